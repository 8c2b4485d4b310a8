"""Layer-wise learning-rate decay for the ConvViT / ViT segmentors (mmengine optimizer constructor).

mmseg's own ``LearningRateDecayOptimizerConstructor`` only knows BEiT / MAE / ConvNeXt parameter
names, so this one reads the levels from ``util.lr_decay.layer_id`` (shared with classification
fine-tuning): for a backbone with L transformer blocks there are L + 2 levels:

* level 0: embeddings and the convolutional stages (``patch_embed*``, ``blocks1``, ``blocks2``,
  ``pos_embed``, ``cls_token``);
* level i + 1: transformer block i (``blocks3.i`` / ``blocks.i``);
* level L + 1: everything else — the backbone's stride-32 branch, the neck and the heads.

A parameter at level l gets ``lr = base_lr * layer_decay_rate ** (L + 1 - l)`` (ConvViT-B: 13
levels, the heads at full lr). Weight decay is off for 1-D parameters (norms, layer scales),
biases, position embeddings, the cls token and relative position bias tables.
"""
from __future__ import annotations

import json
from typing import List, Optional

import torch.nn as nn
from mmengine.dist import get_rank
from mmengine.logging import MMLogger
from mmengine.optim import DefaultOptimWrapperConstructor
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS

from util.lr_decay import layer_id, num_transformer_blocks

BACKBONE_PREFIX = 'backbone.'
NO_DECAY_NAMES = ('pos_embed', 'cls_token', 'relative_position_bias_table')


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    return (param.ndim <= 1 or name.endswith('.bias')
            or name.split('.')[-1] in NO_DECAY_NAMES)


def level_of(name: str, num_blocks: int) -> int:
    """Level of a segmentor parameter (``backbone.…`` by its encoder name, the rest last)."""
    if name.startswith(BACKBONE_PREFIX):
        return layer_id(name[len(BACKBONE_PREFIX):], num_blocks)
    return num_blocks + 1


def layer_decay_groups(model: nn.Module, base_lr: float, weight_decay: float,
                       layer_decay_rate: float, num_blocks: int) -> List[dict]:
    """One parameter group per (level, decay / no decay), ordered by level."""
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        level = level_of(name, num_blocks)
        decay = not is_no_decay(name, param)
        key = (level, decay)
        if key not in groups:
            scale = layer_decay_rate ** (num_blocks + 1 - level)
            groups[key] = dict(params=[], param_names=[], lr=base_lr * scale, lr_scale=scale,
                               weight_decay=weight_decay if decay else 0.0, layer_id=level)
        groups[key]['params'].append(param)
        groups[key]['param_names'].append(name)
    return [groups[key] for key in sorted(groups)]


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``paramwise_cfg=dict(layer_decay_rate=0.75, num_layers=11)``; ``num_layers`` (the number of
    transformer blocks, published name) is optional and checked against the backbone."""

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '',
                   is_dcn_module: Optional[int] = None) -> None:
        rate = self.paramwise_cfg.get('layer_decay_rate')
        if rate is None:
            raise ValueError('LayerDecayOptimWrapperConstructor needs '
                             'paramwise_cfg=dict(layer_decay_rate=...)')
        num_blocks = num_transformer_blocks(module.backbone)
        expected = self.paramwise_cfg.get('num_layers', num_blocks)
        if expected != num_blocks:
            raise ValueError(f'paramwise_cfg.num_layers={expected} but the backbone has '
                             f'{num_blocks} transformer blocks; fix num_layers or leave it out')
        groups = layer_decay_groups(module, self.base_lr, self.base_wd or 0.0, rate, num_blocks)
        params.extend(groups)
        if get_rank() == 0:
            summary = [dict(layer_id=g['layer_id'], lr_scale=round(g['lr_scale'], 6),
                            weight_decay=g['weight_decay'], num_params=len(g['params']))
                       for g in groups]
            MMLogger.get_current_instance().info(
                f'layer decay {rate} over {num_blocks + 2} levels, parameter groups:\n'
                + json.dumps(summary))
