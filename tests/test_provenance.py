"""Checkpoints record how their inputs were prepared (blur, size, channels, colour), and evaluation,
fine-tuning, linear probing and the reconstruction tool prepare them the same way unless told
otherwise; a blurred copy carries its settings (blur.json) from blurred_images.py into the checkpoints."""
import argparse
import json
import os

import cv2
import numpy as np
import pytest
import torch

import blurred_images
import main_finetune
import main_linprobe
import main_pretrain
import models_convmae  # noqa: F401  (registers the pretraining models)
from classification_images import make_image
from cli_args import finetune_args, pretrain_args
from tools import visualize_reconstruction
from util import visualize
from util.blur import BlurSpec
from util.datasets import center_box, model_channels, resize_box
from util.image_io import to_grey
from util.provenance import PUBLISHED_BLUR, recorded_input_blur, resolve_input_blur
from util.registry import pretrain_models


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    """train/val/test with two classes; sharp detail (noise) that a blur visibly changes."""
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4), ("test", 5)):
        for i in range(n):
            folder = root / split / ("malignant" if i % 2 else "benign")
            folder.mkdir(parents=True, exist_ok=True)
            noisy = make_image(rng, i % 2 == 1).astype(np.int16) + rng.integers(-40, 40, (40, 48))
            cv2.imwrite(str(folder / f"{split}{i}.png"), np.clip(noisy, 0, 255).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("val", 4)):
        (root / split).mkdir()
        for i in range(n):
            cv2.imwrite(str(root / split / f"{i}.png"), make_image(rng, i % 2 == 0, shape=(64, 64)))
    return root


def blur_copy(src, dst, *extra):
    args = blurred_images.get_args_parser().parse_args(["--src_dir", str(src), "--dst_dir", str(dst),
                                                        "--workers", "1", *extra])
    return blurred_images.main(args)


def recorded(path):
    return torch.load(path, weights_only=True)["args"]


def predictions(out):
    return open(os.path.join(out, "predictions.csv")).read()


# ------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def finetuned(cls_data, tmp_path_factory):
    """A classifier fine-tuned on inputs blurred on the fly (gaussian, sigma 2)."""
    out = tmp_path_factory.mktemp("ft")
    main_finetune.cli(finetune_args(cls_data, out, "--blur", "gaussian", "--blur_sigma", "2.0"))
    return out / "checkpoint-best.pth"


def evaluate(cls_data, out, checkpoint, *extra):
    main_finetune.cli(finetune_args(cls_data, out, "--resume", str(checkpoint), "--eval", *extra))


def test_every_checkpoint_records_how_its_inputs_were_prepared(finetuned):
    for name in ("checkpoint-best.pth", "checkpoint-last.pth"):
        args = recorded(finetuned.parent / name)
        assert args["input_blur"] == {"method": "gaussian", "sigma": 2.0, "applied": "on the fly"}
        assert args["input_size"] == [32] and args["in_chans"] == 3 and args["keep_channels"] is False


def test_eval_without_blur_uses_the_blur_the_checkpoint_was_trained_with(finetuned, cls_data, tmp_path, capsys):
    # the README's evaluation command names no blur: it used to evaluate on sharp images
    evaluate(cls_data, tmp_path / "recorded", finetuned)
    assert f"input blur: gaussian (sigma 2.0), applied on the fly as {finetuned} was trained" in capsys.readouterr().out
    evaluate(cls_data, tmp_path / "explicit", finetuned, "--blur", "gaussian", "--blur_sigma", "2.0")
    assert predictions(tmp_path / "recorded") == predictions(tmp_path / "explicit")
    results = [json.load(open(tmp_path / run / "results.json")) for run in ("recorded", "explicit")]
    assert results[0] == results[1]
    # the override: sharp images give other probabilities (so the check above can fail), with a warning
    with pytest.warns(UserWarning, match=r"trained on inputs blurred with gaussian \(sigma 2.0\).* this run has "
                                         "unblurred inputs"):
        evaluate(cls_data, tmp_path / "sharp", finetuned, "--blur", "none")
    assert "input blur: none" in capsys.readouterr().out
    assert predictions(tmp_path / "sharp") != predictions(tmp_path / "recorded")


