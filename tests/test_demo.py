"""tools/demo.py (`make demo`): the --quick run end to end (every script, the table, the figures),
its table against the recorded one, the README's table against the recorded full run, and the
helpers of tools/pipeline.py (runner, progress lines). The quick run takes about two minutes on 2
CPU cores."""
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tools import demo, pipeline

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
    assert dmae["data_path_blurred"] == str(out / "data_blurred/gaussian_1.1/pretrain")
    assert dmae["data_path_orig"] == str(out / "data/pretrain")
    mae = torch.load(out / "pretrain/mae/checkpoint-0.pth", weights_only=True)["args"]
    assert mae["data_path_blurred"] == str(out / "data/pretrain")
    fine = {key: torch.load(out / f"classification/{key}/checkpoint-best.pth",
                            weights_only=True)["args"] for key in ("scratch", "mae", "dmae")}
    assert fine["dmae"]["data_path"] == str(out / "data_blurred/gaussian_1.1/cls")
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


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the recorded quick table is a CPU run's")
def test_quick_run_prints_the_recorded_table(quick_run):
    """The quick demo's table as docs/demo-quick-table.md records it: a change of the code that
    changes the demo's numbers fails here until `python tools/demo.py --update_readme` has
    regenerated the README's demo table, its figures and this record."""
    _, stdout = quick_run
    recorded = _table_lines(demo.QUICK_RECORD.read_text())
    assert len(recorded) == 1 + len(demo.ARMS)  # the header and a row per arm
    assert _table_lines(stdout) == recorded, (
        "the quick demo's table differs from docs/demo-quick-table.md: regenerate the README's "
        "demo section with `python tools/demo.py --update_readme`")


def test_readme_table_is_the_recorded_full_run():
    """The README's demo table is what tools/demo.py renders from the full run recorded in
    docs/demo-results.json (written by --update_readme together with the README), so it cannot be
    edited by hand or left behind by a change of the table's format."""
    record = json.loads(demo.FULL_RECORD.read_text())
    assert record["scale"] == {**demo.asdict(demo.FULL)}
    readme = demo.readme_table(demo.README.read_text())
    assert readme and readme == demo.table_from_record(record)


def test_readme_block_is_replaced_between_the_markers():
    begin, end = demo.README_MARKERS
    text = f"intro\n{begin}\nold table\n{end}\nrest\n"
    new = demo.replace_between_markers(text, "| a |\n|---|\n| 1 |")
    assert new == f"intro\n{begin}\n| a |\n|---|\n| 1 |\n{end}\nrest\n"
    assert demo.readme_table(new) == "| a |\n|---|\n| 1 |"
    for broken in ("no markers", f"{end}\n{begin}", f"{begin}\n{begin}\n{end}"):
        with pytest.raises(demo.DemoError, match="demo-results:begin"):
            demo.replace_between_markers(broken, "x")


# ---------------------------------------------------------------------- pipeline runner
def _script(text: str) -> list:
    return [sys.executable, "-c", text]


def test_runner_follows_dependencies_and_skips_completed_jobs(tmp_path):
    """A job starts after those it waits for; a job whose results are there is not run again
    (an interrupted study or demo continues where it stopped)."""
    order = tmp_path / "order.txt"
    append = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"
    jobs = [pipeline.Job("c", "third", _script(append) + [order, "c"], after=["b"]),
            pipeline.Job("b", "second", _script("import time; time.sleep(0.3);" + append)
                         + [order, "b"], after=["a"]),
            pipeline.Job("a", "first", _script(append) + [order, "a"]),
            pipeline.Job("d", "done before", _script(append) + [order, "d"],
                         done=lambda: True)]
    lines = []

    class Out:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass
    runner = pipeline.Runner(tmp_path / "logs", parallel=4, threads=1, status_every=0,
                             out=Out())
    runner.run(*jobs)
    assert order.read_text().split() == ["a", "b", "c"]
    printed = "".join(lines)
    assert "done before: already done, skipped" in printed and runner.skipped == 1
    assert re.search(r"\[\d/4\] third: \d+ s", printed)
    with pytest.raises(ValueError, match="unknown"):
        runner.run(pipeline.Job("x", "x", _script("pass"), after=["nowhere"]))


