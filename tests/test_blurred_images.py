"""blurred_images.py: tree mirroring, formats, resume, corrupt files, refusals, DICOM, the published command."""
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

import blurred_images
from util.blur import BLUR_SETTINGS_FILE, BlurSpec
from util.image_io import read_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)


def save_png(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path)


def colour_image(h=32, w=40):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def run(src, dst, *extra, workers=1):
    args = blurred_images.get_args_parser().parse_args(
        ["--src_dir", str(src), "--dst_dir", str(dst), "--workers", str(workers), *extra])
    return blurred_images.main(args)


def run_cli(*argv):
    return subprocess.run([sys.executable, "blurred_images.py", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def relative_files(folder):
    """Every file below ``folder`` but a blurred copy's settings file (tested on its own)."""
    return sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                  for d, _, files in os.walk(folder) for f in files if f != BLUR_SETTINGS_FILE)


def test_published_command_gives_opencv_grey_gaussian_of_every_image(tmp_path):
    src, dst = tmp_path / "dataset_orig", tmp_path / "dataset_blurred"
    for rel in ["train/benign/a.png", "train/malignant/b.png", "val/benign/c.png"]:
        save_png(src / rel, colour_image())
    result = run_cli("--src_dir", f"{src}/", "--dst_dir", f"{dst}/", "--method", "gaussian", "--sigma", "1.1")
    assert result.returncode == 0, result.stderr
    assert "written 3, skipped 0" in result.stdout
    assert relative_files(dst) == relative_files(src)
    for rel in relative_files(src):
        # What the published script computed: OpenCV grey read, then GaussianBlur(sigma 1.1).
        expected = cv2.GaussianBlur(cv2.imread(str(src / rel), cv2.IMREAD_GRAYSCALE), (0, 0), 1.1)
        assert np.array_equal(cv2.imread(str(dst / rel), cv2.IMREAD_UNCHANGED), expected), rel


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_tree_is_mirrored_at_any_depth_and_non_images_ignored(tmp_path, depth):
    src, dst = tmp_path / "src", tmp_path / "dst"
    folder = "/".join(f"level{i}" for i in range(depth - 1))
    images = [f"{folder}/x.png".lstrip("/"), f"{folder}/y.jpg".lstrip("/"), "top.png"]
    for rel in images:
        save_png(src / rel, colour_image())
    for junk in ["notes.txt", ".DS_Store", "Thumbs.db", f"{folder}/.hidden.png".lstrip("/")]:
        (src / junk).write_bytes(b"not an image")
    summary = run(src, dst)
    assert summary.written == 3 and not summary.failed
    assert relative_files(dst) == sorted(images)
    assert (dst / images[1]).read_bytes()[:2] == b"\xff\xd8"  # JPEG stays JPEG


def test_exclude_skips_mask_folders_at_any_depth(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel in ["images/train/a.png", "masks/train/a.png", "sub/masks/b.png"]:
        save_png(src / rel, colour_image())
    run(src, dst, "--exclude", "masks")
    assert relative_files(dst) == ["images/train/a.png"]


def test_keep_channels_16bit_and_rgba_inputs(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    rgb = colour_image()
    save_png(src / "rgb.png", rgb)
    rgba = RNG.integers(0, 256, (32, 40, 4), dtype=np.uint8)
    save_png(src / "rgba.png", rgba)
    grey16 = RNG.integers(0, 65536, (32, 40), dtype=np.uint16)
    cv2.imwrite(str(src / "grey16.png"), grey16)
    cv2.imwrite(str(src / "grey16.tif"), grey16)

    run(src, dst / "grey")
    assert read_image(dst / "grey" / "rgb.png").ndim == 2
    assert read_image(dst / "grey" / "rgba.png").shape == (32, 40)
    for name in ["grey16.png", "grey16.tif"]:
        out = read_image(dst / "grey" / name)
        assert out.dtype == np.uint16
        assert np.array_equal(out, cv2.GaussianBlur(grey16, (0, 0), 1.1))

    run(src, dst / "colour", "--keep_channels")
    assert np.array_equal(read_image(dst / "colour" / "rgb.png"), BlurSpec().apply(rgb))
    assert np.array_equal(read_image(dst / "colour" / "rgba.png"), BlurSpec().apply(rgba[:, :, :3].copy()))


def test_resume_skips_existing_outputs_and_overwrite_redoes_them(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel in ["a/1.png", "a/2.png", "b/3.png"]:
        save_png(src / rel, colour_image())
    first = run(src, dst)
    assert (first.written, first.skipped) == (3, 0)

    marker = np.zeros((4, 4), np.uint8)
    save_png(dst / "a/1.png", marker)  # stands for an output from an earlier, interrupted run
    (dst / "b/3.png").unlink()  # ...which never got to this one
    second = run(src, dst)
    assert (second.written, second.skipped) == (1, 2)
    assert read_image(dst / "a/1.png").shape == (4, 4)  # left alone
    assert read_image(dst / "b/3.png").shape == (32, 40)

    third = run(src, dst, "--overwrite")
    assert (third.written, third.skipped) == (3, 0)
    assert read_image(dst / "a/1.png").shape == (32, 40)


def test_corrupt_files_are_reported_by_name_skipped_and_fail_the_run(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_png(src / "ok/good.png", colour_image())
    good = (src / "ok/good.png").read_bytes()
    (src / "bad").mkdir()
    (src / "bad/empty.png").write_bytes(b"")
    (src / "bad/truncated.png").write_bytes(good[: len(good) // 2])
    (src / "bad/random.jpg").write_bytes(RNG.bytes(3000))
    result = run_cli("--src_dir", src, "--dst_dir", dst, "--workers", 2)
    assert result.returncode == 1
    assert "written 1, skipped 0 (already there), failed 3" in result.stdout
    for name in ["empty.png", "truncated.png", "random.jpg"]:
        assert str(src / "bad" / name) in result.stderr
    assert relative_files(dst) == ["ok/good.png"]  # nothing half-written for the bad ones


@pytest.mark.parametrize("inside", ["", "blurred", "a/b"])
def test_refuses_to_write_into_the_source_tree(tmp_path, inside):
    src = tmp_path / "src"
    save_png(src / "a/x.png", colour_image())
    with pytest.raises(blurred_images.UsageError, match="inside"):
        run(src, src / inside)
    assert relative_files(src) == ["a/x.png"]


def test_refusal_and_missing_source_exit_with_status_2(tmp_path):
    save_png(tmp_path / "src/x.png", colour_image())
    refused = run_cli("--src_dir", tmp_path / "src", "--dst_dir", tmp_path / "src/out")
    assert refused.returncode == 2 and "Choose a destination outside it" in refused.stderr
    missing = run_cli("--src_dir", tmp_path / "nope", "--dst_dir", tmp_path / "dst")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run_cli("--src_dir", tmp_path / "empty", "--dst_dir", tmp_path / "dst")
    assert empty.returncode == 2 and "no images found" in empty.stderr


def test_parallel_run_matches_single_process_and_motion_uses_per_file_keys(tmp_path):
    src = tmp_path / "src"
    for i in range(12):
        save_png(src / f"d{i % 3}/img{i}.png", colour_image())
    run(src, tmp_path / "serial", "--method", "motion", "--seed", "5", workers=1)
    run(src, tmp_path / "parallel", "--method", "motion", "--seed", "5", workers=2)
    spec = BlurSpec("motion", seed=5)
    for rel in relative_files(src):
        serial, parallel = read_image(tmp_path / "serial" / rel), read_image(tmp_path / "parallel" / rel)
        assert np.array_equal(serial, parallel)
        # The on-the-fly pipeline blurs the same file identically when it passes the relative path.
        grey = cv2.imread(str(src / rel), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(serial, spec.apply(grey, key=rel))


@pytest.mark.parametrize("method", ["mean", "median", "defocus", "srad"])
def test_other_methods_run_from_the_command_line(tmp_path, method):
    save_png(tmp_path / "src/x.png", colour_image())
    summary = run(tmp_path / "src", tmp_path / "dst", "--method", method, "--kernel_size", "7",
                  "--srad_iterations", "3")
    grey = cv2.imread(str(tmp_path / "src/x.png"), cv2.IMREAD_GRAYSCALE)
    expected = BlurSpec(method, kernel_size=7, srad_iterations=3).apply(grey)
    assert summary.written == 1 and np.array_equal(read_image(tmp_path / "dst/x.png"), expected)


def test_dicom_becomes_png_one_file_per_frame(tmp_path):
    from pydicom.data import get_testdata_file

    cine = get_testdata_file("examples_ybr_color.dcm", download=False)
    single = get_testdata_file("examples_rgb_color.dcm", download=False)
    if cine is None or single is None:
        pytest.skip("pydicom's bundled example files are missing from this installation")
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "us").mkdir(parents=True)
    shutil.copy(cine, src / "us/cine.dcm")
    shutil.copy(single, src / "us/still.DCM")
    summary = run(src, dst)
    assert summary.written == 31 and not summary.failed
    expected = sorted([f"us/cine_f{i:03d}.png" for i in range(30)] + ["us/still.png"])
    assert relative_files(dst) == expected
    frame = read_image(dst / "us/cine_f007.png")
    assert frame.shape == (240, 320) and frame.dtype == np.uint8

    (dst / "us/cine_f010.png").unlink()
    resumed = run(src, dst)
    assert (resumed.written, resumed.skipped) == (1, 30)


def test_dicom_whose_png_name_is_taken_fails_instead_of_being_skipped(tmp_path):
    from pydicom.data import get_testdata_file

    single = get_testdata_file("examples_rgb_color.dcm", download=False)
    if single is None:
        pytest.skip("pydicom's bundled example files are missing from this installation")
    src = tmp_path / "src"
    save_png(src / "scan.png", colour_image())
    shutil.copy(single, src / "scan.dcm")
    summary = run(src, tmp_path / "dst")
    assert summary.written == 1 and summary.failed == ["scan.dcm"]


# ------------------------------------------------------------------------------ outputs that are originals
def tree_bytes(folder):
    return {rel: (folder / rel).read_bytes() for rel in relative_files(folder)}


@pytest.mark.parametrize("overwrite", [False, True])
def test_destination_that_contains_the_source_is_refused_and_originals_kept(tmp_path, overwrite):
    # dst = parent of src: the output of src/data/a.png is dst/data/a.png, which *is* the original
    # src/a.png; without --overwrite it stood in as the blurred copy, with it it was replaced.
    src = tmp_path / "data"
    for rel in ["a.png", "data/a.png", "b/c.png"]:
        save_png(src / rel, colour_image())
    before = tree_bytes(src)
    extra = ["--overwrite"] if overwrite else []
    with pytest.raises(blurred_images.UsageError, match="contains the source folder"):
        run(src, tmp_path, *extra)
    assert tree_bytes(src) == before
    result = run_cli("--src_dir", src, "--dst_dir", tmp_path, "--workers", 1, *extra)
    assert result.returncode == 2 and f"--dst_dir {tmp_path} contains the source folder" in result.stderr
    assert tree_bytes(src) == before and not (tmp_path / "b").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_destination_folder_linked_into_the_source_is_refused(tmp_path, overwrite):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel in ["a/x.png", "b/y.png"]:
        save_png(src / rel, colour_image())
    dst.mkdir()
    os.symlink(src / "b", dst / "b")  # dst/b/y.png would be written through the link onto src/b/y.png
    before = tree_bytes(src)
    extra = ["--overwrite"] if overwrite else []
    result = run_cli("--src_dir", src, "--dst_dir", dst, "--workers", 1, *extra)
    assert result.returncode == 2, result.stdout
    assert f"the output folder {dst / 'b'} is the source folder {src / 'b'}" in result.stderr
    assert "remove that link" in result.stderr and "Traceback" not in result.stderr
    assert tree_bytes(src) == before
    assert not (dst / "a").exists()  # refused before anything was written


@pytest.mark.parametrize("link", ["hard", "symbolic"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_output_that_is_a_link_to_an_original_is_refused(tmp_path, link, overwrite):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel in ["a/x.png", "a/y.png"]:
        save_png(src / rel, colour_image())
    (dst / "a").mkdir(parents=True)
    (os.link if link == "hard" else os.symlink)(src / "a/x.png", dst / "a/x.png")
    before = tree_bytes(src)
    extra = ["--overwrite"] if overwrite else []
    with pytest.raises(blurred_images.UsageError, match=f"the output {dst / 'a/x.png'} is the source image "
                                                        f"{src / 'a/x.png'}"):
        run(src, dst, *extra)
    assert tree_bytes(src) == before
    assert not (dst / "a/y.png").exists()  # refused before anything was written


def test_dicom_frame_output_hard_linked_to_an_original_is_refused(tmp_path):
    from pydicom.data import get_testdata_file

    single = get_testdata_file("examples_rgb_color.dcm", download=False)
    if single is None:
        pytest.skip("pydicom's bundled example files are missing from this installation")
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_png(src / "other.png", colour_image())
    shutil.copy(single, src / "scan.dcm")
    dst.mkdir()
    os.link(src / "other.png", dst / "scan.png")  # would "already be" scan.dcm's blurred copy
    with pytest.raises(blurred_images.UsageError, match="scan.png is the source image"):
        run(src, dst)


def test_unrelated_links_in_the_destination_are_fine(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_png(src / "a/x.png", colour_image())
    (dst / "a").mkdir(parents=True)
    os.symlink(src / "a/x.png", dst / "a/not_an_output.png")  # never written to: harmless
    os.symlink(src, dst / "unused_link")
    summary = run(src, dst)
    assert summary.written == 1 and not summary.failed


def test_dangling_link_in_the_source_is_reported_by_name(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_png(src / "a/x.png", colour_image())
    os.symlink(src / "a/moved.png", src / "a/gone.png")
    result = run_cli("--src_dir", src, "--dst_dir", dst, "--workers", 1)
    assert result.returncode == 1 and "written 1, skipped 0 (already there), failed 1" in result.stdout
    assert f"{src / 'a/gone.png'}: it is a symbolic link to {src / 'a/moved.png'}, which does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_dicom_without_extension_is_blurred_and_non_images_are_counted(tmp_path):
    from pydicom.data import get_testdata_file

    single = get_testdata_file("examples_rgb_color.dcm", download=False)
    cine = get_testdata_file("examples_ybr_color.dcm", download=False)
    if single is None or cine is None:
        pytest.skip("pydicom's bundled example files are missing from this installation")
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "export/series1").mkdir(parents=True)
    shutil.copy(single, src / "export/series1/IM000001")
    shutil.copy(cine, src / "export/series1/IM000002")
    save_png(src / "other/x.png", colour_image())
    (src / "export/notes.txt").write_text("not an image")
    (src / "export/DICOMDIR").write_bytes(b"\0" * 200)  # no preamble: not an image file
    result = run_cli("--src_dir", src, "--dst_dir", dst, "--workers", 1)
    assert result.returncode == 0, result.stderr
    assert "2 file(s) in" in result.stdout and "are not images and are left out (e.g. export/DICOMDIR" in result.stdout
    assert "written 32, skipped 0 (already there), failed 0; 2 non-image file(s) left out" in result.stdout
    expected = ["export/series1/IM000001.png"] + [f"export/series1/IM000002_f{i:03d}.png" for i in range(30)]
    assert relative_files(dst) == sorted(expected + ["other/x.png"])  # before: only other/x.png
    from util.image_io import to_grey
    assert np.array_equal(read_image(dst / "export/series1/IM000001.png"),
                          BlurSpec().apply(to_grey(read_image(single)), key="export/series1/IM000001"))


def test_dicom_without_extension_whose_png_name_is_taken_fails(tmp_path):
    from pydicom.data import get_testdata_file

    single = get_testdata_file("examples_rgb_color.dcm", download=False)
    if single is None:
        pytest.skip("pydicom's bundled example files are missing from this installation")
    src = tmp_path / "src"
    save_png(src / "IM000001.png", colour_image())
    shutil.copy(single, src / "IM000001")
    summary = run(src, tmp_path / "dst")
    assert summary.written == 1 and summary.failed == ["IM000001"]


# ------------------------------------------------------------------------------ settings file
def settings(dst):
    return json.load(open(dst / BLUR_SETTINGS_FILE))


def test_the_copy_records_its_settings_and_refuses_other_settings_unless_overwrite(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel in ["train/a.png", "val/b.png"]:
        save_png(src / rel, colour_image())
    run(src, dst, "--method", "median", "--kernel_size", "3")
    assert settings(dst) == {"written_by": "blurred_images.py", "blur": {"method": "median", "kernel_size": 3},
                             "channels": "grey", "source": str(src), "pending": False}
    before = (dst / "train/a.png").read_bytes()
    # other settings would keep the images already there: a copy of two blurs
    for other in (["--method", "median", "--kernel_size", "5"], ["--method", "median", "--kernel_size", "3",
                                                                 "--keep_channels"]):
        with pytest.raises(blurred_images.UsageError, match=r"holds images blurred with median \(kernel 3\), grey.*"
                                                            "--overwrite"):
            run(src, dst, *other)
    assert (dst / "train/a.png").read_bytes() == before and settings(dst)["blur"]["kernel_size"] == 3
    run(src, dst, "--method", "median", "--kernel_size", "3")  # the same settings resume
    summary = run(src, dst, "--method", "gaussian", "--sigma", "2", "--overwrite")
    assert summary.written == 2 and settings(dst)["blur"] == {"method": "gaussian", "sigma": 2.0}
    assert settings(dst)["pending"] is False


def test_an_unfinished_overwrite_marks_the_copy_as_mixed(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel in ["a.png", "b.png"]:
        save_png(src / rel, colour_image())
    run(src, dst)
    original = blurred_images.blur_file

    def fails_on_b(task):
        return blurred_images.FileResult(task.relative_path, error="disk full") if task.relative_path == "b.png" \
            else original(task)
    monkeypatch.setattr(blurred_images, "blur_file", fails_on_b)
    summary = run(src, dst, "--sigma", "3", "--overwrite")
    assert summary.failed == ["b.png"] and settings(dst)["pending"] is True  # b.png still has sigma 1.1
    monkeypatch.setattr(blurred_images, "blur_file", original)
    with pytest.raises(blurred_images.UsageError, match="did not finish.*--overwrite"):
        run(src, dst, "--sigma", "3")
    from util.provenance import data_blur
    from util.datasets import DatasetError
    with pytest.raises(DatasetError, match="mixes two blurs"):
        data_blur(str(dst))
    run(src, dst, "--sigma", "3", "--overwrite")
    assert settings(dst)["pending"] is False and data_blur(str(dst)).spec == BlurSpec(sigma=3.0)
