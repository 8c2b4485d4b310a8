#!/usr/bin/env python
"""Draw the method figure of the README: figure/method.svg and figure/method.png.

    python tools/draw_method_figure.py [--out_dir figure]

Top row, pretraining (Deblurring MAE / ConvMAE): the sharp ultrasound image is blurred, 75 % of
the blurred image's 16x16 patches are masked, the encoder sees the visible patches, the decoder
predicts every patch, and the loss compares the prediction with the *sharp* image. Bottom row,
fine-tuning: the pretrained encoder on images blurred the same way, with a classification head or
UPerNet. The thumbnails are a synthetic image of tools/synthetic_us.py (fixed seed), blurred by
util/blur.py exactly as blurred_images.py does; everything else is drawn with matplotlib.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.synthetic_us import generate_image  # noqa: E402
from util.blur import BlurSpec  # noqa: E402

SEED = 9  # a hypoechoic, irregular nodule with punctate echogenic foci
PATCH = 16  # the models' 16x16 patches: an 8x8 grid on the 128-pixel crop
CROP = 128
MASK_RATIO = 0.75
COLOURS = {"data": "#f2f2f2", "encoder": "#cfe2f3", "decoder": "#fde9c9", "loss": "#f4cccc",
           "head": "#d9ead3", "edge": "#404040"}


def thumbnails(seed: int = SEED) -> dict[str, np.ndarray]:
    """Sharp, blurred and masked-blurred crops around the nodule of one synthetic image."""
    image, mask, _, _ = generate_image(seed, size=256, label="malignant")
    blurred = BlurSpec("gaussian", sigma=1.1).apply(image)
    rows, cols = np.nonzero(mask)
    top = int(np.clip((rows.min() + rows.max()) // 2 - CROP // 2, 0, image.shape[0] - CROP))
    left = int(np.clip((cols.min() + cols.max()) // 2 - CROP // 2, 0, image.shape[1] - CROP))
    window = (slice(top, top + CROP), slice(left, left + CROP))
    sharp, blurred = image[window], blurred[window]
    grid = CROP // PATCH
    rng = np.random.default_rng(seed)
    # the models' masking: keep the patches with the lowest random noise
    keep = np.argsort(rng.random(grid * grid))[: int(grid * grid * (1 - MASK_RATIO))]
    visible = np.zeros(grid * grid, bool)
    visible[keep] = True
    pixel_mask = np.kron(visible.reshape(grid, grid), np.ones((PATCH, PATCH), bool))
    masked = np.where(pixel_mask, blurred, 0).astype(np.uint8)
    return dict(sharp=sharp, blurred=blurred, masked=masked, visible=visible.reshape(grid, grid))


def box(ax, x, y, w, h, text, colour, fontsize=9, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.8",
                                facecolor=colour, edgecolor=COLOURS["edge"], linewidth=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize,
            weight=weight, wrap=True)


def trapezoid(ax, x, y, w, h, text, colour, narrowing: str):
    """Encoder (narrows to the right) or decoder (widens to the right)."""
    inset = h * 0.18
    if narrowing == "right":
        corners = [(x, y), (x + w, y + inset), (x + w, y + h - inset), (x, y + h)]
    else:
        corners = [(x, y + inset), (x + w, y), (x + w, y + h), (x, y + h - inset)]
    ax.fill(*zip(*corners), facecolor=colour, edgecolor=COLOURS["edge"], linewidth=1)
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)


def arrow(ax, start, end, label=None, dashed=False, label_offset=1.6):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, linewidth=1.2,
                                 color=COLOURS["edge"], linestyle="--" if dashed else "-",
                                 shrinkA=2, shrinkB=2))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + label_offset, label,
                ha="center", va="bottom", fontsize=7.5, style="italic")


def image(ax, picture, x, y, size, caption):
    ax.imshow(picture, cmap="gray", vmin=0, vmax=255, extent=(x, x + size, y, y + size),
              interpolation="nearest")
    ax.add_patch(Rectangle((x, y), size, size, fill=False, edgecolor=COLOURS["edge"], lw=0.8))
    ax.text(x + size / 2, y - 1.2, caption, ha="center", va="top", fontsize=8)


def patch_grid(ax, x, y, size, visible, caption):
    """The decoder's output: every patch predicted (shaded), those masked at the input darker."""
    n = visible.shape[0]
    step = size / n
    for r in range(n):
        for c in range(n):
            shade = "#9fb6cd" if visible[r, c] else "#5b7fa6"
            ax.add_patch(Rectangle((x + c * step, y + size - (r + 1) * step), step, step,
                                   facecolor=shade, edgecolor="white", linewidth=0.6))
    ax.text(x + size / 2, y - 1.2, caption, ha="center", va="top", fontsize=8)


