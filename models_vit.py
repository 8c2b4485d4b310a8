"""Fine-tuning encoders: ViT and ConvViT classifiers, plus multi-scale features for segmentation.

* ``vit_*``     -- timm's ``VisionTransformer`` with MAE's fine-tuning head: global average pool of
  the patch tokens + ``fc_norm`` (default), or the cls token + ``norm``.
* ``convvit_*`` -- the ConvMAE encoder (two convolutional stages, then transformer blocks). It has no
  cls token, so both pooling choices average the patch tokens: ``global_pool=True`` applies
  ``fc_norm`` after pooling (published default), ``False`` applies ``norm`` before it. The published
  non-pooled path took ``x[:, 0]``, i.e. the first *patch* token, as if it were a cls token;
  ``global_pool="first_patch"`` reproduces it (``--first_patch_token`` in main_finetune.py).

The ConvViT building blocks (``ConvPatchEmbed``, ``CBlock``) and the stage builder are shared with the
pretraining model in ``models_convmae.py`` so that parameter names are defined in one place.
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath, to_2tuple, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer as TimmVisionTransformer

from util.registry import finetune_models, register_finetune_model


# =============================================================================== ConvViT layers
class ConvPatchEmbed(nn.Module):
    """Strided conv + LayerNorm (channels last, eps 1e-5) + GELU, as in ConvMAE. NCHW in and out."""

    def __init__(self, in_chans: int, embed_dim: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=stride, stride=stride)
        self.norm = nn.LayerNorm(embed_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.act(x)


class ConvMlp(nn.Module):
    """1x1-convolution MLP (parameter names ``fc1``/``fc2`` as published)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class CBlock(nn.Module):
    """ConvMAE convolutional block: ``x + conv2(attn(visible * conv1(norm1(x))))`` with ``attn`` a
    5x5 depth-wise conv, then ``x + mlp(norm2(x))``.

    ``visible`` (N, 1, H, W; 1 = visible) zeroes masked positions *before* the depth-wise conv, so a
    visible position never sees the content of a masked one (the only spatial mixing in the block).
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)

    @staticmethod
    def _norm_nchw(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, visible: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.conv1(self._norm_nchw(self.norm1, x))
        if visible is not None:
            y = y * visible.to(y.dtype)
        x = x + self.drop_path(self.conv2(self.attn(y)))
        return x + self.drop_path(self.mlp(self._norm_nchw(self.norm2, x)))


# ConvViT pooling that reproduces the published non-pooled path (norm, then the first patch token).
FIRST_PATCH = "first_patch"

# Stage strides of the ConvViT: 4 (stage 1), x2 (stage 2), x2 (stage 3) -> total 16.
CONVVIT_STRIDES = (4, 2, 2)
CONVVIT_PATCH = 16


def build_convvit_encoder(module: nn.Module, in_chans: int, embed_dims: Sequence[int],
                          depths: Sequence[int], num_heads: int, mlp_ratios: Sequence[float],
                          norm_layer, drop_path_rate: float = 0.0, drop_rate: float = 0.0):
    """Attach the ConvViT encoder to ``module`` under the published top-level names
    (``patch_embed1..4``, ``blocks1..3``, ``norm``); shared by pretraining and fine-tuning models."""
    d1, d2, d3 = embed_dims
    total = sum(depths)
    # stochastic depth grows linearly with depth (plain Python so meta-device construction works)
    dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    module.patch_embed1 = ConvPatchEmbed(in_chans, d1, CONVVIT_STRIDES[0])
    module.patch_embed2 = ConvPatchEmbed(d1, d2, CONVVIT_STRIDES[1])
    module.patch_embed3 = ConvPatchEmbed(d2, d3, CONVVIT_STRIDES[2])
    module.patch_embed4 = nn.Linear(d3, d3)
    module.blocks1 = nn.ModuleList([CBlock(d1, mlp_ratios[0], dpr[i], drop_rate) for i in range(depths[0])])
    module.blocks2 = nn.ModuleList([CBlock(d2, mlp_ratios[1], dpr[depths[0] + i], drop_rate)
                                    for i in range(depths[1])])
    module.blocks3 = nn.ModuleList([
        Block(dim=d3, num_heads=num_heads, mlp_ratio=mlp_ratios[2], qkv_bias=True, norm_layer=norm_layer,
              drop_path=dpr[depths[0] + depths[1] + i], proj_drop=drop_rate)
        for i in range(depths[2])])
    module.norm = norm_layer(d3)


# The published ConvViT sizes, and a CPU-sized one for tests and the demo (shared by the pretraining
# models of models_convmae.py).
CONVVIT_SIZES = {
    "base": dict(embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12, mlp_ratios=(4, 4, 4)),
    "large": dict(embed_dims=(384, 768, 1024), depths=(2, 2, 23), num_heads=16, mlp_ratios=(8, 8, 4)),
    "huge": dict(embed_dims=(768, 1024, 1280), depths=(2, 2, 31), num_heads=16, mlp_ratios=(8, 8, 4)),
    "tiny": dict(embed_dims=(32, 48, 96), depths=(1, 1, 2), num_heads=3, mlp_ratios=(4, 4, 4)),
}


# =============================================================================== ViT
class VisionTransformer(TimmVisionTransformer):
    """timm ViT with MAE's pooling convention and a multi-scale feature method for segmentation."""

    def __init__(self, global_pool: bool = True, **kwargs):
        """
        Args:
            global_pool: ``True``: the average of the patch tokens, then ``fc_norm`` (MAE's fine-tuning
                head, no final ``norm``); ``False``: the cls token after ``norm``.
            **kwargs: timm ``VisionTransformer`` arguments (``img_size`` one int or (H, W),
                ``patch_size``, ``in_chans``, ``num_classes``, ``embed_dim``, ``depth``, ``num_heads``,
                ``mlp_ratio``, ``drop_path_rate``, ...); the norm layer defaults to LayerNorm eps 1e-6.
        """
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        if global_pool == FIRST_PATCH:
            raise ValueError("first-patch pooling exists for ConvViT only (no class token there); a ViT "
                             "classifies from its class token with global_pool=False (--cls_token)")
        if global_pool:
            # average of the patch tokens, then fc_norm; no final `norm` (MAE fine-tuning)
            kwargs.update(global_pool="avg", fc_norm=True)
        else:
            kwargs.update(global_pool="token", fc_norm=False)
        super().__init__(**kwargs)
        self.grid = self.patch_embed.grid_size

    def forward_pyramid(self, x: torch.Tensor, indices: Sequence[int] = (3, 5, 7, 11)) -> List[torch.Tensor]:
        """Outputs of the chosen blocks as (N, D, H/p, W/p) maps (all at the patch stride)."""
        return self.forward_intermediates(x, indices=list(indices), norm=False, output_fmt="NCHW",
                                          intermediates_only=True)


