"""What SEG/tools/train.py and test.py share: command-line spellings, and fitting a config to
the command line and to the machine.

* mmseg 0.x spellings keep working: ``--options`` = ``--cfg-options``, ``--local_rank`` =
  ``--local-rank`` (old ``torch.distributed.launch``), ``--eval`` (test.py).
* ``data_root`` given on the command line reaches every split: mmengine resolves a base config's
  ``data_root`` into each dataset when the file is read, so overriding only the top-level key
  would change nothing. A split's own ``data_root`` given on the command line
  (``train_dataloader.dataset.data_root=...``, the mmseg way) is kept.
* Checkpoints: mmengine's ``CheckpointHook`` becomes ``WorkDirCheckpointHook`` (writes atomically,
  deletes a replaced checkpoint only after the new one is complete and never outside the work
  dir), and a checkpoint to load or resume is checked against the segmentor
  (``mmseg_custom/checkpoints.py``).
* Repeatable runs: the configs fix ``randomness.seed`` (0); ``randomness.deterministic=True``
  (train.py ``--deterministic``) also selects deterministic algorithms (``use_determinism``).
* Data workers: no data loader asks for more worker processes than this process's share of the
  CPU cores it may run on (``fit_workers_to_machine``); the log says when a count is lowered.
* Without a GPU the same config runs: AmpOptimWrapper (which asserts a GPU) becomes OptimWrapper,
  SyncBN becomes BN, distributed runs use gloo and an unpinned DDP wrapper. On a GPU without
  bf16 support, bf16 autocast becomes fp16 with loss scaling.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
from typing import Iterable, List, Mapping, Sequence

import torch
import torch.distributed as dist
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log
from mmengine.runner import Runner

from util import distributed as du
from util.arguments import available_cores
from util.checkpoint import CheckpointError
from util.training import run_cli

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')
IOU_METRICS = ('mIoU', 'mDice', 'mFscore')


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', '--work_dir', dest='work_dir',
                        help='folder for logs, checkpoints, TensorBoard events and metrics '
                             '(default: ./work_dirs/<config name>)')
    parser.add_argument('--cfg-options', '--options', dest='cfg_options', nargs='+',
                        action=DictAction, default={},
                        help='override config values, e.g. model.pretrained=/path/ckpt.pth '
                             'data_root=/path/to/tn3k (--options: the mmseg 0.x spelling)')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none',
                        help='job launcher (dist_train.sh / dist_test.sh pass "pytorch")')
    parser.add_argument('--local-rank', '--local_rank', dest='local_rank', type=int, default=0,
                        help='set by torch.distributed.launch; torchrun sets LOCAL_RANK instead')


def run_tool(run, parser: argparse.ArgumentParser, argv=None) -> None:
    """Parse the command line and run ``run(args)``; an unusable checkpoint or dataset ends in one
    message naming the file (as in the training scripts).

    The process group (which mmengine opens and never closes) is destroyed before the
    interpreter exits: gloo's worker threads otherwise still hold work objects while Python shuts
    down, and a process ended now and then in ``terminate called without an active exception``
    (SIGABRT) after a complete run.
    """
    try:
        run_cli(run, parser, argv)
    finally:
        du.cleanup()


def existing_checkpoint(path: str, what: str) -> str:
    if not osp.isfile(path):
        raise CheckpointError(f'{what} {path}: checkpoint not found (relative paths are taken from '
                              f'the current folder {os.getcwd()})')
    return path


def load_config(config_path: str, args: argparse.Namespace) -> Config:
    if not osp.isfile(config_path):
        raise FileNotFoundError(f'config {config_path} not found (relative paths are taken from '
                                f'the current folder {os.getcwd()}; the published commands run '
                                'from SEG/)')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(config_path)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(config_path))[0])
    propagate_data_root(cfg, args.cfg_options)
    return cfg


def dataloader_keys(cfg: Config) -> List[str]:
    return [key for key in ('train_dataloader', 'val_dataloader', 'test_dataloader')
            if isinstance(cfg.get(key), dict) and isinstance(cfg[key].get('dataset'), dict)]


def propagate_data_root(cfg: Config, overrides: Mapping) -> None:
    """Give every split's dataset the top-level ``data_root`` when the command line set it
    (``overrides``: the ``--options`` key/value pairs), except splits whose own ``data_root`` it
    also set."""
    if 'data_root' not in overrides:
        return  # the config's own values are already resolved into each split
    for key in dataloader_keys(cfg):
        if f'{key}.dataset.data_root' not in overrides:
            cfg[key]['dataset']['data_root'] = overrides['data_root']


def set_metric_output(cfg: Config, work_dir: str) -> None:
    """Per-image metric files in the work dir: val (during training) and test keep separate files."""
    for key, name in (('val_evaluator', 'per_image_metrics_val.json'),
                      ('test_evaluator', 'per_image_metrics.json')):
        evaluators = cfg.get(key)
        if evaluators is None:
            continue
        evaluators = [evaluators] if isinstance(evaluators, dict) else list(evaluators)
        # val and test may share one list object in the config: give each its own copies
        evaluators = [ConfigDict(dict(e)) for e in evaluators]
        for evaluator in evaluators:
            if evaluator.get('type') == 'PerImageNoduleMetric' and not evaluator.get('output_file'):
                evaluator['output_file'] = osp.join(work_dir, name)
        cfg[key] = evaluators


def add_iou_metrics(cfg: Config, names: Iterable[str]) -> None:
    """mmseg 0.x ``--eval mIoU mDice``: add those metrics to the config's IoUMetric."""
    names = list(names)
    unknown = [n for n in names if n not in IOU_METRICS]
    if unknown:
        raise ValueError(f'--eval {" ".join(unknown)}: supported metrics are {", ".join(IOU_METRICS)}')
    evaluators = cfg.test_evaluator
    for evaluator in [evaluators] if isinstance(evaluators, dict) else evaluators:
        if evaluator.get('type') == 'IoUMetric':
            present = list(evaluator.get('iou_metrics', ['mIoU']))
            evaluator['iou_metrics'] = present + [n for n in names if n not in present]


