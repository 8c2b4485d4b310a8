"""util/image_io.py: file listing, decoding rules, grey conversion, atomic writes, DICOM."""
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from util.image_io import (FrameIndexError, UnreadableImageError, image_frames, is_image_file, list_images,
                           read_frames, read_image, to_grey, write_image_atomic)

RNG = np.random.default_rng(0)


def random_image(shape, dtype=np.uint8):
    return RNG.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def touch(path, data=b""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------- listing


def test_is_image_file_accepts_image_extensions_in_any_case():
    for name in ["a.png", "b.JPG", "c.jpeg", "d.Bmp", "e.tif", "f.TIFF", "g.webp", "h.DCM", "dir/i.png"]:
        assert is_image_file(name), name


def test_is_image_file_rejects_system_hidden_and_other_files():
    for name in [".DS_Store", "Thumbs.db", "desktop.ini", ".hidden.png", "notes.txt", "labels.csv", "png", "x.gif"]:
        assert not is_image_file(name), name


def test_list_images_walks_any_depth_sorted_posix_and_honours_exclude(tmp_path):
    for rel in ["z.png", "a/b.jpg", "a/b/c.tif", "a/b/c/d.dcm", "masks/m.png", "a/masks/m.png",
                ".cache/x.png", "a/readme.txt", "a/.DS_Store", "a/Thumbs.db"]:
        touch(tmp_path / rel)
    assert list_images(tmp_path, exclude=["masks"]) == ["a/b.jpg", "a/b/c.tif", "a/b/c/d.dcm", "z.png"]
    assert "masks/m.png" in list_images(tmp_path)


def test_list_images_follows_folder_links_without_looping(tmp_path):
    touch(tmp_path / "real" / "x.png")
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink(tmp_path, tmp_path / "real" / "cycle")  # a cycle back to the root
    found = list_images(tmp_path)
    assert "real/x.png" in found and "link/x.png" in found
    assert len(found) == 2


def test_list_images_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- decoding


def test_grey_and_rgb_png_round_trip_in_rgb_order(tmp_path):
    grey, rgb = random_image((20, 30)), random_image((20, 30, 3))
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert np.array_equal(read_image(tmp_path / "g.png"), grey)
    out = read_image(tmp_path / "c.png")
    assert out.dtype == np.uint8 and np.array_equal(out, rgb)  # RGB, not OpenCV's BGR


def test_alpha_is_dropped_and_palette_becomes_rgb(tmp_path):
    rgba = random_image((20, 30, 4))
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgba[:, :, :3])

    la = random_image((20, 30, 2))
    Image.fromarray(la).save(tmp_path / "la.png")
    assert np.array_equal(read_image(tmp_path / "la.png"), la[:, :, 0])

    palette = Image.fromarray(random_image((20, 30, 3))).convert("P")
    palette.save(tmp_path / "p.png")
    assert np.array_equal(read_image(tmp_path / "p.png"), np.asarray(palette.convert("RGB")))


@pytest.mark.parametrize("extension", [".png", ".tif"])
def test_16bit_grey_and_colour_stay_16bit(tmp_path, extension):
    grey, bgr = random_image((20, 30), np.uint16), random_image((20, 30, 3), np.uint16)
    cv2.imwrite(str(tmp_path / f"g{extension}"), grey)
    cv2.imwrite(str(tmp_path / f"c{extension}"), bgr)
    out_grey, out_colour = read_image(tmp_path / f"g{extension}"), read_image(tmp_path / f"c{extension}")
    assert out_grey.dtype == np.uint16 and np.array_equal(out_grey, grey)
    assert out_colour.dtype == np.uint16 and np.array_equal(out_colour, bgr[:, :, ::-1])


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = 255  # bright band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(img).save(tmp_path / "o.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "o.jpg")
    assert out.shape == (40, 20, 3)
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the left band is now on top