def test_runner_prints_a_status_line_per_running_job(tmp_path, capsys):
    """While a job runs, a line with its time so far and its latest progress line (a progress
    bar's latest redraw, without JSON records)."""
    progress = "\n".join([
        "import sys, time",
        "for i in range(1, 4):",
        "    sys.stdout.write(f'\\repoch {i}/3 eta 00:00:0{3 - i}')",
        "    sys.stdout.flush()",
        "    time.sleep(0.5)",
        "print()",
        "print('{\"epoch\": 3}')",
        "time.sleep(0.6)"])
    runner = pipeline.Runner(tmp_path, parallel=1, status_every=0.4)
    runner.run(pipeline.Job("slow", "a slow step", _script(progress)))
    status = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("...")]
    assert status and all(re.match(r"\s+\.\.\. a slow step: \d+ s", line) for line in status)
    assert any("| epoch " in line for line in status)
    assert pipeline.latest_progress_line(tmp_path / "slow.log") == "epoch 3/3 eta 00:00:00"


def test_latest_progress_line_strips_logger_prefixes_and_cuts_long_lines(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("$ python x.py\n(in /repo)\n\n12/03 08:56:20 - mmengine - INFO - Iter(train) "
                   "[10/300] loss: 0.5\n")
    assert pipeline.latest_progress_line(log) == "Iter(train) [10/300] loss: 0.5"
    log.write_text("x" * 300)
    assert pipeline.latest_progress_line(log, width=50) == "x" * 47 + "..."
    assert pipeline.latest_progress_line(tmp_path / "missing.log") == ""


def test_blur_options_and_folders():
    spec = pipeline.BlurSpec("median", kernel_size=7)
    assert pipeline.blur_tag(spec) == "median_7"
    assert pipeline.blur_options(spec) == ["--method", "median", "--kernel_size", "7"]
    assert pipeline.blur_options(pipeline.PUBLISHED_BLUR, "blur_") == [
        "--blur", "gaussian", "--blur_sigma", "1.1"]
    lay = pipeline.Layout(Path("/o"))
    assert lay.seg_images(None) == "images"
    assert lay.seg_images(pipeline.PUBLISHED_BLUR) == "images_gaussian"
    assert lay.seg_images(spec) == "images_median_7"
    arm = pipeline.Arm("x", "x", "dmae_vit_tiny_patch16", "vit_tiny_patch16", spec)
    assert "train_dataloader.dataset.data_prefix.img_path=images_median_7/train" in \
        pipeline.seg_data_options(lay, arm)


def test_reconstruction_grid_has_a_title_over_each_column():
    """Column titles drawn above the panels; panels too narrow for their titles are enlarged."""
    from util.visualize import column_titles, panels_to_grid

    panels = torch.zeros(2, 4, 1, 128, 128)  # black panels on a white grid
    grid = panels_to_grid(panels, titles=column_titles(deblurring=True))
    plain = panels_to_grid(panels, titles=None)
    assert grid.shape[0] == plain.shape[0] + 16 and grid.shape[1] == plain.shape[1]
    header = grid[:16]
    for j in range(4):  # dark title pixels above every column, and only in the header
        column = header[:, 2 + j * 130:2 + j * 130 + 128]
        assert (column < 128).any(), j
    assert column_titles(True) == ("blurred input", "visible patches", "reconstruction",
                                   "sharp target")
    small = panels_to_grid(torch.zeros(1, 4, 3, 16, 16), titles=column_titles(False))
    assert small.shape[1] > 4 * 4 * 16  # 16-pixel panels enlarged x4 for their titles
    with pytest.raises(ValueError, match="4 columns but 3 titles"):
        panels_to_grid(panels, titles=("a", "b", "c"))
