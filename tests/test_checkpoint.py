"""Checkpoint compatibility with the published models, safe loading and weight surgery.

The published parameter layouts are written out here from the documented architecture
(DESIGN.md §3), independently of the model code, so a renamed or reshaped parameter fails.
"""
import argparse
import os

import numpy as np
import pytest
import torch

from util.checkpoint import CheckpointError, load_checkpoint_file, load_weights, save_checkpoint
import models_convmae  # noqa: F401  (registers the models; it imports models_mae and models_vit)
from util.registry import finetune_models, pretrain_models


def _vit_block(prefix, d, hidden):
    return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
            f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
            f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (hidden, d), f"{prefix}.mlp.fc1.bias": (hidden,),
            f"{prefix}.mlp.fc2.weight": (d, hidden), f"{prefix}.mlp.fc2.bias": (d,)}


def _cblock(prefix, d, hidden):
    return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
            f"{prefix}.conv1.weight": (d, d, 1, 1), f"{prefix}.conv1.bias": (d,),
            f"{prefix}.attn.weight": (d, 1, 5, 5), f"{prefix}.attn.bias": (d,),
            f"{prefix}.conv2.weight": (d, d, 1, 1), f"{prefix}.conv2.bias": (d,),
            f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (hidden, d, 1, 1), f"{prefix}.mlp.fc1.bias": (hidden,),
            f"{prefix}.mlp.fc2.weight": (d, hidden, 1, 1), f"{prefix}.mlp.fc2.bias": (d,)}


def _decoder(tokens, dec_mlp_hidden, out):
    shapes = {"decoder_embed.weight": (512, None), "decoder_embed.bias": (512,),
              "mask_token": (1, 1, 512), "decoder_pos_embed": (1, tokens, 512),
              "decoder_norm.weight": (512,), "decoder_norm.bias": (512,),
              "decoder_pred.weight": (out, 512), "decoder_pred.bias": (out,)}
    for i in range(8):
        shapes.update(_vit_block(f"decoder_blocks.{i}", 512, dec_mlp_hidden))
    return shapes


def published_mae_vit(p, d, depth, chans=3, img=224):
    tokens = (img // p) ** 2 + 1
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, tokens, d),
              "patch_embed.proj.weight": (d, chans, p, p), "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(depth):
        shapes.update(_vit_block(f"blocks.{i}", d, 4 * d))
    shapes.update(_decoder(tokens, 2048, p * p * chans))
    shapes["decoder_embed.weight"] = (512, d)
    return shapes


