"""SEG/mmseg_custom: backbones and pretrained loading, layer decay, mask dataset, per-image metrics,
configs, and fitting a config to a machine without GPU. In-process, CPU, tiny models."""
import os
import sys

import numpy as np
import pytest
import torch

SEG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'SEG')
if SEG_DIR not in sys.path:
    sys.path.append(SEG_DIR)  # appended: SEG/ must not shadow top-level names such as tools

import mmseg_compat  # noqa: E402,F401  (before any mmseg import)
import mmseg_custom  # noqa: E402,F401  (registers the backbones, dataset, metric, constructor)
from mmengine.config import Config  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

from mmseg_custom.launch import adapt_to_machine, propagate_data_root, set_metric_output  # noqa: E402
from mmseg_custom.layer_decay import LayerDecayOptimWrapperConstructor  # noqa: E402
from mmseg_custom.nodule_metric import dice_score, hd95, iou_score, nodule_scores  # noqa: E402
from mmseg_custom.us_dataset import MaskFormatError, UltrasoundNoduleDataset  # noqa: E402
from util.pos_embed import resample_pos_embed  # noqa: E402
from models_vit import VIT_SIZES  # noqa: E402
import models_convmae  # noqa: E402,F401  (registers the pretraining models)
from util.registry import pretrain_models  # noqa: E402

register_all_modules()  # mmseg's types, and 'mmseg' as the default scope (as the Runner does)

CONFIGS = os.path.join(SEG_DIR, 'configs')
DE_CONVMAE_TN3K = os.path.join(CONFIGS, 'de_convmae',
                               'upernet_de_convmae_us280k_base_gaussian_800_512_tn3k.py')
DE_MAE_TN3K = os.path.join(CONFIGS, 'de_mae', 'upernet_de_mae_us280k_base_gaussian_800_512_tn3k.py')
TINY_CONVVIT = {
    'model.backbone.img_size': 64, 'model.backbone.embed_dim': [32, 48, 96],
    'model.backbone.depth': [1, 1, 2], 'model.backbone.num_heads': 3,
    'model.decode_head.in_channels': [32, 48, 96, 96], 'model.decode_head.channels': 16,
    'model.auxiliary_head.in_channels': 96, 'model.auxiliary_head.channels': 8,
    'optim_wrapper.paramwise_cfg.num_layers': 2,
}
TINY_VIT = {
    'model.backbone.arch': 'tiny_patch16', 'model.backbone.img_size': 64,
    'model.backbone.out_indices': [0, 1, 1, 1], 'model.neck.embed_dim': 96,
    'model.decode_head.in_channels': [96] * 4, 'model.decode_head.channels': 16,
    'model.auxiliary_head.in_channels': 96, 'model.auxiliary_head.channels': 8,
    'optim_wrapper.paramwise_cfg.num_layers': 2,
}


def tiny_cfg(config, overrides, **extra):
    cfg = Config.fromfile(config)
    cfg.merge_from_dict({**overrides, **extra})
    cfg.launcher = 'none'
    adapt_to_machine(cfg)  # SyncBN -> BN on CPU
    return cfg


def pretraining_checkpoint(tmp_path_factory, model: str, seed: int, file_name: str):
    """(path, state dict) of a freshly initialised tiny pretraining model saved as {'model': ...}."""
    torch.manual_seed(seed)
    path = tmp_path_factory.mktemp('ckpt') / file_name
    state = pretrain_models().create(model, img_size=224).state_dict()
    torch.save({'model': state}, path)
    return str(path), state


@pytest.fixture(scope='module')
def convmae_checkpoint(tmp_path_factory):
    return pretraining_checkpoint(tmp_path_factory, 'dconvmae_convvit_tiny_patch16', seed=0,
                                  file_name='dconvmae_tiny.pth')


@pytest.fixture(scope='module')
def mae_checkpoint(tmp_path_factory):
    return pretraining_checkpoint(tmp_path_factory, 'dmae_vit_tiny_patch16', seed=1, file_name='dmae_tiny.pth')


# ------------------------------------------------------------------ pretrained backbone weights
def _assert_backbone_holds(backbone, checkpoint_state, interpolated=('pos_embed',)):
    own = backbone.state_dict()
    compared = 0
    for name, value in checkpoint_state.items():
        if name not in own or name in interpolated:
            continue
        assert torch.equal(own[name], value), f'{name} differs from the checkpoint'
        compared += 1
    return compared


@pytest.mark.parametrize('family', ['convvit', 'vit'])
def test_pretrained_weights_survive_construction_and_init_weights(
        family, convmae_checkpoint, mae_checkpoint):
    path, state = convmae_checkpoint if family == 'convvit' else mae_checkpoint
    config, overrides = (DE_CONVMAE_TN3K, TINY_CONVVIT) if family == 'convvit' else (DE_MAE_TN3K, TINY_VIT)
    cfg = tiny_cfg(config, overrides, **{'model.pretrained': path})
    segmentor = MODELS.build(cfg.model)
    backbone = segmentor.backbone

    compared = _assert_backbone_holds(backbone, state)
    encoder_weights = [k for k in backbone.state_dict() if k in state and k != 'pos_embed']
    assert compared == len(encoder_weights) > 10
    grid = backbone.grid if family == 'convvit' else backbone.patch_embed.grid_size
    prefix = 0 if family == 'convvit' else 1
    assert torch.allclose(backbone.pos_embed,
                          resample_pos_embed(state['pos_embed'], grid, num_prefix_tokens=prefix))

    segmentor.init_weights()  # what mmengine's Runner calls before training
    assert _assert_backbone_holds(backbone, state) == compared
    backbone.init_weights()  # also directly: it must not re-initialise
    assert _assert_backbone_holds(backbone, state) == compared

    # the comparison is meaningful: a backbone built without the checkpoint differs
    fresh = MODELS.build(tiny_cfg(config, overrides).model).backbone
    with pytest.raises(AssertionError):
        _assert_backbone_holds(fresh, state)


