"""Optimizer parameter groups: weight decay off for biases, norms and embeddings; optional
layer-wise learning-rate decay (``lr_scale`` per group, read by ``util.lr_sched``).

Layer ids (ViT and ConvViT alike): embeddings, ``cls_token``/``pos_embed`` and the convolutional
stages 1-2 (``blocks1``, ``blocks2``, ``patch_embed1..4``) are layer 0; transformer block i
(``blocks.i`` or ``blocks3.i``) is layer i + 1; everything after the blocks (norms, head) is the
last layer, depth + 1, whose scale is 1.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional

import torch.nn as nn

_EMBEDDING_PREFIXES = ("cls_token", "pos_embed", "mask_token", "patch_embed", "blocks1.", "blocks2.")
_BLOCK_RE = re.compile(r"^blocks3?\.(\d+)\.")


def num_transformer_blocks(model: nn.Module) -> int:
    blocks = getattr(model, "blocks3", None)
    if blocks is None:
        blocks = getattr(model, "blocks")
    return len(blocks)


def layer_id(name: str, num_blocks: int) -> int:
    if name.startswith(_EMBEDDING_PREFIXES):
        return 0
    match = _BLOCK_RE.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_blocks + 1


def no_weight_decay_names(model: nn.Module) -> set:
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None,
                 no_weight_decay: Iterable[str] = ()) -> List[dict]:
    """Groups for AdamW. Without ``layer_decay`` there are at most two groups (decay / no decay)."""
    skip = no_weight_decay_names(model) | set(no_weight_decay)
    num_blocks = num_transformer_blocks(model) if layer_decay is not None else 0
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name.endswith(".bias") or name in skip)
        layer = layer_id(name, num_blocks) if layer_decay is not None else 0
        key = (layer, decay)
        if key not in groups:
            scale = layer_decay ** (num_blocks + 1 - layer) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": scale, "layer_id": layer}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
