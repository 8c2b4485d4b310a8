"""Per-image nodule metrics (Dice, IoU, 95th-percentile Hausdorff distance) and their JSON file.

mmseg's ``IoUMetric`` accumulates pixel counts over the whole split (the published table);
papers on thyroid-nodule segmentation also report per-image means, and HD95 can only be computed
per image. Conventions, per image, for the nodule class:

* Dice = 2|P∩G| / (|P| + |G|), IoU = |P∩G| / |P∪G|; both 1.0 when P and G are empty;
* HD95 (pixels, at the original image resolution): the 95th percentile of the distances from
  each boundary pixel of P to the nearest boundary pixel of G, pooled with those from G to P
  (boundary = pixels of the mask with a 4-neighbour outside it or on the image border); 0.0 when
  both are empty, undefined (JSON ``null``, left out of the mean) when exactly one is;
* pixels labelled ``ignore_index`` in the ground truth are left out of all three.
"""
from __future__ import annotations

import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger
from mmseg.registry import METRICS
from scipy import ndimage

from util.fileio import atomic_write_text

_FOUR_NEIGHBOURS = ndimage.generate_binary_structure(2, 1)


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, gt).sum()) / total


def iou_score(pred: np.ndarray, gt: np.ndarray) -> float:
    union = int(np.logical_or(pred, gt).sum())
    return 1.0 if union == 0 else int(np.logical_and(pred, gt).sum()) / union


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_FOUR_NEIGHBOURS, border_value=0)


def hd95(pred: np.ndarray, gt: np.ndarray) -> Optional[float]:
    pred, gt = pred.astype(bool), gt.astype(bool)
    if not pred.any() and not gt.any():
        return 0.0
    if not pred.any() or not gt.any():
        return None
    pred_edge, gt_edge = _boundary(pred), _boundary(gt)
    # distance of every pixel to the nearest boundary pixel of the other mask
    to_gt = ndimage.distance_transform_edt(~gt_edge)
    to_pred = ndimage.distance_transform_edt(~pred_edge)
    distances = np.concatenate([to_gt[pred_edge], to_pred[gt_edge]])
    return float(np.percentile(distances, 95))


def nodule_scores(pred: np.ndarray, gt: np.ndarray, nodule_label: int = 1,
                  ignore_index: int = 255) -> Dict[str, Optional[float]]:
    valid = gt != ignore_index
    pred_mask = (pred == nodule_label) & valid
    gt_mask = (gt == nodule_label) & valid
    return dict(dice=dice_score(pred_mask, gt_mask), iou=iou_score(pred_mask, gt_mask),
                hd95=hd95(pred_mask, gt_mask))


def summarise(per_image: Sequence[dict]) -> Dict[str, float]:
    def mean(key):
        values = [r[key] for r in per_image if r[key] is not None]
        return float(np.mean(values)) if values else None
    return dict(dice=mean('dice'), iou=mean('iou'), hd95=mean('hd95'),
                hd95_undefined=sum(r['hd95'] is None for r in per_image))


@METRICS.register_module()
class PerImageNoduleMetric(BaseMetric):
    """Args:
        output_file: JSON written at the end of each evaluation (the SEG tools put it in the work
            dir: ``per_image_metrics.json``); ``None``: not written.
        nodule_label, ignore_index: label of the nodule class and the ignored label.

    Returns ``nodule_dice`` / ``nodule_iou`` (percent, means over images) and ``nodule_hd95``
    (pixels, mean over images where it is defined).
    """

    default_prefix = None

    def __init__(self, output_file: Optional[str] = None, nodule_label: int = 1,
                 ignore_index: int = 255, collect_device: str = 'cpu', prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.output_file = output_file
        self.nodule_label = nodule_label
        self.ignore_index = ignore_index

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            pred = sample['pred_sem_seg']['data'].squeeze(0).cpu().numpy()
            gt = sample['gt_sem_seg']['data'].squeeze(0).cpu().numpy()
            scores = nodule_scores(pred, gt, self.nodule_label, self.ignore_index)
            self.results.append(dict(image=osp.basename(sample['img_path']), **scores))

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        summary = summarise(results)
        if self.output_file:
            os.makedirs(osp.dirname(osp.abspath(self.output_file)), exist_ok=True)
            atomic_write_text(self.output_file, json.dumps(
                dict(summary=summary, units='dice and iou: fraction; hd95: pixels',
                     images=sorted(results, key=lambda r: r['image'])), indent=1))
            MMLogger.get_current_instance().info(
                f'per-image nodule metrics of {len(results)} images written to {self.output_file}')
        def percent(value):
            return float('nan') if value is None else round(100 * value, 2)
        return dict(nodule_dice=percent(summary['dice']), nodule_iou=percent(summary['iou']),
                    nodule_hd95=float('nan') if summary['hd95'] is None
                    else round(summary['hd95'], 2))
