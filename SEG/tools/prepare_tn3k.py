#!/usr/bin/env python
"""Convert the TN3K release into the layout the SEG configs read.

TN3K as released (the TRFE+ authors' archive) holds ``trainval-image/``, ``trainval-mask/``,
``test-image/``, ``test-mask/`` (JPEG, masks 0/255 with compression noise) and
``tn3k-trainval-fold<k>.json`` whose ``train`` / ``val`` lists index the trainval images sorted by
their numeric file name (0-based, as the TRFE+ data loader reads them). This writes

    <dst>/images/{train,val,test}/<n>.png     the images, losslessly re-encoded
    <dst>/masks/{train,val,test}/<n>.png      the masks binarised at 128, stored 0/255

    python tools/prepare_tn3k.py --src /path/to/tn3k --dst /path/to/tn3k_seg [--fold 0]

then make the blurred copy for the deblurring configs (from the repository root):

    python blurred_images.py --src_dir /path/to/tn3k_seg/images \\
        --dst_dir /path/to/tn3k_seg/images_gaussian --method gaussian --sigma 1.1
"""
import argparse
import json
import os
import os.path as osp
import sys
from typing import Dict, List

import cv2
import numpy as np

MASK_THRESHOLD = 128  # JPEG noise around 0 and 255 falls on the right side of the middle


def numeric_sorted_names(folder: str) -> List[str]:
    names = [n for n in os.listdir(folder) if osp.splitext(n)[1].lower() in ('.jpg', '.jpeg', '.png')]
    try:
        return sorted(names, key=lambda n: int(osp.splitext(n)[0]))
    except ValueError as err:
        raise SystemExit(f'{folder}: expected numeric file names as in the TN3K release ({err})')


def split_names(src: str, fold: int) -> Dict[str, List[str]]:
    fold_file = osp.join(src, f'tn3k-trainval-fold{fold}.json')
    if not osp.isfile(fold_file):
        raise SystemExit(f'{fold_file} not found: --src must be the TN3K folder holding '
                         'trainval-image/, trainval-mask/, test-image/, test-mask/ and the fold files')
    with open(fold_file, encoding='utf-8') as f:
        folds = json.load(f)
    trainval = numeric_sorted_names(osp.join(src, 'trainval-image'))
    out = {}
    for split in ('train', 'val'):
        indices = folds[split]
        if max(indices) >= len(trainval) or min(indices) < 0:
            raise SystemExit(f'{fold_file}: index {max(indices)} out of range for '
                             f'{len(trainval)} trainval images')
        out[split] = [trainval[i] for i in indices]
    out['test'] = numeric_sorted_names(osp.join(src, 'test-image'))
    return out


def convert_pair(image_path: str, mask_path: str, image_out: str, mask_out: str) -> None:
    image = cv2.imread(image_path, cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(mask_path, cv2.IMREAD_GRAYSCALE)
    if image is None or mask is None:
        raise SystemExit(f'cannot read {image_path if image is None else mask_path}')
    if mask.shape != image.shape[:2]:
        raise SystemExit(f'{mask_path}: mask {mask.shape} does not match image {image.shape[:2]}')
    cv2.imwrite(image_out, image)
    cv2.imwrite(mask_out, np.where(mask >= MASK_THRESHOLD, 255, 0).astype(np.uint8))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--src', required=True, help='the TN3K release folder')
    parser.add_argument('--dst', required=True, help='output folder (data_root of the configs)')
    parser.add_argument('--fold', type=int, default=0, help='which tn3k-trainval-fold<k>.json')
    args = parser.parse_args(argv)

    for split, names in split_names(args.src, args.fold).items():
        group = 'test' if split == 'test' else 'trainval'
        for kind in ('images', 'masks'):
            os.makedirs(osp.join(args.dst, kind, split), exist_ok=True)
        for name in names:
            png = osp.splitext(name)[0] + '.png'
            convert_pair(osp.join(args.src, f'{group}-image', name),
                         osp.join(args.src, f'{group}-mask', name),
                         osp.join(args.dst, 'images', split, png),
                         osp.join(args.dst, 'masks', split, png))
        print(f'{split}: {len(names)} image/mask pairs -> {osp.join(args.dst, "images", split)}')


if __name__ == '__main__':
    sys.exit(main())