def test_convvit_backbone_shapes_options_and_segmentation_only_layers(convmae_checkpoint):
    from mmseg_custom import ConvViTBackbone

    path, _ = convmae_checkpoint
    backbone = ConvViTBackbone(img_size=64, embed_dim=(32, 48, 96), depth=(1, 1, 2), num_heads=3,
                               drop_path_rate=0.2, norm_cfg=dict(type='BN'), pretrained=path)
    backbone.eval()
    outs = backbone(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 16), (2, 48, 8, 8), (2, 96, 4, 4),
                                              (2, 96, 2, 2)]
    # smaller input (slide inference on a small image): padded inside, maps cut back
    outs = backbone(torch.randn(1, 3, 48, 64))
    assert [tuple(o.shape[-2:]) for o in outs] == [(12, 16), (6, 8), (3, 4), (2, 2)]
    # relative position bias starts at zero and layer scale at init_values=1 (published)
    for block in backbone.blocks3:
        assert torch.count_nonzero(block.attn.relative_position_bias_table) == 0
        assert torch.all(block.ls1.gamma == 1) and torch.all(block.ls2.gamma == 1)
    assert backbone.blocks3[-1].drop_path1.drop_prob == pytest.approx(0.2)
    # the bias is really used: a non-zero table changes the output
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        before = backbone(x)[2].clone()
        backbone.blocks3[0].attn.relative_position_bias_table.normal_()
        assert not torch.allclose(backbone(x)[2], before)

    plain = ConvViTBackbone(img_size=64, embed_dim=(32, 48, 96), depth=(1, 1, 2), num_heads=3,
                            use_rel_pos_bias=False, init_values=None, use_abs_pos_emb=False,
                            norm_cfg=dict(type='BN'), pretrained=path)
    assert 'pos_embed' not in dict(plain.named_parameters())
    assert not any('relative_position' in k or '.ls1.' in k for k in plain.state_dict())
    assert plain(torch.randn(1, 3, 64, 64))[3].shape == (1, 96, 2, 2)


def test_convvit_backbone_rejects_unsupported_published_options():
    from mmseg_custom import ConvViTBackbone

    tiny = dict(img_size=64, embed_dim=(32, 48, 96), depth=(1, 1, 2), num_heads=3,
                norm_cfg=dict(type='BN'))
    with pytest.raises(ValueError, match='out_indices'):
        ConvViTBackbone(out_indices=[2, 3], **tiny)
    with pytest.raises(ValueError, match='strides'):
        ConvViTBackbone(patch_size=[16, 1, 1], **tiny)
    with pytest.raises(ValueError, match='shared'):
        ConvViTBackbone(use_shared_rel_pos_bias=True, **tiny)
    ConvViTBackbone(out_indices=[3, 5, 7, 11], **tiny)  # the published value is accepted


def test_wrong_checkpoint_names_the_file(tmp_path, mae_checkpoint):
    from mmseg_custom import ConvViTBackbone
    from util.checkpoint import CheckpointError

    path, _ = mae_checkpoint  # a ViT checkpoint for a ConvViT backbone
    with pytest.raises(CheckpointError, match='dmae_tiny.pth.*missing'):
        ConvViTBackbone(img_size=64, embed_dim=(32, 48, 96), depth=(1, 1, 2), num_heads=3,
                        norm_cfg=dict(type='BN'), pretrained=path)


def test_segmentor_checkpoint_backbone_is_accepted_as_pretrained(tmp_path, convmae_checkpoint):
    path, _ = convmae_checkpoint
    segmentor = MODELS.build(tiny_cfg(DE_CONVMAE_TN3K, TINY_CONVVIT, **{'model.pretrained': path}).model)
    whole = tmp_path / 'segmentor.pth'
    torch.save({'state_dict': segmentor.state_dict(), 'meta': {}}, whole)
    again = MODELS.build(tiny_cfg(DE_CONVMAE_TN3K, TINY_CONVVIT,
                                  **{'model.pretrained': str(whole)}).model)
    for name, value in segmentor.backbone.state_dict().items():
        assert torch.equal(again.backbone.state_dict()[name], value), name