def corrupt_files(folder):
    """Zero-byte, truncated and random-bytes files next to a good one; returns their paths."""
    good = folder / "good.png"
    Image.fromarray(random_image((64, 64, 3))).save(good)
    data = good.read_bytes()
    files = {"empty.png": b"", "truncated.png": data[: len(data) // 2],
             "random.png": RNG.bytes(2000), "random.dcm": RNG.bytes(2000), "truncated.jpg": None}
    jpeg = folder / "full.jpg"
    Image.fromarray(random_image((64, 64, 3))).save(jpeg, quality=90)
    files["truncated.jpg"] = jpeg.read_bytes()[:-600]
    jpeg.unlink()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return [folder / name for name in files]


def test_corrupt_files_raise_unreadable_image_error_naming_the_file(tmp_path):
    for path in corrupt_files(tmp_path):
        with pytest.raises(UnreadableImageError) as info:
            read_image(path)
        assert str(path) in str(info.value) and "re-export" in str(info.value)
        assert info.value.path == str(path)


def test_empty_file_message_says_empty(tmp_path):
    touch(tmp_path / "e.png")
    with pytest.raises(UnreadableImageError, match="empty"):
        read_image(tmp_path / "e.png")


def test_frame_out_of_range_is_a_caller_error(tmp_path):
    Image.fromarray(random_image((8, 8))).save(tmp_path / "g.png")
    assert image_frames(tmp_path / "g.png") == 1
    with pytest.raises(FrameIndexError):
        read_image(tmp_path / "g.png", frame=1)


# ----------------------------------------------------------------------------- grey conversion


def test_to_grey_matches_opencv_grey_read_of_colour_png(tmp_path):
    # A million random colours plus the extremes cover libpng's truncating fixed-point arithmetic
    # (all 2**24 colours also match, but writing them takes seconds).
    rgb = random_image((1000, 1000, 3))
    rgb[0, :8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3],
                  [254, 254, 253], [7, 7, 7]]
    cv2.imwrite(str(tmp_path / "c.png"), rgb[:, :, ::-1])
    expected = cv2.imread(str(tmp_path / "c.png"), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(to_grey(read_image(tmp_path / "c.png")), expected)
    # cvtColor rounds differently, so the match above is not a tautology.
    assert not np.array_equal(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), expected)


