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

from models_mae import PUBLISHED_DECODER, TINY_DECODER, MaskedAutoencoderBase, deblurring, gather_tokens
from models_vit import CONVVIT_PATCH, CONVVIT_SIZES, CONVVIT_STRIDES, build_convvit_encoder
from util.registry import register_pretrain_model


class MaskedAutoencoderConvViT(MaskedAutoencoderBase):
    def __init__(self, img_size=224, in_chans=3, embed_dims=(256, 384, 768), depths=(2, 2, 11),
                 num_heads=12, mlp_ratios=(4, 4, 4), decoder_embed_dim=512, decoder_depth=8,
                 decoder_num_heads=16, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 norm_pix_loss=False, loss_on="masked"):
        """
        Args:
            img_size: input size, one int (square) or (H, W), each divisible by 16 (the total stride).
            in_chans: input (and reconstructed) channels: 3, or 1 for grey models.
            embed_dims: widths of the three encoder stages (two convolutional, then the transformer).
            depths: blocks per stage.
            num_heads: attention heads of the transformer blocks.
            mlp_ratios: MLP hidden width per stage, as a multiple of the stage width; the decoder
                blocks use the stage-1 ratio, as published.
            decoder_embed_dim: width of the decoder.
            decoder_depth: number of decoder blocks.
            decoder_num_heads: attention heads of each decoder block.
            norm_layer: normalisation of the transformer and decoder blocks (LayerNorm, eps 1e-6).
            norm_pix_loss: normalise each target patch by its own mean and variance.
            loss_on: ``'masked'`` (ConvMAE: loss on the masked patches) or ``'all'`` (Deblurring
                ConvMAE as published: on every patch).
        """
        super().__init__()
        self._init_geometry(img_size, CONVVIT_PATCH, in_chans, 0, norm_pix_loss, loss_on)

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


# ------------------------------------------------------------------ named factories
# ``convmae_*``: vanilla ConvMAE (the loss on the masked patches). ``dconvmae_*``: Deblurring ConvMAE
# (the loss on all patches, as published; given the blurred image and the sharp target). The
# ``_dec512d8b`` names are the published long names of the same models. Keyword arguments override any
# setting (``img_size``, ``in_chans``, ``norm_pix_loss``, ``loss_on``, ...).
def _convmae(size: str, kwargs: dict, decoder: dict = PUBLISHED_DECODER) -> MaskedAutoencoderConvViT:
    return MaskedAutoencoderConvViT(**{**CONVVIT_SIZES[size], **decoder, **kwargs})


@register_pretrain_model
def convmae_convvit_base_patch16(**kwargs):
    """ConvMAE, ConvViT-B encoder (stages 256/384/768 wide, 2/2/11 blocks, 12 heads)."""
    return _convmae("base", kwargs)


@register_pretrain_model
def convmae_convvit_large_patch16(**kwargs):
    """ConvMAE, ConvViT-L encoder (stages 384/768/1024 wide, 2/2/23 blocks, 16 heads)."""
    return _convmae("large", kwargs)


@register_pretrain_model
def convmae_convvit_huge_patch16(**kwargs):
    """ConvMAE, ConvViT-H encoder (stages 768/1024/1280 wide, 2/2/31 blocks, 16 heads)."""
    return _convmae("huge", kwargs)


@register_pretrain_model
def convmae_convvit_tiny_patch16(**kwargs):
    """ConvMAE, CPU-sized ConvViT (decoder 64-d, 1 block) for tests and the demo."""
    return _convmae("tiny", kwargs, decoder=TINY_DECODER)


@register_pretrain_model
def dconvmae_convvit_base_patch16(**kwargs):
    """Deblurring ConvMAE, ConvViT-B encoder."""
    return deblurring(convmae_convvit_base_patch16, kwargs)


@register_pretrain_model
def dconvmae_convvit_large_patch16(**kwargs):
    """Deblurring ConvMAE, ConvViT-L encoder."""
    return deblurring(convmae_convvit_large_patch16, kwargs)


@register_pretrain_model
def dconvmae_convvit_huge_patch16(**kwargs):
    """Deblurring ConvMAE, ConvViT-H encoder."""
    return deblurring(convmae_convvit_huge_patch16, kwargs)


@register_pretrain_model
def dconvmae_convvit_tiny_patch16(**kwargs):
    """Deblurring ConvMAE, CPU-sized ConvViT for tests and the demo."""
    return deblurring(convmae_convvit_tiny_patch16, kwargs)


# The published long names, decoder spelled out.
@register_pretrain_model
def convmae_convvit_base_patch16_dec512d8b(**kwargs):
    return convmae_convvit_base_patch16(**kwargs)


@register_pretrain_model
def convmae_convvit_large_patch16_dec512d8b(**kwargs):
    return convmae_convvit_large_patch16(**kwargs)


@register_pretrain_model
def convmae_convvit_huge_patch16_dec512d8b(**kwargs):
    return convmae_convvit_huge_patch16(**kwargs)


@register_pretrain_model
def dconvmae_convvit_base_patch16_dec512d8b(**kwargs):
    return dconvmae_convvit_base_patch16(**kwargs)


@register_pretrain_model
def dconvmae_convvit_large_patch16_dec512d8b(**kwargs):
    return dconvmae_convvit_large_patch16(**kwargs)


@register_pretrain_model
def dconvmae_convvit_huge_patch16_dec512d8b(**kwargs):
    return dconvmae_convvit_huge_patch16(**kwargs)
