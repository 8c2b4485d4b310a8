"""tools/demo.py (`make demo`): the --quick run end to end (every script, the table, the figures),
and its small helpers. The quick run takes about a minute on 2 CPU cores."""
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tools import demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "tools/demo.py", "--quick", "--out", str(out),
                           "--figure_dir", str(out / "readme_figures")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_run_prints_and_writes_the_table(quick_run):
    out, stdout = quick_run
    record = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in record["rows"]] == [arm.method for arm in demo.ARMS]
    table = (out / "results.md").read_text()
    assert "synthetic" in record["notice"] and record["notice"] in stdout
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| Method | Architecture | Pretraining | Cls. AUROC")
    assert "Seg. IoU (%)" in lines[0] and "Seg. Dice (%)" in lines[0]
    assert len(lines) == 1 + len(demo.ARMS) and all(line in table for line in lines)
    # one row per arm, in order, each with its own numbers
    for line, row in zip(lines[1:], record["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["method"]
        assert cells[-2:] == [f"{row['segmentation']['iou']:.2f}",
                              f"{row['segmentation']['dice']:.2f}"]
        if row["pretrain_model"] is None:
            assert cells[2] == "none"
        else:
            assert cells[2].startswith("Synthetic-US-16, 1 ep.")
            assert ("blurred (sigma 1.1) -> sharp" in cells[2]) == row["blurred"]
    # data (5), pretraining (2), reconstruction (1), per arm: fine-tuning, seg. training and test
    assert len(record["timings"]) == 5 + 2 + 1 + 3 * len(demo.ARMS)


def test_table_numbers_come_from_the_runs(quick_run):
    """The classification cells are main_finetune.py's results.json (test split), the
    segmentation cells the nodule row that SEG/tools/test.py printed into its log."""
    out, _ = quick_run
    record = json.loads((out / "results.json").read_text())
    for row in record["rows"]:
        key = row["key"]
        test = json.loads((out / "classification" / key / "results.json").read_text())["test"]
        for name in ("auroc", "accuracy"):
            assert row["classification"][name]["value"] == test["metrics"][name]["value"]
        assert row["classification"]["n"] == test["n"]
        seg_log = (out / "logs" / f"seg_test_{key}.log").read_text()
        nodule = re.search(r"^\|\s*nodule\s*\|\s*([\d.]+)\s*\|\s*[\d.]+\s*\|\s*([\d.]+)\s*\|",
                           seg_log, flags=re.M)
        assert (row["segmentation"]["iou"], row["segmentation"]["dice"]) == \
            (float(nodule.group(1)), float(nodule.group(2)))
        assert 0 <= row["segmentation"]["iou"] <= row["segmentation"]["dice"] <= 100


def test_each_arm_reads_the_right_images_and_weights(quick_run):
    """Deblurring MAE: blurred input, sharp target, fine-tuned on blurred images (classification
    and segmentation); MAE: originals only; the scratch arm starts from no checkpoint."""
    out, _ = quick_run
    dmae = torch.load(out / "pretrain/dmae/checkpoint-0.pth", weights_only=True)["args"]
    assert dmae["model"] == "dmae_vit_tiny_patch16"
    assert dmae["data_path_blurred"] == str(out / "data_blurred/pretrain")
    assert dmae["data_path_orig"] == str(out / "data/pretrain")
    mae = torch.load(out / "pretrain/mae/checkpoint-0.pth", weights_only=True)["args"]
    assert mae["data_path_blurred"] == str(out / "data/pretrain")
    fine = {key: torch.load(out / f"classification/{key}/checkpoint-best.pth",
                            weights_only=True)["args"] for key in ("scratch", "mae", "dmae")}
    assert fine["dmae"]["data_path"] == str(out / "data_blurred/cls")
    assert fine["dmae"]["finetune"] == str(out / "pretrain/dmae/checkpoint-0.pth")
    assert fine["mae"]["data_path"] == str(out / "data_cls")
    assert not fine["scratch"]["finetune"]
    logs = {key: (out / f"logs/seg_train_{key}.log").read_text()
            for key in ("scratch", "mae", "dmae")}
    for key in ("mae", "dmae"):
        checkpoint = re.escape(str(out / f"pretrain/{key}/checkpoint-0.pth"))
        assert re.search(r"loaded \d+ tensors from " + checkpoint, logs[key])
    assert "model.pretrained is None" in logs["scratch"]
    assert "images_gaussian/train" in logs["dmae"] and "images_gaussian" not in logs["mae"]


def test_figures_are_written(quick_run):
    out, _ = quick_run
    for name in ("reconstruction.png", "roc_test.png", "segmentation_overlays.png"):
        image = cv2.imread(str(out / "figures" / name))
        assert image is not None and min(image.shape[:2]) >= 100, name
    overlays = cv2.imread(str(out / "figures" / "segmentation_overlays.png"))
    # a row of plain test images and one row of outlines per arm, plus the legend
    assert overlays.shape[0] == (1 + len(demo.ARMS)) * demo.IMAGE_SIZE + 24
    for name in demo.FIGURE_COPIES.values():
        path = out / "readme_figures" / name
        assert 0 < path.stat().st_size <= 200_000 and cv2.imread(str(path)) is not None


# ------------------------------------------------------------------------------- helpers
def test_crop_nodules_centres_a_square_on_the_nodule(tmp_path):
    image = np.zeros((100, 120), np.uint8)
    image[40:50, 60:80] = 200  # the nodule: rows 40-49, columns 60-79
    for split, label in (("train", "benign"), ("test", "malignant")):
        (tmp_path / "cls" / split / label).mkdir(parents=True)
        (tmp_path / "masks" / split).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "cls" / split / label / "a.png"), image)
        cv2.imwrite(str(tmp_path / "masks" / split / "a.png"), (image > 0).astype(np.uint8) * 255)
    assert demo.crop_nodules(tmp_path / "cls", tmp_path / "masks", tmp_path / "out") == 2
    crop = cv2.imread(str(tmp_path / "out/train/benign/a.png"), cv2.IMREAD_GRAYSCALE)
    # margin 2 x the longer side (20 px): a 40x40 square around the centre (44.5, 69.5)
    assert crop.shape == (40, 40)
    assert (crop == 200).sum() == 10 * 20  # the whole nodule inside
    assert (tmp_path / "out/test/malignant/a.png").is_file()


