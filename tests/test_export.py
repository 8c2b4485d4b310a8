"""tools/export.py: round trips into timm, Hugging Face transformers and safetensors.

Each exported model is loaded here the way its README says (timm.create_model with a local file,
from_pretrained on the folder) with the network blocked, and compared with this repository's model on
the same input (and, for ViTMAE, the same masking noise). Every parameter is perturbed first, so a
LayerNorm left at its initial ones/zeros or a swapped q/k/v would show.
"""
import json
import os
import socket

import cv2
import numpy as np
import pytest
import torch

import main_finetune
from tools import export
from util.checkpoint import CheckpointError, load_checkpoint_file, load_weights
from util.registry import finetune_models, pretrain_models

ATOL = 2e-5


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the Hugging Face hub (or anything else) fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def perturbed(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def save(network, path, **args):
    torch.save({"model": network.state_dict(), "epoch": 3, "args": args}, path)
    return str(path)


def run_export(ckpt, fmt, out, *extra):
    export.main([str(ckpt), "--format", fmt, "--out", str(out), *extra])
    return str(out)


def all_tokens(n, model):
    return torch.arange(model.num_patches).expand(n, -1)


# ------------------------------------------------------------------------------ timm
def create_timm(out):
    """As the export's README says: local file, explicit keyword arguments."""
    import timm
    info = json.load(open(os.path.join(out, "timm.json")))
    return timm.create_model(info["timm_model"], pretrained=True,
                             pretrained_cfg_overlay=dict(info["pretrained_cfg_overlay"],
                                                         file=os.path.join(out, "model.safetensors")),
                             **info["create_kwargs"]).eval(), info


@pytest.mark.parametrize("name,in_chans", [("mae_vit_tiny_patch16", 3), ("dmae_vit_tiny_patch16", 1)])
def test_timm_export_of_a_pretraining_encoder_gives_its_features(tmp_path, no_network, name, in_chans):
    torch.manual_seed(0)
    mae = perturbed(pretrain_models().create(name, img_size=(32, 48), in_chans=in_chans))
    ckpt = save(mae, tmp_path / "p.pth", model=name, input_size=[32, 48], in_chans=in_chans)
    timm_model, info = create_timm(run_export(ckpt, "timm", tmp_path / "timm"))
    assert info["create_kwargs"]["global_pool"] == "token" and info["create_kwargs"]["num_classes"] == 0
    x = torch.randn(2, in_chans, 32, 48)
    with torch.no_grad():
        ours = mae.forward_encoder(x, all_tokens(2, mae))  # no masking, tokens in image order
        theirs = timm_model.forward_features(x)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)


@pytest.mark.parametrize("global_pool", [True, False])
def test_timm_export_of_a_fine_tuned_vit_gives_its_logits(tmp_path, no_network, global_pool):
    torch.manual_seed(1)
    vit = perturbed(finetune_models().create("vit_tiny_patch16", img_size=32, in_chans=1, num_classes=2,
                                             global_pool=global_pool))
    ckpt = save(vit, tmp_path / "f.pth", model="vit_tiny_patch16", input_size=[32], in_chans=1,
                global_pool=global_pool, data_mean=[0.3], data_std=[0.2])
    timm_model, info = create_timm(run_export(ckpt, "timm", tmp_path / "timm"))
    assert info["create_kwargs"]["fc_norm"] is global_pool
    assert info["pretrained_cfg_overlay"]["mean"] == [0.3] and timm_model.pretrained_cfg["std"] == [0.2]
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), vit(x), rtol=0, atol=ATOL)
        torch.testing.assert_close(timm_model.forward_features(x), vit.forward_features(x), rtol=0, atol=ATOL)


def test_timm_export_refuses_convvit(tmp_path):
    ckpt = save(pretrain_models().create("dconvmae_convvit_tiny_patch16", img_size=32), tmp_path / "c.pth",
                model="dconvmae_convvit_tiny_patch16", input_size=[32])
    with pytest.raises(SystemExit, match="ConvViT.*--format safetensors"):
        run_export(ckpt, "timm", tmp_path / "timm")


