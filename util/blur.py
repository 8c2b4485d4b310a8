"""Blur filters shared by blurred_images.py (offline) and the data pipelines (on the fly).

``BlurSpec(method, ...).apply(img, key)`` returns an image of the same shape and dtype (uint8,
uint16 or float32; ``H x W`` or ``H x W x C``). Methods:

* ``gaussian``: ``cv2.GaussianBlur(img, (0, 0), sigma)``, the published blur: kernel size derived
  from sigma (9 x 9 at 1.1), reflect-101 borders.
* ``mean``: ``kernel_size`` x ``kernel_size`` box filter.
* ``median``: ``kernel_size`` x ``kernel_size`` median (odd size), replicated borders as OpenCV's.
* ``motion``: a line of ``kernel_size`` pixels through the centre at a random angle. The angle is
  drawn from ``seed`` and the per-file ``key`` (see :func:`blur_key`), so the offline script and an
  on-the-fly pipeline blur the same file identically, and a re-run gives the same dataset.
* ``defocus``: a uniform disk of radius ``kernel_size`` (the published ``Defocus(radius=5)``).
* ``srad``: speckle-reducing anisotropic diffusion (Yu & Acton, IEEE TIP 11(11), 2002).

All linear filters use reflect-101 borders, as OpenCV does by default.
"""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

# the method names, SRAD defaults, ``--blur none`` and the command-line options live in a module without
# OpenCV, so that the scripts build their --help without it
from util.blur_options import (DEFAULT_SRAD_ITERATIONS, DEFAULT_SRAD_TIME_STEP, METHODS, NO_BLUR,  # noqa: F401
                               add_blur_arguments)

# The settings each method uses: what a checkpoint or a blurred copy records, and what two blurs are
# compared on (an unused kernel_size does not make two Gaussian blurs differ).
PARAMETERS = {"gaussian": ("sigma",), "mean": ("kernel_size",), "median": ("kernel_size",),
              "motion": ("kernel_size", "seed"), "defocus": ("kernel_size",),
              "srad": ("srad_iterations", "srad_time_step")}
# The settings file blurred_images.py writes at the top of a blurred copy (util/provenance.py).
BLUR_SETTINGS_FILE = "blur.json"

SUPPORTED_DTYPES = (np.uint8, np.uint16, np.float32)
SRAD_SPECKLE_DECAY_RATE = 1.0 / 6.0  # rho in the paper's q0(t) = q0 exp(-rho t)


def blur_key(relative_path: str, frame: int | None = None) -> str:
    """The per-file key that makes ``motion`` reproducible: the file's path relative to the dataset
    root with '/' separators, plus ``#<frame>`` for one frame of a multi-frame file."""
    key = relative_path.replace("\\", "/")
    return key if frame is None else f"{key}#{frame}"