# ------------------------------------------------------------------ checkpoints of the whole segmentor
def test_checkpoint_that_does_not_fit_the_segmentor_is_refused_naming_its_kind(tmp_path,
                                                                                convmae_checkpoint):
    """tools/test.py, --load-from and --resume: a file of another kind or config stops the run with
    how many weights match and what the file looks like (mmengine would load it non-strictly and
    evaluate a randomly initialised segmentor)."""
    from mmseg_custom.checkpoints import check_segmentor_checkpoint
    from util.checkpoint import CheckpointError
    from util.registry import finetune_models

    segmentor = MODELS.build(tiny_cfg(DE_CONVMAE_TN3K, TINY_CONVVIT).model)
    total = len(segmentor.state_dict())
    classifier = finetune_models().create('convvit_tiny_patch16', num_classes=2, img_size=64)
    other_config = MODELS.build(tiny_cfg(DE_MAE_TN3K, TINY_VIT).model)
    candidates = {
        'pretraining': ({'model': convmae_checkpoint[1]}, r'only 0 of .* an encoder pretraining '
                        r'checkpoint .*model\.pretrained='),
        'classification': ({'model': classifier.state_dict()}, r'only 0 of .* a classification '
                           r'checkpoint .*model\.pretrained='),
        'segmentation': ({'state_dict': other_config.state_dict(), 'meta': {}},
                         r'only \d+ of .* a segmentation checkpoint of another config'),
    }
    for kind, (checkpoint, message) in candidates.items():
        path = str(tmp_path / f'{kind}.pth')
        with pytest.raises(CheckpointError, match=f'^{path}: {message}') as info:
            check_segmentor_checkpoint(segmentor, checkpoint, path)
        assert f'of the segmentor\'s {total} weights' in str(info.value)
    # a segmentor of this config (DDP-prefixed as well) fits
    check_segmentor_checkpoint(segmentor, {'state_dict': segmentor.state_dict()}, 'own.pth')
    wrapped = {f'module.{k}': v for k, v in segmentor.state_dict().items()}
    check_segmentor_checkpoint(segmentor, {'state_dict': wrapped}, 'own.pth')
    # one weight of another shape is enough to refuse
    reshaped = dict(segmentor.state_dict(), **{'decode_head.conv_seg.weight': torch.zeros(3, 16, 1, 1)})
    with pytest.raises(CheckpointError, match=f'only {total - 1} of .* 1 of another shape'):
        check_segmentor_checkpoint(segmentor, {'state_dict': reshaped}, 'three_classes.pth')


def test_resume_without_a_file_stays_in_the_given_work_dir(tmp_path):
    from mmseg_custom.checkpoints import resume_checkpoint
    from util.checkpoint import CheckpointError

    original, copy = tmp_path / 'original', tmp_path / 'copy'
    for folder in (original, copy):
        folder.mkdir()
    assert resume_checkpoint(str(copy))[0] is None  # nothing recorded: a new run
    (copy / 'last_checkpoint').write_text(str(copy / 'iter_4.pth'))
    assert resume_checkpoint(str(copy))[0] == str(copy / 'iter_4.pth')
    # a copied work dir still records the original's absolute path
    (copy / 'last_checkpoint').write_text(str(original / 'iter_4.pth'))
    with pytest.raises(CheckpointError, match=r'outside the work dir .*/copy/iter_4\.pth does not exist'):
        resume_checkpoint(str(copy))
    (copy / 'iter_4.pth').write_bytes(b'')
    resumed, notes = resume_checkpoint(str(copy))
    assert resumed == str(copy / 'iter_4.pth') and 'outside this work dir' in notes[0]


def test_best_checkpoint_replaced_only_inside_the_work_dir(tmp_path):
    from mmseg_custom.checkpoints import own_checkpoint

    out_dir, elsewhere = tmp_path / 'run', tmp_path / 'other_run'
    out_dir.mkdir()
    elsewhere.mkdir()
    inside = str(out_dir / 'best_mDice_iter_2.pth')
    assert own_checkpoint(inside, str(out_dir), log=lambda _: None) == inside
    outside = str(elsewhere / 'best_mDice_iter_2.pth')
    assert own_checkpoint(outside, str(out_dir), log=lambda _: None) is None
    (out_dir / 'best_mDice_iter_2.pth').write_bytes(b'')  # a copied work dir has its own
    assert own_checkpoint(outside, str(out_dir), log=lambda _: None) == inside
    linked = tmp_path / 'link'
    os.symlink(elsewhere, linked)  # a link out of the work dir is outside as well
    os.symlink(linked, out_dir / 'escape')
    assert own_checkpoint(str(out_dir / 'escape' / 'x.pth'), str(out_dir), log=lambda _: None) is None


def test_unreadable_resume_checkpoint_names_the_previous_intact_one(tmp_path):
    from mmseg_custom.checkpoints import CheckpointFileError, load_from_local, unreadable_resume_message

    intact = {'state_dict': {'w': torch.zeros(2)}, 'meta': {'iter': 1}}
    torch.save(intact, tmp_path / 'iter_1.pth')
    for name in ('iter_2.pth', 'iter_3.pth'):
        torch.save(intact, tmp_path / name)
        with open(tmp_path / name, 'r+b') as f:
            f.truncate(200)  # a write cut short
    latest = str(tmp_path / 'iter_3.pth')
    with pytest.raises(CheckpointFileError, match='iter_3.pth: not a readable') as info:
        load_from_local(latest, map_location='cpu')
    assert info.value.path == latest
    assert unreadable_resume_message(info.value).endswith(
        f'The previous checkpoint {tmp_path / "iter_1.pth"} is intact: continue from it with '
        f'--resume {tmp_path / "iter_1.pth"}')
    os.remove(tmp_path / 'iter_1.pth')
    torch.save({'state_dict': {'w': torch.zeros(2)}}, tmp_path / 'best_mDice_iter_1.pth')
    assert unreadable_resume_message(info.value).endswith(
        f'There is no earlier intact checkpoint in {tmp_path}; {tmp_path / "best_mDice_iter_1.pth"} '
        'holds the best weights (no optimizer state): --load-from it starts a new schedule from them.')