# ------------------------------------------------------------------------------ Hugging Face
def hf_models(out):
    from transformers import ViTMAEForPreTraining, ViTModel
    mae, info = ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    encoder, encoder_info = ViTModel.from_pretrained(os.path.join(out, "encoder"), add_pooling_layer=False,
                                                     output_loading_info=True)
    for loading in (info, encoder_info):  # every weight came from the files, none left initialised
        assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    return mae.eval(), encoder.eval()


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hf_export_of_mae_gives_the_same_mask_logits_and_loss(tmp_path, no_network, norm_pix_loss):
    torch.manual_seed(2)
    mae = perturbed(pretrain_models().create("mae_vit_tiny_patch16", img_size=48, norm_pix_loss=norm_pix_loss))
    ckpt = save(mae, tmp_path / "m.pth", model="mae_vit_tiny_patch16", input_size=[48], in_chans=3,
                norm_pix_loss=norm_pix_loss, mask_ratio=0.6)
    hf, encoder = hf_models(run_export(ckpt, "hf", tmp_path / "hf"))
    assert hf.config.mask_ratio == 0.6 and hf.config.norm_pix_loss is norm_pix_loss
    x, noise = torch.randn(2, 3, 48, 48), torch.rand(2, 9)
    with torch.no_grad():
        loss, pred, mask = mae(x, mask_ratio=0.6, noise=noise)
        out = hf(pixel_values=x, noise=noise)
        torch.testing.assert_close(encoder(pixel_values=x).last_hidden_state,
                                   mae.forward_encoder(x, all_tokens(2, mae)), rtol=0, atol=ATOL)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.logits, pred, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)


