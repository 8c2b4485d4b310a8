"""main_linprobe.py (linear probing and k-NN of a frozen encoder), util/lars.py and util/knn.py on CPU:
tiny models, images made here."""
import argparse
import csv
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import main_finetune
import main_linprobe
from classification_images import make_image
from util.knn import knn_class_probabilities
from util.lars import LARS
from util.metrics import METRIC_NAMES
import models_convmae  # noqa: F401  (registers the models; it imports models_mae and models_vit)
from util.registry import finetune_models, pretrain_models

N_TEST = 7  # odd: two processes get a padded shard
OUTPUT_FILES = {"results.json", "results.txt", "predictions.csv", "predictions_val.csv", "roc_curve.png",
                "roc_curve_val.png", "confusion_matrix.png", "confusion_matrix_val.png", "log.txt"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(1)
    for split, n in (("train", 24), ("val", 8), ("test", N_TEST)):
        for i in range(n):
            folder = root / split / ("malignant" if i % 2 else "benign")
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{split}{i}.png"), make_image(rng, i % 2 == 1))
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Grey Deblurring MAE and 3-channel Deblurring ConvMAE pretraining checkpoints (32 px)."""
    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    paths = {}
    for name, chans in (("dmae_vit_tiny_patch16", 1), ("dconvmae_convvit_tiny_patch16", 3)):
        paths[name] = folder / f"{name}.pth"
        torch.save({"model": pretrain_models().create(name, img_size=32, in_chans=chans).state_dict()}, paths[name])
    return paths


def args_for(data, out, *extra, model="vit_tiny_patch16", size=("32", "48")):
    return ["--data_path", str(data), "--output_dir", str(out), "--model", model, "--input_size", *size,
            "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--n_boot", "20", *extra]


def vit_probe_args(data, out, ckpt, *extra):
    """Grey, non-square (32 x 48) ViT, augmented images, SGD (the tiny data needs it)."""
    return args_for(data, out, "--finetune", str(ckpt), "--optimizer", "sgd", "--lr", "0.05", "--epochs", "3",
                    "--warmup_epochs", "1", *extra)


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.txt"))]


def saved_results(out, split="test"):
    return json.load(open(os.path.join(out, "results.json")))[split]


def predicted_probs(path):
    """The class-probability columns of a predictions CSV, one row per image."""
    with open(path, newline="") as f:
        return np.array([[float(v) for k, v in row.items() if k.startswith("prob_")] for row in csv.DictReader(f)])


def encoder_state(state):
    return {k: v for k, v in state.items() if not k.startswith("head.")}


@pytest.fixture(scope="module")
def vit_probe(dataset, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("vit_probe")
    main_linprobe.cli(vit_probe_args(dataset, out, pretrained["dmae_vit_tiny_patch16"]))
    return out


# ------------------------------------------------------------------------------ the probe head
def test_probe_head_is_batchnorm_without_affine_then_linear_with_small_init_and_only_it_trains():
    torch.manual_seed(0)
    model = finetune_models().create("vit_tiny_patch16", img_size=32, num_classes=100)
    main_linprobe.attach_probe_head(model)
    bn, linear = model.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.weight is None and bn.eps == 1e-6
    assert isinstance(linear, torch.nn.Linear) and linear.in_features == bn.num_features == 96
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.05)  # 9600 draws
    assert linear.weight.abs().max().item() < 0.06 and torch.all(linear.bias == 0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    # the training view keeps the encoder in eval mode while the head trains
    probe = main_linprobe.FrozenEncoderProbe(model, model.head, features_in=False).train()
    assert probe.head.training and bn.training
    assert not any(m.training for name, m in model.named_modules() if not name.startswith("head"))


@pytest.mark.parametrize("model_name", ["vit_tiny_patch16", "convvit_tiny_patch16"])
@pytest.mark.parametrize("global_pool", [True, False])
@pytest.mark.parametrize("chans,size", [(1, (32, 48)), (3, (48, 32))])
def test_pooled_features_are_what_the_classifier_sees(model_name, global_pool, chans, size):
    torch.manual_seed(0)
    model = finetune_models().create(model_name, img_size=size, in_chans=chans, num_classes=3,
                                     global_pool=global_pool).eval()
    images = torch.randn(2, chans, *size)
    feats = main_linprobe.pooled_features(model, images)
    assert feats.shape == (2, model.head.in_features)
    torch.testing.assert_close(model.head(feats), model(images), rtol=0, atol=0)


# ------------------------------------------------------------------------------ LARS
def test_lars_step_follows_the_trust_ratio_rule_by_hand():
    w0 = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # ||w|| = 5
    b0 = torch.tensor([1.0, -1.0])
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = LARS([w, b], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    g_w, g_b = torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([0.3, 0.4])
    expected_w, expected_b, buf_w, buf_b = w0.clone(), b0.clone(), torch.zeros(2, 2), torch.zeros(2)
    for _ in range(2):
        w.grad, b.grad = g_w.clone(), g_b.clone()
        opt.step()
        d = g_w + 0.1 * expected_w  # weight decay on the matrix only
        d = d * (0.01 * expected_w.norm() / d.norm())
        buf_w = 0.9 * buf_w + d
        buf_b = 0.9 * buf_b + g_b  # vectors: no trust ratio, no weight decay
        expected_w, expected_b = expected_w - 0.5 * buf_w, expected_b - 0.5 * buf_b
        torch.testing.assert_close(w.detach(), expected_w)
        torch.testing.assert_close(b.detach(), expected_b)
    # zero weights (or a zero direction): ratio 1, a plain momentum step
    z = torch.nn.Parameter(torch.zeros(2, 2))
    z.grad = torch.ones(2, 2)
    LARS([z], lr=0.1).step()
    torch.testing.assert_close(z.detach(), torch.full((2, 2), -0.1))


def test_lars_skips_a_non_finite_step_on_the_device():
    """step_optimizer hands LARS the non-finite flag (no host check): a skipped step leaves weights and
    momentum as they were, a finite one equals LARS's plain step."""
    from util.training import skips_on_device, step_optimizer

    torch.manual_seed(0)
    probe, twin = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    twin.load_state_dict(probe.state_dict())
    opt, plain = LARS(probe.parameters(), lr=0.5), LARS(twin.parameters(), lr=0.5)
    assert skips_on_device(opt) and not skips_on_device(torch.optim.SGD(twin.parameters(), lr=0.1))
    x = torch.randn(3, 4)
    for model in (probe, twin):
        model(x).square().sum().backward()
    step_optimizer(opt, None, torch.tensor(True))
    plain.step()
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in probe.parameters()]
    for p in probe.parameters():
        p.grad = torch.full_like(p, float("nan"))  # a NaN gradient: skipped however the loss looked
    step_optimizer(opt, None, torch.tensor(True))
    for p in probe.parameters():
        p.grad = torch.ones_like(p)
    step_optimizer(opt, None, torch.tensor(False))  # a non-finite loss: skipped too
    for key, value in probe.state_dict().items():
        assert torch.equal(value, before[key]), key
    for p, buf in zip(probe.parameters(), buffers):
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)
    for model in (probe, twin):
        model.zero_grad()
        model(x).square().sum().backward()
    step_optimizer(opt, None, torch.tensor(True))
    plain.step()
    for (key, value), other in zip(probe.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=0, atol=1e-7, msg=key)


