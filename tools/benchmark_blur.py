"""Throughput of blurred_images.py: images/s for 512 x 512 grey PNGs, parallel vs one process.

    python tools/benchmark_blur.py                      # 200 images, gaussian/median/srad, all cores
    python tools/benchmark_blur.py --count 500 --methods gaussian --workers 4

The images are made in a temporary folder: speckle (Rayleigh, like B-mode) over smooth structure, so
PNG decoding and encoding cost what they cost on real ultrasound. Three ways are timed per method:

* ``loop``: a bare single-process loop of read -> grey -> blur -> atomic write (the floor);
* ``script, 1 worker``: blurred_images.py's in-process path (adds listing, progress bar, bookkeeping);
* ``script, N workers``: blurred_images.py's process pool, worker start-up included.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import blurred_images  # noqa: E402
from util.arguments import available_cores  # noqa: E402
from util.blur import BlurSpec  # noqa: E402
from util.image_io import list_images, read_image, to_grey, write_image_atomic  # noqa: E402


def make_images(folder: str, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        structure = 90 + 60 * np.sin(6 * rows + i) * np.cos(4 * cols) + 40 * (rows > 0.5 + 0.1 * np.sin(9 * cols))
        speckle = rng.rayleigh(1.0, (size, size)) / np.sqrt(np.pi / 2)  # mean 1
        img = np.clip(structure * speckle, 0, 255).astype(np.uint8)
        write_image_atomic(os.path.join(folder, f"case{i // 50:02d}", f"img{i:05d}.png"), img)


def time_loop(src: str, dst: str, spec: BlurSpec) -> float:
    start = time.perf_counter()
    for rel in list_images(src):
        img = to_grey(read_image(os.path.join(src, rel)))
        write_image_atomic(os.path.join(dst, rel), spec.apply(img, key=rel))
    return time.perf_counter() - start


def time_script(src: str, dst: str, method: str, workers: int) -> float:
    args = blurred_images.get_args_parser().parse_args(
        ["--src_dir", src, "--dst_dir", dst, "--method", method, "--workers", str(workers)])
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        summary = blurred_images.main(args)
    elapsed = time.perf_counter() - start
    if summary.failed or summary.written == 0:
        raise RuntimeError(f"benchmark run failed: {summary}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="number of images (default: 200)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--methods", nargs="+", default=["gaussian", "median", "srad"])
    parser.add_argument("--workers", type=int, default=available_cores(),
                        help="workers of the parallel run (default: all cores)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="benchmark_blur_") as tmp:
        src = os.path.join(tmp, "src")
        make_images(src, args.count, args.size)
        # Other work on the machine skews every number; the load average makes that visible.
        print(f"{args.count} grey PNGs of {args.size} x {args.size}, {os.cpu_count()} CPU cores visible, "
              f"1-minute load average before: {os.getloadavg()[0]:.2f}\n")
        print("| method | run | workers | seconds | images/s | speed-up vs loop |")
        print("|---|---|---:|---:|---:|---:|")
        for method in args.methods:
            loop = time_loop(src, os.path.join(tmp, f"{method}_loop"), BlurSpec(method))
            runs = [("loop", 1, loop),
                    ("script", 1, time_script(src, os.path.join(tmp, f"{method}_1"), method, 1)),
                    ("script", args.workers, time_script(src, os.path.join(tmp, f"{method}_n"), method, args.workers))]
            for name, workers, seconds in runs:
                print(f"| {method} | {name} | {workers} | {seconds:.2f} | {args.count / seconds:.1f} | "
                      f"{loop / seconds:.2f}x |")
        print(f"\n1-minute load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