def test_checkpoints_are_written_atomically_and_a_failed_write_names_the_seg_fix(tmp_path):
    import mmengine.runner.runner
    from mmseg_custom.checkpoints import save_checkpoint_atomically
    from util.checkpoint import CheckpointError

    assert mmengine.runner.runner.save_checkpoint is save_checkpoint_atomically  # Runner's writer
    save_checkpoint_atomically({'state_dict': {'w': torch.ones(2)}}, str(tmp_path / 'iter_1.pth'))
    assert os.listdir(tmp_path) == ['iter_1.pth']  # no temporary file left behind
    assert torch.equal(torch.load(tmp_path / 'iter_1.pth', weights_only=True)['state_dict']['w'],
                       torch.ones(2))
    (tmp_path / 'not_a_folder').write_text('')
    with pytest.raises(CheckpointError, match=r'could not write .*not_a_folder/iter_2\.pth .*'
                       r'pass a writable --work-dir\) and re-run the same command with --resume'):
        save_checkpoint_atomically({'state_dict': {}}, str(tmp_path / 'not_a_folder' / 'iter_2.pth'))


# ------------------------------------------------------------------ class-weighted loss
@pytest.mark.parametrize('avg_non_ignore', [False, True])
def test_class_weighted_cross_entropy_with_ignored_pixels(avg_non_ignore):
    """Padding (label 255) around a crop smaller than the model input, with class weights (the
    demo configs weight the nodule x5): mmseg 1.2.2 raised IndexError: index 255 is out of bounds."""
    import torch.nn.functional as F
    from mmseg.models.losses import cross_entropy_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 5)
    label = torch.randint(0, 2, (2, 4, 5))
    label[0, :, 3:] = 255  # a wide image padded at the right
    label[1, 2:] = 255     # a tall one padded at the bottom
    weights = [1.0, 5.0]
    loss_fn = MODELS.build(dict(type='CrossEntropyLoss', class_weight=weights,
                                avg_non_ignore=avg_non_ignore, loss_weight=1.0))
    loss = loss_fn(logits, label, ignore_index=255)

    valid = label != 255
    w = torch.tensor(weights)
    per_pixel = F.cross_entropy(logits, label, weight=w, ignore_index=255, reduction='none')
    # padded pixels count as mmseg counts them without class weights: 1, or 0 with avg_non_ignore
    denominator = w[label[valid]].sum() + (0 if avg_non_ignore else (~valid).sum())
    assert loss.item() == pytest.approx((per_pixel.sum() / denominator).item(), rel=1e-5)
    if avg_non_ignore:  # then it is PyTorch's own weighted mean
        expected = F.cross_entropy(logits, label, weight=w, ignore_index=255)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # without ignored pixels the result is mmseg's own
    full = torch.randint(0, 2, (2, 4, 5))
    mmseg_own = cross_entropy_loss.cross_entropy.__wrapped__(
        logits, full, class_weight=w, ignore_index=255, avg_non_ignore=avg_non_ignore)
    assert loss_fn(logits, full, ignore_index=255).item() == pytest.approx(mmseg_own.item(), rel=1e-6)


# ------------------------------------------------------------------ layer decay
def test_layer_decay_groups_convvit_base_levels():
    cfg = tiny_cfg(DE_CONVMAE_TN3K, {'model.backbone.img_size': 64,
                                     'model.test_cfg.crop_size': (64, 64)})
    segmentor = MODELS.build(cfg.model)
    wrapper_cfg = dict(cfg.optim_wrapper)
    constructor = LayerDecayOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=wrapper_cfg['optimizer']), wrapper_cfg['paramwise_cfg'])
    optimizer = constructor(segmentor).optimizer
    groups = optimizer.param_groups

    names = [n for g in groups for n in g['param_names']]
    assert sorted(names) == sorted(n for n, p in segmentor.named_parameters() if p.requires_grad)
    assert len(names) == len(set(names))  # each parameter in exactly one group

    level = {n: g['layer_id'] for g in groups for n in g['param_names']}
    scale = {n: g['lr_scale'] for g in groups for n in g['param_names']}
    decay = {n: g['weight_decay'] for g in groups for n in g['param_names']}
    assert {g['layer_id'] for g in groups} == set(range(13))  # ConvViT-B: 11 blocks -> 13 levels
    expected_level = {
        'backbone.patch_embed1.proj.weight': 0, 'backbone.blocks1.0.conv1.weight': 0,
        'backbone.blocks2.1.attn.weight': 0, 'backbone.patch_embed4.weight': 0,
        'backbone.pos_embed': 0, 'backbone.blocks3.0.attn.qkv.weight': 1,
        'backbone.blocks3.10.mlp.fc2.weight': 11, 'backbone.blocks3.4.ls1.gamma': 5,
        'backbone.downsample.0.weight': 12, 'decode_head.conv_seg.weight': 12,
        'auxiliary_head.convs.0.conv.weight': 12}
    for name, lvl in expected_level.items():
        assert level[name] == lvl, name
        assert scale[name] == pytest.approx(0.75 ** (12 - lvl)), name
    for group in groups:
        assert group['lr'] == pytest.approx(1e-4 * group['lr_scale'])
    # no weight decay on norms, biases, position embedding, relative position bias, layer scale
    for name in ('backbone.pos_embed', 'backbone.blocks3.0.attn.relative_position_bias_table',
                 'backbone.blocks3.0.norm1.weight', 'backbone.blocks3.0.attn.qkv.bias',
                 'backbone.blocks3.0.ls2.gamma', 'decode_head.bottleneck.bn.weight'):
        assert decay[name] == 0.0, name
    for name in ('backbone.blocks3.0.attn.qkv.weight', 'backbone.patch_embed1.proj.weight',
                 'decode_head.conv_seg.weight'):
        assert decay[name] == 0.05, name


