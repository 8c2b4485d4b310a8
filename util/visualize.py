"""Reconstruction figures: (blurred) input | visible patches | reconstruction | (sharp) target,
one row per image, the columns titled."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from util.fileio import atomic_write_with


def denormalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruction_panels(model, inputs: torch.Tensor, targets: torch.Tensor, mean: torch.Tensor,
                          std: torch.Tensor, mask_ratio: float = 0.75,
                          noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, 4, C, H, W) in [0, 1]: input, masked input, reconstruction (visible patches pasted from
    the input, as MAE shows it), target. Inputs/targets are normalised model inputs; ``model`` is the
    bare model (not the DDP-wrapped or compiled one: its methods ``patchify`` / ``unpatchify`` are used)."""
    _, pred, mask = model(inputs, targets, mask_ratio=mask_ratio, noise=noise)
    pred = pred.float()
    if model.norm_pix_loss:
        # predictions are per-patch normalised targets: undo with the target's own statistics
        target_patches = model.patchify(targets.float())
        mu = target_patches.mean(-1, keepdim=True)
        var = target_patches.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    recon = model.unpatchify(pred)
    pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).float())
    inp = denormalize(inputs.float(), mean, std)
    tgt = denormalize(targets.float(), mean, std)
    rec = denormalize(recon, mean, std)
    masked = inp * (1 - pixel_mask)
    pasted = inp * (1 - pixel_mask) + rec * pixel_mask
    return torch.stack([inp, masked, pasted, tgt], dim=1)


def column_titles(deblurring: bool) -> tuple[str, ...]:
    """What the four columns of :func:`reconstruction_panels` show."""
    if deblurring:
        return ("blurred input", "visible patches", "reconstruction", "sharp target")
    return ("input", "visible patches", "reconstruction", "target")


COLUMN_TITLES: Sequence[str] = column_titles(False)


def panels_to_grid(panels: torch.Tensor, pad: int = 2,
                   titles: Optional[Sequence[str]] = COLUMN_TITLES) -> np.ndarray:
    """(N, K, C, H, W) -> uint8 H' x W' x 3 image, one row per sample, a title above each column
    (``titles`` None: none). Panels narrower than their titles are enlarged (nearest neighbour, up
    to x4) so that every title fits over its column."""
    n, k, c, h, w = panels.shape
    if titles is not None and len(titles) != k:
        raise ValueError(f"{k} columns but {len(titles)} titles")
    scale = _title_scale(titles, w) if titles else 1
    if scale > 1:
        panels = panels.flatten(0, 1).repeat_interleave(scale, -2).repeat_interleave(scale, -1)
        panels = panels.reshape(n, k, c, h * scale, w * scale)
        h, w = h * scale, w * scale
    header = _TITLE_HEIGHT if titles else 0
    grid = torch.ones(3, header + n * (h + pad) + pad, k * (w + pad) + pad)
    for i in range(n):
        for j in range(k):
            img = panels[i, j].cpu()
            img = img.expand(3, -1, -1) if c == 1 else img[:3]
            top, left = header + pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top:top + h, left:left + w] = img
    out = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if titles:
        _draw_titles(out, titles, w, pad)
    return out


_TITLE_HEIGHT = 16


def _font():
    from PIL import ImageFont
    return ImageFont.load_default()


def _text_width(text: str) -> int:
    left, _, right, _ = _font().getbbox(text)
    return right - left


def _title_scale(titles: Sequence[str], width: int) -> int:
    widest = max(_text_width(t) for t in titles) + 4
    return min(4, max(1, -(-widest // width)))


def _draw_titles(grid: np.ndarray, titles: Sequence[str], width: int, pad: int) -> None:
    from PIL import Image, ImageDraw

    header = Image.fromarray(grid[:_TITLE_HEIGHT])
    draw = ImageDraw.Draw(header)
    for j, title in enumerate(titles):
        centre = pad + j * (width + pad) + width // 2
        draw.text((centre - _text_width(title) // 2, 2), title, fill=(0, 0, 0), font=_font())
    grid[:_TITLE_HEIGHT] = np.asarray(header)


def save_grid_png(path: str, grid: np.ndarray) -> None:
    from PIL import Image

    atomic_write_with(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