def published_convmae(dims, depths, mlps, chans=3, img=224):
    d1, d2, d3 = dims
    tokens = (img // 16) ** 2
    shapes = {"patch_embed1.proj.weight": (d1, chans, 4, 4), "patch_embed1.proj.bias": (d1,),
              "patch_embed1.norm.weight": (d1,), "patch_embed1.norm.bias": (d1,),
              "patch_embed2.proj.weight": (d2, d1, 2, 2), "patch_embed2.proj.bias": (d2,),
              "patch_embed2.norm.weight": (d2,), "patch_embed2.norm.bias": (d2,),
              "patch_embed3.proj.weight": (d3, d2, 2, 2), "patch_embed3.proj.bias": (d3,),
              "patch_embed3.norm.weight": (d3,), "patch_embed3.norm.bias": (d3,),
              "patch_embed4.weight": (d3, d3), "patch_embed4.bias": (d3,),
              "stage1_output_decode.weight": (d3, d1, 4, 4), "stage1_output_decode.bias": (d3,),
              "stage2_output_decode.weight": (d3, d2, 2, 2), "stage2_output_decode.bias": (d3,),
              "pos_embed": (1, tokens, d3), "norm.weight": (d3,), "norm.bias": (d3,)}
    for i in range(depths[0]):
        shapes.update(_cblock(f"blocks1.{i}", d1, mlps[0] * d1))
    for i in range(depths[1]):
        shapes.update(_cblock(f"blocks2.{i}", d2, mlps[1] * d2))
    for i in range(depths[2]):
        shapes.update(_vit_block(f"blocks3.{i}", d3, mlps[2] * d3))
    # published decoder blocks use the stage-1 MLP ratio
    shapes.update(_decoder(tokens, 512 * mlps[0], 256 * chans))
    shapes["decoder_embed.weight"] = (512, d3)
    return shapes


PUBLISHED = {
    "mae_vit_base_patch16": published_mae_vit(16, 768, 12),
    "mae_vit_large_patch16": published_mae_vit(16, 1024, 24),
    "mae_vit_huge_patch14": published_mae_vit(14, 1280, 32),
    "mae_vit_base_patch8": published_mae_vit(8, 768, 12),
    "mae_vit_base_patch28": published_mae_vit(28, 768, 12),
    "convmae_convvit_base_patch16": published_convmae((256, 384, 768), (2, 2, 11), (4, 4, 4)),
    "convmae_convvit_large_patch16": published_convmae((384, 768, 1024), (2, 2, 23), (8, 8, 4)),
    "convmae_convvit_huge_patch16": published_convmae((768, 1024, 1280), (2, 2, 31), (8, 8, 4)),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("prefix", ["", "d"])
def test_published_parameter_names_and_shapes(name, prefix):
    with torch.device("meta"):
        model = pretrain_models().create(prefix + name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == PUBLISHED[name]


def _published_checkpoint(name, path, fill=0.01):
    """A file shaped like the released checkpoints: model weights + pickled argparse.Namespace."""
    state = {k: torch.full(s, fill) for k, s in PUBLISHED[name].items()}
    args = argparse.Namespace(model="d" + name, batch_size=32, blr=1.5e-4, norm_pix_loss=False)
    torch.save({"model": state, "args": args, "epoch": 799}, path)
    return state


@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "convmae_convvit_base_patch16"])
def test_published_checkpoint_loads_strictly_and_into_finetuning(name, tmp_path):
    path = tmp_path / "published.pth"
    state = _published_checkpoint(name, path)
    ckpt = load_checkpoint_file(path)
    assert isinstance(ckpt["args"], argparse.Namespace)

    pretrain = pretrain_models().create("d" + name)
    pretrain.load_state_dict(ckpt["model"], strict=True)
    report = load_weights(pretrain, path, allow_unexpected=False)
    assert not report.missing and not report.unexpected

    ft_name = "vit_base_patch16" if name.startswith("mae") else "convvit_base_patch16"
    finetune = finetune_models().create(ft_name, num_classes=2)
    report = load_weights(finetune, path, allowed_missing=("head.", "fc_norm."))
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert all(k.startswith(("decoder", "mask_token", "norm.", "stage")) for k in report.unexpected)
    assert "blocks.0.attn.qkv.weight" in report.loaded or "blocks3.0.attn.qkv.weight" in report.loaded
    for key, value in finetune.state_dict().items():
        if key in state:
            assert torch.equal(value, state[key]), key


def test_our_checkpoint_is_weights_only_loadable(tmp_path):
    model = pretrain_models().create("dmae_vit_tiny_patch16")
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3, 224, 224))[0].backward()
    opt.step()
    path = tmp_path / "checkpoint-0.pth"
    save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0,
                     "scaler": None, "args": {"model": "dmae_vit_tiny_patch16", "lr": 1e-3}}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 0 and loaded["args"]["lr"] == 1e-3
    assert os.listdir(tmp_path) == ["checkpoint-0.pth"]  # no temp file left behind


def test_module_prefix_and_plain_state_dict(tmp_path):
    src = pretrain_models().create("mae_vit_tiny_patch16")
    dst = pretrain_models().create("mae_vit_tiny_patch16")
    wrapped = {"module." + k: v for k, v in src.state_dict().items()}
    load_weights(dst, wrapped, allow_unexpected=False)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_pos_embed_interpolated_and_channels_adapted():
    src = finetune_models().create("vit_tiny_patch16", num_classes=2, img_size=224)
    dst = finetune_models().create("vit_tiny_patch16", num_classes=2, img_size=(256, 192), in_chans=1)
    report = load_weights(dst, src.state_dict())
    assert any("pos_embed" in k for k in report.interpolated)
    assert any("patch_embed.proj.weight" in k for k in report.adapted)
    assert dst.pos_embed.shape == (1, 1 + 16 * 12, 96)
    torch.testing.assert_close(dst.patch_embed.proj.weight[:, 0], src.patch_embed.proj.weight.sum(1))
    # ConvViT: no cls token, learnable pos-embed resampled; fixed sin-cos in the pretraining model kept
    conv_pre = pretrain_models().create("dconvmae_convvit_tiny_patch16", img_size=224)
    conv_ft = finetune_models().create("convvit_tiny_patch16", num_classes=2, img_size=256)
    report = load_weights(conv_ft, conv_pre.state_dict(), allowed_missing=("head.", "fc_norm."))
    assert conv_ft.pos_embed.shape == (1, 256, 96) and report.interpolated
    conv_pre_256 = pretrain_models().create("dconvmae_convvit_tiny_patch16", img_size=256)
    own = conv_pre_256.pos_embed.clone()
    report = load_weights(conv_pre_256, conv_pre.state_dict(), allow_unexpected=False)
    assert "pos_embed" in report.kept_model_value and torch.equal(conv_pre_256.pos_embed, own)