def test_layer_decay_groups_vit_levels():
    segmentor = MODELS.build(tiny_cfg(DE_MAE_TN3K, TINY_VIT).model)
    cfg = tiny_cfg(DE_MAE_TN3K, TINY_VIT)
    constructor = LayerDecayOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(cfg.optim_wrapper.optimizer)),
        dict(cfg.optim_wrapper.paramwise_cfg))
    groups = constructor(segmentor).optimizer.param_groups
    level = {n: g['layer_id'] for g in groups for n in g['param_names']}
    decay = {n: g['weight_decay'] for g in groups for n in g['param_names']}
    assert len(level) == sum(1 for p in segmentor.parameters() if p.requires_grad)
    assert level['backbone.cls_token'] == level['backbone.pos_embed'] == 0
    assert level['backbone.patch_embed.proj.weight'] == 0
    assert level['backbone.blocks.0.attn.qkv.weight'] == 1
    assert level['backbone.blocks.1.mlp.fc2.weight'] == 2
    assert level['neck.upsample_4x.0.weight'] == level['decode_head.conv_seg.weight'] == 3
    assert decay['backbone.cls_token'] == decay['backbone.pos_embed'] == 0.0


def test_layer_decay_checks_num_layers():
    cfg = tiny_cfg(DE_CONVMAE_TN3K, TINY_CONVVIT)
    segmentor = MODELS.build(cfg.model)
    wrapper_cfg = dict(cfg.optim_wrapper)
    constructor = LayerDecayOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=wrapper_cfg['optimizer']),
        dict(num_layers=11, layer_decay_rate=0.75))
    with pytest.raises(ValueError, match='num_layers=11.*2 transformer blocks'):
        constructor(segmentor)


# ------------------------------------------------------------------ masks
def _write_pair(root, split, name, mask, image_size=None):
    import cv2

    for folder in ('images', 'masks'):
        os.makedirs(os.path.join(root, folder, split), exist_ok=True)
    h, w = image_size or mask.shape[:2]
    cv2.imwrite(os.path.join(root, 'images', split, name), np.full((h, w, 3), 90, np.uint8))
    cv2.imwrite(os.path.join(root, 'masks', split, name), mask)


def _dataset(root, split='train'):
    return UltrasoundNoduleDataset(
        data_root=str(root), data_prefix=dict(img_path=f'images/{split}', seg_map_path=f'masks/{split}'),
        pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations')])


def test_masks_0_255_and_0_1_both_map_to_0_1(tmp_path):
    nodule = np.zeros((16, 20), np.uint8)
    nodule[4:10, 5:15] = 1
    _write_pair(tmp_path, 'train', 'a.png', nodule * 255)
    _write_pair(tmp_path, 'train', 'b.png', nodule)
    _write_pair(tmp_path, 'train', 'c.png', np.zeros_like(nodule))
    dataset = _dataset(tmp_path)
    assert dataset.metainfo['classes'] == ('background', 'nodule')
    for index in range(3):
        sample = dataset[index]
        expected = np.zeros_like(nodule) if sample['seg_map_path'].endswith('c.png') else nodule
        np.testing.assert_array_equal(sample['gt_seg_map'], expected)


@pytest.mark.parametrize('bad, message', [
    (np.array([[0, 128], [255, 255]], np.uint8), r'values \[0, 128, 255\]'),
    (np.array([[0, 1], [2, 2]], np.uint8), r'values \[0, 1, 2\]'),
    (np.zeros((2, 2, 3), np.uint8) + 255, 'single-channel'),
])
def test_masks_with_other_values_fail_naming_the_file(tmp_path, bad, message):
    _write_pair(tmp_path, 'train', 'good.png', np.zeros((2, 2), np.uint8))
    _write_pair(tmp_path, 'train', 'bad.png', bad, image_size=(2, 2))
    with pytest.raises(MaskFormatError, match=f'bad.png.*{message}'):
        _dataset(tmp_path)


def test_missing_mask_wrong_size_and_missing_folder_are_clear(tmp_path):
    _write_pair(tmp_path, 'train', 'a.png', np.zeros((8, 8), np.uint8))
    _write_pair(tmp_path, 'train', 'b.png', np.zeros((8, 8), np.uint8), image_size=(8, 9))
    with pytest.raises(MaskFormatError, match='b.png: mask is 8x8 but its image .* is 9x8'):
        _dataset(tmp_path)
    os.remove(tmp_path / 'masks' / 'train' / 'b.png')
    with pytest.raises(FileNotFoundError, match='1 images have no mask'):
        _dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match='data_root'):
        _dataset(tmp_path, split='val')


