"""SEG/tools end to end on CPU: train.py (2 iterations + validation), test.py (table, per-image
metrics JSON, overlays), --resume (also in a copied work dir, and after a kill -9 inside a
checkpoint write), and dist_train.sh / dist_test.sh with one process; checkpoints they must refuse. Tiny ConvViT and ViT backbones on 64x64 crops;
configs inherit the real experiment configs, data made here. The tools run as the published
commands do: from SEG/, in subprocesses; runs that must stop before training are called in this
process (no start-up of a new interpreter and mmseg for each)."""
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

from same_values import assert_same_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG_DIR = os.path.join(ROOT, 'SEG')
CONFIGS = os.path.join(SEG_DIR, 'configs')

TINY_DATA = """
crop_size = (64, 64)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(96, 64), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(96, 64), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
loader = dict(num_workers=0, persistent_workers=False)
train_dataloader = dict(batch_size=2, **loader, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(**loader, dataset=dict(pipeline=test_pipeline))
test_dataloader = dict(**loader, dataset=dict(pipeline=test_pipeline))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=1),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1, end=10),
]
train_cfg = dict(max_iters=2, val_interval=2)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
"""

TINY_CONVVIT = f"""
_base_ = ['{CONFIGS}/de_convmae/upernet_de_convmae_us280k_base_gaussian_800_512_tn3k.py']
model = dict(
    data_preprocessor=dict(size=(64, 64)),
    backbone=dict(img_size=64, embed_dim=[32, 48, 96], depth=[1, 1, 2], num_heads=3),
    decode_head=dict(in_channels=[32, 48, 96, 96], channels=16),
    auxiliary_head=dict(in_channels=96, channels=8),
    test_cfg=dict(crop_size=(64, 64), stride=(43, 43)))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=2))
""" + TINY_DATA

TINY_VIT = f"""
_base_ = ['{CONFIGS}/de_mae/upernet_de_mae_us280k_base_gaussian_800_512_tn3k.py']
model = dict(
    data_preprocessor=dict(size=(64, 64)),
    backbone=dict(arch='tiny_patch16', img_size=64, out_indices=[0, 1, 1, 1]),
    neck=dict(embed_dim=96),
    decode_head=dict(in_channels=[96, 96, 96, 96], channels=16),
    auxiliary_head=dict(in_channels=96, channels=8),
    test_cfg=dict(crop_size=(64, 64), stride=(43, 43)))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=2))
""" + TINY_DATA


