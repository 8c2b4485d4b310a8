#!/usr/bin/env python
"""Train a segmentor (mmsegmentation 1.x + mmengine) from a SEG config.

    python tools/train.py CONFIG [--work-dir DIR] [--options model.pretrained=CKPT data_root=DIR]
                                 [--resume [CKPT]] [--launcher none|pytorch]

Multi-GPU: tools/dist_train.sh CONFIG GPUS [same options] (torchrun). See SEG/README.md.
"""
import argparse
import os.path as osp

import _paths  # noqa: F401  (sys.path and the mmcv/mmseg patches, before mmseg is imported)

from mmseg_custom.launch import add_common_args, build_runner, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a DeblurringMIM segmentor')
    parser.add_argument('config', help='config file, e.g. configs/de_convmae/'
                                       'upernet_de_convmae_us280k_base_gaussian_800_512_tn3k.py')
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                        help='continue a run: from CKPT, or (no value) from the latest checkpoint '
                             'in the work dir')
    parser.add_argument('--resume-from', dest='resume', metavar='CKPT',
                        help='mmseg 0.x spelling of --resume CKPT')
    parser.add_argument('--load-from', help='initialise the whole segmentor from a checkpoint '
                                            '(weights only; the schedule starts at 0)')
    add_common_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args)
    if args.load_from:
        cfg.load_from = args.load_from
    if args.resume == 'auto':
        cfg.resume = True  # mmengine finds the latest checkpoint in the work dir
    elif args.resume:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume {args.resume}: checkpoint not found')
        cfg.resume, cfg.load_from = True, args.resume
    build_runner(cfg).train()


if __name__ == '__main__':
    main()
