"""SEG/mmseg_compat.py: mmsegmentation 1.2.2 + mmengine 0.10.7 + mmcv-lite 2.1.0 on current torch.

CPU only, tiny models, data made here; the whole module runs in well under a minute.
"""
import importlib.util
import os
import pickle
import sys

import pytest


import numpy as np  # noqa: E402
import torch  # noqa: E402

SEG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'SEG')
if SEG_DIR not in sys.path:
    sys.path.append(SEG_DIR)  # appended: SEG/ must not shadow top-level names such as tools

import mmseg_compat  # noqa: E402  (must come before any mmseg submodule import)

SHIM_ACTIVE = getattr(sys.modules.get('mmcv.ops'), '__deblurringmim_shim__', False)
TORCH_LOADS_WEIGHTS_ONLY_BY_DEFAULT = (
    tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]) >= (2, 6)
    and os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '0') in ('', '0'))
needs_shim = pytest.mark.skipif(not SHIM_ACTIVE, reason='full mmcv with compiled ops installed')


def test_stack_imports_and_is_consistent():
    import mmseg
    import mmseg.datasets  # noqa: F401
    import mmseg.models  # noqa: F401
    from mmseg.registry import MODELS

    assert mmseg.__version__ == '1.2.2'
    assert MODELS.get('UPerHead') is not None
    assert mmseg_compat.stack_problems() == []


def test_mmseg_base_config_import_resolves():
    # `mmseg::` base configs go through pkg_resources (hence setuptools<82).
    from mmengine.config import Config

    cfg = Config.fromstring("_base_ = ['mmseg::_base_/models/upernet_r50.py']\n", '.py')
    assert cfg.model.decode_head.type == 'UPerHead'


def test_install_is_idempotent_also_under_a_second_name():
    ops_before = sys.modules['mmcv.ops']
    allowed_before = len(torch.serialization.get_safe_globals())
    mmseg_compat.install()
    mmseg_compat.install()
    spec = importlib.util.spec_from_file_location(
        '_mmseg_compat_second_copy', os.path.join(SEG_DIR, 'mmseg_compat.py'))
    second = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(second)
    assert sys.modules['mmcv.ops'] is ops_before
    assert len(torch.serialization.get_safe_globals()) == allowed_before
    if SHIM_ACTIVE:
        assert second.MmcvOpUnavailableError is mmseg_compat.MmcvOpUnavailableError


@needs_shim
def test_point_sample_matches_hand_values():
    from mmcv.ops import point_sample

    img = torch.tensor([[[[0., 1.], [2., 3.]]]])  # (N=1, C=1, H=2, W=2)
    # Relative (x, y) in [0, 1]; align_corners=False puts pixel centres at 0.25 and 0.75.
    points = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.5, 0.25]]])
    out = point_sample(img, points, align_corners=False)
    assert out.shape == (1, 1, 5)
    torch.testing.assert_close(out[0, 0], torch.tensor([0., 1., 2., 1.5, 0.5]))
    # mmseg's own helpers see the same function
    from mmseg.models.utils import point_sample as mmseg_point_sample_module
    assert mmseg_point_sample_module.point_sample is point_sample


@needs_shim
def test_pure_pytorch_op_from_mmcv_files_is_available():
    from mmcv.ops import CrissCrossAttention

    cca = CrissCrossAttention(16)  # query/key use in_channels // 8
    assert cca(torch.randn(1, 16, 5, 6)).shape == (1, 16, 5, 6)


@needs_shim
def test_compiled_op_raises_clear_error():
    import mmcv.ops

    with pytest.raises(mmseg_compat.MmcvOpUnavailableError) as info:
        from mmcv.ops import nms  # noqa: F401
    message = str(info.value)
    assert 'mmcv.ops.nms' in message and 'mmcv-lite' in message and 'full `mmcv`' in message
    # a ModuleNotFoundError, so mmseg's `except ModuleNotFoundError` fallbacks keep working
    assert isinstance(info.value, ModuleNotFoundError)
    with pytest.raises(ModuleNotFoundError, match='RoIAlign'):
        mmcv.ops.RoIAlign
    with pytest.raises(AttributeError):
        mmcv.ops.no_such_op


