"""Fixed 2-D sine-cosine position embeddings and resampling of learned ones.

Convention (the one the published MAE / ConvMAE checkpoints were made with, so that our freshly
initialised fixed embeddings equal theirs): the first half of the channels encodes the *column*
index, the second half the *row* index; within each half, sines come before cosines with
frequencies 1 / 10000 ** (k / (D/4)). Grids may be non-square; tokens are in row-major order.
"""
from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed, to_2tuple


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(P,) positions -> (P, dim) with dim/2 sines then dim/2 cosines."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size, cls_token: bool = False) -> torch.Tensor:
    """Return a float32 tensor (gh*gw [+1], embed_dim); with ``cls_token`` a zero first row."""
    gh, gw = to_2tuple(grid_size)
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols.reshape(-1)),
                     _sincos_1d(embed_dim // 2, rows.reshape(-1))], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def resample_pos_embed(pos_embed: torch.Tensor, new_grid, old_grid=None,
                       num_prefix_tokens: int = 0, antialias: bool = False) -> torch.Tensor:
    """Resample a learned (1, prefix + gh*gw, D) embedding to ``new_grid``.

    Default: the published MAE / ConvMAE interpolation (``interpolate_pos_embed`` of their fine-tuning
    and segmentation code): the ``num_prefix_tokens`` leading rows (class token) are kept unchanged,
    the grid is resized with bicubic interpolation, ``align_corners=False`` and no anti-aliasing.

    ``antialias=True`` gives the resize timm applies by default (``resample_abs_pos_embed``): PyTorch's
    anti-aliased bicubic, which uses another cubic kernel (a=-0.5 instead of -0.75) and, when
    shrinking, a wider support. It changes the resampled values by up to a few 1e-2 and is not what
    the published results were made with.

    ``old_grid`` defaults to the square grid implied by the token count (as in every published
    checkpoint, all made at 224x224).
    """
    if old_grid is None:
        n = pos_embed.shape[1] - num_prefix_tokens
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"cannot infer the grid of a position embedding with {n} tokens; "
                             "pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    # timm's function does exactly the published steps when anti-aliasing is off (computed in fp32)
    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(old_grid),
                                  num_prefix_tokens=num_prefix_tokens, interpolation="bicubic",
                                  antialias=antialias, align_corners=False)