@dataclass(frozen=True)
class BlurSpec:
    """One blur configuration; ``apply`` is a pure function of (image, key)."""

    method: str = "gaussian"
    sigma: float = 1.1
    kernel_size: int = 5
    srad_iterations: int = DEFAULT_SRAD_ITERATIONS
    srad_time_step: float = DEFAULT_SRAD_TIME_STEP
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown blur method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "gaussian" and not self.sigma > 0:
            raise ValueError(f"gaussian blur needs sigma > 0, got {self.sigma}")
        if self.kernel_size < 1:
            raise ValueError(f"kernel size must be at least 1, got {self.kernel_size}")
        if self.method == "median" and self.kernel_size % 2 == 0:
            raise ValueError(f"median blur needs an odd kernel size, got {self.kernel_size}")
        if self.srad_iterations < 0:
            raise ValueError(f"SRAD iterations must be >= 0, got {self.srad_iterations}")
        if not 0 < self.srad_time_step <= 1:
            raise ValueError(f"SRAD time step must be in (0, 1] for a stable diffusion, got {self.srad_time_step}")
        if self.seed < 0:
            raise ValueError(f"blur seed must be >= 0, got {self.seed}")

    def settings(self) -> dict:
        """The method and the settings it uses, as plain values (JSON, checkpoints)."""
        return {"method": self.method, **{name: getattr(self, name) for name in PARAMETERS[self.method]}}

    @classmethod
    def from_settings(cls, settings: dict) -> "BlurSpec":
        """The inverse of :meth:`settings`; other keys are ignored, missing settings take the defaults."""
        method = settings.get("method")
        if method not in METHODS:
            raise ValueError(f"unknown blur method {method!r}; choose one of {', '.join(METHODS)}")
        return cls(method=method, **{name: settings[name] for name in PARAMETERS[method] if name in settings})

    def describe(self) -> str:
        """Short human-readable form naming only the settings the method uses."""
        details = {
            "gaussian": f"sigma {self.sigma}",
            "srad": f"{self.srad_iterations} iterations, time step {self.srad_time_step}",
            "motion": f"length {self.kernel_size}, seed {self.seed}",
            "defocus": f"radius {self.kernel_size}",
        }.get(self.method, f"kernel {self.kernel_size}")
        return f"{self.method} ({details})"

    def apply(self, img: np.ndarray, key: str = "") -> np.ndarray:
        """Blur ``img``; ``key`` (see :func:`blur_key`) only matters for ``motion``."""
        if img.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"blur supports uint8, uint16 and float32 images, got {img.dtype}")
        if img.ndim == 2:
            return self._apply_2d(img, key)
        if img.ndim == 3:
            # Channel by channel: every filter then handles any channel count and keeps H x W x 1.
            channels = [self._apply_2d(np.ascontiguousarray(img[:, :, c]), key) for c in range(img.shape[2])]
            return np.stack(channels, axis=2)
        raise ValueError(f"blur expects an H x W or H x W x C image, got shape {img.shape}")

    def _apply_2d(self, img: np.ndarray, key: str) -> np.ndarray:
        k = self.kernel_size
        if self.method == "gaussian":
            return cv2.GaussianBlur(img, (0, 0), self.sigma)
        if self.method == "mean":
            return cv2.blur(img, (k, k))
        if self.method == "median":
            return median_blur(img, k)
        if self.method == "motion":
            kernel = motion_kernel(k, motion_angle(self.seed, key))
            return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
        if self.method == "defocus":
            return cv2.filter2D(img, -1, disk_kernel(k), borderType=cv2.BORDER_REFLECT_101)
        return srad(img, self.srad_iterations, self.srad_time_step)


def median_blur(img: np.ndarray, kernel_size: int) -> np.ndarray:
    """Median over a square window with replicated borders, for any odd size and supported dtype.

    OpenCV's medianBlur takes uint16/float32 only for sizes 3 and 5; larger sizes go through
    scipy with the same border rule (``nearest`` = replicate), so results agree across dtypes.
    """
    if img.dtype == np.uint8 or kernel_size in (3, 5):
        return cv2.medianBlur(img, kernel_size)
    if kernel_size == 1:
        return img.copy()
    return ndimage.median_filter(img, size=kernel_size, mode="nearest")


def motion_angle(seed: int, key: str) -> float:
    """Angle in degrees [0, 180) for ``motion``, a pure function of (seed, key)."""
    # blake2b rather than hash(): Python salts str hashes per process.
    key_digest = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return float(np.random.default_rng([seed, key_digest]).uniform(0.0, 180.0))


