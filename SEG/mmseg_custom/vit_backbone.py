"""Plain ViT (MAE encoder) as an mmseg backbone: outputs of four blocks, all at stride 16.

A subclass of ``models_vit.VisionTransformer`` (timm's ViT), so MAE / Deblurring MAE checkpoints
load by name. Pair it with mmseg's ``Feature2Pyramid`` neck (rescales 4, 2, 1, 0.5) to get the
stride 4/8/16/32 pyramid UPerNet expects, as mmseg's own MAE configs do
(see ``configs/de_mae/``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from mmengine.logging import MMLogger
from mmseg.registry import MODELS

from models_vit import VIT_SIZES, VisionTransformer

from .fixed_size import crop_to_input, pad_to_size
from .pretrained import load_pretrained_backbone


@MODELS.register_module()
class ViTBackbone(VisionTransformer):
    """Args:
        arch: a ``models_vit`` size name (``base_patch16``, ``large_patch16``, ``tiny_patch16`` ...).
        img_size: crop size the learned position embedding is built for (resampled from the
            checkpoint's grid when loading).
        out_indices: blocks whose outputs are returned (MAE / BEiT segmentation: 3, 5, 7, 11).
        drop_path_rate: stochastic depth, linear over the blocks.
        pretrained: encoder checkpoint (ours or published); ``model.pretrained`` of the segmentor
            is passed here by mmseg's EncoderDecoder.
        Other keyword arguments override the size (``embed_dim``, ``depth``, ``num_heads`` ...).
    """

    def __init__(self, arch: str = 'base_patch16', img_size: Union[int, Sequence[int]] = 512,
                 out_indices: Sequence[int] = (3, 5, 7, 11), drop_path_rate: float = 0.1,
                 pretrained: Optional[str] = None, **size_overrides):
        if arch not in VIT_SIZES:
            raise ValueError(f'unknown ViT arch {arch!r}; choose one of {", ".join(VIT_SIZES)}')
        size = {**dict(mlp_ratio=4, qkv_bias=True), **VIT_SIZES[arch], **size_overrides}
        super().__init__(global_pool=False, img_size=img_size, num_classes=0,
                         drop_path_rate=drop_path_rate, **size)
        if max(out_indices) >= len(self.blocks):
            raise ValueError(f'out_indices {tuple(out_indices)} must be < depth {len(self.blocks)}')
        self.out_indices = tuple(out_indices)
        # Block outputs are used before the final norm; dropping the unused norm keeps DDP from
        # waiting for gradients that never come.
        self.norm = nn.Identity()
        self.fc_norm = nn.Identity()
        self._constructed = True  # from here on, init_weights must not touch the weights
        self.pretrained = pretrained
        if pretrained:
            load_pretrained_backbone(self, pretrained)
        else:
            MMLogger.get_current_instance().warning(
                'ViTBackbone: model.pretrained is None: the encoder keeps its random '
                'initialisation unless a whole-model checkpoint is loaded later (load_from, '
                '--resume, tools/test.py)')

    def init_weights(self, *args, **kwargs):
        """timm's constructor calls this to initialise its layers; that still happens. After
        construction (mmengine calls it again) it does nothing: the pretrained weights were loaded
        in ``__init__``, and re-initialising would overwrite them (the published defect)."""
        if not getattr(self, '_constructed', False):
            super().init_weights(*args, **kwargs)

    def forward(self, x: torch.Tensor):
        input_hw = tuple(x.shape[-2:])
        size = tuple(self.patch_embed.img_size)
        # timm returns each requested block once, in block order; map back to out_indices (which
        # may repeat a block, e.g. in a 2-block test model)
        blocks = sorted(set(self.out_indices))
        by_block = dict(zip(blocks, self.forward_pyramid(pad_to_size(x, size), indices=blocks)))
        features = [by_block[i] for i in self.out_indices]
        stride = self.patch_embed.patch_size[0]
        return tuple(crop_to_input(features, input_hw, [stride] * len(features)))