VIT_SIZES = {
    "base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "base_patch8": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12),
    "base_patch28": dict(patch_size=28, embed_dim=768, depth=12, num_heads=12),
    "tiny_patch16": dict(patch_size=16, embed_dim=96, depth=2, num_heads=3),
}


# =============================================================================== ConvViT
class ConvViT(nn.Module):
    """ConvMAE encoder for fine-tuning (classification head, drop path, learnable position embedding)."""

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dims=(256, 384, 768),
                 depths=(2, 2, 11), num_heads=12, mlp_ratios=(4, 4, 4),
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_rate=0.0, drop_path_rate=0.0,
                 global_pool: bool = True):
        """
        Args:
            img_size: input size, one int (square) or (H, W), each divisible by 16.
            in_chans: input channels: 3, or 1 for grey models.
            num_classes: classes of the linear head (0: no head, the pooled features are the output).
            embed_dims: widths of the three stages (two convolutional, then the transformer).
            depths: blocks per stage.
            num_heads: attention heads of the transformer blocks.
            mlp_ratios: MLP hidden width per stage, as a multiple of the stage width.
            norm_layer: normalisation of the transformer blocks and the final norm (LayerNorm, eps 1e-6).
            drop_rate: dropout after the embeddings and in the MLPs.
            drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over the blocks.
            global_pool: ``True``: average of the tokens, then ``fc_norm`` (published default);
                ``False``: ``norm``, then the average; ``'first_patch'``: ``norm``, then the first patch
                token (the published non-pooled path).
        """
        super().__init__()
        img_size = to_2tuple(img_size)
        if img_size[0] % CONVVIT_PATCH or img_size[1] % CONVVIT_PATCH:
            raise ValueError(f"ConvViT needs an image size divisible by 16, got {img_size}")
        self.grid = (img_size[0] // CONVVIT_PATCH, img_size[1] // CONVVIT_PATCH)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.embed_dim = embed_dims[-1]
        if global_pool not in (True, False, FIRST_PATCH):
            raise ValueError(f"global_pool must be True, False or {FIRST_PATCH!r}, got {global_pool!r}")
        global_pool = global_pool if global_pool == FIRST_PATCH else bool(global_pool)
        self.global_pool = global_pool
        build_convvit_encoder(self, in_chans, embed_dims, depths, num_heads, mlp_ratios, norm_layer,
                              drop_path_rate, drop_rate)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dims[-1]))
        self.pos_drop = nn.Dropout(drop_rate)
        if global_pool is True:
            self.fc_norm = norm_layer(embed_dims[-1])
            del self.norm  # MAE convention: the pooled features are normalised by fc_norm instead
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed"}

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_stages(self, x: torch.Tensor):
        """Return the stride-4 and stride-8 maps and the stride-16 token sequence (before norm)."""
        x = self.pos_drop(self.patch_embed1(x))
        for blk in self.blocks1:
            x = blk(x)
        stage1 = x
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x)
        stage2 = x
        x = self.patch_embed3(x)
        gh, gw = x.shape[-2:]
        x = self.patch_embed4(x.flatten(2).transpose(1, 2))
        if (gh, gw) != self.grid:
            raise ValueError(f"input grid {(gh, gw)} does not match the model's {self.grid}; build the "
                             f"model with img_size={(gh * 16, gw * 16)}")
        x = x + self.pos_embed
        for blk in self.blocks3:
            x = blk(x)
        return stage1, stage2, x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _, _, tokens = self.forward_stages(x)
        if self.global_pool is True:
            return self.fc_norm(tokens.mean(dim=1))
        tokens = self.norm(tokens)
        return tokens[:, 0] if self.global_pool == FIRST_PATCH else tokens.mean(dim=1)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_pyramid(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Feature maps at strides 4, 8 and 16 (channels ``embed_dims``) for dense prediction."""
        stage1, stage2, tokens = self.forward_stages(x)
        n, _, d = tokens.shape
        stage3 = tokens.transpose(1, 2).reshape(n, d, *self.grid)
        return [stage1, stage2, stage3]


# =============================================================================== factories
# Keyword arguments override any setting (``img_size``, ``in_chans``, ``num_classes``, ``global_pool``, ...).
def _vit(size: dict, kwargs: dict) -> VisionTransformer:
    return VisionTransformer(**{**dict(mlp_ratio=4, qkv_bias=True), **size, **kwargs})


@register_finetune_model
def vit_base_patch16(**kwargs):
    """ViT-B/16 (768-d, 12 blocks, 12 heads)."""
    return _vit(VIT_SIZES["base_patch16"], kwargs)


@register_finetune_model
def vit_large_patch16(**kwargs):
    """ViT-L/16 (1024-d, 24 blocks, 16 heads)."""
    return _vit(VIT_SIZES["large_patch16"], kwargs)


@register_finetune_model
def vit_huge_patch14(**kwargs):
    """ViT-H/14 (1280-d, 32 blocks, 16 heads)."""
    return _vit(VIT_SIZES["huge_patch14"], kwargs)


@register_finetune_model
def vit_base_patch8(**kwargs):
    """ViT-B on 8x8 patches."""
    return _vit(VIT_SIZES["base_patch8"], kwargs)


@register_finetune_model
def vit_base_patch28(**kwargs):
    """ViT-B on 28x28 patches."""
    return _vit(VIT_SIZES["base_patch28"], kwargs)


@register_finetune_model
def vit_tiny_patch16(**kwargs):
    """CPU-sized ViT (96-d, 2 blocks, 3 heads) for tests and the demo."""
    return _vit(VIT_SIZES["tiny_patch16"], kwargs)


@register_finetune_model
def convvit_base_patch16(**kwargs):
    """ConvViT-B (stages 256/384/768 wide, 2/2/11 blocks, 12 heads)."""
    return ConvViT(**{**CONVVIT_SIZES["base"], **kwargs})


@register_finetune_model
def convvit_large_patch16(**kwargs):
    """ConvViT-L (stages 384/768/1024 wide, 2/2/23 blocks, 16 heads)."""
    return ConvViT(**{**CONVVIT_SIZES["large"], **kwargs})


@register_finetune_model
def convvit_huge_patch16(**kwargs):
    """ConvViT-H (stages 768/1024/1280 wide, 2/2/31 blocks, 16 heads)."""
    return ConvViT(**{**CONVVIT_SIZES["huge"], **kwargs})


@register_finetune_model
def convvit_tiny_patch16(**kwargs):
    """CPU-sized ConvViT (stages 32/48/96 wide, 1/1/2 blocks, 3 heads) for tests and the demo."""
    return ConvViT(**{**CONVVIT_SIZES["tiny"], **kwargs})


def create_model(name: str, **kwargs) -> nn.Module:
    return finetune_models().create(name, **kwargs)
