"""Ultrasound nodule segmentation dataset: ``<data_root>/<img_dir>/*.png`` with masks
``<data_root>/<mask_dir>/<same name>.png``, classes ``background`` (0) and ``nodule`` (1).

Public datasets store nodule masks either as 0/1 or as 0/255. Every mask is read once when the
dataset is built (header and pixels, in threads) to find out which, and each file is loaded with its
own mapping (255 -> 1 through mmseg's per-sample ``label_map``); the log says what was found. A
mask with any other value (a JPEG-compressed mask, a label image with several classes, an RGB mask)
or a size different from its image is an error naming the file and the fix: silently treating 128
as "ignore" or as background would corrupt training without a trace.
"""
from __future__ import annotations

import contextlib
import os
import os.path as osp
from concurrent.futures import ThreadPoolExecutor
from typing import List, Tuple

import numpy as np
from mmengine.logging import MMLogger
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS
from PIL import Image

from util.image_io import UnreadableImageError

BINARY_01 = '0/1'
BINARY_0255 = '0/255'
EMPTY = 'empty'  # only background: valid under both encodings
MAP_255_TO_NODULE = {255: 1}


class MaskFormatError(ValueError):
    """A mask file the dataset cannot use; the message names the file and the fix."""


@contextlib.contextmanager
def _opened(path: str):
    """``Image.open`` whose failures (empty, truncated, not an image) name the file and the fix
    instead of Pillow's bare 'image file is truncated' from inside a thread pool."""
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's ways of saying "not a whole image"
        raise UnreadableImageError(path, f'{type(err).__name__}: {err}') from None


def mask_encoding(mask_path: str, image_path: str) -> str:
    """``'0/1'``, ``'0/255'`` or ``'empty'`` for one mask file; ``MaskFormatError`` otherwise."""
    with _opened(mask_path) as mask_file:
        mask = np.asarray(mask_file)  # palette PNGs give their indices, as mmseg's loader does
    if mask.ndim != 2:
        raise MaskFormatError(
            f'{mask_path}: mask has shape {mask.shape}; masks must be single-channel images '
            '(0/1 or 0/255). Save it as a greyscale PNG, e.g. with '
            'cv2.imwrite(path, (cv2.imread(path, cv2.IMREAD_GRAYSCALE) > 127).astype("uint8"))')
    with _opened(image_path) as image_file:
        width, height = image_file.size  # header only
        image_file.verify()  # PNG: every chunk's CRC and the end marker, without decoding pixels
    if mask.shape != (height, width):
        raise MaskFormatError(f'{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image '
                              f'{image_path} is {width}x{height}; masks must match their images')
    values = set(np.unique(mask).tolist())
    if values <= {0}:
        return EMPTY
    if values <= {0, 1}:
        return BINARY_01
    if values <= {0, 255}:
        return BINARY_0255
    shown = sorted(values)[:8]
    raise MaskFormatError(
        f'{mask_path}: mask values {shown}{" ..." if len(values) > 8 else ""} are neither 0/1 nor '
        '0/255 (a JPEG-compressed or multi-class mask?). Binarise it and save it as PNG, e.g. '
        'cv2.imwrite(out_png, (cv2.imread(mask, cv2.IMREAD_GRAYSCALE) > 127).astype("uint8"))')


@DATASETS.register_module(name=['UltrasoundNoduleDataset', 'USDataset'])
class UltrasoundNoduleDataset(BaseSegDataset):
    METAINFO = dict(classes=('background', 'nodule'), palette=[[0, 0, 0], [255, 0, 0]])

    def __init__(self, img_suffix: str = '.png', seg_map_suffix: str = '.png',
                 scan_threads: int = 8, **kwargs):
        if kwargs.pop('reduce_zero_label', False):
            raise ValueError('reduce_zero_label must be False: label 0 is the background class')
        self.scan_threads = scan_threads
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=False, **kwargs)

    def load_data_list(self) -> List[dict]:
        img_dir = self.data_prefix.get('img_path', '')
        mask_dir = self.data_prefix.get('seg_map_path', '')
        for kind, folder in (('image', img_dir), ('mask', mask_dir)):
            if not osp.isdir(folder):
                raise FileNotFoundError(
                    f'{kind} folder {folder} not found. Set data_root (e.g. --cfg-options '
                    f'data_root=/path/to/tn3k) to the folder holding images/ (or '
                    f'images_gaussian/) and masks/; see SEG/README.md')
        data_list = super().load_data_list()
        if not data_list:
            raise FileNotFoundError(f'no *{self.img_suffix} images in {img_dir}')
        missing = [d['seg_map_path'] for d in data_list if not osp.isfile(d['seg_map_path'])]
        if missing:
            raise FileNotFoundError(f'{len(missing)} images have no mask, e.g. {missing[0]}; every '
                                    f'image in {img_dir} needs a mask of the same name in {mask_dir}')
        encodings = self._scan_masks(data_list)
        for info, encoding in zip(data_list, encodings):
            if encoding == BINARY_0255:
                info['label_map'] = MAP_255_TO_NODULE
        self._log_encodings(mask_dir, encodings)
        return data_list

    def _scan_masks(self, data_list: List[dict]) -> List[str]:
        pairs: List[Tuple[str, str]] = [(d['seg_map_path'], d['img_path']) for d in data_list]
        workers = max(1, min(self.scan_threads, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda pair: mask_encoding(*pair), pairs))

    @staticmethod
    def _log_encodings(mask_dir: str, encodings: List[str]) -> None:
        counts = {e: encodings.count(e) for e in (BINARY_01, BINARY_0255, EMPTY)}
        found = [f'{n} stored {e}' for e, n in counts.items() if n and e != EMPTY]
        mapping = ' (255 read as nodule = 1)' if counts[BINARY_0255] else ''
        MMLogger.get_current_instance().info(
            f'{mask_dir}: {len(encodings)} masks, {", ".join(found) or "none with a nodule"}'
            f'{mapping}, {counts[EMPTY]} without nodule')
