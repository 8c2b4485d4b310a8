"""util/blur.py: OpenCV parity, every method on every dtype/layout, motion reproducibility, SRAD, CLI."""
import argparse

import cv2
import numpy as np
import pytest

from util.blur import (METHODS, BlurSpec, add_blur_arguments, blur_key, blur_spec_from_args, disk_kernel,
                       median_blur, motion_angle, motion_kernel, srad)


def textured_image(shape, dtype):
    """Smooth structure plus noise, spanning most of the dtype's range (blurring must change it)."""
    rng = np.random.default_rng(1)
    h, w = shape[:2]
    ramp = np.add.outer(np.linspace(0.1, 0.5, h), np.linspace(0.0, 0.3, w))
    noisy = ramp[..., None] if len(shape) == 3 else ramp
    noisy = np.clip(noisy + 0.15 * rng.standard_normal(shape), 0.02, 1.0)
    scale = 1.0 if dtype == np.float32 else np.iinfo(dtype).max
    return (noisy * scale).astype(dtype)


@pytest.mark.parametrize("sigma", [0.5, 1.1, 2.0, 3.7])
@pytest.mark.parametrize("shape,dtype", [((64, 80), np.uint8), ((64, 80), np.uint16), ((64, 80, 3), np.uint8)])
def test_gaussian_is_exactly_opencv(sigma, shape, dtype):
    img = textured_image(shape, dtype)
    assert np.array_equal(BlurSpec("gaussian", sigma=sigma).apply(img), cv2.GaussianBlur(img, (0, 0), sigma))