def test_eval_on_a_copy_blurred_otherwise_is_refused_and_on_the_same_blur_adds_none(finetuned, cls_data, tmp_path,
                                                                                   capsys):
    other = tmp_path / "copy11"
    blur_copy(cls_data, other, "--sigma", "1.1")
    with pytest.raises(SystemExit, match=r"trained on inputs blurred with gaussian \(sigma 2.0\).*copy11 is a copy "
                                         r"blurred with gaussian \(sigma 1.1\), grey.*--blur none"):
        evaluate(other, tmp_path / "refused", finetuned)
    same = tmp_path / "copy20"
    blur_copy(cls_data, same, "--sigma", "2.0")
    evaluate(same, tmp_path / "same", finetuned)
    assert "input blur: none added; the data is a copy blurred with gaussian (sigma 2.0)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already a blurred copy.*blurred twice"):
        evaluate(same, tmp_path / "twice", finetuned, "--blur", "gaussian", "--blur_sigma", "2.0")


# ------------------------------------------------------------------------------ paired pretraining
@pytest.fixture(scope="module")
def paired_pretraining(pretrain_data, tmp_path_factory):
    """Deblurring MAE pretrained at 48 x 48 on a copy blurred offline (gaussian, sigma 1.7)."""
    base = tmp_path_factory.mktemp("paired")
    copy = base / "blurred"
    blur_copy(pretrain_data, copy, "--sigma", "1.7")
    out = base / "run"
    main_pretrain.cli(pretrain_args(copy, out, "--model", "dmae_vit_tiny_patch16", "--data_path_orig",
                                    str(pretrain_data), "--input_size", "48"))
    return copy, out / "checkpoint-0.pth"


def test_blurred_copy_records_its_settings_and_pretraining_records_them(paired_pretraining, pretrain_data):
    copy, checkpoint = paired_pretraining
    settings = json.load(open(copy / "blur.json"))
    assert settings["blur"] == {"method": "gaussian", "sigma": 1.7} and settings["channels"] == "grey"
    assert settings["source"] == str(pretrain_data) and settings["pending"] is False
    args = recorded(checkpoint)
    assert args["input_blur"] == {"method": "gaussian", "sigma": 1.7, "applied": str(copy / "blur.json")}
    assert args["input_size"] == [48] and args["in_chans"] == 3 and args["keep_channels"] is False


def test_finetuning_a_deblurring_encoder_blurs_its_inputs_the_same_way_at_its_size(paired_pretraining, cls_data,
                                                                                   tmp_path, capsys):
    _, checkpoint = paired_pretraining
    out = tmp_path / "ft"
    args = [a for a in finetune_args(cls_data, out, "--finetune", str(checkpoint))]
    cut = args.index("--input_size")
    del args[cut:cut + 2]  # the size comes from the checkpoint
    main_finetune.cli(args)
    printed = capsys.readouterr().out
    assert f"input size 48 x 48, as {checkpoint} was trained" in printed
    assert f"input blur: gaussian (sigma 1.7), applied on the fly as {checkpoint} was trained" in printed
    fine = recorded(out / "checkpoint-best.pth")
    assert fine["input_blur"] == {"method": "gaussian", "sigma": 1.7, "applied": "on the fly"}
    assert fine["input_size"] == [48]


def test_a_resumed_pretraining_with_another_blur_is_warned_about(paired_pretraining, pretrain_data, tmp_path):
    _, checkpoint = paired_pretraining
    with pytest.warns(UserWarning, match=r"other inputs than this run prepares \(input blur gaussian \(sigma 1.7\) "
                                         r"-> gaussian \(sigma 1.1\)"):
        main_pretrain.cli(pretrain_args(pretrain_data, tmp_path, "--model", "dmae_vit_tiny_patch16", "--blur",
                                        "gaussian", "--input_size", "48", "--resume", str(checkpoint), "--epochs", "2"))


