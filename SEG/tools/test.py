#!/usr/bin/env python
"""Evaluate a trained segmentor on the config's test split.

    python tools/test.py CONFIG CHECKPOINT [--eval mIoU ...] [--show-dir DIR] [--work-dir DIR]
                                           [--options data_root=DIR] [--launcher none|pytorch]

Prints the per-class IoU / Acc / Dice table with aAcc, mIoU, mDice, and writes per-image nodule
Dice / IoU / HD95 to <work dir>/per_image_metrics.json. See SEG/README.md.
"""
import argparse

import _paths  # noqa: F401  (sys.path and the mmcv/mmseg patches, before mmseg is imported)

from mmseg_custom.launch import (IOU_METRICS, add_common_args, add_iou_metrics, build_runner,
                                 existing_checkpoint, load_config, run_tool)


def build_parser():
    parser = argparse.ArgumentParser(description='Test a DeblurringMIM segmentor')
    parser.add_argument('config', help='config file used for training')
    parser.add_argument('checkpoint', help='checkpoint of the trained segmentor')
    parser.add_argument('--eval', nargs='+', default=[], choices=IOU_METRICS, metavar='METRIC',
                        help='mmseg 0.x spelling; the config already computes mIoU and mDice, '
                             'metrics named here are added (mIoU, mDice, mFscore)')
    parser.add_argument('--show-dir', help='write each test image with the ground-truth (green) '
                                           'and predicted (red) nodule outlines to this folder')
    add_common_args(parser)
    return parser


def run(args):
    checkpoint = existing_checkpoint(args.checkpoint, 'CHECKPOINT')
    cfg = load_config(args.config, args)
    cfg.load_from = checkpoint
    cfg.resume = False
    if args.eval:
        add_iou_metrics(cfg, args.eval)
    if args.show_dir:
        cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [
            dict(type='NoduleOverlayHook', out_dir=args.show_dir)]
    build_runner(cfg).test()


def main(argv=None):
    run_tool(run, build_parser(), argv)


if __name__ == '__main__':
    main()