@needs_shim
def test_sigmoid_focal_loss_matches_mmseg_reference():
    from mmcv.ops import sigmoid_focal_loss
    from mmseg.models.losses.focal_loss import py_sigmoid_focal_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 3, generator=gen) * 3
    target = torch.tensor([0, 1, 2, 3, 1, 0, 3])  # 3 == num_classes: background row
    one_hot = torch.nn.functional.one_hot(target, 4)[:, :3]
    expected = py_sigmoid_focal_loss(logits, one_hot, gamma=2.0, alpha=0.25, reduction='none')
    got = sigmoid_focal_loss(logits, target, 2.0, 0.25, None, 'none')
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(sigmoid_focal_loss(logits, target, 2.0, 0.25, None, 'mean'),
                               expected.sum() / 7)
    weight = torch.tensor([1.0, 2.0, 3.0])
    row_weight = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 1.0, 1.0]).unsqueeze(1)
    torch.testing.assert_close(sigmoid_focal_loss(logits, target, 2.0, 0.25, weight, 'sum'),
                               (expected * row_weight).sum())


# --------------------------------------------------------------------------- UPerNet + Runner
NORM = dict(type='BN', requires_grad=True)
CLASSES = ('background', 'nodule')


def _tiny_upernet():
    return dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255, size=(64, 64)),
        backbone=dict(type='ResNetV1c', depth=18, stem_channels=8, base_channels=8,
                      out_indices=(0, 1, 2, 3), norm_cfg=NORM),
        decode_head=dict(type='UPerHead', in_channels=[8, 16, 32, 64], in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=16, dropout_ratio=0.1,
                         num_classes=2, norm_cfg=NORM, align_corners=False,
                         loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
        auxiliary_head=dict(type='FCNHead', in_channels=32, in_index=2, channels=8, num_convs=1,
                            concat_input=False, dropout_ratio=0.1, num_classes=2, norm_cfg=NORM,
                            align_corners=False,
                            loss_decode=dict(type='CrossEntropyLoss', loss_weight=0.4)),
        train_cfg=dict(), test_cfg=dict(mode='whole'))


def _write_dataset(root):
    import cv2

    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        os.makedirs(os.path.join(root, 'images', split))
        os.makedirs(os.path.join(root, 'masks', split))
        for i in range(2):
            mask = np.zeros((64, 64), np.uint8)
            mask[10 + 8 * i:40, 16:50] = 1
            image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8) + 150 * mask[..., None]
            cv2.imwrite(os.path.join(root, 'images', split, f'{i}.png'), image)
            cv2.imwrite(os.path.join(root, 'masks', split, f'{i}.png'), mask)


def _runner_cfg(root, work_dir, max_iters, **extra):
    def dataset(split, train):
        pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations')]
        if train:
            pipeline.append(dict(type='RandomFlip', prob=0.5))
        pipeline.append(dict(type='PackSegInputs'))
        return dict(type='BaseSegDataset', data_root=root, img_suffix='.png',
                    seg_map_suffix='.png', pipeline=pipeline,
                    data_prefix=dict(img_path=f'images/{split}', seg_map_path=f'masks/{split}'),
                    metainfo=dict(classes=CLASSES, palette=[[0, 0, 0], [255, 0, 0]]))

    return dict(
        model=_tiny_upernet(), work_dir=work_dir, default_scope='mmseg', launcher='none',
        randomness=dict(seed=0), env_cfg=dict(cudnn_benchmark=False),
        train_dataloader=dict(batch_size=2, num_workers=0, dataset=dataset('train', True),
                              sampler=dict(type='InfiniteSampler', shuffle=True)),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters),
        val_dataloader=dict(batch_size=1, num_workers=0, dataset=dataset('val', False),
                            sampler=dict(type='DefaultSampler', shuffle=False)),
        val_cfg=dict(type='ValLoop'),
        val_evaluator=dict(type='IoUMetric', iou_metrics=['mIoU', 'mDice']),
        optim_wrapper=dict(type='OptimWrapper',
                           optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05)),
        param_scheduler=[dict(type='PolyLR', power=1.0, eta_min=0.0, begin=0, end=max_iters,
                              by_epoch=False)],
        default_hooks=dict(timer=dict(type='IterTimerHook'),
                           logger=dict(type='LoggerHook', interval=1),
                           param_scheduler=dict(type='ParamSchedulerHook'),
                           checkpoint=dict(type='CheckpointHook', by_epoch=False,
                                           interval=max_iters),
                           sampler_seed=dict(type='DistSamplerSeedHook')),
        log_processor=dict(by_epoch=False), **extra)


