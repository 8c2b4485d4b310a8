"""MAE and Deblurring MAE with a plain ViT encoder (pretraining models).

One class, ``MaskedAutoencoderViT``; the published model names are factories that only choose the
size and the loss defaults:

* ``mae_vit_*``  -- vanilla MAE: input == target, MSE on the masked patches.
* ``dmae_vit_*`` -- Deblurring MAE: the input is the blurred image, the target the sharp original
  (``imgs_orig``), MSE over *all* patches as published.

Target image and loss region are independent options, so each of the two published changes can be
ablated on its own (``loss_on='masked'|'all'``; pass ``imgs_orig`` or not).

Parameter names and shapes follow the published checkpoints exactly (timm-style ``patch_embed.proj``,
``cls_token``, fixed sin-cos ``pos_embed`` with a zero cls row, ``blocks.N.*``, ``norm``, and the
``decoder_*`` / ``mask_token`` decoder), so those checkpoints load strictly.

The masking, decoder and loss shared with ConvMAE live in ``MaskedAutoencoderBase``.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, to_2tuple
from timm.models.vision_transformer import Block

from util.pos_embed import get_2d_sincos_pos_embed
from util.registry import register_pretrain_model

LOSS_REGIONS = ("masked", "all")
# The decoder of every published model (the ``_dec512d8b`` of the long names): 512-d, 8 blocks, 16 heads.
PUBLISHED_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
# The decoder of the CPU-sized (tiny) models of the tests and the demo; not a published size.
TINY_DECODER = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)


def random_masking(batch: int, num_tokens: int, mask_ratio: float, device,
                   noise: Optional[torch.Tensor] = None):
    """Per-sample random masking by argsort of uniform noise (small noise = kept).

    Returns ``ids_keep`` (N, K), ``mask`` (N, L; 1 = removed) and ``ids_restore`` (N, L).
    Pass ``noise`` (N, L) to make the mask reproducible (tests, visualisation, fixed-seed val loss).
    """
    len_keep = int(num_tokens * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, num_tokens, device=device)
    elif noise.shape != (batch, num_tokens):
        raise ValueError(f"noise must have shape {(batch, num_tokens)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    # rank of each token in the shuffle >= len_keep  <=>  removed; no scatter/gather needed
    mask = (ids_restore >= len_keep).to(torch.float32)
    return ids_keep, mask, ids_restore


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), ids (N, K) -> (N, K, D); expand is a view, unlike the published ``repeat``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MaskedAutoencoderBase(nn.Module):
    """Decoder, masking, patchify and loss shared by the ViT and ConvViT masked autoencoders.

    Subclasses build the encoder, set ``self.grid`` (gh, gw), ``self.patch_size`` (total stride),
    ``self.in_chans`` and ``self.num_prefix_tokens`` (1 with a cls token, else 0), and implement
    ``forward_encoder(imgs, ids_keep) -> (N, prefix + K, D)``.
    """

    def _init_geometry(self, img_size, patch_size: int, in_chans: int, num_prefix_tokens: int,
                       norm_pix_loss: bool, loss_on: str):
        """Check the size and loss settings (one clear error before any layer is built) and set
        ``grid``, ``patch_size``, ``in_chans``, ``num_prefix_tokens``, ``norm_pix_loss``, ``loss_on``."""
        if loss_on not in LOSS_REGIONS:
            raise ValueError(f"loss_on must be one of {LOSS_REGIONS}, got {loss_on!r}")
        img_size = to_2tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        self.patch_size, self.in_chans, self.num_prefix_tokens = patch_size, in_chans, num_prefix_tokens
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.norm_pix_loss, self.loss_on = norm_pix_loss, loss_on
        return img_size

    def _build_decoder(self, embed_dim: int, decoder_embed_dim: int, decoder_depth: int,
                       decoder_num_heads: int, decoder_mlp_ratio: float, norm_layer):
        num_tokens = self.grid[0] * self.grid[1] + self.num_prefix_tokens
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(dim=decoder_embed_dim, num_heads=decoder_num_heads, mlp_ratio=decoder_mlp_ratio,
                  qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * self.in_chans, bias=True)

    def _init_fixed_embeddings(self):
        cls = self.num_prefix_tokens > 0
        self.pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid, cls_token=cls).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid, cls_token=cls).unsqueeze(0))

    @staticmethod
    def _init_linear_and_norm(m: nn.Module):
        if isinstance(m, nn.Linear):
            # xavier_uniform as the official JAX ViT / MAE
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    # ---------------------------------------------------------------- patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), patch order (h, w), pixels (p, q, c) as published."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W) on ``grid`` (default: the model's)."""
        p, c = self.patch_size, self.in_chans
        gh, gw = grid or self.grid
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    # ---------------------------------------------------------------- forward
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        prefix = self.num_prefix_tokens
        x = self.decoder_embed(latent)
        n, num_visible = x.shape[0], x.shape[1] - prefix
        mask_tokens = self.mask_token.to(x.dtype).expand(n, ids_restore.shape[1] - num_visible, -1)
        patches = torch.cat([x[:, prefix:], mask_tokens], dim=1)
        patches = gather_tokens(patches, ids_restore)  # unshuffle to image order
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, prefix:]

    def patch_target(self, imgs_orig: torch.Tensor) -> torch.Tensor:
        """Target patches in fp32, normalised per patch when ``norm_pix_loss``."""
        target = self.patchify(imgs_orig.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs_orig: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches or over all of them."""
        per_patch = (pred.float() - self.patch_target(imgs_orig)).pow(2).mean(dim=-1)
        if self.loss_on == "all":
            return per_patch.mean()
        # clamp: with mask_ratio 0 there is nothing masked; return 0 rather than NaN (no host sync)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, imgs: torch.Tensor, imgs_orig: Optional[torch.Tensor] = None,
                mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None):
        """Return ``(loss, pred, mask)``; ``imgs_orig`` is the reconstruction target (default ``imgs``)."""
        if imgs_orig is None:
            imgs_orig = imgs
        n = imgs.shape[0]
        ids_keep, mask, ids_restore = random_masking(n, self.num_patches, mask_ratio, imgs.device, noise)
        latent = self.forward_encoder(imgs, ids_keep, mask)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs_orig, pred, mask)
        return loss, pred, mask


class MaskedAutoencoderViT(MaskedAutoencoderBase):
    """Masked autoencoder with a ViT encoder, as MAE, for any image size divisible by the patch."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=False,
                 loss_on="masked"):
        """
        Args:
            img_size: input size, one int (square) or (H, W), each divisible by ``patch_size``.
            patch_size: side of the square patches (the token grid is ``img_size / patch_size``).
            in_chans: input (and reconstructed) channels: 3, or 1 for grey models.
            embed_dim: width of the encoder.
            depth: number of encoder blocks.
            num_heads: attention heads of each encoder block.
            decoder_embed_dim: width of the decoder.
            decoder_depth: number of decoder blocks.
            decoder_num_heads: attention heads of each decoder block.
            mlp_ratio: hidden width of the MLPs (encoder and decoder) as a multiple of their width.
            norm_layer: normalisation layer (LayerNorm, eps 1e-6, as MAE).
            norm_pix_loss: normalise each target patch by its own mean and variance.
            loss_on: ``'masked'`` (MAE: mean squared error on the masked patches) or ``'all'``
                (Deblurring MAE as published: on every patch).
        """
        super().__init__()
        img_size = self._init_geometry(img_size, patch_size, in_chans, 1, norm_pix_loss, loss_on)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                  norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self._build_decoder(embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads,
                            mlp_ratio, norm_layer)
        self.initialize_weights()

    def initialize_weights(self):
        self._init_fixed_embeddings()
        # patch_embed like nn.Linear (MAE)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_linear_and_norm)

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor, mask=None) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = gather_tokens(x, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)



