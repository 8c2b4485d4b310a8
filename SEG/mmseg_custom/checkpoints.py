"""Segmentation checkpoints: read safely, resumed from the work dir they belong to, and refused when
they do not fit the segmentor.

* Every local checkpoint mmengine reads (``load_from``, ``resume``, ``tools/test.py``) goes through
  ``util/checkpoint.py``: a truncated file, a missing one or a pickle that would run code ends in a
  ``CheckpointError`` naming the file, as in the training scripts, instead of torch's traceback
  (``OSError: [Errno 22]``, ``UnpicklingError``).
* ``SegmentorCheckpointCheckHook``: mmengine loads a checkpoint into the segmentor non-strictly, so a
  file of another kind (an encoder pretraining or classification checkpoint, a segmentor of another
  config) silently left a randomly initialised model that was then evaluated or trained. The hook
  compares the checkpoint with the segmentor before the weights are copied and stops the run with
  how many weights match and what the file looks like.
* ``--resume`` without a file reads ``<work_dir>/last_checkpoint``, which mmengine writes as an
  absolute path. In a copy of a work dir that path leads back into the original; the checkpoint of
  the same name inside the given work dir is used instead (``resume_checkpoint``).
* ``WorkDirCheckpointHook``: mmengine's ``CheckpointHook`` deletes the previous best checkpoint by
  the absolute path recorded in the resumed checkpoint, i.e. possibly in another work dir. This one
  only ever replaces a best checkpoint inside its own folder.
"""
from __future__ import annotations

import os
import os.path as osp
import re
from typing import List, Mapping, Optional, Tuple

from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import is_model_wrapper
from mmengine.runner.checkpoint import CheckpointLoader
from mmseg.registry import HOOKS

from util.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file

LAST_CHECKPOINT_FILE = 'last_checkpoint'
NUMBERED_CHECKPOINT = re.compile(r'^(iter|epoch)_(\d+)\.pth$')
SEGMENTOR_PREFIXES = ('backbone.', 'decode_head.', 'auxiliary_head.', 'neck.')
PRETRAINING_PREFIXES = ('decoder_', 'mask_token')
NEEDED = ('tools/test.py, --load-from and --resume need a checkpoint that tools/train.py wrote for '
          'this config (iter_N.pth or best_mDice_iter_N.pth in its work dir)')


class CheckpointFileError(CheckpointError):
    """A checkpoint file mmengine was asked to read cannot be read; ``path`` names it."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


# ------------------------------------------------------------------------------ reading
def load_from_local(filename: str, map_location=None) -> dict:
    """mmengine's loader for local files, through ``util.checkpoint.load_checkpoint_file`` (the name
    after ``load_from_`` is what mmengine logs: "Loads checkpoint by local backend")."""
    path = osp.expanduser(filename)
    try:
        return load_checkpoint_file(path, map_location=map_location)
    except CheckpointError as err:
        raise CheckpointFileError(str(err), path) from None


def install_checkpoint_loader() -> None:
    """Make ``load_from_local`` mmengine's loader for paths without a URL scheme."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


def is_intact(path: str) -> bool:
    try:
        load_checkpoint_file(path)
    except CheckpointError:
        return False
    return True


def previous_intact_checkpoint(path: str) -> Optional[str]:
    """The newest readable ``iter_N.pth`` (``epoch_N.pth``) beside ``path`` with a smaller N."""
    match = NUMBERED_CHECKPOINT.match(osp.basename(path))
    if match is None:
        return None
    folder, kind, number = osp.dirname(path) or '.', match.group(1), int(match.group(2))
    earlier = []
    for name in os.listdir(folder):
        other = NUMBERED_CHECKPOINT.match(name)
        if other and other.group(1) == kind and int(other.group(2)) < number:
            earlier.append((int(other.group(2)), osp.join(folder, name)))
    for _, candidate in sorted(earlier, reverse=True):
        if is_intact(candidate):
            return candidate
    return None


def unreadable_resume_message(err: CheckpointFileError) -> str:
    """``err`` (the checkpoint to resume from cannot be read) with the way forward."""
    if not NUMBERED_CHECKPOINT.match(osp.basename(err.path)):
        return str(err)  # not one of a work dir's checkpoints: nothing earlier to offer
    previous = previous_intact_checkpoint(err.path)
    if previous is not None:
        return (f'{err} The previous checkpoint {previous} is intact: continue from it with '
                f'--resume {previous}')
    folder = osp.dirname(err.path) or '.'
    best = [osp.join(folder, name) for name in os.listdir(folder)
            if name.startswith('best_') and name.endswith('.pth')]
    hint = (f'; {max(best, key=osp.getmtime)} holds the best weights (no optimizer state): '
            f'--load-from it starts a new schedule from them') if best else ''
    return f'{err} There is no earlier intact checkpoint in {folder}{hint}.'


