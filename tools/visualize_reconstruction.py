"""Reconstruction figure for any pretraining checkpoint (ours or the published ones).

    python tools/visualize_reconstruction.py CKPT IMAGE [IMAGE ...] --out recon.png

One row per image, titled columns: input (blurred for deblurring models), visible patches,
reconstruction, target.
The images are prepared as the checkpoint's training prepared them: its model name, input size,
channels, normalisation, colour decision (grey unless it was trained with ``--keep_channels``) and
input blur come from the checkpoint's ``args``. A deblurring checkpoint that records no blur (the
published ones) is shown with the published blur, Gaussian sigma 1.1. ``--model``, ``--input_size``,
``--in_chans`` and ``--blur`` (``--blur none``: no blur) override. Pass the original images: the tool
blurs them itself, and refuses images of a blurred copy (their sharp target is elsewhere).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models_convmae  # noqa: E402,F401  (registers the pretraining models)
from models_mae import is_deblurring_model  # noqa: E402
from util.blur import add_blur_arguments, blur_spec_from_args  # noqa: E402
from util.checkpoint import CheckpointError, load_checkpoint_file, load_weights  # noqa: E402
from util.datasets import (IMAGENET_MEAN, IMAGENET_STD, DatasetError, PixelNormaliser, center_box,  # noqa: E402
                           model_channels, resize_box, stack_pixels)
from util.image_io import UnreadableImageError, read_image, to_grey  # noqa: E402
from util.provenance import (read_blur_settings, recorded_args, recorded_input_blur,  # noqa: E402
                             resolve_input_blur, size_hw)
from util.registry import pretrain_models  # noqa: E402
from util.visualize import column_titles, panels_to_grid, reconstruction_panels, save_grid_png  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="pretraining checkpoint (.pth or .safetensors), ours or a published one")
    p.add_argument("images", nargs="+", help="original (sharp) images, one figure row each")
    p.add_argument("--out", default="reconstruction.png", help="PNG to write (default: reconstruction.png)")
    p.add_argument("--model", default=None, help="model name (default: from the checkpoint)")
    p.add_argument("--input_size", type=int, nargs="+", default=None,
                   help="one number (square) or H W (default: the checkpoint's, else 224)")
    p.add_argument("--in_chans", type=int, default=None, help="default: the checkpoint's, else 3")
    p.add_argument("--mask_ratio", type=float, default=0.75,
                   help="fraction of patches hidden from the encoder (default: 0.75)")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks")
    p.add_argument("--norm_pix_loss", action="store_true", default=None,
                   help="the checkpoint was trained with norm_pix_loss (default: from the checkpoint)")
    add_blur_arguments(p, prefix="blur_", method_flag="--blur", default_method=None)
    return p


def parse_args(argv=None):
    return get_args_parser().parse_args(argv)


def prepared_pair(path: str, blur, keep_channels: bool, in_chans: int, size, deblurring: bool):
    """(input, target) pixels of one image as the checkpoint's pretraining made them: one colour decision
    for both, the blur on the input, then PretrainDataset's centred crop and resize."""
    copy = read_blur_settings(os.path.dirname(os.path.abspath(path)))
    if copy is not None:
        raise SystemExit(f"{path} belongs to a blurred copy ({copy.path}): pass the original image, which this tool "
                         "blurs as the checkpoint's model was trained (its sharp version is the target)")
    try:
        image = read_image(path)
    except UnreadableImageError as err:
        raise SystemExit(str(err))
    if not keep_channels:
        image = to_grey(image)
    source = blur.apply(image) if blur else image
    box = center_box(image.shape[0], image.shape[1], size)
    pixels = resize_box(model_channels(source, in_chans), box, size)
    # a vanilla model reconstructs its own input; a deblurring one the sharp image
    target = resize_box(model_channels(image, in_chans), box, size) if deblurring else pixels
    return pixels, target


def main(argv=None):
    args = parse_args(argv)
    ckpt = load_checkpoint_file(args.checkpoint)
    saved = recorded_args(ckpt)
    name = args.model or saved.get("model")
    if not name:
        raise SystemExit(f"{args.checkpoint} does not record its model: pass --model")
    size = size_hw(args.input_size or saved.get("input_size") or 224)
    in_chans = args.in_chans or saved.get("in_chans") or 3
    keep_channels = bool(saved.get("keep_channels")) and in_chans == 3
    norm_pix = args.norm_pix_loss if args.norm_pix_loss is not None else bool(saved.get("norm_pix_loss"))
    model = pretrain_models().create(name, img_size=size, in_chans=in_chans, norm_pix_loss=norm_pix)
    print(load_weights(model, ckpt, source_name=args.checkpoint))
    model.eval()

    norm = PixelNormaliser(saved.get("data_mean") or (IMAGENET_MEAN if in_chans == 3 else [0.5]),
                           saved.get("data_std") or (IMAGENET_STD if in_chans == 3 else [0.25]), "cpu")
    deblurring = is_deblurring_model(name)
    resolve_input_blur(args, recorded_input_blur(saved, deblurring), args.checkpoint, data_root="")
    blur = blur_spec_from_args(args, prefix="blur_")
    print(f"colour: {'kept' if keep_channels else 'converted to grey'}, as {args.checkpoint} was trained")
    pairs = [prepared_pair(path, blur, keep_channels, in_chans, size, deblurring) for path in args.images]
    x = norm(stack_pixels([p[0] for p in pairs]))
    y = norm(stack_pixels([p[1] for p in pairs]))
    noise = torch.rand(len(pairs), model.num_patches, generator=torch.Generator().manual_seed(args.seed))
    panels = reconstruction_panels(model, x, y, norm.mean, norm.std, args.mask_ratio, noise)
    titles = column_titles(deblurring=blur is not None)
    save_grid_png(args.out, panels_to_grid(panels, titles=titles))
    print(f"wrote {args.out} (columns: {', '.join(titles)})")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DatasetError) as err:
        raise SystemExit(f"error: {err}")