def _write_dataset(root):
    """Nodule-like bright blobs on speckle; blurred twins in images_gaussian; masks alternate
    between 0/1 and 0/255 storage."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :80]
    for split, count in (('train', 4), ('val', 2), ('test', 2)):
        for folder in ('images', 'images_gaussian', 'masks'):
            os.makedirs(os.path.join(root, folder, split), exist_ok=True)
        for i in range(count):
            cy, cx, r = 26 + 3 * i, 36 + 2 * i, 10 + i
            mask = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).astype(np.uint8)
            image = np.clip(rng.normal(70, 20, mask.shape) + 90 * mask, 0, 255).astype(np.uint8)
            name = f'{split}_{i}.png'
            cv2.imwrite(os.path.join(root, 'images', split, name), image)
            cv2.imwrite(os.path.join(root, 'images_gaussian', split, name),
                        cv2.GaussianBlur(image, (9, 9), 1.1))
            cv2.imwrite(os.path.join(root, 'masks', split, name), mask * (255 if i % 2 else 1))


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    import models_convmae  # noqa: F401  (registers the pretraining models)
    from util.registry import pretrain_models

    base = tmp_path_factory.mktemp('seg_tools')
    data = base / 'data'
    _write_dataset(str(data))
    torch.manual_seed(0)
    for name, model in (('dconvmae.pth', 'dconvmae_convvit_tiny_patch16'),
                        ('dmae.pth', 'dmae_vit_tiny_patch16')):
        torch.save({'model': pretrain_models().create(model, img_size=224).state_dict()},
                   base / name)
    (base / 'tiny_convvit.py').write_text(TINY_CONVVIT)
    (base / 'tiny_vit.py').write_text(TINY_VIT)
    return base


def _run(args, extra_env=None, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='2', **(extra_env or {}))
    proc = subprocess.run(args, cwd=SEG_DIR, env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def _train(workspace, config, work_dir, *extra):
    return _run([sys.executable, 'tools/train.py', str(workspace / config), '--work-dir',
                 str(work_dir), '--launcher', 'none', '--options',
                 f'data_root={workspace / "data"}', *extra])


def _class_table(output):
    """Rows of the per-class table: {class: (IoU, Acc, Dice)}."""
    rows = re.findall(r'^\|\s*(background|nodule)\s*\|\s*([\d.na]+)\s*\|\s*([\d.na]+)\s*\|'
                      r'\s*([\d.na]+)\s*\|', output, flags=re.M)
    return {name: values for name, *values in rows}


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return str(sock.getsockname()[1])


@pytest.fixture(scope='module')
def convvit_run(workspace):
    """tools/train.py --launcher none: 2 iterations from a pretraining checkpoint, then validation."""
    work_dir = workspace / 'run_convvit'
    output = _train(workspace, 'tiny_convvit.py', work_dir,
                    f'model.pretrained={workspace / "dconvmae.pth"}')
    return work_dir, output


def _check_training(work_dir, output, checkpoint):
    assert re.search(r'pretrained weights\nloaded \d+ tensors from .*' + checkpoint, output)
    assert 'interpolated: pos_embed' in output
    assert re.search(r'Iter\(train\) \[2/2\].*loss: [\d.]+', output)
    assert set(_class_table(output)) == {'background', 'nodule'}  # validation after iteration 2
    assert (work_dir / 'iter_2.pth').is_file()
    assert (work_dir / 'best_mDice_iter_2.pth').is_file()  # best checkpoint by mDice
    assert (work_dir / 'per_image_metrics_val.json').is_file()
    assert list(work_dir.glob('*/vis_data/events.out.tfevents.*'))  # TensorBoard


def _check_test_outputs(output, test_dir, show_dir=None):
    assert set(_class_table(output)) == {'background', 'nodule'}
    assert re.search(r'aAcc: [\d.]+\s+mIoU: [\d.]+\s+mAcc: [\d.]+\s+mDice: [\d.]+', output)
    metrics = json.loads((test_dir / 'per_image_metrics.json').read_text())
    assert sorted(r['image'] for r in metrics['images']) == ['test_0.png', 'test_1.png']
    for record in metrics['images']:
        assert 0.0 <= record['dice'] <= 1.0 and 0.0 <= record['iou'] <= 1.0
    assert set(metrics['summary']) >= {'dice', 'iou', 'hd95'}
    if show_dir is not None:
        assert sorted(p.name for p in show_dir.iterdir()) == ['test_0.png', 'test_1.png']
        assert cv2.imread(str(show_dir / 'test_0.png')).shape == (64, 80, 3)


def _test(workspace, config, checkpoint, test_dir, *extra):
    return _run([sys.executable, 'tools/test.py', str(workspace / config), str(checkpoint),
                 '--eval', 'mIoU', '--launcher', 'none', '--work-dir', str(test_dir),
                 '--options', f'data_root={workspace / "data"}', *extra])


def test_convvit_train_then_test(workspace, convvit_run):
    work_dir, output = convvit_run
    _check_training(work_dir, output, 'dconvmae.pth')
    test_dir, show_dir = workspace / 'test_convvit', workspace / 'show_convvit'
    output = _test(workspace, 'tiny_convvit.py', work_dir / 'iter_2.pth', test_dir,
                   '--show-dir', str(show_dir))
    _check_test_outputs(output, test_dir, show_dir)


def test_vit_train_then_test(workspace):
    work_dir = workspace / 'run_vit'
    output = _train(workspace, 'tiny_vit.py', work_dir, f'model.pretrained={workspace / "dmae.pth"}')
    _check_training(work_dir, output, 'dmae.pth')
    test_dir = workspace / 'test_vit'
    _check_test_outputs(_test(workspace, 'tiny_vit.py', work_dir / 'iter_2.pth', test_dir), test_dir)


def test_dist_scripts_resume_and_test_with_one_process(workspace, convvit_run):
    """The published command forms with GPU count 1 (torchrun; gloo on a machine without GPU):
    dist_train.sh continues the 2-iteration run with --resume, dist_test.sh evaluates it."""
    work_dir = workspace / 'run_dist'
    shutil.copytree(convvit_run[0], work_dir)
    env = dict(PORT=_free_port())
    output = _run(['./tools/dist_train.sh', str(workspace / 'tiny_convvit.py'), '1',
                   '--work-dir', str(work_dir), '--resume', '--options',
                   f'data_root={workspace / "data"}', 'train_cfg.max_iters=3',
                   'train_cfg.val_interval=3'], env)
    assert re.search(r'resumed', output, flags=re.I)
    assert re.search(r'Iter\(train\) \[3/3\]', output)
    assert not re.search(r'Iter\(train\) \[[12]/3\]', output)  # iterations 1-2 not redone
    assert (work_dir / 'iter_3.pth').is_file()

    test_dir = workspace / 'test_dist'
    output = _run(['./tools/dist_test.sh', str(workspace / 'tiny_convvit.py'),
                   str(work_dir / 'iter_3.pth'), '1', '--eval', 'mIoU', '--work-dir',
                   str(test_dir), '--options', f'data_root={workspace / "data"}'],
                  dict(PORT=_free_port()))
    _check_test_outputs(output, test_dir)


# ------------------------------------------------------------------ image shapes
def test_demo_config_trains_and_validates_on_non_square_images(tmp_path):
    """The CPU demo config weights the nodule class; crops of wide and tall images are padded with
    ignored pixels (label 255), on which mmseg's class-weighted loss failed (IndexError)."""
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for folder in ('images_gaussian', 'masks'):
            (tmp_path / 'data' / folder / split).mkdir(parents=True)
        for i, (h, w) in enumerate([(96, 200), (200, 96)]):
            mask = np.zeros((h, w), np.uint8)
            mask[h // 3:h // 2, w // 3:w // 2] = 1
            image = np.clip(rng.normal(70, 20, (h, w)) + 90 * mask, 0, 255).astype(np.uint8)
            cv2.imwrite(str(tmp_path / 'data' / 'images_gaussian' / split / f'{i}.png'), image)
            cv2.imwrite(str(tmp_path / 'data' / 'masks' / split / f'{i}.png'), mask)
    _in_process('train')([os.path.join(CONFIGS, 'demo', 'upernet_de_mae_vit_tiny_synthetic_128.py'),
                          '--work-dir', str(tmp_path / 'run'), '--launcher', 'none', '--options',
                          f'data_root={tmp_path / "data"}', 'train_dataloader.batch_size=2',
                          'train_cfg.max_iters=1', 'train_cfg.val_interval=1'])
    logged = [json.loads(line) for scalars in (tmp_path / 'run').glob('*/vis_data/scalars.json')
              for line in scalars.read_text().splitlines()]
    assert [np.isfinite(r['loss']) for r in logged if 'loss' in r] == [True]
    assert [0 <= r['mDice'] <= 100 for r in logged if 'mDice' in r] == [True]


# ------------------------------------------------------------------ checkpoints and work dirs
def _files(folder):
    """path -> (size, mtime) of every file below ``folder``."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob('*') if p.is_file()}


def _set_best_score(checkpoint, score):
    if SEG_DIR not in sys.path:
        sys.path.append(SEG_DIR)
    import mmseg_compat  # noqa: F401  (lets torch read mmengine's message hub with weights_only)

    state = torch.load(checkpoint, map_location='cpu', weights_only=True)
    state['message_hub']['runtime_info']['best_score'] = score
    torch.save(state, checkpoint)


def test_resume_in_a_copied_work_dir_leaves_the_original_untouched(workspace, convvit_run):
    """mmengine records checkpoints by absolute path (last_checkpoint, the best checkpoint in the
    message hub): a copy resumed from the original's checkpoint and, on a better score, deleted the
    original's best checkpoint."""
    original = convvit_run[0]
    before = _files(original)
    copy = workspace / 'run_copy'
    shutil.copytree(original, copy)
    # the copy's own checkpoint differs from the original's: any new score is a new best, so the
    # previous best is replaced (and a resume from the original's file would not see this)
    _set_best_score(copy / 'iter_2.pth', -1.0)
    output = _train(workspace, 'tiny_convvit.py', copy, 'train_cfg.max_iters=3',
                    'train_cfg.val_interval=3', '--resume')
    assert f'continuing from {copy / "iter_2.pth"} instead' in output
    assert f'Load checkpoint from {copy / "iter_2.pth"}' in output
    assert re.search(r'Iter\(train\) \[3/3\]', output)
    assert f'The previous best checkpoint {copy / "best_mDice_iter_2.pth"} is removed' in output
    assert (copy / 'best_mDice_iter_3.pth').is_file() and not (copy / 'best_mDice_iter_2.pth').exists()
    assert (copy / 'last_checkpoint').read_text() == str(copy / 'iter_3.pth')
    assert _files(original) == before  # nothing in the original was removed, added or rewritten


def _import_tool_file(module_name, file_name):
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(SEG_DIR, 'tools', file_name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _in_process(tool):
    """``main`` of SEG/tools/<tool>.py, imported into this process."""
    if '_paths' not in sys.modules:  # what the tools import first
        sys.modules['_paths'] = _import_tool_file('_paths', '_paths.py')
    return _import_tool_file(f'seg_tools_{tool}', f'{tool}.py').main


def _refused(tool, workspace, config, *args):
    """Run a SEG tool that must stop: its one-line message (SystemExit, no traceback)."""
    with pytest.raises(SystemExit) as info:
        _in_process(tool)([str(workspace / config), *map(str, args), '--launcher', 'none',
                           '--options', f'data_root={workspace / "data"}'])
    message = str(info.value)
    assert message.startswith('error: ') and '\n' not in message
    return message


def test_test_py_refuses_a_segmentor_of_another_config_and_writes_no_metrics(workspace, convvit_run):
    checkpoint = convvit_run[0] / 'iter_2.pth'  # ConvViT segmentor, evaluated with the ViT config
    test_dir = workspace / 'test_wrong_config'
    message = _refused('test', workspace, 'tiny_vit.py', checkpoint, '--work-dir', test_dir)
    assert re.match(rf'error: {re.escape(str(checkpoint))}: only \d+ of the segmentor\'s \d+ '
                    r'weights match .* a segmentation checkpoint of another config', message)
    assert not (test_dir / 'per_image_metrics.json').exists()


def test_load_from_an_encoder_checkpoint_is_refused_naming_its_kind(workspace, tmp_path):
    message = _refused('train', workspace, 'tiny_convvit.py', '--load-from',
                       workspace / 'dconvmae.pth', '--work-dir', tmp_path / 'run')
    assert (f'{workspace / "dconvmae.pth"}: only 0 of the segmentor' in message
            and 'encoder pretraining checkpoint' in message
            and f'model.pretrained={workspace / "dconvmae.pth"}' in message)
    assert not list((tmp_path / 'run').glob('iter_*.pth'))


def test_resume_from_a_truncated_latest_checkpoint_names_the_previous_intact_one(
        workspace, convvit_run, tmp_path):
    work_dir = tmp_path / 'run'
    work_dir.mkdir()
    shutil.copy(convvit_run[0] / 'iter_2.pth', work_dir / 'iter_2.pth')
    data = (convvit_run[0] / 'iter_2.pth').read_bytes()
    (work_dir / 'iter_3.pth').write_bytes(data[:len(data) // 2])  # a write cut short
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_3.pth'))
    message = _refused('train', workspace, 'tiny_convvit.py', '--resume', '--work-dir', work_dir)
    assert message.startswith(f'error: {work_dir / "iter_3.pth"}: not a readable PyTorch checkpoint')
    assert message.endswith(f'The previous checkpoint {work_dir / "iter_2.pth"} is intact: '
                            f'continue from it with --resume {work_dir / "iter_2.pth"}')


class _RunsCode:
    marker = None

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('entry', ['test.py', 'train.py --load-from', 'train.py --resume'])
def test_checkpoint_whose_pickle_would_run_code_is_refused(entry, workspace, tmp_path):
    _RunsCode.marker = str(tmp_path / 'code-ran')
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': {'x': _RunsCode()}}, evil)
    tool, *flag = entry.replace('.py', '').split()
    message = _refused(tool, workspace, 'tiny_convvit.py', *flag, evil, '--work-dir', tmp_path / 'run')
    assert message.startswith(f'error: {evil}: refused to load: the file pickles objects outside '
                              'the safe allow-list')
    assert not os.path.exists(_RunsCode.marker)


# ------------------------------------------------------------------ kill -9 inside a checkpoint write
# The child runs tools/train.py through this wrapper: once the checkpoint file named PAUSE_SAVE_OF
# has been written (atomically: the temporary file ``util.fileio.atomic_path`` hands torch.save;
# or in place, as mmengine's own writer does), it is cut to half its size (what a kill mid-write
# leaves), the test is signalled and the process sleeps until it is killed.
PAUSE_IN_SEG_SAVE = """
import os, runpy, sys, time
import torch
from mmengine.fileio.backends import LocalBackend
target, marker = os.environ['PAUSE_SAVE_OF'], os.environ['PAUSE_MARKER']

def pause_in(path):
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    with open(marker, 'w') as f:
        f.write(path)
    time.sleep(600)

real_save, real_put = torch.save, LocalBackend.put

def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if os.path.basename(str(f)).startswith('.' + target + '.'):
        pause_in(str(f))

def put(self, obj, filepath):
    real_put(self, obj, filepath)
    if os.path.basename(str(filepath)) == target:
        pause_in(str(filepath))

torch.save, LocalBackend.put = save, put
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name='__main__')
"""


def _killed_inside_the_write_of(name, args, tmp_path):
    """Run tools/train.py ``args``; kill -9 it while ``name`` is being written. Returns the path
    of the half-written file."""
    wrapper, marker, log = tmp_path / 'pause_in_save.py', tmp_path / 'paused', tmp_path / f'{name}.log'
    wrapper.write_text(PAUSE_IN_SEG_SAVE)
    marker.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS='2', PAUSE_SAVE_OF=name, PAUSE_MARKER=str(marker))
    with open(log, 'w') as out:
        proc = subprocess.Popen([sys.executable, str(wrapper), 'tools/train.py', *args], cwd=SEG_DIR,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None, f'ended before writing {name}: {log.read_text()[-4000:]}'
            assert time.time() < deadline, f'timed out waiting for the write of {name}'
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return marker.read_text()


def _checkpoints_on_disk(work_dir):
    """Names of the checkpoint files under their own names, each loaded (a truncated or unsafe
    file fails here); hidden ``.tmp.pth`` files are what atomic writes cut short leave."""
    from util.checkpoint import load_checkpoint_file

    names = set()
    for path in work_dir.glob('[!.]*.pth'):
        assert 'state_dict' in load_checkpoint_file(str(path)), path
        names.add(path.name)
    return names


def test_kill_inside_checkpoint_writes_leaves_a_complete_checkpoint_and_resume_continues(
        workspace, convvit_run, tmp_path):
    """mmengine deleted the checkpoint it replaces (the previous iter_N.pth with the published
    max_keep_ckpts=1, the previous best) before writing the new one in place: a kill during the
    write left a truncated file and nothing to --resume from."""
    work_dir = tmp_path / 'run'
    shutil.copytree(convvit_run[0], work_dir)
    _set_best_score(work_dir / 'iter_2.pth', -1.0)  # iteration 4's validation is a new best
    args = [str(workspace / 'tiny_convvit.py'), '--work-dir', str(work_dir), '--launcher', 'none',
            '--resume', '--options', f'data_root={workspace / "data"}', 'train_cfg.max_iters=4']

    half_written = _killed_inside_the_write_of('iter_4.pth', args, tmp_path)
    assert os.path.basename(half_written).startswith('.iter_4.pth.')  # a hidden temporary file
    assert _checkpoints_on_disk(work_dir) == {'iter_2.pth', 'best_mDice_iter_2.pth'}
    # not yet replaced (it still names the copied run's file, which --resume maps into this dir)
    assert (work_dir / 'last_checkpoint').read_text() == str(convvit_run[0] / 'iter_2.pth')

    half_written = _killed_inside_the_write_of('best_mDice_iter_4.pth', args, tmp_path)
    assert os.path.basename(half_written).startswith('.best_mDice_iter_4.pth.')
    # iter_4.pth is complete and recorded; only then was iter_2.pth deleted
    assert _checkpoints_on_disk(work_dir) == {'iter_4.pth', 'best_mDice_iter_2.pth'}
    assert (work_dir / 'last_checkpoint').read_text() == str(work_dir / 'iter_4.pth')

    _in_process('train')(args[:-1] + ['train_cfg.max_iters=6'])
    assert _checkpoints_on_disk(work_dir) == {'iter_6.pth', 'best_mDice_iter_6.pth'}
    log = max(work_dir.glob('*/*.log')).read_text()
    assert f'Load checkpoint from {work_dir / "iter_4.pth"}' in log
    assert re.search(r'Iter\(train\) \[5/6\]', log) and not re.search(r'Iter\(train\) \[[1-4]/6\]', log)
    assert f'The previous best checkpoint {work_dir / "best_mDice_iter_2.pth"} is removed' in log


# ------------------------------------------------------------------ repeatable runs
# What differs between two runs of the same command is time, and only time: the wall-clock stamp of
# each log line, the iteration and data-loading times and the ETA derived from them (``time``,
# ``data_time``, ``eta``; ``memory`` on GPUs), the run's start timestamp (the name of its log
# folder and files, mmengine's experiment name, ``meta.time`` of a checkpoint), and the wall time
# TensorBoard stores with every event (its file name carries the time, host and process id).
TIMESTAMP = re.compile(r'\d{8}_\d{6}')
TIMED_FIELDS = ('time', 'data_time', 'eta', 'memory')
LOG_PREFIX = re.compile(r'^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d - ', flags=re.M)
TIMED_VALUE = re.compile(r'\b(eta|data_time|time|memory): [\d.:]+')


def _untimed_checkpoint(path):
    if SEG_DIR not in sys.path:
        sys.path.append(SEG_DIR)
    import mmseg_compat  # noqa: F401  (lets torch read mmengine's message hub with weights_only)
    from util.checkpoint import load_checkpoint_file

    ckpt = load_checkpoint_file(str(path))
    for key in ('time', 'experiment_name'):
        ckpt['meta'].pop(key)
    hub = ckpt['message_hub']
    for key in ('eta', 'experiment_name'):
        hub['runtime_info'].pop(key)
        hub['resumed_keys'].pop(key)
    hub['log_scalars'] = {key: buffer.data for key, buffer in hub['log_scalars'].items()
                          if key.rsplit('/', 1)[-1] not in TIMED_FIELDS}
    return ckpt


def _untimed_log(path):
    text = TIMED_VALUE.sub(r'\1: -', LOG_PREFIX.sub('', path.read_text()))
    return TIMESTAMP.sub('<timestamp>', text)


def _untimed_json_lines(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMED_FIELDS}
            for line in path.read_text().splitlines()]


def _tensorboard_scalars(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()['scalars'] if tag.rsplit('/', 1)[-1] not in TIMED_FIELDS}


def _run_files(folder):
    """relative path (timestamps and TensorBoard's host/pid suffix replaced) -> file."""
    files = {}
    for path in sorted(folder.rglob('*')):
        if path.is_file():
            name = TIMESTAMP.sub('<timestamp>', str(path.relative_to(folder)))
            files[re.sub(r'events\.out\.tfevents\..*', 'events.out.tfevents', name)] = path
    return files


def _assert_same_run(first, second):
    """Every file of two runs: equal apart from the time fields above; returns the names."""
    files, other = _run_files(first), _run_files(second)
    assert list(files) == list(other)
    for name, path in files.items():
        if name.endswith('.pth'):
            assert_same_values(_untimed_checkpoint(path), _untimed_checkpoint(other[name]), name)
        elif name.endswith('.log'):
            assert _untimed_log(path) == _untimed_log(other[name]), name
        elif name.endswith('/scalars.json') or name.endswith('/<timestamp>.json'):
            assert_same_values(_untimed_json_lines(path), _untimed_json_lines(other[name]), name)
        elif name.endswith('events.out.tfevents'):
            assert_same_values(_tensorboard_scalars(path), _tensorboard_scalars(other[name]), name)
        else:  # metrics JSON, config dumps, last_checkpoint
            assert path.read_bytes() == other[name].read_bytes(), name
    return list(files)


def test_the_same_command_twice_gives_the_same_checkpoints_logs_and_metrics(workspace, tmp_path):
    """tools/train.py (4 iterations, validation every 2, two data workers) then tools/test.py,
    run twice with the same seed in the same work dir, compared file by file. Before, the configs
    set no seed: mmengine drew a new one per run, and no two runs gave the same weights."""
    work_dir = tmp_path / 'run'

    def run_then_test():
        _train(workspace, 'tiny_convvit.py', work_dir, f'model.pretrained={workspace / "dconvmae.pth"}',
               'train_cfg.max_iters=4', 'train_dataloader.num_workers=2',
               'train_dataloader.persistent_workers=True', '--seed', '5')
        _test(workspace, 'tiny_convvit.py', work_dir / 'iter_4.pth', work_dir / 'test')

    run_then_test()
    first = work_dir.rename(tmp_path / 'first')
    run_then_test()
    names = _assert_same_run(first, work_dir)
    assert any(re.fullmatch(r'best_mDice_iter_[24]\.pth', name) for name in names)
    assert {'iter_4.pth', 'per_image_metrics_val.json',
            'test/per_image_metrics.json', '<timestamp>/<timestamp>.log',
            '<timestamp>/vis_data/scalars.json', '<timestamp>/vis_data/events.out.tfevents',
            'test/<timestamp>/<timestamp>.log', 'test/<timestamp>/<timestamp>.json'} <= set(names)
    checkpoint = _untimed_checkpoint(work_dir / 'iter_4.pth')
    assert checkpoint['meta']['seed'] == 5 and checkpoint['meta']['iter'] == 4


def _runner_built_by_train_py(workspace, work_dir, monkeypatch, *args, inspect):
    """tools/train.py in this process up to its runner (``inspect(runner)`` instead of training)."""
    main = _in_process('train')
    monkeypatch.setattr(sys.modules['mmseg_custom.launch'].SegRunner, 'train', inspect)
    main([str(workspace / 'tiny_convvit.py'), '--work-dir', str(work_dir), '--launcher', 'none',
          *args, '--options', f'data_root={workspace / "data"}'])


def test_deterministic_flag_sets_every_switch_and_a_resume_keeps_them(workspace, tmp_path, monkeypatch):
    """--deterministic: CUBLAS_WORKSPACE_CONFIG before CUDA starts, cuDNN deterministic without
    benchmark, deterministic algorithms where they exist; UPerNet's backward on CUDA has ops without
    one (adaptive average pooling, bilinear up-sampling), which warn instead of stopping the run,
    also after a resume re-seeds (mmengine re-applies its strict setting then)."""
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    seen = {}

    def inspect(runner):
        seen['seed'] = runner.seed
        runner.set_randomness(7, deterministic=True)  # what mmengine's resume does on another seed
        seen.update(
            cublas=os.environ.get('CUBLAS_WORKSPACE_CONFIG'),
            algorithms=torch.are_deterministic_algorithms_enabled(),
            warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
            cudnn=(torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
            env_benchmark=runner.cfg.env_cfg.cudnn_benchmark)

    benchmark = torch.backends.cudnn.benchmark
    try:
        _runner_built_by_train_py(workspace, tmp_path / 'run', monkeypatch, '--deterministic',
                                  '--seed', '3', inspect=inspect)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, benchmark
    assert seen == dict(cublas=':4096:8', seed=3, algorithms=True, warn_only=True,
                        cudnn=(True, False), env_benchmark=False)


def test_train_py_lowers_data_workers_to_the_cores_and_logs_it(workspace, tmp_path, monkeypatch):
    _in_process('train')  # puts SEG/ on sys.path
    from mmseg_custom.launch import available_cores

    for variable in ('LOCAL_WORLD_SIZE', 'OMPI_COMM_WORLD_LOCAL_SIZE'):
        monkeypatch.delenv(variable, raising=False)
    cores, seen = available_cores(), []
    _runner_built_by_train_py(
        workspace, tmp_path / 'run', monkeypatch, '--options', f'train_dataloader.num_workers={cores + 3}',
        inspect=lambda runner: seen.append(runner.cfg.train_dataloader.num_workers))
    assert seen == [cores]
    log = max((tmp_path / 'run').glob('*/*.log')).read_text()
    assert f'train_dataloader: num_workers {cores + 3} -> {cores} ({cores} CPU cores available)' in log