def test_upernet_train_val_checkpoint_and_resume_on_cpu(tmp_path):
    from mmengine.config import Config
    from mmengine.logging import HistoryBuffer
    from mmengine.runner import Runner
    from mmengine.runner.checkpoint import _load_checkpoint

    root = str(tmp_path / 'data')
    _write_dataset(root)

    runner = Runner.from_cfg(Config(_runner_cfg(root, str(tmp_path / 'run1'), 2)))
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    runner.train()  # 2 iterations (loss + optimizer step), then validation with IoUMetric
    after = runner.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), 'no parameter changed'
    metrics = runner.message_hub.get_scalar('val/mDice')
    assert np.isfinite(metrics.current())

    # forward in test mode
    runner.model.eval()
    batch = next(iter(runner.val_dataloader))
    with torch.no_grad():
        preds = runner.model.test_step(batch)
    assert preds[0].seg_logits.data.shape == (2, 64, 64)
    assert set(preds[0].pred_sem_seg.data.unique().tolist()) <= {0, 1}

    ckpt = str(tmp_path / 'run1' / 'iter_2.pth')
    # torch's default loader (weights_only=True since torch 2.6) and the explicit form
    for loaded in (torch.load(ckpt, map_location='cpu'),
                   torch.load(ckpt, map_location='cpu', weights_only=True)):
        buffers = loaded['message_hub']['log_scalars']
        assert isinstance(buffers['train/loss'], HistoryBuffer)
        assert len(buffers['train/loss'].data[0]) == 2
    # mmengine's own loader (no weights_only argument: torch's default applies)
    loaded = _load_checkpoint(ckpt, map_location='cpu')
    assert loaded['meta']['dataset_meta']['classes'] == CLASSES

    resumed = Runner.from_cfg(Config(_runner_cfg(root, str(tmp_path / 'run2'), 3,
                                                 load_from=ckpt, resume=True)))
    resumed.train()
    assert resumed.iter == 3
    assert len(resumed.message_hub.get_scalar('train/loss').data[0]) == 3


def test_save_checkpoint_with_message_hub_roundtrip(tmp_path):
    from mmengine.logging import HistoryBuffer, MessageHub
    from mmengine.runner.checkpoint import _load_checkpoint, load_checkpoint, save_checkpoint

    hub = MessageHub.get_instance('seg_compat_roundtrip')
    for step in range(3):
        hub.update_scalar('train/loss', 1.0 / (step + 1))
        hub.update_scalar('val/mDice', np.float64(0.5 + step / 10))
    hub.update_info('iter', 3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = str(tmp_path / 'ckpt.pth')
    save_checkpoint({'state_dict': model.state_dict(), 'message_hub': hub.state_dict(),
                     'meta': {'seed': np.int64(7), 'iter': 3}}, path)

    loaded = _load_checkpoint(path, map_location='cpu')
    mdice = loaded['message_hub']['log_scalars']['val/mDice']
    assert isinstance(mdice, HistoryBuffer)
    np.testing.assert_allclose(mdice.data[0], [0.5, 0.6, 0.7])
    assert mdice.mean() == pytest.approx(0.6)  # statistics methods came back too
    assert loaded['meta']['seed'] == 7

    restored = MessageHub.get_instance('seg_compat_restored')
    restored.load_state_dict(loaded['message_hub'])
    assert restored.get_info('iter') == 3

    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    load_checkpoint(other, path, map_location='cpu', strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key])


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class _RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').close()",)


class _ReachesAttribute:
    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


@pytest.mark.parametrize('payload', ['os.system', 'eval', 'getattr-init', 'getattr-numpy'])
def test_untrusted_pickle_is_still_refused(tmp_path, payload):
    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import _load_checkpoint

    marker = tmp_path / 'pwned'
    evil = {'os.system': lambda: _RunsShell(marker),
            'eval': lambda: _RunsEval(str(marker)),
            'getattr-init': lambda: _ReachesAttribute(HistoryBuffer, '__init__'),
            'getattr-numpy': lambda: _ReachesAttribute(np.ndarray, 'tofile')}[payload]()
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': {'x': evil}}, path)

    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location='cpu', weights_only=True)
    if TORCH_LOADS_WEIGHTS_ONLY_BY_DEFAULT:  # mmengine's reader passes no weights_only
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, map_location='cpu')
    # mmengine's reader of local files: once mmseg_custom is imported (as every SEG config and
    # tool does), util/checkpoint.py's, which refuses with its message; before, torch's default
    from mmengine.runner.checkpoint import CheckpointLoader
    from util.checkpoint import CheckpointError

    project_reader = CheckpointLoader._get_checkpoint_loader(path).__module__ == 'mmseg_custom.checkpoints'
    if project_reader:
        with pytest.raises(CheckpointError, match=f'{path}: refused to load'):
            _load_checkpoint(path, map_location='cpu')
    elif TORCH_LOADS_WEIGHTS_ONLY_BY_DEFAULT:
        with pytest.raises(pickle.UnpicklingError):
            _load_checkpoint(path, map_location='cpu')
    assert not marker.exists()