def test_wrong_architecture_and_class_count_are_clear_errors(tmp_path):
    vit = pretrain_models().create("mae_vit_tiny_patch16").state_dict()
    conv = finetune_models().create("convvit_tiny_patch16", num_classes=2)
    with pytest.raises(CheckpointError, match="missing from the checkpoint.*check --model"):
        load_weights(conv, vit, allowed_missing=("head.", "fc_norm."))

    three = finetune_models().create("vit_tiny_patch16", num_classes=3)
    path = tmp_path / "three.pth"
    save_checkpoint({"model": three.state_dict()}, path)
    two = finetune_models().create("vit_tiny_patch16", num_classes=2)
    with pytest.raises(CheckpointError, match=r"three.pth.*head.weight.*\(3, 96\).*--nb_classes"):
        load_weights(two, path)
    report = load_weights(two, path, allowed_missing=("head.",), drop_mismatched=("head.",))
    assert any(k.startswith("head.weight") for k in report.dropped)


def test_errors_name_the_setting_the_caller_gives():
    small = finetune_models().create("vit_tiny_patch16", num_classes=0, img_size=32)
    narrow = finetune_models().create("vit_tiny_patch16", num_classes=0, img_size=32, embed_dim=48)
    cases = {"architecture or size; check model.backbone.": (narrow, small.state_dict()),
             "another architecture; check model.backbone.": (
                 small, {k: v for k, v in small.state_dict().items() if k != "blocks.0.norm1.weight"})}
    for ending, (model, state) in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_weights(model, state, source_name="enc.pth", hint="check model.backbone")
        message = str(info.value)
        assert message.startswith("enc.pth: ") and message.endswith(ending), message
        assert "--model" not in message


def test_segmentation_backbone_errors_name_the_file_and_the_config_key(tmp_path):
    import sys
    seg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "SEG")
    if seg not in sys.path:
        sys.path.append(seg)  # appended: SEG/ must not shadow top-level names such as tools
    from mmseg_custom.pretrained import load_pretrained_backbone
    path = str(tmp_path / "wide.pth")
    save_checkpoint({"model": finetune_models().create("vit_tiny_patch16", img_size=32).state_dict()}, path)
    narrow = finetune_models().create("vit_tiny_patch16", num_classes=0, img_size=32, embed_dim=48)
    # a shape mismatch: its message used to keep the scripts' '--model (and --nb_classes ...)' advice
    with pytest.raises(CheckpointError, match=f"^{path}: 'cls_token' has shape .*; check model.backbone in the config"
                       ) as info:
        load_pretrained_backbone(narrow, path, new_parameters=("head.",))
    assert "--model" not in str(info.value)


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ckpt.pth: not a readable PyTorch checkpoint"):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match="nope.pth: checkpoint not found"):
        load_checkpoint_file(tmp_path / "nope.pth")


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_are_not_a_checkpoint_and_not_called_unsafe(tmp_path, seed):
    # random bytes used to be "refused ... would run arbitrary code", or a bare KeyError/IndexError
    rng = np.random.default_rng(seed)
    path = tmp_path / "random.pth"
    path.write_bytes(rng.bytes(5000))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    assert str(info.value).startswith(f"{path}: not a PyTorch checkpoint (truncated or corrupt: its 5000 bytes")
    # garbage behind the headers of torch.save's two formats reaches torch's readers, and is damaged data too
    for header in (b"PK\x03\x04", b"\x80\x02\x8a\x0a"):
        path.write_bytes(header + rng.bytes(5000))
        with pytest.raises(CheckpointError, match=r"random.pth: not a readable PyTorch checkpoint \(truncated or corrupt"
                           ) as info:
            load_checkpoint_file(path)
        assert "arbitrary code" not in str(info.value) and "refused" not in str(info.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint .truncated or corrupt: it is empty"):
        load_checkpoint_file(path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="evil.pth: refused to load.*holds \\w+.system.*arbitrary code"):
        load_checkpoint_file(path)
    torch.save({"model": {}, "payload": _RunsCode()}, path, _use_new_zipfile_serialization=False)  # legacy format
    with pytest.raises(CheckpointError, match="evil.pth: refused to load.*holds \\w+.system.*arbitrary code"):
        load_checkpoint_file(path)