def test_linear_probe_of_a_deblurring_encoder_blurs_its_inputs(paired_pretraining, cls_data, tmp_path, capsys):
    _, checkpoint = paired_pretraining
    main_linprobe.cli(["--data_path", str(cls_data), "--output_dir", str(tmp_path), "--model", "vit_tiny_patch16",
                       "--finetune", str(checkpoint), "--knn", "--batch_size", "4", "--num_workers", "0",
                       "--device", "cpu", "--n_boot", "0"])
    assert f"input blur: gaussian (sigma 1.7), applied on the fly as {checkpoint} was trained" in capsys.readouterr().out


# ------------------------------------------------------------------------------ the rules, one by one
def flags(method=None, sigma=1.1):
    return argparse.Namespace(blur_method=method, blur_sigma=sigma, blur_kernel_size=5, blur_srad_iterations=20,
                              blur_srad_time_step=0.25, blur_seed=0)


def test_what_a_checkpoint_says_about_its_blur():
    # ours: input_blur (None: unblurred); before it, the --blur flags; published deblurring ones: assumed
    assert recorded_input_blur({"input_blur": None}, deblurring=True).spec is None
    assert recorded_input_blur({"input_blur": {"method": "mean", "kernel_size": 7, "applied": "x"}},
                               deblurring=False).spec == BlurSpec("mean", kernel_size=7)
    legacy = {"blur_method": "motion", "blur_kernel_size": 9, "blur_seed": 3, "blur_sigma": 1.1}
    assert recorded_input_blur(legacy, deblurring=False).spec == BlurSpec("motion", kernel_size=9, seed=3)
    published = recorded_input_blur({"model": "dmae_vit_base_patch16"}, deblurring=True)
    assert published.spec == PUBLISHED_BLUR and published.how.startswith("assumed")
    assert recorded_input_blur({"input_blur": {"method": "unknown", "applied": "x"}}, deblurring=True).spec == \
        PUBLISHED_BLUR
    assert recorded_input_blur({"blur_method": None}, deblurring=False) is None  # unknown: nothing enforced


def test_unblurred_checkpoint_on_a_blurred_copy_is_refused_unless_asked(tmp_path, cls_data):
    copy = tmp_path / "copy"
    blur_copy(cls_data / "test", copy)
    sharp = recorded_input_blur({"input_blur": None}, deblurring=False)
    with pytest.raises(SystemExit, match="trained on unblurred inputs.*is a blurred copy"):
        resolve_input_blur(flags(), sharp, "c.pth", str(copy))
    args = flags("none")
    resolve_input_blur(args, sharp, "c.pth", str(copy / "benign"))  # a folder inside the copy finds its settings
    assert args.blur_method is None and args.input_blur == {"method": "gaussian", "sigma": 1.1,
                                                           "applied": str(copy / "blur.json")}


# ------------------------------------------------------------------------------ reconstruction tool
def test_reconstruction_tool_prepares_images_as_the_checkpoint_was_trained(tmp_path):
    rng = np.random.default_rng(2)
    image = np.stack([make_image(rng, c == 0, shape=(48, 48)) for c in range(3)], axis=2)  # channels differ
    path = str(tmp_path / "colour.png")
    cv2.imwrite(path, image[:, :, ::-1])
    state = pretrain_models().create("dmae_vit_tiny_patch16", img_size=32).state_dict()
    blur = BlurSpec("gaussian", sigma=2.5)
    for keep in (False, True):
        ckpt = tmp_path / f"keep{keep}.pth"
        torch.save({"model": state, "args": {"model": "dmae_vit_tiny_patch16", "input_size": [32], "in_chans": 3,
                                             "keep_channels": keep, "input_blur": {**blur.settings(), "applied": "x"},
                                             "data_mean": [0.5] * 3, "data_std": [0.25] * 3}}, ckpt)
        out = tmp_path / f"fig{keep}.png"
        visualize_reconstruction.main([str(ckpt), path, "--out", str(out), "--mask_ratio", "0.5"])
        grid = cv2.imread(str(out))[:, :, ::-1].astype(int)
        # the figure's layout: a title row, then panels enlarged x`scale` (nearest) to fit their titles
        scale = visualize._title_scale(visualize.column_titles(deblurring=True), 32)
        side, top = 32 * scale, visualize._TITLE_HEIGHT + 2
        first = grid[top:top + side:scale, 2:2 + side:scale]
        left = 2 + 3 * (side + 2)
        target = grid[top:top + side:scale, left:left + side:scale]
        source = image if keep else to_grey(image)
        box = center_box(48, 48, (32, 32))
        expected_input = resize_box(model_channels(blur.apply(source), 3), box, (32, 32)).permute(1, 2, 0).numpy()
        expected_target = resize_box(model_channels(source, 3), box, (32, 32)).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(first, np.broadcast_to(expected_input, first.shape), atol=1)
        np.testing.assert_allclose(target, np.broadcast_to(expected_target, target.shape), atol=1)
        assert (np.ptp(target, axis=2).max() > 20) == keep  # grey unless the checkpoint kept colour


