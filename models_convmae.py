"""ConvMAE and Deblurring ConvMAE (pretraining models with the ConvViT encoder).

One class, ``MaskedAutoencoderConvViT``; ``convmae_convvit_*`` (input == target, masked-patch loss)
and ``dconvmae_convvit_*`` (blurred input, sharp target, loss over all patches, as published) only
choose sizes and defaults.

The encoder is the ConvViT of ``models_vit.py``: two convolutional stages whose 5x5 depth-wise
convolutions see only visible positions (the token mask upsampled to the stage-1 and stage-2 grids,
derived from the input size, so any size divisible by 16 works, non-square included), then
transformer blocks over the visible tokens only. ``stage1_output_decode`` / ``stage2_output_decode``
project the stage-1/2 maps to stage-3 tokens, which are gathered with the same kept ids and added to
the transformer output before ``norm`` (multi-scale fusion).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from models_mae import LOSS_REGIONS, MaskedAutoencoderBase, gather_tokens, to_2tuple
from util.registry import ModelRegistry
from models_vit import CONVVIT_PATCH, CONVVIT_SIZES, CONVVIT_STRIDES, build_convvit_encoder


class MaskedAutoencoderConvViT(MaskedAutoencoderBase):
    def __init__(self, img_size=224, in_chans=3, embed_dims=(256, 384, 768), depths=(2, 2, 11),
                 num_heads=12, mlp_ratios=(4, 4, 4), decoder_embed_dim=512, decoder_depth=8,
                 decoder_num_heads=16, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 norm_pix_loss=False, loss_on="masked"):
        super().__init__()
        if loss_on not in LOSS_REGIONS:
            raise ValueError(f"loss_on must be one of {LOSS_REGIONS}, got {loss_on!r}")
        img_size = to_2tuple(img_size)
        if img_size[0] % CONVVIT_PATCH or img_size[1] % CONVVIT_PATCH:
            raise ValueError(f"ConvMAE needs an image size divisible by 16, got {img_size}")
        self.patch_size, self.in_chans, self.num_prefix_tokens = CONVVIT_PATCH, in_chans, 0
        self.grid = (img_size[0] // CONVVIT_PATCH, img_size[1] // CONVVIT_PATCH)
        self.norm_pix_loss, self.loss_on = norm_pix_loss, loss_on

        build_convvit_encoder(self, in_chans, embed_dims, depths, num_heads, mlp_ratios, norm_layer)
        # Each stage-1 (stage-2) map is projected onto the token grid by a conv whose stride is the
        # remaining downsampling factor: 4 = 2*2 from stage 1, 2 from stage 2.
        s12, s2 = CONVVIT_STRIDES[1] * CONVVIT_STRIDES[2], CONVVIT_STRIDES[2]
        self.stage1_output_decode = nn.Conv2d(embed_dims[0], embed_dims[2], s12, stride=s12)
        self.stage2_output_decode = nn.Conv2d(embed_dims[1], embed_dims[2], s2, stride=s2)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dims[2]), requires_grad=False)
        # The published decoder blocks use the stage-1 MLP ratio (8 for large/huge): keep it for
        # checkpoint compatibility.
        self._build_decoder(embed_dims[2], decoder_embed_dim, decoder_depth, decoder_num_heads,
                            mlp_ratios[0], norm_layer)
        self.initialize_weights()

    def initialize_weights(self):
        self._init_fixed_embeddings()
        w = self.patch_embed3.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_linear_and_norm)

    def _stage_visibility(self, mask: torch.Tensor):
        """Token mask (N, L; 1 = removed) -> visibility maps on the stage-1 and stage-2 grids."""
        visible = (1.0 - mask).reshape(mask.shape[0], 1, *self.grid)
        s12, s2 = CONVVIT_STRIDES[1] * CONVVIT_STRIDES[2], CONVVIT_STRIDES[2]
        return (F.interpolate(visible, scale_factor=s12, mode="nearest"),
                F.interpolate(visible, scale_factor=s2, mode="nearest"))

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        visible1, visible2 = self._stage_visibility(mask)
        x = self.patch_embed1(imgs)
        for blk in self.blocks1:
            x = blk(x, visible1)
        stage1 = self.stage1_output_decode(x).flatten(2).transpose(1, 2)
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x, visible2)
        stage2 = self.stage2_output_decode(x).flatten(2).transpose(1, 2)
        x = self.patch_embed3(x).flatten(2).transpose(1, 2)
        x = self.patch_embed4(x) + self.pos_embed
        x = gather_tokens(x, ids_keep)
        for blk in self.blocks3:
            x = blk(x)
        x = x + gather_tokens(stage1, ids_keep) + gather_tokens(stage2, ids_keep)
        return self.norm(x)


CONVMAE_MODELS = ModelRegistry("pretraining model")
TINY_DECODER = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)


def _convmae_factory(sizes: dict, default_loss_on: str):
    def factory(**kwargs):
        kwargs.setdefault("loss_on", default_loss_on)
        return MaskedAutoencoderConvViT(**{**sizes, **kwargs})
    return factory


def _register_convmae_models():
    for size, (dims, depths, heads, mlps) in CONVVIT_SIZES.items():
        sizes = dict(embed_dims=dims, depths=depths, num_heads=heads, mlp_ratios=mlps)
        published = size != "tiny"
        if published:
            sizes.update(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
        else:
            sizes.update(TINY_DECODER)
        for prefix, loss_on in (("convmae", "masked"), ("dconvmae", "all")):
            factory = _convmae_factory(sizes, loss_on)
            CONVMAE_MODELS.register(f"{prefix}_convvit_{size}_patch16", factory)
            if published:
                CONVMAE_MODELS.register(f"{prefix}_convvit_{size}_patch16_dec512d8b", factory)


_register_convmae_models()