def test_lars_state_round_trips_for_resume():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = LARS(a.parameters(), lr=1.0), LARS(b.parameters(), lr=1.0)
    x = torch.randn(5, 4)
    a(x).square().sum().backward()
    opt_a.step()
    saved = io.BytesIO()  # through a file, as a resume does
    torch.save({"model": a.state_dict(), "optimizer": opt_a.state_dict()}, saved)
    saved.seek(0)
    saved = torch.load(saved, weights_only=True)
    b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["optimizer"])
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


# ------------------------------------------------------------------------------ k-NN
def test_knn_vote_matches_a_hand_computation():
    bank = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 3.0], [-1.0, 0.0], [0.0, -5.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    query = torch.tensor([[4.0, 3.0]])  # cosines: 0.8, 0.98995, 0.6, -0.8, -0.6
    probs = knn_class_probabilities(bank, labels, query, num_classes=3, k=3, temperature=0.1)
    # the 3 nearest: bank 1 (class 0), bank 0 (class 0), bank 2 (class 1); weights exp(cos / T)
    w = [math.exp(0.7 * math.sqrt(2) / 0.1), math.exp(0.8 / 0.1), math.exp(0.6 / 0.1)]
    expected = torch.tensor([[(w[0] + w[1]) / sum(w), w[2] / sum(w), 0.0]])
    torch.testing.assert_close(probs, expected)
    # k larger than the bank: every feature votes; a huge T makes the votes counts (2/5, 2/5, 1/5)
    flat = knn_class_probabilities(bank, labels, query, num_classes=3, k=50, temperature=1e6)
    torch.testing.assert_close(flat, torch.tensor([[0.4, 0.4, 0.2]]))
    # k = 1 is the nearest neighbour's class; chunking does not change anything
    queries = torch.randn(10, 2)
    nearest = knn_class_probabilities(bank, labels, queries, 3, k=1, temperature=0.07, chunk_size=3)
    cos = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    torch.testing.assert_close(nearest, torch.nn.functional.one_hot(labels[cos.argmax(1)], 3).float())


def test_knn_run_writes_results_and_uses_k_and_t(dataset, pretrained, tmp_path):
    ckpt = str(pretrained["dmae_vit_tiny_patch16"])
    main_linprobe.cli(args_for(dataset, tmp_path / "k1", "--finetune", ckpt, "--knn", "--knn_k", "1"))
    assert OUTPUT_FILES <= set(os.listdir(tmp_path / "k1"))
    assert not any(f.startswith("checkpoint") for f in os.listdir(tmp_path / "k1"))
    summary = read_log(tmp_path / "k1")[-1]
    assert summary["mode"] == "knn" and summary["knn_k"] == 1 and summary["knn_t"] == 0.07
    test = saved_results(tmp_path / "k1")
    assert test["n"] == N_TEST and set(test["metrics"]) == set(METRIC_NAMES)
    assert {k: m["value"] for k, m in test["metrics"].items()} == {k: summary[f"test_{k}"] for k in METRIC_NAMES}
    probs = predicted_probs(tmp_path / "k1" / "predictions.csv")
    assert set(probs.ravel()) == {0.0, 1.0}  # one neighbour: its class gets the whole vote
    # every training image votes with (almost) equal weight: the shares are the class frequencies (12/24)
    with pytest.warns(UserWarning, match="--knn_k 100 exceeds the 24 training images"):
        main_linprobe.cli(args_for(dataset, tmp_path / "all", "--finetune", ckpt, "--knn", "--knn_k", "100",
                                   "--knn_t", "1000"))
    probs = predicted_probs(tmp_path / "all" / "predictions.csv")
    np.testing.assert_allclose(probs, 0.5, atol=2e-3)
    assert read_log(tmp_path / "all")[-1]["knn_k"] == 24


def test_per_group_results_and_an_operating_point_as_main_finetune(dataset, pretrained, tmp_path):
    """The evaluation path of main_finetune.py: --groups/--group_by, --target_sensitivity chosen on val."""
    groups_csv = tmp_path / "groups.csv"
    rows = ["file,group"] + [f"{split}/{sub}/{name},{split}-{sub}-{int(name[len(split):-4]) // 4}"
                             for split in ("train", "val", "test") for sub in ("benign", "malignant")
                             for name in sorted(os.listdir(dataset / split / sub))]
    groups_csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    main_linprobe.cli(args_for(dataset, out, "--finetune", str(pretrained["dmae_vit_tiny_patch16"]), "--knn",
                               "--knn_k", "5", "--groups", str(groups_csv), "--target_sensitivity", "0.75"))
    test, val = saved_results(out), saved_results(out, "val")
    assert test["group_by"] == "csv" and test["n_images"] == N_TEST and test["n_groups"] == 4
    assert test["group_level"]["n"] == 4 and test["bootstrap"]["resamples"] == "groups"
    for results in (test, val):
        assert results["operating_point"]["rule"] == "target_sensitivity"
        assert results["operating_point"]["chosen_on"] == "val"
    assert val["group_level"]["metrics"]["recall"]["value"] >= 0.75
    assert {"predictions_groups.csv", "confusion_matrix_groups.png"} <= set(os.listdir(out))
    summary = read_log(out)[-1]
    assert summary["test_n_groups"] == 4 and "test_groups_accuracy" in summary


# ------------------------------------------------------------------------------ linear probing end to end
def test_probe_keeps_the_encoder_bit_identical_while_the_head_learns(vit_probe, dataset, pretrained):
    # the encoder as --finetune loads it (position embedding resampled to 32 x 48) ...
    args = main_linprobe.get_args_parser().parse_args(vit_probe_args(dataset, "unused", "x"))
    args.in_chans, args.nb_classes, args.global_pool = 1, 2, False
    reference = main_finetune.build_model(args)
    main_finetune.load_pretrained(reference, str(pretrained["dmae_vit_tiny_patch16"]))
    reference = encoder_state(reference.state_dict())
    # ... is exactly what both checkpoints hold after three epochs of probing
    for name in ("checkpoint-best.pth", "checkpoint-last.pth"):
        state = torch.load(vit_probe / name, weights_only=True)["model"]
        encoder = encoder_state(state)
        assert encoder.keys() == reference.keys()
        assert all(torch.equal(encoder[k], reference[k]) for k in reference), name
        assert {k for k in state if k.startswith("head.")} == {
            "head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked", "head.1.weight", "head.1.bias"}
    last = torch.load(vit_probe / "checkpoint-last.pth", weights_only=True)
    assert last["model"]["head.0.num_batches_tracked"] == 9  # 3 epochs x 3 batches of 8
    assert last["model"]["head.0.running_mean"].abs().sum() > 0
    assert last["model"]["head.1.weight"].std() > 0.02  # moved well away from the std-0.01 initialisation
    log = read_log(vit_probe)
    epochs, summary = log[:-1], log[-1]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert summary["best_epoch"] == max(epochs, key=lambda e: (e["val_accuracy"], -e["epoch"]))["epoch"]


def test_probe_writes_every_output_with_the_best_head(vit_probe):
    assert OUTPUT_FILES | {"checkpoint-best.pth", "checkpoint-last.pth"} <= set(os.listdir(vit_probe))
    summary = read_log(vit_probe)[-1]
    test = saved_results(vit_probe)
    assert test["n"] == N_TEST and test["class_names"] == ["benign", "malignant"]
    assert {k: m["value"] for k, m in test["metrics"].items()} == {k: summary[f"test_{k}"] for k in METRIC_NAMES}
    best_epoch = next(e for e in read_log(vit_probe) if e.get("epoch") == summary["best_epoch"])
    assert saved_results(vit_probe, "val")["metrics"]["accuracy"]["value"] == best_epoch["val_accuracy"]
    rows = open(vit_probe / "predictions.csv").read().splitlines()
    assert rows[0] == "file,label,predicted,prob_benign,prob_malignant,group" and len(rows) == N_TEST + 1
    recorded = torch.load(vit_probe / "checkpoint-best.pth", weights_only=True)["args"]
    assert recorded["in_chans"] == 1 and recorded["input_size"] == [32, 48] and recorded["optimizer"] == "sgd"


def test_eval_of_the_best_checkpoint_reproduces_the_test_results(vit_probe, dataset, tmp_path):
    # in_chans, input size, pooling, normalisation and classes come from the checkpoint
    main_linprobe.cli(["--data_path", str(dataset), "--output_dir", str(tmp_path), "--model", "vit_tiny_patch16",
                       "--num_workers", "0", "--device", "cpu", "--n_boot", "20", "--eval",
                       "--resume", str(vit_probe / "checkpoint-best.pth")])
    assert saved_results(tmp_path) == saved_results(vit_probe)
    assert open(tmp_path / "predictions.csv").read() == open(vit_probe / "predictions.csv").read()


def test_convvit_rgb_probe_on_cached_features(dataset, pretrained, tmp_path):
    main_linprobe.cli(args_for(dataset, tmp_path, "--finetune", str(pretrained["dconvmae_convvit_tiny_patch16"]),
                               "--cache_features", "--optimizer", "sgd", "--lr", "0.05", "--epochs", "3",
                               "--warmup_epochs", "1", "--global_pool", model="convvit_tiny_patch16",
                               size=("48", "32")))
    log = read_log(tmp_path)
    assert log[-2]["train_loss"] < log[0]["train_loss"]
    assert OUTPUT_FILES <= set(os.listdir(tmp_path)) and saved_results(tmp_path)["n"] == N_TEST
    recorded = torch.load(tmp_path / "checkpoint-best.pth", weights_only=True)
    assert recorded["args"]["in_chans"] == 3 and recorded["args"]["global_pool"] is True
    assert "fc_norm.weight" in recorded["model"] and recorded["model"]["head.1.weight"].shape == (2, 96)


def test_resume_continues_exactly_as_an_uninterrupted_run(dataset, pretrained, tmp_path, monkeypatch):
    # LARS (momentum state) on augmented images: the epoch-0 checkpoint-last.pth of a 3-epoch run,
    # resumed, must give the same later epochs and the same final head, bit for bit
    args = ["--finetune", str(pretrained["dmae_vit_tiny_patch16"]), "--epochs", "3", "--warmup_epochs", "1",
            "--lr", "50", "--n_boot", "0"]
    real_save_last = main_finetune.save_last  # the epoch loop is main_finetune.train_epochs

    def save_last_and_keep_epoch_0(model, optimizer, scaler, epoch, best, run_args):
        real_save_last(model, optimizer, scaler, epoch, best, run_args)
        if epoch == 0:
            shutil.copy(os.path.join(run_args.output_dir, "checkpoint-last.pth"), tmp_path / "epoch0.pth")

    monkeypatch.setattr(main_finetune, "save_last", save_last_and_keep_epoch_0)
    main_linprobe.cli(args_for(dataset, tmp_path / "full", *args))
    monkeypatch.setattr(main_finetune, "save_last", real_save_last)
    main_linprobe.cli(args_for(dataset, tmp_path / "resumed", *args, "--resume", str(tmp_path / "epoch0.pth")))
    full = [e for e in read_log(tmp_path / "full") if "epoch" in e]
    resumed = [e for e in read_log(tmp_path / "resumed") if "epoch" in e]
    assert [e["epoch"] for e in resumed] == [1, 2]
    for a, b in zip(full[1:], resumed):
        assert (a["train_loss"], a["val_loss"]) == (b["train_loss"], b["val_loss"])
    last_full = torch.load(tmp_path / "full" / "checkpoint-last.pth", weights_only=True)
    last_resumed = torch.load(tmp_path / "resumed" / "checkpoint-last.pth", weights_only=True)
    for key in ("head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"):
        assert torch.equal(last_full["model"][key], last_resumed["model"][key]), key
    # the best head so far (epoch 0) was carried into the new folder: the final evaluation is the same
    assert saved_results(tmp_path / "full") == saved_results(tmp_path / "resumed")
    momentum = [s["momentum_buffer"] for s in last_resumed["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, [s["momentum_buffer"] for s in
                                                          last_full["optimizer"]["state"].values()]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_probe_trains_the_head_with_ddp_and_counts_each_image_once(dataset, pretrained, tmp_path,
                                                                                repo_root):
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_port", str(free_port()), "main_linprobe.py",
           *args_for(dataset, two, "--finetune", str(pretrained["dmae_vit_tiny_patch16"]), "--cache_features",
                     "--optimizer", "sgd", "--lr", "0.05", "--epochs", "2", "--warmup_epochs", "1",
                     "--batch_size", "4")]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert saved_results(two)["n"] == N_TEST and len(open(two / "predictions.csv").read().splitlines()) == N_TEST + 1
    # one process evaluating the same head gives the same test results: the gathered features of the
    # two processes were each image once, in dataset order
    one = tmp_path / "one"
    main_linprobe.cli(args_for(dataset, one, "--resume", str(two / "checkpoint-best.pth"), "--eval"))
    assert saved_results(one) == saved_results(two)
    assert [e["epoch"] for e in read_log(two) if "epoch" in e] == [0, 1]


# ------------------------------------------------------------------------------ user errors
def run_expecting_error(argv):
    with pytest.raises(SystemExit) as info:
        main_linprobe.cli(argv)
    return str(info.value)


def test_clear_errors(dataset, pretrained, tmp_path):
    ckpt = str(pretrained["dmae_vit_tiny_patch16"])
    assert "--resume" in run_expecting_error(args_for(dataset, tmp_path, "--eval"))
    message = run_expecting_error(args_for(dataset, tmp_path, "--resume", ckpt, "--eval"))
    assert ckpt in message and "not a linear-probe checkpoint" in message and "--finetune" in message
    assert "--knn" in run_expecting_error(args_for(dataset, tmp_path, "--knn", "--resume", ckpt))
    assert "at least 2" in run_expecting_error(args_for(dataset, tmp_path, "--finetune", ckpt, "--batch_size", "1"))
    message = run_expecting_error(args_for(dataset, tmp_path, "--finetune", ckpt, "--batch_size", "64"))
    assert "no full batch" in message and "train" in message
    convmae = str(pretrained["dconvmae_convvit_tiny_patch16"])
    message = run_expecting_error(args_for(dataset, tmp_path, "--finetune", convmae))  # into a ViT
    assert convmae in message and "--model" in message


def test_a_run_resumed_into_another_folder_keeps_its_best_head_or_chooses_afresh(tmp_path):
    model = torch.nn.Linear(2, 2)
    args = argparse.Namespace(output_dir=str(tmp_path), start_epoch=3)
    best = {"epoch": 2, "metric": "accuracy", "value": 0.5}
    assert main_linprobe.keep_best_on_disk(best, model, args) == best  # the resumed head is the best
    saved = torch.load(tmp_path / "checkpoint-best.pth", weights_only=True)
    assert saved["epoch"] == 2 and torch.equal(saved["model"]["weight"], model.weight)
    os.remove(tmp_path / "checkpoint-best.pth")
    args.start_epoch = 5  # the best head (epoch 2) is elsewhere: say so and start the choice afresh
    with pytest.warns(UserWarning, match="epoch 2"):
        assert main_linprobe.keep_best_on_disk(best, model, args) == {}
