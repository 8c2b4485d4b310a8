"""Bad and odd input across the scripts: every failure names the file and the fix; every odd but valid
image (tiny, huge, 16-bit, RGBA, palette, non-square, DICOM colour) trains. In-process, tiny models.
Cases already covered elsewhere are listed in docs/reliability.md with their tests."""
import json
import os
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import main_finetune
import main_pretrain
from util.blur import BlurSpec
from util.checkpoint import save_checkpoint
from util.cls_datasets import ClassificationDataset, build_transform
from util.datasets import DatasetError, PretrainDataset, pixels_to_unit
from util.registry import pretrain_models

from cli_args import finetune_args, pretrain_args

SEG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "SEG")
RNG = np.random.default_rng(0)


def smooth(shape, dtype=np.uint8):
    top = 65535 if dtype == np.uint16 else 255
    img = cv2.GaussianBlur(RNG.random(shape[:2]).astype(np.float32), (0, 0), 2)
    img = np.clip(img * 0.6 + 0.2, 0, 1)
    if len(shape) == 3:
        img = np.repeat(img[:, :, None], shape[2], axis=2)
    return (img * top).astype(dtype)


def png_bytes(img):
    return cv2.imencode(".png", img)[1].tobytes()


def jpeg_bytes(img):
    return cv2.imencode(".jpg", img)[1].tobytes()


BAD_FILES = {  # name -> bytes: what a damaged dataset holds
    "zero_byte.png": lambda: b"",
    "truncated.png": lambda: png_bytes(smooth((40, 48)))[:200],
    "truncated.jpg": lambda: jpeg_bytes(smooth((40, 48)))[:300],
    "random_bytes.png": lambda: RNG.bytes(2000),
}


