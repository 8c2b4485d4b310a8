"""The blur's method names, SRAD defaults, ``--blur none`` and command-line options, without OpenCV or numpy.

util/blur.py holds the filters and re-exports these names; they live here so that the scripts can
build their ``--help`` (and check their arguments) without importing the image libraries.
"""
from __future__ import annotations

import argparse

METHODS = ("gaussian", "mean", "median", "motion", "defocus", "srad")
# ``--blur none`` in the training scripts and tools: no blur, whatever a checkpoint recorded.
NO_BLUR = "none"

# SRAD defaults: the explicit scheme is stable for time steps up to 1 (see util/blur.py _srad_step).
# 20 steps of 0.25 (diffusion time 5) reduce fully developed speckle about as much as the default
# Gaussian (sigma 1.1) does, with sharper edges; about 0.15 s for a 512 x 512 grey image on one CPU core.
DEFAULT_SRAD_ITERATIONS = 20
DEFAULT_SRAD_TIME_STEP = 0.25


def add_blur_arguments(parser: argparse.ArgumentParser, prefix: str = "", method_flag: str = "--method",
                       default_method: str | None = "gaussian") -> None:
    """Add the blur options to ``parser``.

    blurred_images.py: ``add_blur_arguments(parser)`` gives the published ``--method --sigma --seed``
    plus ``--kernel_size --srad_iterations --srad_time_step``.
    Training scripts: ``add_blur_arguments(parser, prefix="blur_", method_flag="--blur",
    default_method=None)`` gives ``--blur METHOD --blur_sigma --blur_kernel_size
    --blur_srad_iterations --blur_srad_time_step --blur_seed`` (blur off unless ``--blur`` is given).
    Read them back with :func:`blur_spec_from_args` and the same ``prefix``.
    """
    group = parser.add_argument_group("blur")
    off = f" (default: {default_method}, as published)" if default_method else (
        " (default: no blur; fine-tuning, linear probing and the reconstruction tool "
        f"apply the blur their checkpoint records, and '{NO_BLUR}' turns that off)")
    choices = METHODS if default_method else METHODS + (NO_BLUR,)
    group.add_argument(method_flag, dest=f"{prefix}method", default=default_method, choices=choices,
                       help=f"blur method{off}")
    group.add_argument(f"--{prefix}sigma", type=float, default=1.1,
                       help="gaussian: standard deviation in pixels; kernel size follows from it (default: 1.1)")
    group.add_argument(f"--{prefix}kernel_size", type=int, default=5,
                       help="mean/median: window side (median: odd); motion: line length; "
                            "defocus: disk radius (default: 5, as published)")
    group.add_argument(f"--{prefix}srad_iterations", type=int, default=DEFAULT_SRAD_ITERATIONS,
                       help=f"srad: number of diffusion steps (default: {DEFAULT_SRAD_ITERATIONS})")
    group.add_argument(f"--{prefix}srad_time_step", type=float, default=DEFAULT_SRAD_TIME_STEP,
                       help=f"srad: time step per iteration, in (0, 1] (default: {DEFAULT_SRAD_TIME_STEP})")
    group.add_argument(f"--{prefix}seed", type=int, default=0,
                       help="motion: seed of the per-file blur angles (default: 0)")
