"""Class-weighted cross-entropy with ignored pixels (mmsegmentation 1.2.2 fails on them).

mmseg's ``cross_entropy`` normalises a class-weighted loss by the sum of the class weights of the
labels, looked up as ``class_weight[label]`` for every pixel, the ignored ones included. Ignored
pixels carry the label ``ignore_index`` (255): the padding the data preprocessor adds around a crop
smaller than the model input (any image whose resized shorter side is below the crop size, e.g. a
non-square image with ``keep_ratio=True``) and pixels a mask marks as unknown. The lookup then ends
in ``IndexError: index 255 is out of bounds for dimension 0 with size 2`` (upstream issues
open-mmlab/mmsegmentation#3734 and #3831, not fixed in 1.2.2).

Installed on import of ``mmseg_custom``: the normalisation is computed here, in the same way for
the pixels that have a class, and passed to mmseg's function as its ``avg_factor``. An ignored pixel
counts as mmseg counts it without class weights: 0 with ``avg_non_ignore=True``, 1 otherwise.
Nothing changes for a batch without ignored pixels, nor for unweighted losses.
"""
from __future__ import annotations

import functools

import torch
from mmseg.models import losses
from mmseg.models.losses import cross_entropy_loss

_PATCHED = '__ignored_pixels_weighted__'


def weighted_pixel_count(label: torch.Tensor, class_weight: torch.Tensor, ignore_index: int,
                         avg_non_ignore: bool) -> torch.Tensor:
    """Sum over pixels of the class weight of each label; ignored pixels count 0 or 1."""
    ignored = label == ignore_index
    weights = class_weight.to(label.device)[torch.where(ignored, torch.zeros_like(label), label)]
    return torch.where(ignored, torch.zeros_like(weights) if avg_non_ignore
                       else torch.ones_like(weights), weights).sum()


def _with_ignored_pixels(mmseg_cross_entropy):
    @functools.wraps(mmseg_cross_entropy)
    def cross_entropy(pred, label, weight=None, class_weight=None, reduction='mean',
                      avg_factor=None, ignore_index=-100, avg_non_ignore=False):
        if class_weight is not None and avg_factor is None and reduction == 'mean':
            avg_factor = weighted_pixel_count(label, class_weight, ignore_index, avg_non_ignore)
        return mmseg_cross_entropy(pred, label, weight=weight, class_weight=class_weight,
                                   reduction=reduction, avg_factor=avg_factor,
                                   ignore_index=ignore_index, avg_non_ignore=avg_non_ignore)
    setattr(cross_entropy, _PATCHED, True)
    return cross_entropy


def install() -> None:
    """Route mmseg's ``CrossEntropyLoss`` (which binds ``cross_entropy`` when it is built) through
    the fix; idempotent."""
    current = cross_entropy_loss.cross_entropy
    if not getattr(current, _PATCHED, False):
        cross_entropy_loss.cross_entropy = losses.cross_entropy = _with_ignored_pixels(current)


install()