# ------------------------------------------------------------------ per-image metrics
def test_dice_and_iou_by_hand():
    pred = np.zeros((6, 6), bool)
    gt = np.zeros((6, 6), bool)
    pred[1:3, 1:4] = True   # 6 pixels
    gt[1:4, 2:4] = True     # 6 pixels, overlap rows 1-2 x cols 2-3 = 4
    assert dice_score(pred, gt) == pytest.approx(2 * 4 / 12)
    assert iou_score(pred, gt) == pytest.approx(4 / 8)
    empty = np.zeros((6, 6), bool)
    assert dice_score(empty, empty) == 1.0 and iou_score(empty, empty) == 1.0
    assert dice_score(pred, empty) == 0.0


def test_hd95_by_hand():
    a = np.zeros((7, 7), bool)
    b = np.zeros((7, 7), bool)
    a[2, 2] = True
    b[2, 5] = True
    assert hd95(a, b) == pytest.approx(3.0)          # single pixels 3 apart
    assert hd95(a, a) == 0.0
    # A = {(0,0)}, B = {(0,0), (0,4)}: distances A->B [0], B->A [0, 4];
    # 95th percentile of [0, 0, 4] (linear interpolation) = 0 + 0.9 * (4 - 0) = 3.6
    a = np.zeros((5, 5), bool)
    b = np.zeros((5, 5), bool)
    a[0, 0] = True
    b[0, 0] = b[0, 4] = True
    assert hd95(a, b) == pytest.approx(3.6)
    # a filled 5x5 square against the same square shifted right by 3: the left column of A and
    # the right column of B (10 of the 32 boundary pixels) are 3 from the other boundary, all
    # others closer, so the 95th percentile is 3
    a = np.zeros((9, 12), bool)
    b = np.zeros((9, 12), bool)
    a[2:7, 1:6] = True
    b[2:7, 4:9] = True
    assert hd95(a, b) == pytest.approx(3.0)
    empty = np.zeros((5, 5), bool)
    assert hd95(empty, empty) == 0.0
    assert hd95(a[:5, :5], empty) is None


def test_nodule_scores_leave_out_ignored_pixels():
    gt = np.array([[0, 1, 1, 255]])
    pred = np.array([[0, 1, 1, 1]])
    scores = nodule_scores(pred, gt)
    assert scores['dice'] == 1.0 and scores['iou'] == 1.0 and scores['hd95'] == 0.0


# ------------------------------------------------------------------ configs and launch helpers
@pytest.mark.parametrize('relative, data_dir, batch', [
    ('de_convmae/upernet_de_convmae_us280k_base_gaussian_800_512_tn3k.py', 'images_gaussian', 10),
    ('de_convmae/upernet_de_convmae_us280k_base_gaussian_800_512_tnui.py', 'images_gaussian', 10),
    ('convmae/upernet_convmae_us280k_base_800_512_tn3k.py', 'images', 6),
    ('convmae/upernet_convmae_us280k_base_800_512_tnui.py', 'images', 10),
])
def test_published_configs_keep_the_published_values(relative, data_dir, batch):
    cfg = Config.fromfile(os.path.join(CONFIGS, relative))
    backbone = cfg.model.backbone
    assert backbone.type == 'ConvMAE' and backbone.embed_dim == [256, 384, 768]
    assert backbone.depth == [2, 2, 11] and backbone.num_heads == 12
    assert backbone.use_rel_pos_bias and backbone.use_abs_pos_emb and backbone.init_values == 1.0
    assert backbone.drop_path_rate == 0.2
    assert cfg.model.decode_head.channels == 768
    assert cfg.model.decode_head.in_channels == [256, 384, 768, 768]
    assert cfg.model.auxiliary_head.in_index == 2 and cfg.model.auxiliary_head.in_channels == 768
    assert cfg.model.test_cfg == dict(mode='slide', crop_size=(512, 512), stride=(341, 341))
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                                               weight_decay=0.05)
    assert cfg.optim_wrapper.paramwise_cfg == dict(num_layers=11, layer_decay_rate=0.75)
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.end, warmup.start_factor) == ('LinearLR', 1500, 1e-6)
    assert (poly.type, poly.power, poly.begin, poly.end) == ('PolyLR', 1.0, 1500, 160000)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.default_hooks.checkpoint.save_best == 'mDice'
    assert cfg.train_dataloader.batch_size == batch
    steps = [t.type for t in cfg.train_dataloader.dataset.pipeline]
    assert steps == ['LoadImageFromFile', 'LoadAnnotations', 'RandomResize', 'RandomCrop',
                     'RandomFlip', 'PhotoMetricDistortion', 'PackSegInputs']
    resize = cfg.train_dataloader.dataset.pipeline[2]
    assert resize.scale == (1096, 768) and resize.ratio_range == (0.5, 2.0)
    for split in ('train', 'val', 'test'):
        prefix = cfg[f'{split}_dataloader'].dataset.data_prefix
        assert prefix == dict(img_path=f'{data_dir}/{split}', seg_map_path=f'masks/{split}')
    assert 'tnui' in cfg.data_root if relative.endswith('tnui.py') else 'tn3k' in cfg.data_root