def test_a_settings_file_of_something_else_above_the_data_is_passed_over(tmp_path):
    from util.datasets import DatasetError
    from util.provenance import read_blur_settings
    (tmp_path / "blur.json").write_text('{"kernel": "for another program"}')
    (tmp_path / "data" / "train").mkdir(parents=True)
    assert read_blur_settings(str(tmp_path / "data" / "train")) is None
    (tmp_path / "data" / "blur.json").write_text("{not json")
    with pytest.raises(DatasetError, match="data/blur.json: not a readable settings file of blurred_images.py"):
        read_blur_settings(str(tmp_path / "data"))


def test_the_recorded_colour_decision_is_applied_when_the_model_takes_colour():
    from util.provenance import resolve_colour
    args = argparse.Namespace(keep_channels=False, in_chans=3)
    resolve_colour(args, {"keep_channels": True}, "c.pth")
    assert args.keep_channels is True
    grey_model = argparse.Namespace(keep_channels=False, in_chans=1)
    resolve_colour(grey_model, {"keep_channels": True}, "c.pth")
    assert grey_model.keep_channels is False
    with pytest.warns(UserWarning, match="c.pth was trained on grey inputs"):
        resolve_colour(argparse.Namespace(keep_channels=True, in_chans=3), {"keep_channels": False}, "c.pth")


def test_pretraining_records_what_it_knows_of_its_inputs(pretrain_data, tmp_path):
    copy = tmp_path / "copy"
    blur_copy(pretrain_data, copy, "--method", "mean", "--kernel_size", "3")
    args = argparse.Namespace()
    with pytest.raises(SystemExit, match="already a blurred copy.*blurred twice"):
        main_pretrain.record_input_blur(args, str(copy), None, BlurSpec())
    main_pretrain.record_input_blur(args, str(pretrain_data), None, BlurSpec(sigma=0.8))
    assert args.input_blur == {"method": "gaussian", "sigma": 0.8, "applied": "on the fly"}
    main_pretrain.record_input_blur(args, str(pretrain_data), None, None)  # vanilla on the originals
    assert args.input_blur is None
    old_copy = tmp_path / "old_copy"  # made before blur.json existed
    old_copy.mkdir()
    main_pretrain.record_input_blur(args, str(old_copy), str(pretrain_data), None)
    assert args.input_blur["method"] == "unknown"
    assert recorded_input_blur({"input_blur": args.input_blur}, deblurring=True).spec == PUBLISHED_BLUR


def test_resume_compares_sizes_however_they_were_written():
    import warnings
    args = argparse.Namespace(input_blur=None, input_size=[224], in_chans=3, keep_channels=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the published checkpoints write 224, ours [224]
        main_pretrain.warn_on_changed_inputs(args, {"input_size": 224, "input_blur": None}, "c.pth")
    with pytest.warns(UserWarning, match=r"input size \(224, 224\) -> \(256, 192\)"):
        main_pretrain.warn_on_changed_inputs(argparse.Namespace(**{**vars(args), "input_size": [256, 192]}),
                                             {"input_size": [224]}, "c.pth")