def _replace_type(node, old: str, new: str) -> int:
    """Replace ``type=old`` by ``type=new`` in every dict of a config tree; count them."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') == old:
            node['type'] = new
            count += 1
        for value in node.values():
            count += _replace_type(value, old, new)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _replace_type(value, old, new)
    return count


def adapt_to_machine(cfg: Config) -> List[str]:
    """Fit GPU-specific settings to this machine; return one line per change (for the log)."""
    changes = []
    wrapper = cfg.get('optim_wrapper')
    if not torch.cuda.is_available():
        if wrapper is not None and wrapper.get('type') == 'AmpOptimWrapper':
            wrapper['type'] = 'OptimWrapper'
            for amp_only in ('dtype', 'loss_scale'):
                wrapper.pop(amp_only, None)
            changes.append('no GPU: AmpOptimWrapper -> OptimWrapper (fp32)')
        if _replace_type(cfg._cfg_dict, 'SyncBN', 'BN'):
            changes.append('no GPU: SyncBN -> BN')
        if cfg.launcher != 'none':
            cfg.env_cfg = dict(cfg.get('env_cfg', {}), dist_cfg=dict(backend='gloo'))
            # mmengine pins DDP to device LOCAL_RANK by default, which only exists on GPUs
            cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None,
                                         broadcast_buffers=False, find_unused_parameters=False)
            changes.append('no GPU: distributed over gloo on CPU')
    elif (wrapper is not None and wrapper.get('type') == 'AmpOptimWrapper'
          and wrapper.get('dtype') in ('bfloat16', torch.bfloat16)
          and not torch.cuda.is_bf16_supported()):
        wrapper['dtype'] = 'float16'
        changes.append('GPU without bf16: mixed precision in fp16 with dynamic loss scaling')
    return changes


def processes_per_node() -> int:
    """Training processes sharing this node's cores (torchrun sets LOCAL_WORLD_SIZE)."""
    for variable in ('LOCAL_WORLD_SIZE', 'OMPI_COMM_WORLD_LOCAL_SIZE'):
        value = os.environ.get(variable, '')
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def fit_workers_to_machine(cfg: Config) -> List[str]:
    """Lower each data loader's ``num_workers`` to this process's share of the cores; return one
    line per change. The published configs ask for 4 per GPU; on a 2-core machine 4 workers (x2
    loaders with persistent workers) only compete for the cores and slow the run down."""
    cores, processes = available_cores(), processes_per_node()
    share = cores // processes
    changes = []
    for key in dataloader_keys(cfg):
        loader = cfg[key]
        asked = int(loader.get('num_workers', 0))
        if asked <= share:
            continue
        loader['num_workers'] = share
        if share == 0:  # loading in the main process: options that need workers go
            loader['persistent_workers'] = False
            loader.pop('prefetch_factor', None)
        per = f' shared by {processes} processes on this node' if processes > 1 else ''
        changes.append(f'{key}: num_workers {asked} -> {share} ({cores} CPU cores available{per})')
    return changes


