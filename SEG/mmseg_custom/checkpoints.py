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
* Writing: mmengine writes a checkpoint in place, and ``CheckpointHook`` deletes the checkpoint it
  replaces (the previous ``iter_N.pth`` beyond ``max_keep_ckpts``, the previous best) *before*
  writing the new one. With the published ``max_keep_ckpts=1`` a kill during the write left no
  intact ``iter_N.pth`` to ``--resume`` from. Here every local checkpoint is written atomically
  (``util.checkpoint.save_checkpoint``: temporary file in the same folder, fsync, rename),
  ``last_checkpoint`` is replaced atomically once the checkpoint it names is complete, and only
  then are the replaced checkpoints deleted. At every moment the work dir holds a complete
  checkpoint that ``last_checkpoint`` names.
"""
from __future__ import annotations

import functools
import os
import os.path as osp
import re
import shutil
from typing import Dict, List, Mapping, Optional, Tuple

import mmengine.runner
import mmengine.runner.checkpoint
import mmengine.runner.runner
from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import is_model_wrapper
from mmengine.runner.checkpoint import CheckpointLoader
from mmseg.registry import HOOKS

from util.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file, save_checkpoint
from util.fileio import atomic_write_text

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


# ------------------------------------------------------------------------------ writing
SEG_RERUN_HINT = '(or pass a writable --work-dir) and re-run the same command with --resume'
# mmengine's own writer, kept for remote storage (``s3://``, ``pavi://``, a backend_args backend)
_mmengine_save_checkpoint = getattr(mmengine.runner.checkpoint.save_checkpoint, '__wrapped__',
                                    mmengine.runner.checkpoint.save_checkpoint)


@functools.wraps(_mmengine_save_checkpoint)
def save_checkpoint_atomically(checkpoint, filename, file_client_args=None, backend_args=None):
    """mmengine's ``save_checkpoint``; a local file is written atomically, and a failed write (disk
    full, read-only folder) is a ``CheckpointError`` naming the file."""
    if file_client_args is not None or backend_args is not None or '://' in str(filename):
        return _mmengine_save_checkpoint(checkpoint, filename, file_client_args=file_client_args,
                                         backend_args=backend_args)
    return save_checkpoint(checkpoint, filename, rerun_hint=SEG_RERUN_HINT)


def install_atomic_checkpoint_writer() -> None:
    """Make ``save_checkpoint_atomically`` the writer of ``Runner.save_checkpoint`` (which calls
    the name it imported into ``mmengine.runner.runner``) and of mmengine's public name."""
    for module in (mmengine.runner.runner, mmengine.runner.checkpoint, mmengine.runner):
        module.save_checkpoint = save_checkpoint_atomically


def remove_checkpoint(path: str) -> bool:
    """Delete a checkpoint file (or a checkpoint folder, as deepspeed writes); False if absent."""
    if osp.isfile(path) or osp.islink(path):
        os.remove(path)  # a link: only the link, never what it points to
        return True
    if osp.isdir(path):
        shutil.rmtree(path)
        return True
    return False


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
    it resumed; a path elsewhere becomes the file of the same name here, or nothing. Checkpoints
    it replaces are deleted only once their successor is complete (see the module's notes)."""

    def before_train(self, runner) -> None:
        super().before_train(runner)
        self._keep_best_inside(runner)

    def _save_best_checkpoint(self, runner, metrics) -> None:
        """mmengine's, but the previous best is deleted after the new one is complete: mmengine
        deletes the path it holds before writing, so that path is hidden from it meanwhile."""
        self._keep_best_inside(runner)
        if not self.save_best or self._remote():
            super()._save_best_checkpoint(runner, metrics)
            return
        previous = self._best_paths()
        self._set_best_paths(dict.fromkeys(previous))
        try:
            super()._save_best_checkpoint(runner, metrics)
        finally:
            written = self._best_paths()
            self._set_best_paths({key: written[key] or previous[key] for key in previous})
        for key, old in previous.items():
            if old and written[key] and written[key] != old and is_main_process():
                if remove_checkpoint(old):
                    runner.logger.info(f'The previous best checkpoint {old} is removed')

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        """mmengine's, in an order that keeps a complete checkpoint named by ``last_checkpoint``
        on disk at every moment: the new checkpoint (atomically), then ``last_checkpoint``
        (atomically), then the deletion of checkpoints beyond ``max_keep_ckpts``."""
        if self._remote():
            super()._save_checkpoint_with_step(runner, step, meta)
            return
        outdated = self._keep_step(runner, step)
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir, filename, self.file_client_args, save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler, meta=meta, by_epoch=self.by_epoch,
            backend_args=self.backend_args, **self.args)
        if not is_main_process():
            return
        atomic_write_text(osp.join(runner.work_dir, LAST_CHECKPOINT_FILE), self.last_ckpt)
        for old_step in outdated:
            remove_checkpoint(osp.join(self.out_dir, self.filename_tmpl.format(old_step)))

    def _keep_step(self, runner, step) -> List[int]:
        """Record ``step`` among the kept checkpoints (as mmengine does); return the steps whose
        checkpoints it pushes out of ``max_keep_ckpts`` (deleted once ``step``'s is written)."""
        if self.max_keep_ckpts <= 0 or (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            return []  # keep all, or the same step saved again (after a new best)
        outdated = []
        if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
            outdated.append(self.keep_ckpt_ids.popleft())
        self.keep_ckpt_ids.append(step)
        runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        return outdated

    def _remote(self) -> bool:
        return '://' in str(self.out_dir)

    def _best_paths(self) -> Dict[Optional[str], Optional[str]]:
        """Path of the best checkpoint per key indicator (key None: one indicator)."""
        if len(self.key_indicators) == 1:
            return {None: self.best_ckpt_path}
        return dict(self.best_ckpt_path_dict)

    def _set_best_paths(self, paths: Mapping[Optional[str], Optional[str]]) -> None:
        if len(self.key_indicators) == 1:
            self.best_ckpt_path = paths[None]
        else:
            self.best_ckpt_path_dict.update(paths)

    def _keep_best_inside(self, runner) -> None:
        if self._remote():
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
install_atomic_checkpoint_writer()