# Every experiment config: (model base it is built on, number of transformer blocks for the layer
# decay, iterations). The demo configs scale the Deblurring MAE experiment down.
EXPERIMENTS = {
    'convmae/upernet_convmae_us280k_base_800_512_tn3k.py': ('upernet_convvit.py', 11, 160000),
    'convmae/upernet_convmae_us280k_base_800_512_tnui.py': ('upernet_convvit.py', 11, 160000),
    'de_convmae/upernet_de_convmae_us280k_base_gaussian_800_512_tn3k.py': ('upernet_convvit.py', 11, 160000),
    'de_convmae/upernet_de_convmae_us280k_base_gaussian_800_512_tnui.py': ('upernet_convvit.py', 11, 160000),
    'de_mae/upernet_de_mae_us280k_base_gaussian_800_512_tn3k.py': ('upernet_vit.py', 12, 160000),
    'demo/upernet_de_mae_vit_tiny_synthetic_128.py': ('upernet_vit.py', 2, 300),
    'demo/upernet_mae_vit_tiny_synthetic_128.py': ('upernet_vit.py', 2, 300),
}


def _config_files(*parts):
    folder = os.path.join(CONFIGS, *parts)
    return sorted(os.path.relpath(os.path.join(root, name), CONFIGS)
                  for root, _, names in os.walk(folder) for name in names if name.endswith('.py'))


def test_configs_are_model_dataset_runtime_and_schedule_bases_without_delete():
    """mmseg's layout: each model base is complete on its own, so no config deletes a part of
    another (``_delete_``), and the layer-decay optimizer is written once, in the schedule."""
    every = _config_files()
    assert every and not [f for f in every if '_delete_' in open(os.path.join(CONFIGS, f)).read()]
    experiments = [f for f in every if not f.startswith('_base_')]
    assert experiments == sorted(EXPERIMENTS)
    schedule = Config.fromfile(os.path.join(CONFIGS, '_base_', 'schedules', 'schedule_160k.py'))
    assert schedule.optim_wrapper == dict(
        type='AmpOptimWrapper', dtype='bfloat16', constructor='LayerDecayOptimWrapperConstructor',
        optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
        paramwise_cfg=dict(layer_decay_rate=0.75))
    for base, backbone, neck in (('upernet_convvit.py', 'ConvMAE', None),
                                 ('upernet_vit.py', 'ViTBackbone', 'Feature2Pyramid')):
        model = Config.fromfile(os.path.join(CONFIGS, '_base_', 'models', base)).model
        assert (model.backbone.type, model.get('neck', {}).get('type')) == (backbone, neck)
        assert (model.decode_head.type, model.auxiliary_head.type) == ('UPerHead', 'FCNHead')


@pytest.mark.parametrize('relative', sorted(EXPERIMENTS))
def test_each_experiment_is_its_model_base_with_the_shared_layer_decay(relative):
    base, num_layers, iterations = EXPERIMENTS[relative]
    cfg = Config.fromfile(os.path.join(CONFIGS, relative))
    model_base = Config.fromfile(os.path.join(CONFIGS, '_base_', 'models', base)).model
    schedule = Config.fromfile(os.path.join(CONFIGS, '_base_', 'schedules', 'schedule_160k.py'))
    backbone = cfg.model.backbone
    if relative.startswith('demo/'):  # a tiny ViT, the same parts
        assert (backbone.type, cfg.model.neck.type) == (model_base.backbone.type, model_base.neck.type)
    else:
        assert cfg.model == model_base  # the full-size experiments take the model as it is
    blocks = backbone.depth[-1] if backbone.type == 'ConvMAE' else VIT_SIZES[backbone.arch]['depth']
    assert cfg.optim_wrapper.paramwise_cfg == dict(num_layers=num_layers, layer_decay_rate=0.75)
    assert blocks == num_layers
    wrapper = {**cfg.optim_wrapper, 'paramwise_cfg': dict(layer_decay_rate=0.75)}
    if relative.startswith('demo/'):  # a short run: 10x the lr
        assert wrapper['optimizer'].pop('lr') == 1e-3
        wrapper['optimizer']['lr'] = schedule.optim_wrapper.optimizer.lr
    assert wrapper == schedule.optim_wrapper  # experiments change only num_layers
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, poly.type, poly.end, cfg.train_cfg.max_iters) == (
        'LinearLR', 'PolyLR', iterations, iterations)


def _data_roots(overrides):
    """Each split's data_root after ``--options`` ``overrides``, as the SEG tools resolve them."""
    cfg = Config.fromfile(DE_CONVMAE_TN3K)
    cfg.merge_from_dict(overrides)
    propagate_data_root(cfg, overrides)
    return cfg, [cfg[f'{split}_dataloader'].dataset.data_root for split in ('train', 'val', 'test')]


def test_data_root_and_metric_files_reach_every_split():
    cfg, roots = _data_roots({'data_root': '/data/tn3k'})
    assert roots == ['/data/tn3k'] * 3
    set_metric_output(cfg, '/runs/a')
    files = {key: [e.get('output_file') for e in cfg[key] if e.type == 'PerImageNoduleMetric']
             for key in ('val_evaluator', 'test_evaluator')}
    assert files == {'val_evaluator': ['/runs/a/per_image_metrics_val.json'],
                     'test_evaluator': ['/runs/a/per_image_metrics.json']}