# ------------------------------------------------------------------------------ does it fit?
def checkpoint_kind(state: Mapping) -> Tuple[str, str]:
    """(what the weights look like, what to do with them) for a state dict that does not fit."""
    keys = list(state)
    if any(k.startswith(SEGMENTOR_PREFIXES) for k in keys):
        return ('a segmentation checkpoint of another config (another backbone, size or class '
                'count)', 'pass the config it was trained with, or use it as an encoder: '
                '--options model.pretrained=FILE (only its backbone is read)')
    if any(k.startswith(PRETRAINING_PREFIXES) for k in keys):
        return ('an encoder pretraining checkpoint (main_pretrain.py, or a published MAE / ConvMAE '
                'one), not a trained segmentor', 'to fine-tune a segmentor from it, pass it to '
                'tools/train.py as --options model.pretrained=FILE')
    if any(k.startswith('head.') for k in keys):
        return ('a classification checkpoint (main_finetune.py), not a trained segmentor',
                'to fine-tune a segmentor from its encoder, pass it to tools/train.py as '
                '--options model.pretrained=FILE')
    return ('no segmentor, encoder or classifier weights this project knows',
            'check the path')


def check_segmentor_checkpoint(model, checkpoint: Mapping, path: str) -> None:
    """Refuse ``checkpoint`` unless every weight of ``model`` is in it with the same shape."""
    state = extract_state_dict(checkpoint, path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not missing and not reshaped:
        return
    matched = len(own) - len(missing) - len(reshaped)
    kind, fix = checkpoint_kind(state)
    first = ', '.join((missing + reshaped)[:4])
    raise CheckpointError(
        f'{path}: only {matched} of the segmentor\'s {len(own)} weights match the checkpoint '
        f'({len(missing)} missing, {len(reshaped)} of another shape; first: {first}). It looks like '
        f'{kind}: {fix.replace("FILE", path)}. {NEEDED}.')


@HOOKS.register_module()
class SegmentorCheckpointCheckHook(Hook):
    """Stops the run when the checkpoint being loaded (``load_from`` / ``resume``) does not fit."""

    priority = 'VERY_HIGH'

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        check_segmentor_checkpoint(model, checkpoint, self.checkpoint)


# ------------------------------------------------------------------------------ the work dir
def _inside(path: str, folder: str) -> bool:
    path, folder = osp.realpath(path), osp.realpath(folder)
    return osp.commonpath([path, folder]) == folder


def resume_checkpoint(work_dir: str) -> Tuple[Optional[str], List[str]]:
    """The checkpoint ``--resume`` (no file) continues from, and lines for the log.

    ``None`` when the work dir has no ``last_checkpoint`` (a new run). A recorded path outside the
    work dir (the work dir was copied or moved) is replaced by the file of the same name inside
    it; when there is none, the run stops rather than continue from another run's file.
    """
    record = osp.join(work_dir, LAST_CHECKPOINT_FILE)
    if not osp.isfile(record):
        return None, [f'--resume: {record} does not exist; starting at iteration 0']
    with open(record, encoding='utf-8') as f:
        recorded = f.read().strip()
    if _inside(recorded, work_dir):
        return recorded, [f'--resume: continuing from {recorded}']
    own = osp.join(work_dir, osp.basename(recorded))
    if not osp.isfile(own):
        raise CheckpointError(
            f'{record} names {recorded}, which is outside the work dir {work_dir} (was it copied or '
            f'moved?), and {own} does not exist. Pass the checkpoint to continue from: '
            f'--resume /path/to/iter_N.pth')
    return own, [f'--resume: {record} names {recorded}, outside this work dir; continuing from '
                 f'{own} instead']


def own_checkpoint(path: str, out_dir: str, log=print) -> Optional[str]:
    """``path`` if it lies in ``out_dir``; else the file of the same name in ``out_dir``, or None."""
    if _inside(path, out_dir):
        return path
    own = osp.join(out_dir, osp.basename(path))
    if osp.isfile(own):
        log(f'previous best checkpoint: {own} (the resumed checkpoint named {path}, outside '
            f'this work dir, which is left alone)')
        return own
    log(f'the resumed checkpoint names {path} as the best so far; it is outside this work dir '
        'and is left alone')
    return None


@HOOKS.register_module()
class WorkDirCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` that replaces (deletes) a previous best checkpoint only inside
    its own folder. A resumed run inherits the best checkpoint's absolute path from the checkpoint
    it resumed; a path elsewhere becomes the file of the same name here, or nothing."""

    def before_train(self, runner) -> None:
        super().before_train(runner)
        self._keep_best_inside(runner)

    def _save_best_checkpoint(self, runner, metrics) -> None:
        self._keep_best_inside(runner)
        super()._save_best_checkpoint(runner, metrics)

    def _keep_best_inside(self, runner) -> None:
        if '://' in str(self.out_dir):
            return  # remote storage: no local paths to compare
        if getattr(self, 'best_ckpt_path', None):
            self.best_ckpt_path = self._own_copy(runner, self.best_ckpt_path)
            runner.message_hub.update_info('best_ckpt', self.best_ckpt_path)
        for key, path in list(getattr(self, 'best_ckpt_path_dict', {}).items()):
            if path:
                self.best_ckpt_path_dict[key] = self._own_copy(runner, path)
                runner.message_hub.update_info(f'best_ckpt_{key}', self.best_ckpt_path_dict[key])

    def _own_copy(self, runner, path: str) -> Optional[str]:
        return own_checkpoint(path, self.out_dir, runner.logger.info)


install_checkpoint_loader()
