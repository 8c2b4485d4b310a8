"""Running a backbone built for one input size on smaller inputs.

Both backbones have a learned position embedding for one grid (the crop size, 512 in the
configs). Slide inference cuts crops of that size, except where the resized image is smaller than a
crop (a very elongated image): mmseg then passes the smaller image as it is. Instead of failing on
the grid check, the backbone pads such an input at the bottom/right with zeros (the value of the
mean pixel after normalisation) and cuts every feature map back to the input's extent.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F


def pad_to_size(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Zero-pad an NCHW batch at the bottom/right to ``size``; larger inputs are an error."""
    h, w = x.shape[-2:]
    if h > size[0] or w > size[1]:
        raise ValueError(f'input {h}x{w} is larger than the {size[0]}x{size[1]} the backbone was '
                         'built for: use slide inference (test_cfg mode="slide") with that crop '
                         'size, or build the backbone with a larger img_size')
    if (h, w) == tuple(size):
        return x
    return F.pad(x, (0, size[1] - w, 0, size[0] - h))


def crop_to_input(features: Sequence[torch.Tensor], input_hw: Tuple[int, int],
                  strides: Sequence[int]) -> List[torch.Tensor]:
    """Cut each map to the cells that cover the original (unpadded) input."""
    out = []
    for feat, stride in zip(features, strides):
        h, w = math.ceil(input_hw[0] / stride), math.ceil(input_hw[1] / stride)
        out.append(feat[..., :h, :w])
    return out
