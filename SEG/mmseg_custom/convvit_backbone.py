"""ConvViT (ConvMAE encoder) as an mmseg backbone: feature maps at strides 4, 8, 16 and 32.

A subclass of ``models_vit.ConvViT``: the encoder layers, their parameter names and the stage
forward pass are that class's, so every ConvMAE / Deblurring ConvMAE checkpoint loads by name.
What segmentation adds:

* the stride-32 map: a strided 3x3 conv + norm + GELU on the stride-16 map (``downsample``);
* optional relative position bias in every transformer block (``use_rel_pos_bias``, published
  configs: on), a learned table per block, zero at the start so the pretrained attention is
  unchanged until training moves it;
* optional layer scale (``init_values``, published configs: 1.0), timm's ``LayerScale``;
* a learned absolute position embedding for the crop grid, resampled from the checkpoint's grid
  (``use_abs_pos_emb``, published configs: on);
* pretrained weights loaded at construction, after all random initialisation, and never touched
  again by ``init_weights`` (the published backbone re-initialised them afterwards).

Constructor arguments keep the published names (``embed_dim``, ``depth``, ``mlp_ratio``, ``img_size``
as ``[512, 128, 64]`` ...), so the published configs' backbone dicts work unchanged.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmengine.logging import MMLogger
from mmseg.registry import MODELS
from timm.layers import Attention, LayerScale
from timm.layers.pos_embed_rel import gen_relative_position_index

from models_vit import CONVVIT_STRIDES, ConvViT

from .fixed_size import crop_to_input, pad_to_size
from .pretrained import load_pretrained_backbone

FEATURE_STRIDES = (4, 8, 16, 32)
# The published configs pass out_indices=[3, 5, 7, 11], which the published backbone ignored
# (it always returned the four stage outputs); only that value (or None) is accepted here.
PUBLISHED_OUT_INDICES = (3, 5, 7, 11)


class RelPosBiasAttention(Attention):
    """timm attention plus a learned relative position bias over a fixed token grid (BEiT style).

    Parameter names (``qkv``, ``proj``, ``relative_position_bias_table``) are those of the published
    segmentation backbone; the bias is passed to timm's attention as an additive mask, so the
    fused (SDPA) kernel is kept.
    """

    def __init__(self, dim: int, num_heads: int, grid: Tuple[int, int], proj_drop: float = 0.0):
        super().__init__(dim, num_heads=num_heads, qkv_bias=True, proj_drop=proj_drop)
        self.grid = tuple(grid)
        num_distances = (2 * grid[0] - 1) * (2 * grid[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_distances, num_heads))
        # derived from the grid, so not saved in checkpoints
        self.register_buffer('relative_position_index',
                             gen_relative_position_index(self.grid).view(-1), persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.grid[0] * self.grid[1]
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        bias = self.relative_position_bias()
        if attn_mask is not None:
            bias = bias + attn_mask
        return super().forward(x, attn_mask=bias, is_causal=is_causal)


def _as_size(img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """``512``, ``(512, 512)`` or the published per-stage list ``[512, 128, 64]`` (input first)."""
    if isinstance(img_size, int):
        return img_size, img_size
    if len(img_size) == 3:  # published: input size of each patch-embedding stage
        return int(img_size[0]), int(img_size[0])
    if len(img_size) == 2:
        return int(img_size[0]), int(img_size[1])
    raise ValueError(f'img_size must be an int, (H, W) or the published [input, stage2, stage3] '
                     f'list, got {img_size!r}')


@MODELS.register_module(name=['ConvViTBackbone', 'ConvMAE'])
class ConvViTBackbone(ConvViT):
    """Outputs (N, embed_dim[0], H/4, W/4), (N, embed_dim[1], H/8, W/8), (N, embed_dim[2], H/16,
    W/16) and (N, embed_dim[2], H/32, W/32).

    Args (published names):
        img_size: crop size the position embedding / relative bias are built for.
        patch_size: strides of the three patch embeddings; fixed to (4, 2, 2) by ConvViT.
        embed_dim, depth, num_heads, mlp_ratio: ConvViT size (base: (256, 384, 768), (2, 2, 11), 12).
        qkv_bias: must be True (every ConvMAE checkpoint has qkv biases).
        use_abs_pos_emb: learned absolute position embedding added to the stage-3 tokens.
        use_rel_pos_bias: relative position bias table in every transformer block.
        init_values: layer-scale initial value (None: no layer scale).
        drop_rate, drop_path_rate: dropout and stochastic depth (linear over all blocks).
        out_indices: accepted for the published configs only (see PUBLISHED_OUT_INDICES).
        norm_cfg: norm of the stride-32 branch (published: SyncBN; reverted to BN when not
            distributed by mmengine, and on CPU by SEG/tools).
        pretrained: encoder checkpoint (ours or published); ``model.pretrained`` of the segmentor
            is passed here by mmseg's EncoderDecoder.
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 512,
                 patch_size: Sequence[int] = CONVVIT_STRIDES, in_chans: int = 3,
                 embed_dim: Sequence[int] = (256, 384, 768), depth: Sequence[int] = (2, 2, 11),
                 num_heads: int = 12, mlp_ratio: Sequence[float] = (4, 4, 4), qkv_bias: bool = True,
                 use_abs_pos_emb: bool = True, use_rel_pos_bias: bool = True,
                 use_shared_rel_pos_bias: bool = False, init_values: Optional[float] = 1.0,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 out_indices: Optional[Sequence[int]] = None,
                 norm_cfg: Optional[dict] = None, pretrained: Optional[str] = None):
        if tuple(patch_size) != tuple(CONVVIT_STRIDES):
            raise ValueError(f'ConvViT patch embeddings have strides {CONVVIT_STRIDES}, got '
                             f'patch_size={tuple(patch_size)}')
        if not qkv_bias:
            raise ValueError('ConvViT blocks always have qkv biases (as every ConvMAE checkpoint); '
                             'qkv_bias=False is not supported')
        if use_shared_rel_pos_bias:
            raise ValueError('use_shared_rel_pos_bias (one bias table for all blocks) is not '
                             'supported: no published config uses it; use use_rel_pos_bias')
        if out_indices is not None and tuple(out_indices) != PUBLISHED_OUT_INDICES:
            raise ValueError(f'out_indices has no effect on ConvViT (its outputs are the ends of '
                             f'stages 1-3 plus the stride-32 branch); leave it out, got {out_indices}')
        self.img_size = _as_size(img_size)
        super().__init__(img_size=self.img_size, in_chans=in_chans, num_classes=0,
                         embed_dims=tuple(embed_dim), depths=tuple(depth), num_heads=num_heads,
                         mlp_ratios=tuple(mlp_ratio), norm_layer=partial(nn.LayerNorm, eps=1e-6),
                         drop_rate=drop_rate, drop_path_rate=drop_path_rate, global_pool=False)
        dim = self.embed_dims[-1]
        # Segmentation uses the stage-3 tokens before the final norm (as published); removing the
        # unused norm keeps DDP from waiting for gradients that never come.
        self.norm = nn.Identity()
        self._configure_blocks(num_heads, use_rel_pos_bias, init_values, drop_rate)
        if not use_abs_pos_emb:
            # ConvViT always adds ``pos_embed``: a fixed zero buffer makes that a no-op, and the
            # checkpoint loader keeps a fixed buffer's value instead of loading one.
            del self.pos_embed
            self.register_buffer('pos_embed', torch.zeros(1, 1, dim), persistent=False)
        norm_cfg = norm_cfg or dict(type='SyncBN', requires_grad=True)
        self.downsample = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1),
            build_norm_layer(norm_cfg, dim)[1],
            nn.GELU())
        self.apply(self._init_weights)  # the layers replaced above get ConvViT's initialisation
        self.pretrained = pretrained
        if pretrained:
            load_pretrained_backbone(self, pretrained, self.segmentation_only_parameters())
        else:
            MMLogger.get_current_instance().warning(
                'ConvViTBackbone: model.pretrained is None: the encoder keeps its random '
                'initialisation unless a whole-model checkpoint is loaded later (load_from, '
                '--resume, tools/test.py)')

    def _configure_blocks(self, num_heads, use_rel_pos_bias, init_values, drop_rate):
        dim = self.embed_dims[-1]
        for block in self.blocks3:
            if use_rel_pos_bias:
                block.attn = RelPosBiasAttention(dim, num_heads, self.grid, proj_drop=drop_rate)
            if init_values is not None:
                block.ls1 = LayerScale(dim, init_values=init_values)
                block.ls2 = LayerScale(dim, init_values=init_values)

    def segmentation_only_parameters(self) -> list:
        """Names of weights no encoder checkpoint has: they keep their initialisation."""
        added = ('downsample.', '.relative_position_bias_table', '.ls1.', '.ls2.')
        return [name for name in self.state_dict()
                if name.startswith(added[0]) or any(part in name for part in added[1:])]

    def init_weights(self):
        """Nothing to do: all layers were initialised in ``__init__`` and the pretrained weights
        loaded after that. mmengine calls this after construction; re-initialising here would
        overwrite the pretrained encoder (the published defect)."""

    def forward(self, x: torch.Tensor):
        input_hw = tuple(x.shape[-2:])
        stage1, stage2, stage3 = self.forward_pyramid(pad_to_size(x, self.img_size))
        features = [stage1, stage2, stage3.contiguous(), self.downsample(stage3)]
        return tuple(crop_to_input(features, input_hw, FEATURE_STRIDES))
