"""Reconstruction figure for any pretraining checkpoint (ours or the published ones).

    python tools/visualize_reconstruction.py CKPT IMAGE [IMAGE ...] --out recon.png

One row per image, titled columns: input (blurred for deblurring models), visible patches, reconstruction,
target.
The model name, input size, channels and normalisation come from the checkpoint's ``args`` when it
has them; ``--model`` etc. override (the published checkpoints only record ``args.model``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models_mae import is_deblurring_model  # noqa: E402
from util.blur import add_blur_arguments, blur_spec_from_args  # noqa: E402
from util.checkpoint import CheckpointError, load_checkpoint_file, load_weights  # noqa: E402
from util.datasets import (IMAGENET_MEAN, IMAGENET_STD, PixelNormaliser, center_box,  # noqa: E402
                           model_channels, resize_box, stack_pixels)
from util.image_io import UnreadableImageError, read_image, to_grey  # noqa: E402
from util.registry import pretrain_models  # noqa: E402
from util.visualize import column_titles, panels_to_grid, reconstruction_panels, save_grid_png  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default="reconstruction.png")
    p.add_argument("--model", default=None, help="model name (default: from the checkpoint)")
    p.add_argument("--input_size", type=int, nargs="+", default=None)
    p.add_argument("--in_chans", type=int, default=None)
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0, help="seed of the masks")
    p.add_argument("--norm_pix_loss", action="store_true", default=None,
                   help="the checkpoint was trained with norm_pix_loss (default: from the checkpoint)")
    add_blur_arguments(p, prefix="blur_", method_flag="--blur", default_method=None)
    return p.parse_args(argv)


def recorded(ckpt, name, default=None):
    args = ckpt.get("args")
    value = args.get(name) if isinstance(args, dict) else getattr(args, name, None)
    return default if value is None else value


def main(argv=None):
    args = parse_args(argv)
    ckpt = load_checkpoint_file(args.checkpoint)
    name = args.model or recorded(ckpt, "model")
    if not name:
        raise SystemExit(f"{args.checkpoint} does not record its model: pass --model")
    size = args.input_size or recorded(ckpt, "input_size", [224])
    size = [size, size] if isinstance(size, int) else list(size) * (2 if len(size) == 1 else 1)
    in_chans = args.in_chans or recorded(ckpt, "in_chans", 3)
    norm_pix = args.norm_pix_loss if args.norm_pix_loss is not None else bool(recorded(ckpt, "norm_pix_loss", False))
    model = pretrain_models().create(name, img_size=tuple(size), in_chans=in_chans, norm_pix_loss=norm_pix)
    print(load_weights(model, ckpt))
    model.eval()

    norm = PixelNormaliser(recorded(ckpt, "data_mean", IMAGENET_MEAN if in_chans == 3 else [0.5]),
                           recorded(ckpt, "data_std", IMAGENET_STD if in_chans == 3 else [0.25]), "cpu")
    blur = blur_spec_from_args(args, prefix="blur_")
    if blur is None and is_deblurring_model(name):
        from util.blur import BlurSpec
        blur = BlurSpec("gaussian", sigma=1.1)  # the published default
    inputs, targets = [], []
    for path in args.images:
        try:
            image = read_image(path)
        except UnreadableImageError as err:
            raise SystemExit(str(err))
        # the pixels training would see: PretrainDataset's channel rule and resize, then the same
        # normalisation on the device
        source = model_channels(blur.apply(to_grey(image)), in_chans) if blur else model_channels(image, in_chans)
        box = center_box(image.shape[0], image.shape[1], tuple(size))
        inputs.append(resize_box(source, box, tuple(size)))
        targets.append(resize_box(model_channels(image, in_chans), box, tuple(size)))
    x, y = norm(stack_pixels(inputs)), norm(stack_pixels(targets))
    noise = torch.rand(len(inputs), model.num_patches, generator=torch.Generator().manual_seed(args.seed))
    panels = reconstruction_panels(model, x, y, norm.mean, norm.std, args.mask_ratio, noise)
    titles = column_titles(deblurring=blur is not None)
    save_grid_png(args.out, panels_to_grid(panels, titles=titles))
    print(f"wrote {args.out} (columns: {', '.join(titles)})")


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")