def test_gaussian_default_is_the_published_9x9_reflect101_kernel():
    img = textured_image((40, 50), np.uint8)
    expected = cv2.GaussianBlur(img, (9, 9), 1.1, borderType=cv2.BORDER_REFLECT_101)
    assert np.array_equal(BlurSpec().apply(img), expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(48, 64), (48, 64, 3), (48, 64, 1)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_every_method_changes_the_image_and_keeps_shape_and_dtype(method, shape, dtype):
    img = textured_image(shape, dtype)
    out = BlurSpec(method, srad_iterations=5).apply(img, key="case.png")
    assert out.shape == img.shape and out.dtype == img.dtype
    assert not np.array_equal(out, img)
    # A blur smooths: the mean absolute difference between neighbours drops.
    roughness = lambda a: np.abs(np.diff(a.astype(np.float64), axis=1)).mean()
    assert roughness(out) < 0.8 * roughness(img)


def test_colour_channels_are_blurred_independently():
    img = textured_image((32, 32, 3), np.uint8)
    spec = BlurSpec("mean")
    out = spec.apply(img)
    for c in range(3):
        assert np.array_equal(out[:, :, c], spec.apply(img[:, :, c].copy()))


def test_mean_and_defocus_match_their_opencv_definitions():
    img = textured_image((40, 50), np.uint8)
    assert np.array_equal(BlurSpec("mean", kernel_size=7).apply(img), cv2.blur(img, (7, 7)))
    kernel = disk_kernel(5)
    assert kernel.shape == (11, 11) and np.isclose(kernel.sum(), 1) and np.array_equal(kernel, kernel.T)
    assert kernel[5, 0] > 0 and kernel[0, 0] == 0  # a disk, not a box
    assert np.array_equal(BlurSpec("defocus").apply(img), cv2.filter2D(img, -1, kernel))


def test_median_large_kernels_work_for_uint16_like_opencv_for_uint8():
    # OpenCV's medianBlur refuses uint16 with ksize > 5; the scipy path must give the same answer.
    img8 = textured_image((40, 50), np.uint8)
    for k in (3, 5, 7, 9):
        expected = cv2.medianBlur(img8, k)
        got16 = median_blur(img8.astype(np.uint16), k)
        assert got16.dtype == np.uint16 and np.array_equal(got16, expected.astype(np.uint16)), k
    assert np.array_equal(median_blur(img8, 1), img8)


def test_median_rejects_even_kernels_with_a_clear_message():
    with pytest.raises(ValueError, match="odd kernel size"):
        BlurSpec("median", kernel_size=4)


def test_motion_is_reproducible_per_key_and_seed():
    img = textured_image((48, 48), np.uint8)
    spec = BlurSpec("motion", kernel_size=9, seed=3)
    same_spec_again = BlurSpec("motion", kernel_size=9, seed=3)
    assert np.array_equal(spec.apply(img, key="a/b.png"), same_spec_again.apply(img, key="a/b.png"))
    angles = {motion_angle(3, f"img_{i}.png") for i in range(50)}
    assert len(angles) == 50 and all(0 <= a < 180 for a in angles)
    assert 0 < min(angles) < 30 and 150 < max(angles)  # spread over the half circle
    assert motion_angle(3, "x.png") != motion_angle(4, "x.png")
    assert not np.array_equal(spec.apply(img, key="a/b.png"), spec.apply(img, key="a/c.png"))


def test_motion_kernel_is_a_normalised_centred_line():
    horizontal = motion_kernel(5, 0.0)
    assert horizontal.shape == (5, 5) and np.isclose(horizontal.sum(), 1)
    assert np.allclose(horizontal[2], 0.2) and horizontal[[0, 1, 3, 4]].sum() == 0
    vertical = motion_kernel(5, 90.0)
    assert np.allclose(vertical, horizontal.T, atol=1e-6)
    diagonal = motion_kernel(6, 45.0)  # even length: odd kernel keeps the line centred
    # Point-symmetric up to warpAffine's 1/32-pixel interpolation grid.
    assert diagonal.shape == (7, 7) and np.allclose(diagonal, diagonal[::-1, ::-1], atol=5e-3)


def test_blur_key_uses_posix_paths_and_frames():
    assert blur_key("a\\b.png") == "a/b.png"
    assert blur_key("a/cine.dcm", 3) == "a/cine.dcm#3"


# ----------------------------------------------------------------------------- SRAD


def speckled_step(size=128, looks=4, seed=0):
    """Step image (60 | 160) times multiplicative speckle: Rayleigh amplitude averaged over ``looks``
    (coefficient of variation ~0.26 for 4 looks, like displayed B-mode speckle), mean 1."""
    rng = np.random.default_rng(seed)
    clean = np.where(np.arange(size) < size // 2, 60.0, 160.0)[None, :].repeat(size, axis=0)
    speckle = rng.rayleigh(1.0, (looks, size, size)).mean(axis=0)
    return np.clip(clean * speckle / speckle.mean(), 0, 255).astype(np.uint8)


def region_cv(img, size=128):
    region = img[16:-16, 8 : size // 2 - 16].astype(np.float64)  # inside the dark half
    return region.std() / region.mean()


def edge_contrast(img, size=128):
    """Mean difference between the 3 columns right and left of the step."""
    a = img.astype(np.float64)
    return a[:, size // 2 : size // 2 + 3].mean() - a[:, size // 2 - 3 : size // 2].mean()


def test_srad_removes_speckle_but_keeps_the_step_edge():
    img = speckled_step()
    out = srad(img, iterations=40, time_step=0.25)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert region_cv(out) < 0.25 * region_cv(img)  # speckle variance down by more than 16x
    assert edge_contrast(out) > 0.85 * edge_contrast(img)
    # A Gaussian that smooths the homogeneous region as much blurs the edge far more.
    gaussian = cv2.GaussianBlur(img, (0, 0), 1.5)
    assert region_cv(gaussian) >= region_cv(out)
    assert edge_contrast(gaussian) < edge_contrast(out) - 10


def test_srad_default_strength_is_close_to_the_default_gaussian():
    img = speckled_step()
    ratio = region_cv(BlurSpec("srad").apply(img)) / region_cv(BlurSpec("gaussian").apply(img))
    assert 0.7 < ratio < 1.4


def test_srad_keeps_uint16_and_leaves_flat_and_black_images_alone():
    img16 = speckled_step().astype(np.uint16) * 257
    out16 = srad(img16, 10, 0.25)
    assert out16.dtype == np.uint16 and region_cv(out16) < region_cv(img16)
    flat = np.full((20, 20), 77, np.uint8)
    assert np.array_equal(srad(flat), flat)
    black = np.zeros((20, 20), np.uint8)
    assert np.array_equal(srad(black), black)


def test_srad_handles_black_background_without_nan():
    img = speckled_step()
    img[:, :20] = 0  # ultrasound sector images have a black surround
    out = srad(img, 10, 0.5)
    assert (out[:, :18] == 0).all()  # nothing diffuses out of the background...
    assert region_cv(out) < region_cv(img)  # ...while the speckle still goes


@pytest.mark.parametrize("field,value,message", [
    ("method", "blurry", "unknown blur method"), ("sigma", 0.0, "sigma > 0"), ("kernel_size", 0, "at least 1"),
    ("srad_time_step", 1.5, r"\(0, 1\]"), ("srad_iterations", -1, ">= 0"), ("seed", -1, ">= 0"),
])
def test_blur_spec_rejects_bad_settings(field, value, message):
    with pytest.raises(ValueError, match=message):
        BlurSpec(**{field: value})


# ----------------------------------------------------------------------------- command line


def test_argument_helper_published_spelling():
    parser = argparse.ArgumentParser()
    add_blur_arguments(parser)
    args = parser.parse_args(["--method", "motion", "--sigma", "2", "--seed", "7", "--kernel_size", "9"])
    assert blur_spec_from_args(args) == BlurSpec("motion", sigma=2.0, kernel_size=9, seed=7)
    assert blur_spec_from_args(parser.parse_args([])) == BlurSpec()


def test_argument_helper_training_spelling_is_off_by_default():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)  # the training seed must not clash
    add_blur_arguments(parser, prefix="blur_", method_flag="--blur", default_method=None)
    assert blur_spec_from_args(parser.parse_args([]), prefix="blur_") is None
    args = parser.parse_args(["--blur", "srad", "--blur_srad_iterations", "3", "--blur_srad_time_step", "0.5",
                              "--blur_sigma", "1.5", "--seed", "9"])
    assert blur_spec_from_args(args, prefix="blur_") == BlurSpec("srad", sigma=1.5, srad_iterations=3,
                                                                 srad_time_step=0.5, seed=0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--blur", "unknown"])
