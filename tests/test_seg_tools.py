"""SEG/tools end to end on CPU: train.py (2 iterations + validation), test.py (table, per-image
metrics JSON, overlays), --resume (also in a copied work dir), and dist_train.sh / dist_test.sh
with one process; checkpoints they must refuse. Tiny ConvViT and ViT backbones on 64x64 crops;
configs inherit the real experiment configs, data made here. The tools run as the published
commands do: from SEG/, in subprocesses; runs that must stop before training are called in this
process (no start-up of a new interpreter and mmseg for each)."""
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

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