def test_to_grey_matches_opencv_for_16bit_and_rgba_png(tmp_path):
    bgr16 = random_image((64, 64, 3), np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), bgr16)
    expected = cv2.imread(str(tmp_path / "c16.png"), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    grey = to_grey(read_image(tmp_path / "c16.png"))
    assert grey.dtype == np.uint16 and np.array_equal(grey, expected)

    Image.fromarray(random_image((64, 64, 4))).save(tmp_path / "rgba.png")
    expected = cv2.imread(str(tmp_path / "rgba.png"), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(to_grey(read_image(tmp_path / "rgba.png")), expected)


def test_to_grey_keeps_grey_and_squeezes_one_channel():
    grey = random_image((5, 6))
    assert to_grey(grey) is grey
    assert np.array_equal(to_grey(grey[:, :, None]), grey)
    assert np.array_equal(to_grey(np.stack([grey] * 3, axis=2)), grey)


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("shape,dtype,extension", [
    ((20, 30), np.uint8, ".png"), ((20, 30, 3), np.uint8, ".png"), ((20, 30), np.uint16, ".png"),
    ((20, 30, 3), np.uint16, ".png"), ((20, 30), np.uint16, ".tif"), ((20, 30, 3), np.uint8, ".bmp"),
])
def test_write_image_atomic_is_lossless_for_lossless_formats(tmp_path, shape, dtype, extension):
    img = random_image(shape, dtype)
    path = tmp_path / "sub" / f"out{extension}"
    write_image_atomic(path, img)
    back = read_image(path)
    assert back.dtype == dtype and np.array_equal(back, img)
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind


def test_write_image_atomic_jpeg_keeps_format_and_refuses_16bit(tmp_path):
    write_image_atomic(tmp_path / "x.jpg", random_image((16, 16)))
    assert (tmp_path / "x.jpg").read_bytes()[:2] == b"\xff\xd8"  # JPEG, not PNG, despite any default
    with pytest.raises(ValueError, match="16-bit"):
        write_image_atomic(tmp_path / "y.jpg", random_image((16, 16), np.uint16))


def test_write_image_atomic_replaces_existing_file(tmp_path):
    path = tmp_path / "x.png"
    write_image_atomic(path, np.zeros((4, 4), np.uint8))
    write_image_atomic(path, np.full((4, 4), 9, np.uint8))
    assert read_image(path).max() == 9


# ----------------------------------------------------------------------------- DICOM


def bundled_dicom(name):
    """A DICOM file shipped inside the pydicom package; never downloads."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom installation (it would need a download)")
    return path


def test_multiframe_ybr_ultrasound_cine_reads_as_rgb_frames():
    path = bundled_dicom("examples_ybr_color.dcm")
    assert image_frames(path) == 30
    first, last = read_image(path, 0), read_image(path, 29)
    assert first.shape == last.shape == (240, 320, 3) and first.dtype == np.uint8
    # An ultrasound frame is mostly grey: after YBR -> RGB the channels nearly agree, whereas raw YBR
    # data would differ by ~50 grey levels (chroma planes sit at 128).
    channel_spread = np.abs(first.astype(int) - first.mean(axis=2, keepdims=True)).mean()
    assert channel_spread < 3
    frames = dict(read_frames(path, [0, 29]))
    assert np.array_equal(frames[0], first) and np.array_equal(frames[29], last)
    with pytest.raises(FrameIndexError):
        read_image(path, 30)


def test_rgb_and_jpeg2000_examples_show_the_same_picture():
    rgb = read_image(bundled_dicom("examples_rgb_color.dcm"))
    jpeg2000 = read_image(bundled_dicom("examples_jpeg2k.dcm"))  # YBR_RCT, needs a JPEG 2000 decoder
    assert rgb.shape == (240, 320, 3) and jpeg2000.shape == (480, 640, 3)
    assert image_frames(bundled_dicom("examples_rgb_color.dcm")) == 1
    half = cv2.resize(jpeg2000, (320, 240), interpolation=cv2.INTER_AREA)
    assert np.abs(half.astype(int) - rgb).mean() < 4  # same image, same colour order


def write_dicom(path, pixels, photometric, bits_stored):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data(pixels, photometric, bits_stored)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


def test_dicom_8bit_grey_is_returned_unchanged(tmp_path):
    pixels = random_image((10, 12))
    write_dicom(tmp_path / "g.dcm", pixels, "MONOCHROME2", 8)
    out = read_image(tmp_path / "g.dcm")
    assert out.dtype == np.uint8 and np.array_equal(out, pixels)


def test_dicom_12bit_monochrome1_is_inverted_and_scaled_to_16_bits(tmp_path):
    pixels = np.array([[0, 1, 2048, 4095]], np.uint16)
    write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1", 12)
    out = read_image(tmp_path / "m1.dcm")
    assert out.dtype == np.uint16
    assert out.tolist() == [[4095 << 4, 4094 << 4, 2047 << 4, 0]]


def test_dicom_signed_values_are_shifted_without_loss(tmp_path):
    pixels = np.array([[-32768, -1, 0, 32767]], np.int16)
    write_dicom(tmp_path / "s.dcm", pixels, "MONOCHROME2", 16)
    assert read_image(tmp_path / "s.dcm").tolist() == [[0, 32767, 32768, 65535]]


def write_float_dicom(path, values):
    """A grey DICOM with Float Pixel Data (32-bit), as parametric maps store them."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.30"  # parametric map
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 32
    ds.FloatPixelData = values.astype("<f4").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_float_dicom_is_stretched_and_one_nan_makes_it_unreadable(tmp_path):
    values = np.linspace(-1.0, 3.0, 12, dtype=np.float32).reshape(3, 4)
    write_float_dicom(tmp_path / "ok.dcm", values)
    assert read_image(tmp_path / "ok.dcm").tolist()[0][:2] == [0, 5958]  # min -> 0, step 65535/11
    values[1, 2] = np.nan
    write_float_dicom(tmp_path / "nan.dcm", values)
    with pytest.raises(UnreadableImageError, match="1 of its 12 floating-point pixel values are NaN or infinite") as info:
        read_image(tmp_path / "nan.dcm")  # before: an all-black image
    assert str(tmp_path / "nan.dcm") in str(info.value) and "Re-export" in str(info.value)


def with_declared_frames(source, path, frames):
    import pydicom

    ds = pydicom.dcmread(source)
    ds.NumberOfFrames = frames
    ds.save_as(path)
    return path


def test_dicom_declaring_more_frames_than_its_pixel_data_holds_is_unreadable(tmp_path):
    write_dicom(tmp_path / "one.dcm", random_image((6, 8)), "MONOCHROME2", 8)
    native = with_declared_frames(tmp_path / "one.dcm", tmp_path / "native.dcm", 999_999_999)
    rle = with_declared_frames(bundled_dicom("SC_rgb_rle_2frame.dcm"), tmp_path / "rle.dcm", 999_999_999)
    for path, present in [(native, 1), (rle, 2)]:
        with pytest.raises(UnreadableImageError, match=f"declares 999,999,999 frames .* pixel data hold {present};"):
            image_frames(path)  # before: 999999999 (one dataset entry per declared frame)
        with pytest.raises(UnreadableImageError, match="999,999,999 frames"):
            read_image(path)
    # the counts that agree with the data are taken as declared
    assert image_frames(bundled_dicom("SC_rgb_rle_2frame.dcm")) == 2
    two = with_declared_frames(bundled_dicom("SC_rgb_rle_2frame.dcm"), tmp_path / "two.dcm", 1)
    assert image_frames(two) == 1  # fewer frames than fragments: a frame may span several


def test_truncated_native_dicom_names_the_frames_present(tmp_path):
    pixels = random_image((3, 6, 8))
    write_dicom(tmp_path / "cine.dcm", pixels, "MONOCHROME2", 8)
    assert image_frames(tmp_path / "cine.dcm") == 3
    data = (tmp_path / "cine.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-12])  # the last frame loses 12 of its 48 bytes
    with pytest.raises(UnreadableImageError, match="declares 3 frames .* hold 2;"):
        image_frames(tmp_path / "cut.dcm")


@pytest.fixture
def pixel_limit_100(monkeypatch):
    monkeypatch.setenv("DEBLURRINGMIM_MAX_IMAGE_PIXELS", "100")


@pytest.mark.parametrize("shape,extension", [((10, 11), ".png"), ((10, 11, 3), ".png"), ((25, 25), ".png"),
                                             ((10, 11, 3), ".tif"), ((10, 11), ".jpg")])
def test_image_above_the_pixel_limit_is_refused_before_decoding(tmp_path, pixel_limit_100, shape, extension):
    write_image_atomic(tmp_path / f"small{extension}", random_image((10, 10, *shape[2:])))
    assert read_image(tmp_path / f"small{extension}").shape[:2] == (10, 10)  # at the limit: read
    dtype = np.uint16 if extension == ".tif" else np.uint8  # 16-bit colour goes through OpenCV
    write_image_atomic(tmp_path / f"big{extension}", random_image(shape, dtype))
    # 10 x 11 is just over the limit; 25 x 25 is over twice the limit, where Pillow's own check fires
    with pytest.raises(UnreadableImageError, match="DEBLURRINGMIM_MAX_IMAGE_PIXELS") as info:
        read_image(tmp_path / f"big{extension}")
    assert str(tmp_path / f"big{extension}") in str(info.value)
    if shape[:2] == (10, 11):
        assert "11 x 10 = 110 pixels, above the limit of 100 pixels" in str(info.value)


def test_dicom_above_the_pixel_limit_is_refused_from_its_header(tmp_path, pixel_limit_100):
    write_dicom(tmp_path / "big.dcm", random_image((11, 10)), "MONOCHROME2", 8)
    for read in (image_frames, read_image):
        with pytest.raises(UnreadableImageError, match="10 x 11 = 110 pixels.*DEBLURRINGMIM_MAX_IMAGE_PIXELS=110"):
            read(tmp_path / "big.dcm")


def test_pixel_limit_setting_must_be_a_positive_number(tmp_path, monkeypatch):
    write_image_atomic(tmp_path / "a.png", random_image((4, 4)))
    monkeypatch.setenv("DEBLURRINGMIM_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="DEBLURRINGMIM_MAX_IMAGE_PIXELS='lots' is not a positive number"):
        read_image(tmp_path / "a.png")
    monkeypatch.setenv("DEBLURRINGMIM_MAX_IMAGE_PIXELS", "1e3")
    assert read_image(tmp_path / "a.png").shape == (4, 4)


def test_dangling_link_is_unreadable_naming_the_link(tmp_path):
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    os.symlink(tmp_path / "gone.dcm", tmp_path / "link.dcm")
    assert list_images(tmp_path) == ["link.dcm", "link.png"]
    for name in ["link.png", "link.dcm"]:
        with pytest.raises(UnreadableImageError, match=f"{tmp_path / name}: it is a symbolic link to "
                                                       f"{tmp_path}/gone.*which does not exist. Fix or remove"):
            read_image(tmp_path / name)  # before: a bare FileNotFoundError
    with pytest.raises(FileNotFoundError):  # a path that is simply wrong stays the caller's error
        read_image(tmp_path / "never.png")


def test_to_grey_does_not_copy_a_large_image_to_64_bits():
    import tracemalloc

    img = random_image((600, 500, 3), np.uint16)
    tracemalloc.start()
    grey = to_grey(img)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert grey.shape == (600, 500)
    # the grey result (2 bytes/pixel) plus 32-bit sums of one band of rows; before: 4 x 8 bytes/pixel
    assert peak < grey.nbytes + 3 * 256 * 500 * 4 + 65536, peak


# ----------------------------------------------------------------------------- DICOM without extension, decoders
def test_dicom_without_extension_is_recognised_by_its_preamble(tmp_path):
    import shutil

    from util.image_io import blurred_copy_names, is_dicom_file, scan_images

    source = bundled_dicom("examples_rgb_color.dcm")
    shutil.copy(source, tmp_path / "IM000001")  # the usual name in a scanner's export
    shutil.copy(source, tmp_path / "1.2.840.113619.2.55.1")  # or a UID, whose "extension" is .1
    touch(str(tmp_path / "notes"), b"patient list, not an image " * 10)
    touch(str(tmp_path / "DICOMDIR.txt"), b"x" * 128 + b"DICX")
    write_image_atomic(tmp_path / "a.png", random_image((4, 4)))
    scan = scan_images(tmp_path)
    assert scan.images == ["1.2.840.113619.2.55.1", "IM000001", "a.png"]  # before: only a.png
    assert scan.not_images == ["DICOMDIR.txt", "notes"]
    assert list_images(tmp_path) == scan.images
    assert is_dicom_file(tmp_path / "IM000001") and not is_dicom_file(tmp_path / "notes")
    assert np.array_equal(read_image(tmp_path / "IM000001"), read_image(source))
    assert image_frames(tmp_path / "IM000001") == 1
    assert blurred_copy_names("us/IM000001", 1, True) == ["us/IM000001.png"]
    assert blurred_copy_names("us/1.2.840.1", 2, True) == ["us/1.2.840.1_f000.png", "us/1.2.840.1_f001.png"]
    assert blurred_copy_names("us/scan.DCM", 1, True) == ["us/scan.png"]
    assert blurred_copy_names("us/scan.png", 1, False) == ["us/scan.png"]


@pytest.mark.parametrize("compressed,reference", [
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
    ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE lossless
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"),  # JPEG lossless, process 14 SV1 (colour)
])
def test_compressed_dicom_decodes_to_the_same_pixels_as_its_uncompressed_twin(compressed, reference):
    assert np.array_equal(read_image(bundled_dicom(compressed)), read_image(bundled_dicom(reference)))


def test_12bit_jpeg_extended_and_jpeg_ls_near_lossless_decode():
    extended = read_image(bundled_dicom("JPGExtended.dcm"))  # Pillow alone cannot: 12-bit precision
    assert extended.shape == (1024, 256) and extended.dtype == np.uint16
    assert extended.max() > 0 and not (extended & 0xF).any()  # 12 bits scaled up to 16 by a shift
    near = read_image(bundled_dicom("JPEGLSNearLossless_16.dcm"))
    assert near.shape == (50, 10) and near.std() > 0


def without_decoders(monkeypatch, syntax, keep=()):
    """Make pydicom's decoder of ``syntax`` look as if only the plugins in ``keep`` were installed."""
    from pydicom.pixels import get_decoder

    decoder = get_decoder(syntax)
    available = {k: v for k, v in decoder._available.items() if k in keep}
    unavailable = {k: ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1") for k in decoder._available if k not in keep}
    monkeypatch.setattr(decoder, "_available", available)
    monkeypatch.setattr(decoder, "_unavailable", {**unavailable, "gdcm": ("gdcm>=3.0.10",)})


def test_missing_decoder_is_named_instead_of_calling_the_file_damaged(tmp_path, monkeypatch):
    from pydicom.uid import JPEGExtended12Bit, JPEGLSLossless

    without_decoders(monkeypatch, JPEGLSLossless)
    path = bundled_dicom("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(UnreadableImageError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"cannot read image {path}: no decoder for its compression is installed "
                              "(decoders of its compression, JPEG-LS Lossless Image Compression "
                              "(1.2.840.10008.1.2.4.80), that are not installed: pylibjpeg - requires pylibjpeg>=2.0 "
                              "and pylibjpeg-libjpeg>=2.1")
    assert "gdcm" not in message and "damaged" not in message
    assert "pip install -r requirements.txt" in message
    # only Pillow left for 12-bit JPEG: it fails on this file, and the message says what else could read it
    without_decoders(monkeypatch, JPEGExtended12Bit, keep=("pillow",))
    with pytest.raises(UnreadableImageError, match="12-bit precision.*not installed: pylibjpeg - requires.*"
                                                   "The file may be damaged, or need one of those decoders"):
        read_image(bundled_dicom("JPGExtended.dcm"))