def test_hf_export_of_deblurring_mae_gives_the_same_logits_and_its_loss_from_them(tmp_path, no_network):
    torch.manual_seed(3)
    dmae = perturbed(pretrain_models().create("dmae_vit_tiny_patch16", img_size=32, in_chans=1))
    ckpt = save(dmae, tmp_path / "d.pth", model="dmae_vit_tiny_patch16", input_size=[32], in_chans=1)
    out_dir = run_export(ckpt, "hf", tmp_path / "hf")
    hf, _ = hf_models(out_dir)
    notes = json.load(open(os.path.join(out_dir, "export.json")))
    assert "loss_on='all'" in notes["loss"] and "sharp" in notes["loss"]
    blurred, sharp, noise = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32), torch.rand(2, 4)
    with torch.no_grad():
        loss, pred, mask = dmae(blurred, sharp, noise=noise)
        out = hf(pixel_values=blurred, noise=noise)
    torch.testing.assert_close(out.logits, pred, rtol=0, atol=ATOL)
    # the Deblurring MAE loss from Hugging Face's logits: sharp target, all patches
    deblurring_loss = (out.logits - hf.patchify(sharp)).pow(2).mean()
    torch.testing.assert_close(deblurring_loss, loss, rtol=1e-5, atol=1e-6)
    # Hugging Face's own loss is the vanilla one: against its input, masked patches only
    vanilla = ((out.logits - hf.patchify(blurred)).pow(2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss, vanilla, rtol=1e-5, atol=1e-6)


def test_hf_export_refuses_what_vitmae_cannot_hold(tmp_path):
    vit = save(finetune_models().create("vit_tiny_patch16", img_size=32, num_classes=2), tmp_path / "f.pth",
               model="vit_tiny_patch16", input_size=[32])
    with pytest.raises(SystemExit, match="--format timm"):
        run_export(vit, "hf", tmp_path / "a")
    wide = save(pretrain_models().create("mae_vit_tiny_patch16", img_size=(32, 48)), tmp_path / "w.pth",
                model="mae_vit_tiny_patch16", input_size=[32, 48])
    with pytest.raises(SystemExit, match="square"):
        run_export(wide, "hf", tmp_path / "b")


# ------------------------------------------------------------------------------ safetensors
SAFETENSORS_CASES = [
    ("dmae_vit_tiny_patch16", dict(img_size=(32, 48), in_chans=1)),
    ("dconvmae_convvit_tiny_patch16", dict(img_size=(32, 48), in_chans=1)),
    ("vit_tiny_patch16", dict(img_size=32, in_chans=3, num_classes=3, global_pool=False)),
    ("convvit_tiny_patch16", dict(img_size=32, in_chans=1, num_classes=2, global_pool=True)),
    ("convvit_tiny_patch16", dict(img_size=32, in_chans=3, num_classes=2, global_pool="first_patch")),
]


@pytest.mark.parametrize("name,kwargs", SAFETENSORS_CASES)
def test_safetensors_export_rebuilds_every_model_from_its_json(tmp_path, name, kwargs):
    registry = pretrain_models() if name in pretrain_models() else finetune_models()
    torch.manual_seed(4)
    model = perturbed(registry.create(name, **kwargs))
    size = kwargs["img_size"]
    ckpt = save(model, tmp_path / "x.pth", model=name, input_size=[size] if isinstance(size, int) else list(size),
                class_names=["benign", "malignant"], global_pool=kwargs.get("global_pool"))
    out = run_export(ckpt, "safetensors", tmp_path / "st")
    spec = json.load(open(os.path.join(out, "model.json")))
    assert spec["model"] == name
    if "global_pool" in kwargs:
        assert spec["constructor"]["global_pool"] == kwargs["global_pool"]
    rebuilt = registry.create(spec["model"], **spec["constructor"])
    load_weights(rebuilt, os.path.join(out, "model.safetensors"), allowed_missing=(), allow_unexpected=False)
    rebuilt.eval()
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    # the recorded settings travel in the file itself, for --resume / --eval
    loaded = load_checkpoint_file(os.path.join(out, "model.safetensors"))
    assert loaded["args"]["class_names"] == ["benign", "malignant"] and loaded["args"]["model"] == name
    x = torch.randn(2, kwargs["in_chans"], *((size, size) if isinstance(size, int) else size))
    with torch.no_grad():
        if name in pretrain_models():
            noise = torch.rand(2, model.num_patches)
            assert torch.equal(rebuilt(x, noise=noise)[1], model(x, noise=noise)[1])
        else:
            assert torch.equal(rebuilt(x), model(x))


def write_classification_data(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        for i in range(n):
            folder = root / split / ("malignant" if i % 2 else "benign")
            folder.mkdir(parents=True, exist_ok=True)
            img = cv2.GaussianBlur(rng.random((36, 40)).astype(np.float32), (0, 0), 2) * 0.5 + 0.4 * (i % 2)
            cv2.imwrite(str(folder / f"{split}{i}.png"), (np.clip(img, 0, 1) * 255).astype(np.uint8))
    return root


def test_fine_tuning_from_the_safetensors_export_equals_fine_tuning_from_the_pth(tmp_path):
    torch.manual_seed(5)
    pretrained = perturbed(pretrain_models().create("dmae_vit_tiny_patch16", img_size=32, in_chans=1))
    pth = save(pretrained, tmp_path / "pretrain.pth", model="dmae_vit_tiny_patch16", input_size=[32],
               in_chans=1, data_mean=[0.45], data_std=[0.2])
    exported = os.path.join(run_export(pth, "safetensors", tmp_path / "st"), "model.safetensors")
    data = write_classification_data(tmp_path / "data")
    states = []
    for source in (pth, exported):
        out = tmp_path / f"ft_{os.path.basename(source)}"
        main_finetune.cli(["--data_path", str(data), "--output_dir", str(out), "--model", "vit_tiny_patch16",
                           "--input_size", "32", "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
                           "--n_boot", "10", "--epochs", "1", "--warmup_epochs", "1", "--seed", "0",
                           "--finetune", source])
        states.append(torch.load(out / "checkpoint-last.pth", weights_only=True))
    from_pth, from_safetensors = states
    assert from_pth["model"].keys() == from_safetensors["model"].keys()
    for key, value in from_pth["model"].items():
        assert torch.equal(from_safetensors["model"][key], value), key
    assert from_pth["args"]["data_mean"] == from_safetensors["args"]["data_mean"] == [0.45]
    # and a fine-tuned model exported to safetensors evaluates like its .pth (--resume ... --eval)
    best = str(tmp_path / f"ft_{os.path.basename(pth)}" / "checkpoint-best.pth")
    exported_best = os.path.join(run_export(best, "safetensors", tmp_path / "st_best"), "model.safetensors")
    results = []
    for source in (best, exported_best):
        out = tmp_path / f"eval_{os.path.basename(source)}"
        main_finetune.cli(["--data_path", str(data), "--output_dir", str(out), "--model", "vit_tiny_patch16",
                           "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--n_boot", "10",
                           "--resume", source, "--eval"])
        results.append(json.load(open(out / "results.json")))
    assert results[0] == results[1]


# ------------------------------------------------------------------------------ errors and safety
def test_a_corrupt_safetensors_file_is_a_checkpoint_error_naming_it(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="broken.safetensors.*not a readable safetensors"):
        load_checkpoint_file(bad)
    from safetensors.torch import save_file
    odd = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(2)}, str(odd), metadata={"args": "[1, 2"})
    with pytest.raises(CheckpointError, match="odd.safetensors.*args"):
        load_checkpoint_file(odd)