def test_a_split_data_root_given_on_the_command_line_is_kept():
    """mmseg's own spelling (train_dataloader.dataset.data_root=...) was overwritten with the
    config's top-level data_root."""
    published = Config.fromfile(DE_CONVMAE_TN3K).data_root
    _, roots = _data_roots({'train_dataloader.dataset.data_root': '/data/train_here'})
    assert roots == ['/data/train_here', published, published]
    _, roots = _data_roots({'data_root': '/data/tn3k', 'test_dataloader.dataset.data_root': '/data/ext'})
    assert roots == ['/data/tn3k', '/data/tn3k', '/data/ext']
    _, roots = _data_roots({})
    assert roots == [published] * 3


@pytest.mark.parametrize('fails', [False, True])
def test_tools_close_the_process_group_at_the_end(tmp_path, fails):
    """A gloo process group still open at interpreter exit ended 2-process runs now and then in
    'terminate called without an active exception' (SIGABRT) after they had finished."""
    import argparse

    import torch.distributed as dist
    from mmseg_custom.launch import run_tool
    from util.checkpoint import CheckpointError

    def run(args):  # what mmengine's Runner does in a tools/train.py or test.py run
        dist.init_process_group('gloo', init_method=f'file://{tmp_path / "rendezvous"}', rank=0,
                                world_size=1)
        dist.all_reduce(torch.ones(1))
        if fails:
            raise CheckpointError('iter_2.pth: not a readable PyTorch checkpoint')

    if fails:
        with pytest.raises(SystemExit, match='error: iter_2.pth'):
            run_tool(run, argparse.ArgumentParser(), [])
    else:
        run_tool(run, argparse.ArgumentParser(), [])
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU fallbacks')
def test_cpu_fallbacks_replace_amp_and_syncbn():
    cfg = Config.fromfile(DE_CONVMAE_TN3K)
    cfg.launcher = 'pytorch'
    changes = adapt_to_machine(cfg)
    assert cfg.optim_wrapper.type == 'OptimWrapper' and 'dtype' not in cfg.optim_wrapper
    assert cfg.model.decode_head.norm_cfg.type == 'BN'
    assert cfg.model.backbone.norm_cfg.type == 'BN'
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.device_ids is None
    assert len(changes) == 3


@pytest.mark.parametrize('cores,processes,expected', [(16, '1', 4), (2, '1', 2), (8, '4', 2), (2, '4', 0)])
def test_data_workers_are_lowered_to_the_cores_of_each_process(cores, processes, expected,
                                                               monkeypatch):
    """The published configs ask for 4 workers per loader and process: more than a 2-core machine
    (or a node's share per GPU process) has."""
    from mmseg_custom import launch

    monkeypatch.setattr(launch.os, 'sched_getaffinity', lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', processes)
    cfg = Config.fromfile(DE_CONVMAE_TN3K)
    changes = launch.fit_workers_to_machine(cfg)
    keys = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    assert [cfg[key].num_workers for key in keys] == [expected] * 3
    assert [cfg[key].persistent_workers for key in keys] == [expected > 0] * 3
    if expected == 4:
        assert changes == []
    else:
        per = f' shared by {processes} processes on this node' if processes != '1' else ''
        assert changes == [f'{key}: num_workers 4 -> {expected} ({cores} CPU cores available{per})'
                           for key in keys]


# ------------------------------------------------------------------ TN3K conversion
def test_prepare_tn3k_splits_by_numeric_order_and_binarises_jpeg_masks(tmp_path):
    import importlib.util
    import json

    import cv2

    spec = importlib.util.spec_from_file_location(
        'prepare_tn3k', os.path.join(SEG_DIR, 'tools', 'prepare_tn3k.py'))
    prepare_tn3k = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_tn3k)

    src = tmp_path / 'tn3k'
    rng = np.random.default_rng(0)
    nodule = np.zeros((24, 32), np.uint8)
    nodule[6:18, 8:24] = 255
    for group, names in (('trainval', ['1', '2', '3', '10']), ('test', ['5'])):
        for kind in ('image', 'mask'):
            os.makedirs(src / f'{group}-{kind}')
        for name in names:
            cv2.imwrite(str(src / f'{group}-image' / f'{name}.jpg'),
                        rng.integers(0, 255, (24, 32), dtype=np.uint8))
            cv2.imwrite(str(src / f'{group}-mask' / f'{name}.jpg'), nodule)  # JPEG: noisy values
    # indices into the trainval names sorted numerically: 1, 2, 3, 10
    (src / 'tn3k-trainval-fold0.json').write_text(json.dumps({'train': [0, 3], 'val': [1]}))

    dst = tmp_path / 'seg'
    prepare_tn3k.main(['--src', str(src), '--dst', str(dst)])
    listing = {split: sorted(os.listdir(dst / 'masks' / split)) for split in ('train', 'val', 'test')}
    assert listing == {'train': ['1.png', '10.png'], 'val': ['2.png'], 'test': ['5.png']}
    mask = cv2.imread(str(dst / 'masks' / 'train' / '10.png'), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(mask).tolist()) == {0, 255}
    np.testing.assert_array_equal(mask, nodule)
    assert len(_dataset(dst, 'train')) == 2  # the dataset accepts the converted masks
