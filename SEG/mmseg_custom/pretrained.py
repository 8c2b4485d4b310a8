"""Loading pretrained encoder weights into a segmentation backbone, through util/checkpoint.py.

Accepted files: our pretraining and classification fine-tuning checkpoints, the published
DeblurringMIM / MAE / ConvMAE ones (``{'model': ...}``), and mmseg checkpoints of a whole
segmentor (``{'state_dict': {'backbone.…', 'decode_head.…'}}``), of which only the backbone is used.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch.nn as nn
from mmengine.logging import MMLogger

from util.checkpoint import LoadReport, extract_state_dict, load_checkpoint_file, load_weights

SEGMENTOR_BACKBONE_PREFIX = 'backbone.'
# what a checkpoint of another architecture asks the user to check (the scripts say --model)
BACKBONE_HINT = 'check model.backbone in the config (its size and type)'


def backbone_state(state: Mapping) -> dict:
    """The backbone's weights: a segmentor's ``backbone.*`` entries, else the whole state dict."""
    if any(key.startswith(SEGMENTOR_BACKBONE_PREFIX) for key in state):
        cut = len(SEGMENTOR_BACKBONE_PREFIX)
        return {k[cut:]: v for k, v in state.items() if k.startswith(SEGMENTOR_BACKBONE_PREFIX)}
    return dict(state)


def load_pretrained_backbone(backbone: nn.Module, path: str,
                             new_parameters: Iterable[str] = ()) -> LoadReport:
    """Load ``path`` into ``backbone`` and log what was loaded, interpolated and skipped.

    ``new_parameters``: names of the backbone's parameters that no encoder checkpoint has (the
    segmentation-only layers); they keep their initialisation. Any other missing weight, or a
    shape that cannot be adapted, ends in a ``CheckpointError`` naming the file.
    """
    state = backbone_state(extract_state_dict(load_checkpoint_file(path), path))
    report = load_weights(backbone, state, allowed_missing=tuple(new_parameters), source_name=path,
                          hint=BACKBONE_HINT)
    MMLogger.get_current_instance().info(
        f'{type(backbone).__name__}: pretrained weights\n{report}')
    return report
