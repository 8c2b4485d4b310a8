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
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from util.pos_embed import get_2d_sincos_pos_embed
from util.registry import ModelRegistry

LOSS_REGIONS = ("masked", "all")
MAE_MODELS = ModelRegistry("pretraining model")


def to_2tuple(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


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
        super().__init__()
        if loss_on not in LOSS_REGIONS:
            raise ValueError(f"loss_on must be one of {LOSS_REGIONS}, got {loss_on!r}")
        img_size = to_2tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        self.patch_size, self.in_chans, self.num_prefix_tokens = patch_size, in_chans, 1
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.norm_pix_loss, self.loss_on = norm_pix_loss, loss_on

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


# ------------------------------------------------------------------ named factories
# (patch, embed_dim, depth, heads) of the published encoders; decoder 512-d, 8 blocks, 16 heads.
VIT_SIZES = {
    "base_patch16": (16, 768, 12, 12),
    "large_patch16": (16, 1024, 24, 16),
    "huge_patch14": (14, 1280, 32, 16),
    "base_patch8": (8, 768, 12, 12),
    "base_patch28": (28, 768, 12, 12),
}
# CPU-sized variant for tests and the demo (not a published size).
TINY_VIT = dict(patch_size=16, embed_dim=96, depth=2, num_heads=3,
                decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)


def _vit_factory(size_kwargs: dict, default_loss_on: str):
    def factory(**kwargs):
        kwargs.setdefault("loss_on", default_loss_on)
        return MaskedAutoencoderViT(**{**size_kwargs, **kwargs})
    return factory


def _register_vit_models():
    for size, (patch, dim, depth, heads) in VIT_SIZES.items():
        sizes = dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
        for prefix, loss_on in (("mae", "masked"), ("dmae", "all")):
            factory = _vit_factory(sizes, loss_on)
            MAE_MODELS.register(f"{prefix}_vit_{size}", factory)
            # the published files also exposed the long names with the decoder spelled out
            MAE_MODELS.register(f"{prefix}_vit_{size}_dec512d8b", factory)
    MAE_MODELS.register("mae_vit_tiny_patch16", _vit_factory(TINY_VIT, "masked"))
    MAE_MODELS.register("dmae_vit_tiny_patch16", _vit_factory(TINY_VIT, "all"))


_register_vit_models()


def is_deblurring_model(name: str) -> bool:
    """The ``d*`` names train to reconstruct the sharp image from a blurred input."""
    return name.startswith(("dmae_", "dconvmae_"))