def draw(out_dir: Path) -> list[Path]:
    thumbs = thumbnails()
    fig = Figure(figsize=(10.0, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 46)
    ax.set_axis_off()

    # --- pretraining row
    ax.text(1, 44, "Pretraining: Deblurring MAE / Deblurring ConvMAE", fontsize=10,
            weight="bold", va="top")
    s, y = 11, 25
    image(ax, thumbs["sharp"], 1, y, s, "ultrasound image\n(sharp)")
    arrow(ax, (12.5, y + s / 2), (18.5, y + s / 2), "Gaussian\nblur σ 1.1")
    image(ax, thumbs["blurred"], 19, y, s, "blurred input")
    arrow(ax, (30.5, y + s / 2), (36.5, y + s / 2), "mask\n75 %")
    image(ax, thumbs["masked"], 37, y, s, "visible patches\n(25 %)")
    arrow(ax, (48.5, y + s / 2), (51, y + s / 2))
    trapezoid(ax, 51, y - 1, 11, s + 2, "encoder\nViT / ConvViT\n(visible\npatches)",
              COLOURS["encoder"], "right")
    arrow(ax, (62, y + s / 2), (64.5, y + s / 2))
    trapezoid(ax, 64.5, y - 1, 10, s + 2, "decoder\n+ mask\ntokens", COLOURS["decoder"], "left")
    arrow(ax, (74.5, y + s / 2), (77, y + s / 2))
    patch_grid(ax, 77, y, s, thumbs["visible"], "reconstruction\n(all patches)")
    box(ax, 91, y + 2.5, 8, 6, "MSE\nloss", COLOURS["loss"], weight="bold")
    arrow(ax, (88.5, y + s / 2), (91, y + s / 2))
    # the target is the sharp image, not the blurred input: the point of the method
    ax.add_patch(FancyArrowPatch((6.5, y + s + 0.3), (95, y + 8.8),
                                 connectionstyle="arc3,rad=-0.12",
                                 arrowstyle="-|>", mutation_scale=12, linewidth=1.2,
                                 linestyle="--", color="#a61c00", shrinkA=2, shrinkB=2))
    ax.text(50, 41.3, "target: the original sharp image (vanilla MAE: input = target, no blur)",
            ha="center", fontsize=8.5, color="#a61c00", style="italic")

    # --- fine-tuning row
    ax.text(1, 17.5, "Fine-tuning: the same blur on the downstream images", fontsize=10,
            weight="bold", va="top")
    s2, y2 = 9, 3.5
    image(ax, thumbs["sharp"], 1, y2, s2, "image")
    arrow(ax, (10.5, y2 + s2 / 2), (18.5, y2 + s2 / 2), "blur (σ 1.1)", label_offset=0.8)
    image(ax, thumbs["blurred"], 19, y2, s2, "blurred image")
    arrow(ax, (28.5, y2 + s2 / 2), (33, y2 + s2 / 2))
    trapezoid(ax, 33, y2 - 1, 14, s2 + 2, "pretrained encoder\n(decoder dropped)",
              COLOURS["encoder"], "right")
    arrow(ax, (47, y2 + s2 / 2 + 1.5), (55, y2 + 9.5))
    arrow(ax, (47, y2 + s2 / 2 - 1.5), (55, y2 - 0.5))
    box(ax, 55, y2 + 6.5, 22, 5, "pooling + linear head:\nbenign / malignant", COLOURS["head"])
    box(ax, 55, y2 - 3, 22, 5, "UPerNet: nodule mask", COLOURS["head"])
    ax.text(80, y2 + 9, "classification\n(main_finetune.py)", fontsize=8, va="center")
    ax.text(80, y2 - 0.5, "segmentation\n(SEG/, mmsegmentation)", fontsize=8, va="center")

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "method.svg", out_dir / "method.png"]
    # text stays text in the SVG (small, searchable); no date, so reruns give the same file
    fig.savefig(paths[0], format="svg", metadata={"Date": None})
    fig.savefig(paths[1], format="png", dpi=110)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parents[1] / "figure")
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.rcParams["svg.fonttype"] = "none"
    matplotlib.rcParams["svg.hashsalt"] = "deblurring-mim"  # stable element ids
    for path in draw(args.out_dir):
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