def odd_images(folder):
    """Valid images a real dataset contains; all must load."""
    os.makedirs(folder, exist_ok=True)
    cv2.imwrite(os.path.join(folder, "small_8x8.png"), smooth((8, 8)))  # smaller than the 32 px crop
    cv2.imwrite(os.path.join(folder, "deep_16bit.png"), smooth((40, 48), np.uint16))
    cv2.imwrite(os.path.join(folder, "rgba.png"), smooth((40, 48, 4)))
    Image.fromarray(smooth((40, 48, 3))).convert("P").save(os.path.join(folder, "palette.png"))
    cv2.imwrite(os.path.join(folder, "wide_20x90.png"), smooth((20, 90)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display
    Image.fromarray(smooth((30, 50, 3))).save(os.path.join(folder, "exif_rotated.jpg"), exif=exif.tobytes())
    from pydicom.data import get_testdata_file
    for name in ("examples_rgb_color.dcm", "examples_jpeg2k.dcm"):  # colour DICOM (bundled with pydicom)
        with open(get_testdata_file(name), "rb") as src, open(os.path.join(folder, name), "wb") as dst:
            dst.write(src.read())


def error_of(cli, argv):
    with pytest.raises(SystemExit) as info:
        cli(argv)
    return str(info.value)


# ------------------------------------------------------------------------------ damaged image files
@pytest.fixture(scope="module")
def damaged_tree(tmp_path_factory):
    """train/ only (no val/: pretraining runs without validation), odd but valid images, 4 damaged files."""
    root = tmp_path_factory.mktemp("damaged")
    odd_images(str(root / "train" / "odd"))
    (root / "train" / "plain").mkdir()
    for i in range(4):
        cv2.imwrite(str(root / "train" / "plain" / f"{i}.png"), smooth((40, 48)))
    for name, make in BAD_FILES.items():
        (root / "train" / "bad" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "train" / "bad" / name).write_bytes(make())
    return root


def test_pretrain_skips_damaged_files_naming_each_and_strict_data_stops_naming_the_file(damaged_tree, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main_pretrain.cli(pretrain_args(damaged_tree, tmp_path / "lenient", "--batch_size", "2"))
    skipped = "\n".join(str(w.message) for w in caught if str(w.message).startswith("skipping"))
    for name in BAD_FILES:
        assert name in skipped, skipped
    log = json.loads(open(tmp_path / "lenient" / "log.txt").read())
    assert log["train_skipped_files"] >= 4 and "val_loss" not in log  # counted; no val/: trains without it
    # --strict_data, also through a DataLoader worker: the error survives the worker boundary whole
    # (one batch of all 16 files: a larger one would be no full batch, refused before any file is read)
    message = error_of(main_pretrain.cli, pretrain_args(damaged_tree, tmp_path / "strict", "--strict_data",
                                                        "--num_workers", "1", "--batch_size", "16"))
    assert message.startswith("error: cannot read image ") and "/bad/" in message
    assert "re-export or re-copy it, or move it out of the dataset folder" in message and "--strict_data" in message


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_finetune_dataset_skips_or_stops_at_each_damaged_file(damaged_tree, name, tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "ok.png").write_bytes(png_bytes(smooth((40, 48))))
    (tmp_path / "train" / "a" / name).write_bytes((damaged_tree / "train" / "bad" / name).read_bytes())
    lenient = ClassificationDataset(str(tmp_path), "train", ["a"])
    index = [i for i in range(len(lenient)) if lenient.sample_name(i).endswith(name)][0]
    with pytest.warns(UserWarning, match=f"skipping .*{name}"):
        assert lenient[index] is None
    strict = ClassificationDataset(str(tmp_path), "train", ["a"], strict=True)
    with pytest.raises(DatasetError, match=f"{name}.*re-export or re-copy it.*--strict_data"):
        strict[index]


def test_odd_but_valid_images_load_in_pretraining_and_finetuning(damaged_tree):
    folder = str(damaged_tree / "train" / "odd")
    pre = PretrainDataset(folder, input_size=32)
    cls = ClassificationDataset(str(damaged_tree), "train", ["odd"],
                                transform=build_transform(True, (32, 32), 3, (0.5,) * 3, (0.25,) * 3))
    assert len(pre) == len(cls) == 8
    for i in range(len(pre)):
        image, _, skipped = pre[i]
        # grey files stay one channel until the device; 16-bit files stay float in [0, 1]
        assert skipped == 0 and image.shape[1:] == (32, 32) and image.shape[0] in (1, 3)
        unit = pixels_to_unit(image)
        assert 0 <= unit.min() and unit.max() <= 1
        assert unit.std() > 0, pre.samples[i][0]  # real content, not a blank stand-in
        image, label, _ = cls[i]
        assert image.shape == (3, 32, 32) and torch.isfinite(image).all()


def peak_rss_mib():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) // 1024


def test_huge_image_loads_without_crash_and_with_bounded_memory(tmp_path):
    path = tmp_path / "train" / "a" / "huge.png"
    path.parent.mkdir(parents=True)
    img = np.zeros((10000, 10000), np.uint8)
    img[::7] = 200
    cv2.imwrite(str(path), img)
    del img
    try:  # reset the peak-RSS counter (Linux); without it only "no crash" is checked
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = peak_rss_mib()
    except OSError:
        base = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning above 89 Mpixel
        image, _, skipped = PretrainDataset(str(tmp_path / "train"), input_size=32)[0]
        crop, _, _ = ClassificationDataset(str(tmp_path), "train", ["a"], transform=build_transform(
            True, (32, 32), 3, (0.5,) * 3, (0.25,) * 3))[0]
    assert image.shape == (1, 32, 32) and crop.shape == (3, 32, 32) and skipped == 0
    if base is not None:
        # 100 MB of pixels: pretraining holds the uint8 decode and a copy of its crop (grey stays one
        # channel); fine-tuning's transform holds more. Bounded either way.
        assert peak_rss_mib() - base < 2500


def peak_over(action):
    """Peak resident memory (MiB) above the current one while ``action`` runs; None off Linux."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter to the current RSS
    except OSError:
        action()
        return None
    start = peak_rss_mib()
    action()
    return peak_rss_mib() - start


@pytest.mark.parametrize("mode", ["vanilla", "blur", "finetune"])
def test_16bit_colour_png_peak_memory_follows_its_size(tmp_path, mode):
    """A 3000 x 3000 16-bit RGB PNG (51 MiB decoded, a few hundred KiB on disk): one sample may
    cost about twice the decoded size (OpenCV's PNG decoder itself holds two copies: 103-131 MiB
    measured), not the four to eight of 32/64-bit conversion copies (before: over 154 MiB with
    blur, 206 MiB fine-tuning; a 12000 x 12000 scan peaked at 7.4 GB)."""
    path = tmp_path / "train" / "a" / "big.png"
    path.parent.mkdir(parents=True)
    img = np.zeros((3000, 3000, 3), np.uint16)
    img[::7] = 50000
    img[:, ::5, 1] = 1234
    cv2.imwrite(str(path), img)
    decoded_mib = img.nbytes / 2**20
    del img
    if mode == "finetune":
        ds = ClassificationDataset(str(tmp_path), "train", ["a"], transform=build_transform(
            True, (32, 32), 3, (0.5,) * 3, (0.25,) * 3))
    else:
        ds = PretrainDataset(str(tmp_path / "train"), input_size=32,
                             blur=BlurSpec() if mode == "blur" else None)
    peak = peak_over(lambda: ds[0])
    if peak is not None:
        assert peak < 3 * decoded_mib, f"{peak} MiB for a {decoded_mib:.0f} MiB image"


def bad_input_file(kind, folder):
    """One file of ``kind`` in ``folder``; returns its name."""
    from test_image_io import write_dicom, write_float_dicom

    if kind == "dangling_link":
        os.symlink(os.path.join(folder, "moved_away.png"), os.path.join(folder, "dangling.png"))
        return "dangling.png"
    if kind == "nan_float_dicom":
        values = smooth((20, 24)).astype(np.float32)
        values[3, 4] = np.nan
        write_float_dicom(os.path.join(folder, "nan.dcm"), values)
        return "nan.dcm"
    # a 1-frame DICOM whose header declares 999,999,999 frames
    import pydicom
    write_dicom(os.path.join(folder, "lying.dcm"), smooth((20, 24)), "MONOCHROME2", 8)
    ds = pydicom.dcmread(os.path.join(folder, "lying.dcm"))
    ds.NumberOfFrames = 999_999_999
    ds.save_as(os.path.join(folder, "lying.dcm"))
    return "lying.dcm"


@pytest.mark.parametrize("kind", ["dangling_link", "nan_float_dicom", "frames_beyond_pixel_data"])
def test_dangling_links_nan_dicoms_and_lying_frame_counts_are_skipped_or_stop_strict(tmp_path, kind):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(folder / f"{i}.png"), smooth((40, 48)))
    name = bad_input_file(kind, str(folder))
    pre = PretrainDataset(str(tmp_path / "train"), input_size=32)
    cls = ClassificationDataset(str(tmp_path), "train", ["a"])
    assert len(pre) == len(cls) == 3  # one entry for the bad file, never one per declared frame
    index = [i for i in range(3) if pre.samples[i][0].endswith(name)][0]
    with pytest.warns(UserWarning, match=f"skipping {folder / name}: "):
        image, _, skipped = pre[index]
    assert skipped == 1 and pixels_to_unit(image).std() > 0  # the next readable image stands in
    with pytest.warns(UserWarning, match=f"skipping {folder / name}: "):
        assert cls[index] is None
    for strict in (PretrainDataset(str(tmp_path / "train"), input_size=32, strict=True),
                   ClassificationDataset(str(tmp_path), "train", ["a"], strict=True)):
        with pytest.raises(DatasetError, match=f"cannot read image {folder / name}: .*--strict_data"):
            strict[index]


def test_missing_data_folder_names_it(tmp_path):
    message = error_of(main_pretrain.cli, pretrain_args(tmp_path / "nope", tmp_path / "out"))
    assert str(tmp_path / "nope") in message and "--data_path_blurred" in message


def test_blurred_copy_of_another_size_names_both_files(tmp_path):
    for tree, size in (("orig", (40, 48)), ("blur", (40, 40))):
        (tmp_path / tree / "train" / "a").mkdir(parents=True)
        cv2.imwrite(str(tmp_path / tree / "train" / "a" / "x.png"), smooth(size))
    ds = PretrainDataset(str(tmp_path / "blur" / "train"), orig_root=str(tmp_path / "orig" / "train"), input_size=32)
    with pytest.raises(DatasetError, match=r"blur/train/a/x.png is 40x40 but its original .*orig/train/a/x.png is "
                                           r"48x40; re-create the blurred copy"):
        ds[0]


# ------------------------------------------------------------------------------ colour decided once per run
@pytest.fixture(scope="module")
def colour_tree(tmp_path_factory):
    """train/val/test, two classes, 3 colour (RGB) and 1 grey image per class folder."""
    root = tmp_path_factory.mktemp("colour")
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                img = smooth((40, 48, 3))
                img[:, :, i] = 255 - img[:, :, i]  # real colour: the channels differ
                cv2.imwrite(str(root / split / cls / f"{i}.png"), img)
            cv2.imwrite(str(root / split / cls / "grey.png"), smooth((40, 48)))
    (root / "val" / "a" / "notes.txt").write_text("not an image")
    return root


def all_channels_equal(img):
    return np.array_equal(img[:, :, 0], img[:, :, 1]) and np.array_equal(img[:, :, 1], img[:, :, 2])


@pytest.mark.parametrize("blur", [None, BlurSpec()])
def test_finetune_inputs_follow_one_colour_decision_with_or_without_blur(colour_tree, blur):
    grey = ClassificationDataset(str(colour_tree), "train", ["a", "b"], blur=blur)
    colour = ClassificationDataset(str(colour_tree), "train", ["a", "b"], blur=blur, keep_channels=True)
    for i in range(len(grey)):
        g, c = grey.load_pixels(i), colour.load_pixels(i)
        assert g.shape == c.shape and g.shape[2] == 3
        assert all_channels_equal(g)  # grey, replicated for a 3-channel model
        # before: colour without --blur but grey with it, so the two arms saw different images
        assert all_channels_equal(c) == grey.sample_name(i).endswith("grey.png")


def test_scripts_print_how_many_colour_images_and_the_conversion(colour_tree, tmp_path, capsys):
    main_pretrain.cli(pretrain_args(colour_tree / "train", tmp_path / "pre", "--batch_size", "2"))
    main_finetune.cli(finetune_args(colour_tree, tmp_path / "fine", "--keep_channels"))
    out = capsys.readouterr().out
    assert ("colour: 6 of 8 images are stored in colour; input and target both converted to grey "
            "(--keep_channels keeps colour)") in out
    assert "colour: 6 of 8 images are stored in colour; kept in colour for input and target alike" in out
    assert f"1 file(s) in {colour_tree / 'val'} are not images and are left out (e.g. a/notes.txt)" in out
    message = error_of(main_pretrain.cli, pretrain_args(colour_tree / "train", tmp_path / "x", "--in_chans", "1",
                                                        "--keep_channels"))
    assert "--keep_channels keeps colour, which a 1-channel model cannot take" in message


# ------------------------------------------------------------------------------ class folders
def test_empty_class_folder_is_an_error_in_train_and_a_warning_elsewhere(tmp_path):
    for split in ("train", "val", "test"):
        for cls in ("benign", "malignant"):
            (tmp_path / split / cls).mkdir(parents=True)
            if not (cls == "malignant" and split in ("train", "test")):
                for i in range(4):
                    cv2.imwrite(str(tmp_path / split / cls / f"{i}.png"), smooth((40, 48)))
    message = error_of(main_finetune.cli, finetune_args(tmp_path, tmp_path / "out"))
    assert str(tmp_path / "train" / "malignant") in message and "Add images to it" in message
    with pytest.warns(UserWarning, match="test/malignant: no test images of class"):
        ClassificationDataset(str(tmp_path), "test", ["benign", "malignant"])


# ------------------------------------------------------------------------------ checkpoints given to the scripts
@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                cv2.imwrite(str(root / split / cls / f"{i}.png"), smooth((40, 48)))
    return root


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    save_checkpoint({"model": pretrain_models().create("convmae_convvit_tiny_patch16", img_size=32).state_dict()},
                    folder / "convmae.pth")
    save_checkpoint({"model": pretrain_models().create("mae_vit_tiny_patch16", img_size=32).state_dict()},
                    folder / "mae.pth")
    data = (folder / "mae.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 3])
    return folder


@pytest.mark.parametrize("script,flag", [("pretrain", "--resume"), ("finetune", "--finetune"),
                                         ("finetune", "--resume")])
def test_truncated_checkpoint_names_the_file_and_the_fix(script, flag, small_tree, bad_checkpoints, tmp_path):
    path = str(bad_checkpoints / "truncated.pth")
    if script == "pretrain":
        message = error_of(main_pretrain.cli, pretrain_args(small_tree, tmp_path, flag, path))
    else:
        message = error_of(main_finetune.cli, finetune_args(small_tree, tmp_path, flag, path))
    assert f"{path}: not a readable PyTorch checkpoint (truncated or corrupt" in message
    assert "Copy or download it again" in message


def test_pretrain_resume_from_another_architecture_names_the_file_and_model(small_tree, bad_checkpoints, tmp_path):
    path = str(bad_checkpoints / "convmae.pth")
    message = error_of(main_pretrain.cli, pretrain_args(small_tree, tmp_path, "--resume", path))
    assert path in message and "another architecture" in message and "check --model" in message


# ------------------------------------------------------------------------------ segmentation data
@pytest.fixture(scope="module")
def seg_dataset_class():
    if SEG_DIR not in sys.path:
        sys.path.append(SEG_DIR)
    import mmseg_compat  # noqa: F401  (before any mmseg import)
    import mmseg_custom  # noqa: F401
    from mmseg.utils import register_all_modules
    register_all_modules()
    from mmseg_custom.us_dataset import UltrasoundNoduleDataset
    return UltrasoundNoduleDataset


@pytest.mark.parametrize("target", ["images", "masks"])
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_segmentation_damaged_image_or_mask_names_the_file_at_start(seg_dataset_class, target, name, tmp_path):
    from util.image_io import UnreadableImageError
    stem = name.rsplit(".", 1)[0] + ".png"  # the dataset pairs .png images with .png masks
    for folder in ("images", "masks"):
        (tmp_path / folder / "train").mkdir(parents=True)
        for file in ("ok.png", stem):
            cv2.imwrite(str(tmp_path / folder / "train" / file), smooth((16, 20)) if folder == "images"
                        else np.zeros((16, 20), np.uint8))
    bad = tmp_path / target / "train" / stem
    bad.write_bytes(BAD_FILES[name]())
    with pytest.raises(UnreadableImageError, match=f"{bad}: .*re-export or re-copy it"):
        seg_dataset_class(data_root=str(tmp_path), data_prefix=dict(img_path="images/train",
                                                                   seg_map_path="masks/train"), pipeline=[])
