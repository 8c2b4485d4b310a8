"""main_finetune.py end to end on CPU: tiny models, images made here, every output checked."""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import main_finetune
import models_convmae  # noqa: F401  (registers the models; it imports models_mae and models_vit)
from classification_images import cine, make_image, write_dicom
from util.metrics import METRIC_NAMES
from util.registry import finetune_models, pretrain_models

N_TEST = 7  # odd: two processes get a padded shard


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8), ("test", N_TEST)):
        for i in range(n):
            name = "malignant" if i % 2 else "benign"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            dtype = np.uint16 if i == 0 else np.uint8  # one 16-bit file per split
            cv2.imwrite(str(folder / f"{split}{i}.png"), make_image(rng, i % 2 == 1, dtype))
    return root


def common_args(data, out, *extra, model="vit_tiny_patch16"):
    return ["--data_path", str(data), "--output_dir", str(out), "--model", model, "--input_size", "32",
            "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--n_boot", "50", *extra]


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.txt"))]


def saved_results(out, split="test"):
    return json.load(open(os.path.join(out, "results.json")))[split]


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A grey, blurred-input fine-tuning run from a Deblurring MAE pretraining checkpoint."""
    out = tmp_path_factory.mktemp("run")
    pretrained = out / "pretrain.pth"
    torch.save({"model": pretrain_models().create("dmae_vit_tiny_patch16", img_size=32, in_chans=1).state_dict()},
               pretrained)
    main_finetune.cli(common_args(dataset, out, "--finetune", str(pretrained), "--blur", "gaussian",
                                  "--blur_sigma", "1.1", "--lr", "2e-3", "--epochs", "6", "--warmup_epochs", "1",
                                  "--early_stops", "2", "--print_freq", "3"))
    return out


# ------------------------------------------------------------------------------ training
def test_run_selects_best_epoch_stops_early_and_evaluates_test(trained):
    log = read_log(trained)
    epochs, summary = log[:-1], log[-1]
    assert [e["epoch"] for e in epochs] == list(range(len(epochs)))
    # selection: the best epoch is the first one with the highest val accuracy seen so far
    best = None
    for entry in epochs:
        if best is None or entry["val_accuracy"] > best["val_accuracy"]:
            best = entry
        assert entry["best_epoch"] == best["epoch"]
        assert entry["epoch"] == epochs[-1]["epoch"] or entry["epoch"] - entry["best_epoch"] < 2
    last = epochs[-1]
    assert last["epoch"] == 5 or last["epoch"] - last["best_epoch"] == 2  # --epochs 6, --early_stops 2
    assert summary["best_epoch"] == best["epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    # the test split was evaluated with the best model
    test = saved_results(trained)
    assert test["n"] == N_TEST
    assert {k: m["value"] for k, m in test["metrics"].items()} == {k: summary[f"test_{k}"] for k in METRIC_NAMES}
    assert saved_results(trained, "val")["metrics"]["accuracy"]["value"] == best["val_accuracy"]
    # only the best and the last checkpoints, with what resuming and evaluating need
    assert sorted(f for f in os.listdir(trained) if f.startswith("checkpoint")) == ["checkpoint-best.pth",
                                                                                    "checkpoint-last.pth"]
    best_ckpt = torch.load(trained / "checkpoint-best.pth", weights_only=True)
    last_ckpt = torch.load(trained / "checkpoint-last.pth", weights_only=True)
    assert best_ckpt["epoch"] == best["epoch"] and last_ckpt["epoch"] == last["epoch"]
    assert set(last_ckpt) >= {"model", "optimizer", "epoch", "scaler", "best", "args"}
    recorded = best_ckpt["args"]
    assert recorded["class_names"] == ["benign", "malignant"] and recorded["in_chans"] == 1
    assert len(recorded["data_mean"]) == 1 and recorded["blur_method"] == "gaussian"


def test_run_writes_every_output(trained):
    files = set(os.listdir(trained))
    assert {"results.json", "results.txt", "predictions.csv", "roc_curve.png", "confusion_matrix.png",
            "predictions_val.csv", "log.txt", "predictions_groups.csv", "confusion_matrix_groups.png"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    rows = open(trained / "predictions.csv").read().splitlines()
    assert rows[0] == "file,label,predicted,prob_benign,prob_malignant,group" and len(rows) == N_TEST + 1
    assert rows[1].split(",")[-1] == rows[1].split(",")[0]  # PNG files: each file its own group
    assert "== test: n = 7 images in 7 groups (by source file" in open(trained / "results.txt").read()


def test_eval_reproduces_the_test_metrics(trained, dataset, tmp_path):
    # the published evaluation command; grey input, normalisation and classes come from the checkpoint
    main_finetune.cli(common_args(dataset, tmp_path, "--nb_classes", "2", "--resume",
                                  str(trained / "checkpoint-best.pth"), "--eval", "--blur", "gaussian"))
    assert saved_results(tmp_path) == saved_results(trained)
    assert open(tmp_path / "predictions.csv").read() == open(trained / "predictions.csv").read()
    assert {"roc_curve.png", "confusion_matrix.png", "results.txt"} <= set(os.listdir(tmp_path))


def test_two_processes_count_each_test_image_once(trained, dataset, tmp_path, repo_root):
    ckpt = str(trained / "checkpoint-best.pth")
    args = ["--batch_size", "2", "--resume", ckpt, "--eval", "--blur", "gaussian"]
    one = tmp_path / "one"
    main_finetune.cli(common_args(dataset, one, *args))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_port", str(29500 + os.getpid() % 1000 + 7), "main_finetune.py",
           *common_args(dataset, two, *args)]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert saved_results(two) == saved_results(one)
    assert saved_results(two)["n"] == N_TEST
    # same files in the same order; probabilities equal up to batching / thread-count rounding
    rows_one, rows_two = read_predictions(one), read_predictions(two)
    assert [r[:3] for r in rows_two] == [r[:3] for r in rows_one] and len(rows_one) == N_TEST
    np.testing.assert_allclose(np.array([r[3:] for r in rows_two], float),
                               np.array([r[3:] for r in rows_one], float), atol=1e-5)


def read_predictions(out):
    """Rows of predictions.csv without the group column."""
    return [line.split(",")[:-1] for line in open(out / "predictions.csv").read().splitlines()[1:]]


# ------------------------------------------------------------------------------ layer decay
def expected_layer(name: str, model_name: str, depth: int) -> int:
    """The layer ids of DESIGN.md, written out per family."""
    embeddings = ("cls_token", "pos_embed", "patch_embed.") if model_name.startswith("vit") else \
        ("pos_embed", "patch_embed1.", "patch_embed2.", "patch_embed3.", "patch_embed4.", "blocks1.", "blocks2.")
    if name.startswith(embeddings):
        return 0
    blocks = "blocks." if model_name.startswith("vit") else "blocks3."
    if name.startswith(blocks):
        return int(name[len(blocks):].split(".")[0]) + 1
    assert name.startswith(("fc_norm.", "head.")), name
    return depth + 1


@pytest.mark.parametrize("model_name,depth", [("vit_tiny_patch16", 2), ("convvit_tiny_patch16", 2)])
def test_layer_decay_groups(model_name, depth):
    model = finetune_models().create(model_name, img_size=32, num_classes=2)
    args = argparse.Namespace(weight_decay=0.05, layer_decay=0.75, lr=1e-3, min_lr=0.0, warmup_epochs=0,
                              epochs=10, device="cpu")
    optimizer = main_finetune.build_optimizer(model, args)
    main_finetune.adjust_learning_rate(optimizer, 0.0, args)
    owner = {}
    for group in optimizer.param_groups:
        for name, param in zip(group["param_names"], group["params"]):
            assert id(param) not in owner, f"{name} in two groups"
            owner[id(param)] = group
            scale = 0.75 ** (depth + 1 - expected_layer(name, model_name, depth))
            assert group["lr_scale"] == pytest.approx(scale), name
            assert group["lr"] == pytest.approx(1e-3 * scale), name
            no_decay = param.ndim == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert set(owner) == {id(p) for p in model.parameters()}
    assert {g["lr_scale"] for g in optimizer.param_groups} == {0.75 ** k for k in range(depth + 2)}


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("model_name,pretrain_name", [("vit_tiny_patch16", "dmae_vit_tiny_patch16"),
                                                      ("convvit_tiny_patch16", "dconvmae_convvit_tiny_patch16")])
@pytest.mark.parametrize("global_pool", [True, False])
def test_pretraining_checkpoint_reports_only_head_missing(tmp_path, model_name, pretrain_name, global_pool):
    path = tmp_path / "pretrain.pth"
    torch.save({"model": pretrain_models().create(pretrain_name, img_size=32).state_dict()}, path)
    model = finetune_models().create(model_name, img_size=64, num_classes=3, global_pool=global_pool)
    report = main_finetune.load_pretrained(model, str(path))
    head = {"head.weight", "head.bias"}
    assert set(report.missing) == (head | {"fc_norm.weight", "fc_norm.bias"} if global_pool else head)
    assert "decoder_pred.weight" in report.unexpected and "mask_token" in report.unexpected
    assert any(s.startswith("pos_embed") for s in report.interpolated)  # 32 -> 64 px grid
    assert model.head.weight.abs().max() < 1e-3  # MAE's small head initialisation


def test_finetune_from_a_classifier_of_other_class_count_drops_its_head(tmp_path):
    path = tmp_path / "cls.pth"
    torch.save({"model": finetune_models().create("vit_tiny_patch16", img_size=32, num_classes=5).state_dict()}, path)
    model = finetune_models().create("vit_tiny_patch16", img_size=32, num_classes=2)
    report = main_finetune.load_pretrained(model, str(path))
    assert [d.split()[0] for d in report.dropped] == ["head.weight", "head.bias"] and not report.missing


def run_expecting_error(argv):
    with pytest.raises(SystemExit) as info:
        main_finetune.cli(argv)
    return str(info.value)


def test_wrong_class_count_fails_clearly(trained, dataset, tmp_path):
    ckpt = trained / "checkpoint-best.pth"
    message = run_expecting_error(common_args(dataset, tmp_path, "--nb_classes", "3", "--resume", str(ckpt), "--eval"))
    assert "--nb_classes 3" in message and "2 classes" in message
    # a published-style checkpoint (weights only, no class list) on data with a third class
    three = tmp_path / "three"
    for split in ("train", "val", "test"):
        (three / split).mkdir(parents=True)
        for sub in ("benign", "malignant"):
            os.symlink(dataset / split / sub, three / split / sub)
        (three / split / "other").symlink_to(dataset / split / "benign")
    bare = tmp_path / "bare.pth"
    torch.save({"model": torch.load(ckpt, weights_only=True)["model"]}, bare)
    message = run_expecting_error(common_args(three, tmp_path / "o", "--resume", str(bare), "--eval"))
    assert str(bare) in message and "2-class head" in message and "3 classes" in message and "--finetune" in message
    # our checkpoint records its classes: an unknown class folder is named
    message = run_expecting_error(common_args(three, tmp_path / "o", "--resume", str(ckpt), "--eval"))
    assert "other" in message and "not trained on" in message


def test_wrong_architecture_fails_clearly(trained, dataset, tmp_path):
    convmae = tmp_path / "convmae.pth"
    torch.save({"model": pretrain_models().create("dconvmae_convvit_tiny_patch16", img_size=32).state_dict()}, convmae)
    message = run_expecting_error(common_args(dataset, tmp_path, "--finetune", str(convmae), "--epochs", "1"))
    assert str(convmae) in message and "--model" in message
    message = run_expecting_error(common_args(dataset, tmp_path, "--resume", str(trained / "checkpoint-best.pth"),
                                              "--eval", model="convvit_tiny_patch16"))
    assert "checkpoint-best.pth" in message and "--model" in message


# ------------------------------------------------------------------------------ user errors and data policy
def test_clear_errors_for_bad_data_and_flags(dataset, tmp_path):
    assert "Valid names" in run_expecting_error(common_args(dataset, tmp_path, model="vit_tiny"))
    no_val = tmp_path / "no_val"
    (no_val / "train" / "a").mkdir(parents=True)
    (no_val / "test" / "a").mkdir(parents=True)
    message = run_expecting_error(common_args(no_val, tmp_path / "o"))
    assert "val" in message and "one sub-folder per class" in message
    loose = tmp_path / "loose"
    for split in ("train", "val", "test"):
        (loose / split / "a").mkdir(parents=True)
    cv2.imwrite(str(loose / "train" / "stray.png"), np.zeros((8, 8), np.uint8))
    assert "outside class folders" in run_expecting_error(common_args(loose, tmp_path / "o"))
    message = run_expecting_error(common_args(dataset, tmp_path / "o", "--eval"))
    assert "--resume" in message
    message = run_expecting_error(common_args(dataset, tmp_path / "o", "--pos_class", "cancer", "--epochs", "1"))
    assert "cancer" in message and "benign" in message


@pytest.mark.parametrize("flags, expected", [
    (["--data_mean", "0.5", "0.5", "0.5", "--data_std", "0.2", "0", "0.2"], "--data_std 0.2 0.0 0.2: every value"),
    (["--accum_iter", "0"], "--accum_iter 0: must be at least 1"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--warmup_epochs", "-2"], "--warmup_epochs -2.0: must be a number >= 0"),
    (["--smoothing", "1"], "--smoothing 1.0: must be in [0, 1)"),
    (["--layer_decay", "0"], "--layer_decay 0.0: must be in (0, 1]"),
    (["--reprob", "1.5"], "--reprob 1.5: must be in [0, 1]"),
    (["--early_stops", "-1"], "--early_stops -1: must be at least 0"),
    (["--blur", "gaussian", "--blur_sigma", "-1"], "gaussian blur needs sigma > 0"),
    (["--blur", "gaussian", "--blur_sigma", "30"], "--blur_sigma 30.0: at most 25"),
])
def test_flags_that_cannot_train_are_refused_before_any_work(dataset, tmp_path, flags, expected):
    out = tmp_path / "out"
    message = run_expecting_error(common_args(dataset, out, "--epochs", "1", *flags))
    assert message.startswith("error: invalid settings, nothing was run") and expected in message
    assert not out.exists()


def test_run_whose_loss_is_never_finite_fails_and_saves_nothing(dataset, tmp_path):
    # 6 non-finite steps (fewer than --max_nonfinite) used to train on nothing and exit 0
    std = ["--data_mean", "0.5", "0.5", "0.5", "--data_std", "1e-30", "1e-30", "1e-30"]
    message = run_expecting_error(common_args(dataset, tmp_path, *std, "--epochs", "2"))
    assert "epoch 0: the loss was non-finite in every one of its 6 steps" in message
    assert not list(tmp_path.glob("checkpoint-*.pth")) and not (tmp_path / "log.txt").exists()


def test_unreadable_test_image_is_skipped_or_stops_with_strict_data(trained, dataset, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val", "test"):
        for sub in ("benign", "malignant"):
            (data / split / sub).mkdir(parents=True)
            for f in os.listdir(dataset / split / sub):
                os.symlink(dataset / split / sub / f, data / split / sub / f)
    (data / "test" / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["--resume", str(trained / "checkpoint-best.pth"), "--eval", "--blur", "gaussian"]
    with pytest.warns(UserWarning, match="broken.png"):
        main_finetune.cli(common_args(data, tmp_path / "lenient", *args))
    assert saved_results(tmp_path / "lenient")["n"] == N_TEST
    assert "broken.png" in run_expecting_error(common_args(data, tmp_path / "strict", *args, "--strict_data"))


def test_a_resumed_run_with_nothing_left_or_inside_its_warm_up_says_so(trained, dataset, tmp_path):
    # the fixture's run stopped early; its own folder, re-run with --epochs 1: nothing left, evaluated again
    shutil.copytree(trained, tmp_path / "run")
    with pytest.warns(UserWarning, match="nothing left to train"):
        main_finetune.cli(common_args(dataset, tmp_path / "run", "--auto_resume", "--blur", "gaussian",
                                      "--epochs", "1", "--n_boot", "0"))
    assert "best_epoch" in read_log(tmp_path / "run")[-1]
    # resumed into a new folder with a warm-up as long as the run: warned; the best model is chosen afresh
    # there (the fixture's best epoch is not the resumed one) and evaluated at the end
    with pytest.warns(UserWarning) as caught:
        main_finetune.cli(common_args(dataset, tmp_path / "warm", "--resume", str(trained / "checkpoint-last.pth"),
                                      "--blur", "gaussian", "--epochs", "6", "--warmup_epochs", "6", "--n_boot", "0"))
    messages = " ".join(str(w.message) for w in caught)
    assert "--warmup_epochs 6 is not shorter than the run (--epochs 6)" in messages
    assert "is not in" in messages and "chosen afresh" in messages
    assert saved_results(tmp_path / "warm")["n"] == N_TEST


def test_resume_continues_exactly_as_an_uninterrupted_run(dataset, tmp_path):
    # --early_stops 0 ends the first run after epoch 0 with the schedule of a 3-epoch run; resuming
    # its checkpoint-last.pth must then reproduce epochs 1-2 of the uninterrupted run exactly
    # (optimizer state, per-epoch seeding of shuffling, RandAugment, mixup and drop path).
    args = ["--epochs", "3", "--warmup_epochs", "1", "--mixup", "0.2", "--n_boot", "0"]
    main_finetune.cli(common_args(dataset, tmp_path / "full", *args))
    main_finetune.cli(common_args(dataset, tmp_path / "split", *args, "--early_stops", "0"))
    main_finetune.cli(common_args(dataset, tmp_path / "split", *args, "--resume",
                                  str(tmp_path / "split" / "checkpoint-last.pth")))
    full = [e for e in read_log(tmp_path / "full") if "epoch" in e]
    split = [e for e in read_log(tmp_path / "split") if "epoch" in e]
    assert [e["epoch"] for e in split] == [0, 1, 2]
    for a, b in zip(full, split):
        assert (a["train_loss"], a["val_loss"]) == (b["train_loss"], b["val_loss"])


# ------------------------------------------------------------------------------ groups and operating point


def test_frames_of_one_dicom_file_form_one_group_and_tags_or_a_csv_group_files(tmp_path):
    from util.cls_datasets import ClassificationDataset, read_groups_csv
    from util.datasets import DatasetError

    rng = np.random.default_rng(1)
    test = tmp_path / "test"
    write_dicom(test / "malignant" / "cine.dcm", cine(rng, True, 4), PatientID="P1", StudyInstanceUID="1.2.3")
    write_dicom(test / "malignant" / "still.dcm", cine(rng, True, 1), PatientID="P1", StudyInstanceUID="1.2.4")
    write_dicom(test / "benign" / "other.dcm", cine(rng, False, 1), PatientID="P2", StudyInstanceUID="1.2.5")
    cv2.imwrite(str(test / "benign" / "a.png"), make_image(rng, False))
    ds = ClassificationDataset(str(tmp_path), "test", ["benign", "malignant"])
    assert len(ds) == 7
    by_sample = {ds.sample_name(i): ds.sample_group(i) for i in range(len(ds))}
    assert {by_sample[f"malignant/cine.dcm#{f}"] for f in range(4)} == {"malignant/cine.dcm"}
    assert len(set(ds.groups)) == 4  # the 4 frames are one group, every other file its own
    # patient / study from the DICOM tags; a file without them is named with the fix
    with pytest.raises(DatasetError, match=r"no DICOM PatientID.*benign/a.png.*--groups"):
        ds.assign_groups("patient")
    (test / "benign" / "a.png").unlink()
    ds = ClassificationDataset(str(tmp_path), "test", ["benign", "malignant"])
    ds.assign_groups("patient")
    assert sorted(ds.groups) == ["P1"] * 5 + ["P2"]
    ds.assign_groups("study")
    assert sorted(set(ds.groups)) == ["1.2.3", "1.2.4", "1.2.5"]
    # a CSV: paths relative to the data folder or to the split; files it lacks are named
    groups_csv = tmp_path / "groups.csv"
    groups_csv.write_text("file,group\ntest/malignant/cine.dcm,A\n./malignant/still.dcm,A\nbenign/other.dcm,B\n")
    ds.assign_groups("csv", read_groups_csv(str(groups_csv)))
    assert sorted(ds.groups) == ["A"] * 5 + ["B"]
    groups_csv.write_text("file,group\ntest/malignant/cine.dcm,A\n")
    with pytest.raises(DatasetError, match=r"no group for 2 file\(s\).*test/benign/other.dcm"):
        ds.assign_groups("csv", read_groups_csv(str(groups_csv)))
    groups_csv.write_text("name,patient\nx,y\n")
    with pytest.raises(DatasetError, match="columns file,group"):
        read_groups_csv(str(groups_csv))


def test_eval_reports_per_group_and_applies_an_operating_point_chosen_on_val(trained, dataset, tmp_path):
    from util.metrics import choose_threshold

    data = tmp_path / "data"
    for split in ("val", "test"):
        shutil.copytree(dataset / split, data / split)
    n_frames = 5
    write_dicom(data / "test" / "malignant" / "cine.dcm", cine(np.random.default_rng(2), True, n_frames))
    out = tmp_path / "out"
    main_finetune.cli(common_args(data, out, "--resume", str(trained / "checkpoint-best.pth"), "--eval",
                                  "--blur", "gaussian", "--target_sensitivity", "0.75"))
    test, val = saved_results(out), saved_results(out, "val")
    assert test["n_images"] == N_TEST + n_frames and test["n_groups"] == N_TEST + 1 and test["group_by"] == "file"
    assert test["group_level"]["n"] == N_TEST + 1 and test["bootstrap"]["resamples"] == "groups"
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["group"] for r in rows if r["file"].startswith("malignant/cine.dcm#")] == ["malignant/cine.dcm"] * 5
    groups = list(csv.DictReader(open(out / "predictions_groups.csv")))
    assert [g["n_images"] for g in groups if g["group"] == "malignant/cine.dcm"] == [str(n_frames)]
    # the threshold: chosen on val's groups, recorded in both splits and applied to both
    val_rows = list(csv.DictReader(open(out / "predictions_val.csv")))
    labels = np.array([r["label"] == "malignant" for r in val_rows], dtype=int)
    probs = np.array([[float(r["prob_benign"]), float(r["prob_malignant"])] for r in val_rows])
    expected, achieved = choose_threshold(labels, probs, groups=[r["group"] for r in val_rows],
                                          target_sensitivity=0.75)
    for results in (test, val):
        point = results["operating_point"]
        assert point["threshold"] == expected and point["rule"] == "target_sensitivity"
        assert point["chosen_on"] == "val" and point["achieved"] == achieved
    assert val["metrics"]["recall"]["value"] >= 0.75
    predicted = [r["predicted"] == "malignant" for r in rows]
    assert predicted == [float(r["prob_malignant"]) >= expected for r in rows]
    assert test["confusion_matrix"][1][1] == sum(p and r["label"] == "malignant" for p, r in zip(predicted, rows))
    text = open(out / "results.txt").read()
    assert f"operating point: p(malignant) >= {expected:.6g}, chosen on val for sensitivity >= 0.75" in text
    assert "-- per group (n = 8 cases in 8 groups" in text


def test_evaluation_flag_errors_and_groups_shared_between_splits(trained, dataset, tmp_path):
    ckpt = ["--resume", str(trained / "checkpoint-best.pth"), "--eval", "--blur", "gaussian"]
    assert "--groups FILE" in run_expecting_error(common_args(dataset, tmp_path, *ckpt, "--group_by", "csv"))
    assert "[0, 1]" in run_expecting_error(common_args(dataset, tmp_path, *ckpt, "--threshold", "1.5"))
    assert "(0, 1]" in run_expecting_error(common_args(dataset, tmp_path, *ckpt, "--target_specificity", "0"))
    # a patient with images in val and test: warned about, named
    groups_csv = tmp_path / "groups.csv"
    rows = ["file,group"] + [f"{split}/{sub}/{f},patient-{f[-5]}" for split in ("val", "test")
                             for sub in ("benign", "malignant") for f in os.listdir(dataset / split / sub)]
    groups_csv.write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match=r"group\(s\) \(--group_by csv\) have images in both val and test"):
        main_finetune.cli(common_args(dataset, tmp_path / "o", *ckpt, "--groups", str(groups_csv),
                                      "--target_specificity", "0.5", "--n_boot", "0"))
    assert saved_results(tmp_path / "o")["group_by"] == "csv"