def motion_kernel(length: int, angle_degrees: float) -> np.ndarray:
    """Normalised kernel of a ``length``-pixel line through the centre, at ``angle_degrees``
    counter-clockwise from horizontal.

    The kernel is square with an odd side (``length`` rounded up to odd) so the line stays centred;
    an even length puts half-weight pixels at both ends. A horizontal line is rotated with bilinear
    interpolation, which anti-aliases oblique lines.
    """
    size = length if length % 2 == 1 else length + 1
    centre = size // 2
    horizontal = np.zeros((size, size), np.float32)
    horizontal[centre, :] = 1.0
    if length % 2 == 0:
        horizontal[centre, [0, -1]] = 0.5
    rotation = cv2.getRotationMatrix2D((float(centre), float(centre)), angle_degrees, 1.0)
    kernel = cv2.warpAffine(horizontal, rotation, (size, size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return kernel / kernel.sum()


def disk_kernel(radius: int) -> np.ndarray:
    """Normalised uniform disk of the given radius (a defocused lens's point spread function)."""
    offsets = np.arange(-radius, radius + 1)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2
    return (disk / disk.sum()).astype(np.float32)


# ----------------------------------------------------------------------------- SRAD


def srad(img: np.ndarray, iterations: int = DEFAULT_SRAD_ITERATIONS,
         time_step: float = DEFAULT_SRAD_TIME_STEP) -> np.ndarray:
    """Speckle-reducing anisotropic diffusion of a 2-D image (Yu & Acton 2002), same dtype out.

    The speckle scale follows the paper's schedule q0(t) = q0 * exp(-t / 6) at diffusion time
    t = step * time_step. The paper measures q0 in a homogeneous region picked by hand; here q0 is
    the median, over the image, of the coefficient of variation in 5 x 5 windows: in ultrasound
    most windows are homogeneous speckle, so their median is an automatic stand-in.
    """
    values = img.astype(np.float32)
    q0_squared = _speckle_scale_squared(values)
    if q0_squared <= 0:  # constant or black image: nothing to diffuse
        return img.copy()
    for step in range(iterations):
        decay = np.exp(-SRAD_SPECKLE_DECAY_RATE * step * time_step)
        values = _srad_step(values, q0_squared * decay**2, time_step)
    return _restore_dtype(values, img.dtype)


def _speckle_scale_squared(values: np.ndarray) -> float:
    mean = cv2.blur(values, (5, 5))
    mean_of_squares = cv2.blur(values * values, (5, 5))
    variance = np.maximum(mean_of_squares - mean * mean, 0)
    positive = mean > 1e-6
    if not positive.any():
        return 0.0
    return float(np.median(variance[positive] / (mean[positive] ** 2)))


def _srad_step(values: np.ndarray, q0_squared: float, time_step: float) -> np.ndarray:
    """One explicit step of the paper's discretisation with zero-flux (Neumann) borders."""
    padded = np.pad(values, 1, mode="edge")
    d_north = padded[:-2, 1:-1] - values
    d_south = padded[2:, 1:-1] - values
    d_west = padded[1:-1, :-2] - values
    d_east = padded[1:-1, 2:] - values

    # Instantaneous coefficient of variation q (paper eq. 34-36): normalised gradient magnitude
    # and normalised Laplacian; the divisor is kept away from 0 for black (zero) pixels.
    intensity = np.maximum(values, 1e-6)
    gradient_squared = (d_north**2 + d_south**2 + d_west**2 + d_east**2) / intensity**2
    laplacian = (d_north + d_south + d_west + d_east) / intensity
    q_squared = (0.5 * gradient_squared - laplacian**2 / 16) / np.maximum((1 + laplacian / 4) ** 2, 1e-12)

    # Diffusion coefficient (eq. 33), clipped to [0, 1]: above 1 the explicit step can overshoot.
    c = 1.0 / (1.0 + (q_squared - q0_squared) / (q0_squared * (1.0 + q0_squared)))
    c = np.clip(c, 0.0, 1.0)
    c_padded = np.pad(c, 1, mode="edge")
    c_south, c_east = c_padded[2:, 1:-1], c_padded[1:-1, 2:]

    # Divergence (eq. 37) and update I += dt/4 * div. The centre weight 1 - dt/4 * (c_s + c_e + 2c)
    # stays >= 0 for dt <= 1, which is why BlurSpec limits the time step to (0, 1].
    divergence = c_south * d_south + c * d_north + c_east * d_east + c * d_west
    return values + (time_step / 4.0) * divergence


def _restore_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


# ----------------------------------------------------------------------------- command line


def blur_spec_from_args(args: argparse.Namespace, prefix: str = "") -> BlurSpec | None:
    """The BlurSpec the options added by :func:`add_blur_arguments` describe; None when blur is off."""
    method = getattr(args, f"{prefix}method")
    if method in (None, NO_BLUR):
        return None
    return BlurSpec(
        method=method,
        sigma=getattr(args, f"{prefix}sigma"),
        kernel_size=getattr(args, f"{prefix}kernel_size"),
        srad_iterations=getattr(args, f"{prefix}srad_iterations"),
        srad_time_step=getattr(args, f"{prefix}srad_time_step"),
        seed=getattr(args, f"{prefix}seed"),
    )