def test_export_never_replaces_an_earlier_export_unless_asked(tmp_path):
    ckpt = save(finetune_models().create("convvit_tiny_patch16", img_size=32, num_classes=2), tmp_path / "c.pth",
                model="convvit_tiny_patch16", input_size=[32])
    out = run_export(ckpt, "safetensors", tmp_path / "st")
    before = open(os.path.join(out, "model.safetensors"), "rb").read()
    with pytest.raises(SystemExit, match="already holds model.safetensors.*--overwrite"):
        run_export(ckpt, "safetensors", out)
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before
    run_export(ckpt, "safetensors", out, "--overwrite")


def test_a_checkpoint_without_recorded_model_asks_for_model(tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": pretrain_models().create("mae_vit_tiny_patch16", img_size=32).state_dict()}, path)
    with pytest.raises(SystemExit, match="does not record its model: pass --model"):
        run_export(path, "safetensors", tmp_path / "a")
    run_export(path, "safetensors", tmp_path / "b", "--model", "mae_vit_tiny_patch16", "--input_size", "32")


def test_segmentation_backbone_takes_the_safetensors_export_as_pretrained(tmp_path):
    """SEG's model.pretrained goes through the same loader: .safetensors equals the .pth."""
    import sys
    seg_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "SEG")
    if seg_dir not in sys.path:
        sys.path.append(seg_dir)  # appended: SEG/ must not shadow top-level names such as tools
    import mmseg_compat  # noqa: F401  (before any mmseg import)
    from mmseg_custom import ConvViTBackbone

    torch.manual_seed(6)
    pretrained = perturbed(pretrain_models().create("dconvmae_convvit_tiny_patch16", img_size=32))
    pth = save(pretrained, tmp_path / "c.pth", model="dconvmae_convvit_tiny_patch16", input_size=[32])
    exported = os.path.join(run_export(pth, "safetensors", tmp_path / "st"), "model.safetensors")
    backbones = []
    for source in (pth, exported):
        torch.manual_seed(0)  # the segmentation-only layers start equal
        backbones.append(ConvViTBackbone(img_size=64, embed_dim=(32, 48, 96), depth=(1, 1, 2), num_heads=3,
                                         norm_cfg=dict(type="BN"), pretrained=source).state_dict())
    assert backbones[0].keys() == backbones[1].keys()
    for key, value in backbones[0].items():
        assert torch.equal(backbones[1][key], value), key
    for key in ("blocks3.1.attn.qkv.weight", "patch_embed1.proj.weight"):  # the weights really came in
        assert torch.equal(backbones[1][key], pretrained.state_dict()[key])
