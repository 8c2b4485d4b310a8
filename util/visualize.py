"""Reconstruction figures: blurred input | masked input | reconstruction | sharp target."""
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


def panels_to_grid(panels: torch.Tensor, pad: int = 2) -> np.ndarray:
    """(N, 4, C, H, W) -> uint8 H' x W' x 3 image, one row per sample."""
    n, k, c, h, w = panels.shape
    grid = torch.ones(3, n * (h + pad) + pad, k * (w + pad) + pad)
    for i in range(n):
        for j in range(k):
            img = panels[i, j].cpu()
            img = img.expand(3, -1, -1) if c == 1 else img[:3]
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top:top + h, left:left + w] = img
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


COLUMN_TITLES: Sequence[str] = ("input", "masked input", "reconstruction", "target")


def save_grid_png(path: str, grid: np.ndarray) -> None:
    from PIL import Image

    atomic_write_with(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