def is_deblurring_model(name: str) -> bool:
    """The ``d*`` names train to reconstruct the sharp image from a blurred input."""
    return name.startswith(("dmae_", "dconvmae_"))


# ------------------------------------------------------------------ named factories
# ``mae_*``: vanilla MAE (the loss on the masked patches). ``dmae_*``: Deblurring MAE (the same model
# with the loss on all patches, as published; it is given the blurred image and the sharp target).
# The ``_dec512d8b`` names are the published long names of the same models. Keyword arguments
# override any setting (``img_size``, ``in_chans``, ``norm_pix_loss``, ``loss_on``, ...).
def _mae_vit(kwargs: dict, *, patch_size: int, embed_dim: int, depth: int, num_heads: int,
             decoder: dict = PUBLISHED_DECODER) -> MaskedAutoencoderViT:
    sizes = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **decoder)
    return MaskedAutoencoderViT(**{**sizes, **kwargs})


def deblurring(factory, kwargs: dict):
    """``factory``'s model with the published Deblurring loss default (all patches)."""
    return factory(**{"loss_on": "all", **kwargs})


@register_pretrain_model
def mae_vit_base_patch16(**kwargs):
    """MAE, ViT-B/16 encoder (768-d, 12 blocks, 12 heads)."""
    return _mae_vit(kwargs, patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_pretrain_model
def mae_vit_large_patch16(**kwargs):
    """MAE, ViT-L/16 encoder (1024-d, 24 blocks, 16 heads)."""
    return _mae_vit(kwargs, patch_size=16, embed_dim=1024, depth=24, num_heads=16)


@register_pretrain_model
def mae_vit_huge_patch14(**kwargs):
    """MAE, ViT-H/14 encoder (1280-d, 32 blocks, 16 heads)."""
    return _mae_vit(kwargs, patch_size=14, embed_dim=1280, depth=32, num_heads=16)


@register_pretrain_model
def mae_vit_base_patch8(**kwargs):
    """MAE, ViT-B encoder on 8x8 patches."""
    return _mae_vit(kwargs, patch_size=8, embed_dim=768, depth=12, num_heads=12)


@register_pretrain_model
def mae_vit_base_patch28(**kwargs):
    """MAE, ViT-B encoder on 28x28 patches."""
    return _mae_vit(kwargs, patch_size=28, embed_dim=768, depth=12, num_heads=12)


@register_pretrain_model
def mae_vit_tiny_patch16(**kwargs):
    """MAE, CPU-sized ViT (96-d, 2 blocks, 3 heads; decoder 64-d, 1 block) for tests and the demo."""
    return _mae_vit(kwargs, patch_size=16, embed_dim=96, depth=2, num_heads=3, decoder=TINY_DECODER)


@register_pretrain_model
def dmae_vit_base_patch16(**kwargs):
    """Deblurring MAE, ViT-B/16 encoder."""
    return deblurring(mae_vit_base_patch16, kwargs)


@register_pretrain_model
def dmae_vit_large_patch16(**kwargs):
    """Deblurring MAE, ViT-L/16 encoder."""
    return deblurring(mae_vit_large_patch16, kwargs)


@register_pretrain_model
def dmae_vit_huge_patch14(**kwargs):
    """Deblurring MAE, ViT-H/14 encoder."""
    return deblurring(mae_vit_huge_patch14, kwargs)


@register_pretrain_model
def dmae_vit_base_patch8(**kwargs):
    """Deblurring MAE, ViT-B encoder on 8x8 patches."""
    return deblurring(mae_vit_base_patch8, kwargs)


@register_pretrain_model
def dmae_vit_base_patch28(**kwargs):
    """Deblurring MAE, ViT-B encoder on 28x28 patches."""
    return deblurring(mae_vit_base_patch28, kwargs)


@register_pretrain_model
def dmae_vit_tiny_patch16(**kwargs):
    """Deblurring MAE, CPU-sized ViT for tests and the demo."""
    return deblurring(mae_vit_tiny_patch16, kwargs)


# The published long names, decoder spelled out.
@register_pretrain_model
def mae_vit_base_patch16_dec512d8b(**kwargs):
    return mae_vit_base_patch16(**kwargs)


@register_pretrain_model
def mae_vit_large_patch16_dec512d8b(**kwargs):
    return mae_vit_large_patch16(**kwargs)


@register_pretrain_model
def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return mae_vit_huge_patch14(**kwargs)


@register_pretrain_model
def mae_vit_base_patch8_dec512d8b(**kwargs):
    return mae_vit_base_patch8(**kwargs)


@register_pretrain_model
def mae_vit_base_patch28_dec512d8b(**kwargs):
    return mae_vit_base_patch28(**kwargs)


@register_pretrain_model
def dmae_vit_base_patch16_dec512d8b(**kwargs):
    return dmae_vit_base_patch16(**kwargs)


@register_pretrain_model
def dmae_vit_large_patch16_dec512d8b(**kwargs):
    return dmae_vit_large_patch16(**kwargs)


@register_pretrain_model
def dmae_vit_huge_patch14_dec512d8b(**kwargs):
    return dmae_vit_huge_patch14(**kwargs)


@register_pretrain_model
def dmae_vit_base_patch8_dec512d8b(**kwargs):
    return dmae_vit_base_patch8(**kwargs)


@register_pretrain_model
def dmae_vit_base_patch28_dec512d8b(**kwargs):
    return dmae_vit_base_patch28(**kwargs)
