#!/usr/bin/env python
"""Train a segmentor (mmsegmentation 1.x + mmengine) from a SEG config.

    python tools/train.py CONFIG [--work-dir DIR] [--options model.pretrained=CKPT data_root=DIR]
                                 [--resume [CKPT]] [--seed N] [--deterministic]
                                 [--launcher none|pytorch]

Multi-GPU: tools/dist_train.sh CONFIG GPUS [same options] (torchrun). See SEG/README.md.
"""
import argparse

import _paths  # noqa: F401  (sys.path and the mmcv/mmseg patches, before mmseg is imported)

from mmseg_custom.checkpoints import CheckpointFileError, resume_checkpoint, unreadable_resume_message
from mmseg_custom.launch import add_common_args, build_runner, existing_checkpoint, load_config, run_tool


def build_parser():
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
    parser.add_argument('--seed', type=int, default=None,
                        help='random seed (default: the config\'s randomness.seed, 0); the same '
                             'command with the same seed repeats the run')
    parser.add_argument('--deterministic', action='store_true',
                        help='deterministic algorithms (torch.use_deterministic_algorithms, cuDNN '
                             'deterministic without benchmark, CUBLAS_WORKSPACE_CONFIG); same as '
                             '--options randomness.deterministic=True')
    add_common_args(parser)
    return parser


def run(args):
    cfg = load_config(args.config, args)
    if args.seed is not None:
        cfg.randomness = dict(cfg.get('randomness', {}), seed=args.seed)
    if args.deterministic:
        cfg.randomness = dict(cfg.get('randomness', {}), deterministic=True)
    notes = []
    if args.load_from:
        cfg.load_from = existing_checkpoint(args.load_from, '--load-from')
    if args.resume == 'auto':
        resume_from, notes = resume_checkpoint(cfg.work_dir)
        cfg.resume = True  # without a checkpoint to resume, mmengine starts at iteration 0
    elif args.resume:
        resume_from = existing_checkpoint(args.resume, '--resume')
    else:
        resume_from = None
    if resume_from:
        cfg.resume, cfg.load_from = True, resume_from
    runner = build_runner(cfg, notes)
    try:
        runner.train()
    except CheckpointFileError as err:
        if resume_from is None or err.path != resume_from:
            raise
        raise CheckpointFileError(unreadable_resume_message(err), err.path) from None


def main(argv=None):
    run_tool(run, build_parser(), argv)


if __name__ == '__main__':
    main()
