"""``--show-dir``: one PNG per test image with the nodule outlines drawn on it.

mmseg's visualiser paints every class, background included, over the image, which for a
two-class ultrasound task mostly darkens the picture. Outlines keep the B-mode texture visible:
ground truth in green, prediction in red (BGR (0, 255, 0) / (0, 0, 255)), where they coincide the
later red line is drawn on top.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Optional, Sequence

import cv2
import numpy as np
from mmengine.hooks import Hook
from mmseg.registry import HOOKS

GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (0, 0, 255)


def draw_outlines(image: np.ndarray, gt: Optional[np.ndarray], pred: np.ndarray,
                  nodule_label: int = 1, thickness: int = 2) -> np.ndarray:
    """Return a BGR copy of ``image`` with the outlines of ``gt`` and ``pred`` nodules."""
    canvas = image.copy() if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    for mask, colour in ((gt, GT_COLOUR), (pred, PRED_COLOUR)):
        if mask is None:
            continue
        contours, _ = cv2.findContours((mask == nodule_label).astype(np.uint8),
                                       cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, colour, thickness)
    return canvas


@HOOKS.register_module()
class NoduleOverlayHook(Hook):
    """Writes ``<out_dir>/<image name>.png`` for every test image."""

    def __init__(self, out_dir: str, nodule_label: int = 1):
        self.out_dir = out_dir
        self.nodule_label = nodule_label

    def before_test(self, runner) -> None:
        os.makedirs(self.out_dir, exist_ok=True)

    def after_test_iter(self, runner, batch_idx: int, data_batch=None,
                        outputs: Sequence = ()) -> None:
        for sample in outputs:
            image = cv2.imread(sample.img_path, cv2.IMREAD_COLOR)
            if image is None:
                raise FileNotFoundError(f'cannot read {sample.img_path} for the overlay')
            pred = sample.pred_sem_seg.data.squeeze(0).cpu().numpy()
            gt = sample.gt_sem_seg.data.squeeze(0).cpu().numpy() if 'gt_sem_seg' in sample else None
            name = osp.splitext(osp.basename(sample.img_path))[0] + '.png'
            cv2.imwrite(osp.join(self.out_dir, name),
                        draw_outlines(image, gt, pred, self.nodule_label))