def test_crop_nodules_stops_on_a_missing_mask(tmp_path):
    (tmp_path / "cls/train/benign").mkdir(parents=True)
    (tmp_path / "masks/train").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "cls/train/benign/b.png"), np.zeros((32, 32), np.uint8))
    with pytest.raises(demo.DemoError, match="b.png"):
        demo.crop_nodules(tmp_path / "cls", tmp_path / "masks", tmp_path / "out")


def test_nodule_row_reads_the_per_class_table():
    output = ("+------------+-------+-------+------+\n|   Class    |  IoU  |  Acc  | Dice |\n"
              "| background | 96.29 | 98.32 | 98.1 |\n|   nodule   | 77.31 | 85.94 | 87.2 |\n")
    assert demo.nodule_row(output) == (77.31, 87.2)
    with pytest.raises(demo.DemoError):
        demo.nodule_row("no table here")


def test_seg_schedule_keeps_warm_up_inside_short_runs():
    assert demo.seg_schedule(300) == [
        "train_cfg.max_iters=300", "train_cfg.val_interval=300",
        "default_hooks.checkpoint.interval=300", "param_scheduler.0.end=20",
        "param_scheduler.1.begin=20", "param_scheduler.1.end=300"]
    assert "param_scheduler.1.begin=1" in demo.seg_schedule(2)


def test_runner_reports_the_failing_step_with_its_log(tmp_path):
    runner = demo.Runner(tmp_path, total=2, parallel=2, threads=1)
    ok = demo.Job("ok", "fine", [sys.executable, "-c", "print('hello')"])
    bad = demo.Job("bad", "broken step",
                   [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    with pytest.raises(demo.DemoError, match=r"(?s)'broken step' failed \(exit status 3\).*boom"):
        runner.run(ok, bad)
    assert "hello" in (tmp_path / "ok.log").read_text()
