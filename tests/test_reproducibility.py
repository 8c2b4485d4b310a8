"""Same command, same --seed, same thread count on CPU: bit-identical checkpoints, logs and results.

Each script runs twice as a user runs it (a fresh process, the same output folder, another hash seed so
that nothing may depend on the order of a set), and the two output folders are compared file by file:
checkpoint tensors equal, log.txt lines equal except util.training.TIMING_FIELDS, every other file
byte for byte (TensorBoard event files record wall-clock times and are left out).
"""
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import models_convmae  # noqa: F401  (registers the models; it imports models_mae and models_vit)
from classification_images import make_image
from same_values import assert_same_values
from util.training import TIMING_FIELDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 6), ("test", 5)):
        for i in range(n):
            folder = root / split / ("malignant" if i % 2 else "benign")
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{split}{i}.png"), make_image(rng, i % 2 == 1))
    torch.manual_seed(0)
    from util.registry import pretrain_models
    torch.save({"model": pretrain_models().create("dmae_vit_tiny_patch16", img_size=32, in_chans=1).state_dict()},
               root / "pretrain.pth")
    return root


def run_twice(tmp_path, script, argv):
    """Run ``script argv`` twice into the same output folder; returns the two folders' copies."""
    out = tmp_path / "out"
    copies = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, script, *argv, "--output_dir", str(out), "--device", "cpu"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        copies.append(tmp_path / f"run{hash_seed}")
        shutil.move(str(out), copies[-1])
    return copies


def log_records(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in open(path)]


def assert_same_outputs(first, second):
    def files(folder):
        return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names
                      if not f.startswith("events.out.tfevents"))

    names = files(first)
    assert names == files(second)
    assert any(n.endswith(".pth") for n in names) and "log.txt" in names
    for name in names:
        a, b = first / name, second / name
        if name.endswith(".pth"):
            assert_same_values(torch.load(a, weights_only=True), torch.load(b, weights_only=True), name)
        elif name == "log.txt":
            assert log_records(a) == log_records(b)
        else:
            assert a.read_bytes() == b.read_bytes(), name
    return names


def test_pretraining_repeats_bit_for_bit(data, tmp_path):
    first, second = run_twice(tmp_path, "main_pretrain.py", [
        "--model", "dmae_vit_tiny_patch16", "--data_path_orig", str(data), "--blur", "gaussian", "--in_chans", "1",
        "--input_size", "32", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--eval_freq", "1",
        "--num_workers", "0", "--seed", "3"])
    names = assert_same_outputs(first, second)
    assert {"checkpoint-1.pth", "checkpoint-last.pth", "reconstruction-0.png", "reconstruction-1.png"} <= set(names)
    # the comparison sees a one-ulp change of one weight, and a changed loss in log.txt
    state = torch.load(second / "checkpoint-1.pth", weights_only=True)
    weight = state["model"]["decoder_pred.weight"]
    weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(1.0))
    torch.save(state, second / "checkpoint-1.pth")
    with pytest.raises(AssertionError, match="checkpoint-1.pth/model/decoder_pred.weight"):
        assert_same_outputs(first, second)
    shutil.copy(first / "checkpoint-1.pth", second / "checkpoint-1.pth")
    records = [json.loads(line) for line in open(second / "log.txt")]
    records[0]["train_loss"] += 1e-12
    (second / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(AssertionError):
        assert_same_outputs(first, second)


def test_finetuning_repeats_bit_for_bit(data, tmp_path):
    names = assert_same_outputs(*run_twice(tmp_path, "main_finetune.py", [
        "--data_path", str(data), "--model", "vit_tiny_patch16", "--finetune", str(data / "pretrain.pth"),
        "--input_size", "32", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--mixup", "0.2",
        "--n_boot", "20", "--num_workers", "0", "--seed", "5"]))
    assert {"checkpoint-best.pth", "results.json", "predictions.csv", "roc_curve.png"} <= set(names)


def test_linear_probing_with_deterministic_algorithms_repeats_bit_for_bit(data, tmp_path):
    names = assert_same_outputs(*run_twice(tmp_path, "main_linprobe.py", [
        "--data_path", str(data), "--model", "vit_tiny_patch16", "--finetune", str(data / "pretrain.pth"),
        "--input_size", "32", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--optimizer", "sgd",
        "--n_boot", "20", "--num_workers", "0", "--deterministic"]))
    assert {"checkpoint-best.pth", "results.json", "predictions_val.csv"} <= set(names)
    assert torch.load(tmp_path / "run1" / "checkpoint-last.pth", weights_only=True)["args"]["deterministic"] is True


def test_deterministic_sets_torch_cudnn_and_cublas(monkeypatch):
    from util import training

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    try:
        training.use_deterministic_algorithms(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own valid setting is kept
        training.use_deterministic_algorithms(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic = before[1]


def test_compile_with_deterministic_is_refused_before_any_work(data, tmp_path):
    import main_pretrain

    with pytest.raises(SystemExit, match="--compile with --deterministic"):
        main_pretrain.cli(["--model", "dmae_vit_tiny_patch16", "--data_path_orig", str(data), "--blur", "gaussian",
                           "--output_dir", str(tmp_path), "--device", "cpu", "--compile", "--deterministic"])
    assert not os.listdir(tmp_path)
