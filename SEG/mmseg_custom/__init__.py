"""DeblurringMIM's additions to mmsegmentation 1.x, registered in mmseg's registries on import.

Configs list this package in ``custom_imports`` (after ``mmseg_compat``); importing it registers:

* backbones ``ConvViTBackbone`` (alias ``ConvMAE``, the published type name) and ``ViTBackbone``;
* the optimizer-wrapper constructor ``LayerDecayOptimWrapperConstructor``;
* the dataset ``UltrasoundNoduleDataset`` (alias ``USDataset``, the published type name);
* the metric ``PerImageNoduleMetric`` (per-image Dice / IoU / HD95 written to JSON);
* the hook ``NoduleOverlayHook`` (``--show-dir`` overlays);
* a fix of mmseg's class-weighted cross-entropy for ignored (padded) pixels (``losses.py``);
* the checkpoint hooks ``WorkDirCheckpointHook`` and ``SegmentorCheckpointCheckHook``, and
  ``util/checkpoint.py`` as mmengine's reader of local checkpoint files (``checkpoints.py``).

The backbones reuse ``models_vit.py`` and ``util/`` from the repository root, one level above
``SEG/``; that folder is put on ``sys.path`` here so the configs work from any working directory.
"""
import os
import sys

_SEG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPO_ROOT = os.path.dirname(_SEG_DIR)
for _path in (_SEG_DIR, _REPO_ROOT):
    if _path not in sys.path:
        sys.path.append(_path)

import mmseg_compat  # noqa: E402,F401  (must precede the first mmseg import)

from .checkpoints import SegmentorCheckpointCheckHook, WorkDirCheckpointHook  # noqa: E402
from .convvit_backbone import ConvViTBackbone  # noqa: E402
from .layer_decay import LayerDecayOptimWrapperConstructor  # noqa: E402
from .losses import weighted_pixel_count  # noqa: E402,F401  (installs the fix)
from .nodule_metric import PerImageNoduleMetric  # noqa: E402
from .overlay_hook import NoduleOverlayHook  # noqa: E402
from .us_dataset import UltrasoundNoduleDataset  # noqa: E402
from .vit_backbone import ViTBackbone  # noqa: E402

__all__ = ['ConvViTBackbone', 'LayerDecayOptimWrapperConstructor', 'NoduleOverlayHook',
           'PerImageNoduleMetric', 'SegmentorCheckpointCheckHook', 'UltrasoundNoduleDataset',
           'ViTBackbone', 'WorkDirCheckpointHook']