def init_distributed_without_gpu(cfg: Config) -> None:
    """mmengine's pytorch launcher calls torch.cuda.set_device, which fails without a GPU; on such
    a machine the process group is opened here (gloo, from torchrun's environment) and mmengine,
    finding it open, uses it."""
    if cfg.launcher == 'pytorch' and not torch.cuda.is_available() and not dist.is_initialized():
        dist.init_process_group(backend='gloo')


def use_checkpoint_safeguards(cfg: Config) -> None:
    """The work-dir-bound checkpoint hook, and a check of the checkpoint ``load_from`` names."""
    checkpoint_hook = cfg.get('default_hooks', {}).get('checkpoint')
    if checkpoint_hook is not None and checkpoint_hook.get('type') == 'CheckpointHook':
        checkpoint_hook['type'] = 'WorkDirCheckpointHook'
    if cfg.get('load_from'):
        cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [
            dict(type='SegmentorCheckpointCheckHook', checkpoint=cfg.load_from)]


CUBLAS_WORKSPACE = ':4096:8'  # a fixed cuBLAS workspace: what deterministic GEMMs on CUDA need


def use_determinism(cfg: Config) -> List[str]:
    """With ``randomness.deterministic``: the settings that must precede CUDA's initialisation
    (``CUBLAS_WORKSPACE_CONFIG``) and cuDNN autotuning off in the config (mmengine would turn it
    on from ``env_cfg`` and off again with a warning). The rest is ``SegRunner.set_randomness``."""
    if not cfg.get('randomness', {}).get('deterministic'):
        return []
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', CUBLAS_WORKSPACE)
    cfg.env_cfg = dict(cfg.get('env_cfg', {}), cudnn_benchmark=False)
    return ['deterministic: torch.use_deterministic_algorithms(True, warn_only=True), cuDNN '
            'deterministic, cuDNN benchmark off, CUBLAS_WORKSPACE_CONFIG='
            f'{os.environ["CUBLAS_WORKSPACE_CONFIG"]}']


class SegRunner(Runner):
    """mmengine's Runner; ``randomness.deterministic`` makes the operations that have no
    deterministic implementation warn instead of stopping the run. On CUDA, UPerNet's backward
    passes through some (adaptive average pooling, bilinear up-sampling) and its loss through
    ``nll_loss2d``; mmengine's plain ``torch.use_deterministic_algorithms(True)`` raised there."""

    def set_randomness(self, seed, diff_rank_seed: bool = False,
                       deterministic: bool = False) -> None:
        super().set_randomness(seed, diff_rank_seed=diff_rank_seed, deterministic=deterministic)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)


def build_runner(cfg: Config, notes: Sequence[str] = ()) -> Runner:
    """The mmengine Runner for ``cfg`` fitted to this machine; what was changed for the machine
    (and ``notes``) is logged through the runner's logger (which exists only once the runner
    does)."""
    changes = use_determinism(cfg)  # first: before anything initialises CUDA
    changes += adapt_to_machine(cfg)
    changes += fit_workers_to_machine(cfg)
    set_metric_output(cfg, cfg.work_dir)
    use_checkpoint_safeguards(cfg)
    init_distributed_without_gpu(cfg)
    runner = SegRunner.from_cfg(cfg)
    for line in [*changes, *notes]:
        print_log(line, logger='current')
    return runner
