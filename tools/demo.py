#!/usr/bin/env python
"""`make demo`: the whole Deblurring MIM method on synthetic thyroid ultrasound, in minutes on a CPU.

    python tools/demo.py [--out demo_out] [--quick] [--seed 0]

Every step runs one of the repository's own scripts as a subprocess, with small arguments:

  1. tools/synthetic_us.py          synthetic B-mode images: unlabelled ones for pretraining,
                                    benign/malignant ones for classification, the same with nodule
                                    masks for segmentation
  2. blurred_images.py              the Gaussian-blurred copy (sigma 1.1), as for real data
  3. main_pretrain.py               a tiny Deblurring MAE (blurred input, sharp target) and a tiny
                                    vanilla MAE (input = target)
  4. tools/visualize_reconstruction.py   what the Deblurring MAE reconstructs
  5. main_finetune.py               classification from scratch, from the MAE and from the
                                    Deblurring MAE (on the blurred images, as published)
  6. SEG/tools/train.py, test.py    UPerNet segmentation from the same three starting points
  7. one table shaped like the published results table, and the figures

Outputs go to --out: results.md / results.json (the table), figures/, logs/ (one log per step),
and each run's own folder (checkpoints, results files, TensorBoard events). The numbers are those
of tiny models trained for seconds to minutes on a few hundred synthetic images: they show that
the pipeline runs end to end, not how the method compares on real data.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEG_DIR = REPO / "SEG"
PYTHON = sys.executable

IMAGE_SIZE = 128  # the SEG demo configs are written for 128x128 crops
BLUR_SIGMA = "1.1"
FINETUNE_MODEL = "vit_tiny_patch16"
SEG_CONFIGS = {True: SEG_DIR / "configs/demo/upernet_de_mae_vit_tiny_synthetic_128.py",
               False: SEG_DIR / "configs/demo/upernet_mae_vit_tiny_synthetic_128.py"}
NOTICE = ("Tiny models (ViT-Tiny: 2 blocks, 96 channels) trained for {minutes} on {images} "
          "synthetic images made by tools/synthetic_us.py, on {device}. These numbers show that the "
          "pipeline runs end to end; they say nothing about the method on real ultrasound "
          "(see the published results).")


@dataclass(frozen=True)
class Scale:
    """How much data and training; the only thing --quick changes."""
    num_pretrain: int
    num_labelled: int
    pretrain_epochs: int
    finetune_epochs: int
    seg_iters: int
    n_boot: int
    batch_size: int  # pretraining and classification


FULL = Scale(num_pretrain=300, num_labelled=240, pretrain_epochs=30, finetune_epochs=30,
             seg_iters=300, n_boot=1000, batch_size=32)
# --quick: every step and output of the full run, on a handful of images (for tests)
QUICK = Scale(num_pretrain=16, num_labelled=40, pretrain_epochs=1, finetune_epochs=1,
              seg_iters=2, n_boot=20, batch_size=8)


@dataclass(frozen=True)
class Arm:
    """One row of the table: how the encoder starts and which images it is fine-tuned on."""
    key: str
    method: str
    pretrain_model: str | None  # None: random initialisation
    blurred: bool  # fine-tuned on the blurred copy (the deblurring arm, as published)


ARMS = (
    Arm("scratch", "ViT (random init.)", None, False),
    Arm("mae", "MAE", "mae_vit_tiny_patch16", False),
    Arm("dmae", "Deblurring MAE", "dmae_vit_tiny_patch16", True),
)


class DemoError(RuntimeError):
    pass


class Layout:
    """Where every step reads and writes under --out."""

    def __init__(self, out: Path):
        self.out = out
        self.data = out / "data"  # synthetic_us.py output: pretrain/, cls/, seg/
        self.blurred = out / "data_blurred"  # blurred copy of pretrain/ and cls/
        self.seg_data = self.data / "seg"  # images/, images_gaussian/ (blurred), masks/
        self.pretrain = out / "pretrain"
        self.classification = out / "classification"
        self.segmentation = out / "segmentation"
        self.figures = out / "figures"
        self.logs = out / "logs"

    def owned_folders(self):
        return (self.data, self.blurred, self.pretrain, self.classification, self.segmentation,
                self.figures, self.logs)


class Steps:
    """Runs the scripts one after the other, each with its own log file, and times them."""

    def __init__(self, logs: Path, total: int):
        self.logs = logs
        self.total = total
        self.done = 0
        self.timings: list[tuple[str, float]] = []

    def run(self, name: str, title: str, cmd: list, cwd: Path = REPO) -> str:
        self.done += 1
        print(f"[{self.done:2d}/{self.total}] {title} ...", end="", flush=True)
        log_path = self.logs / f"{self.done:02d}_{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        start = time.perf_counter()
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(map(str, cmd)) + f"\n(in {cwd})\n\n")
            log.flush()
            proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        elapsed = time.perf_counter() - start
        output = log_path.read_text(errors="replace")
        if proc.returncode != 0:
            print(" FAILED")
            raise DemoError(f"step '{title}' failed (exit status {proc.returncode}); the end of "
                            f"its log {log_path}:\n{output[-4000:]}")
        print(f" {elapsed:.0f} s", flush=True)
        self.timings.append((title, elapsed))
        return output


# ------------------------------------------------------------------------------------- steps
def make_data(steps: Steps, lay: Layout, scale: Scale, seed: int) -> None:
    steps.run("synthetic_us", f"synthetic data: {scale.num_pretrain} unlabelled + "
              f"{scale.num_labelled} labelled images",
              [PYTHON, "tools/synthetic_us.py", "--out", lay.data, "--num_pretrain",
               scale.num_pretrain, "--num_labelled", scale.num_labelled, "--size", IMAGE_SIZE,
               "--seed", seed, "--quiet"])
    # pretraining and classification read a mirrored tree; segmentation wants the blurred images
    # beside the masks (images_gaussian/), as SEG/README.md describes for TN3K
    steps.run("blur", "blurred copy for pretraining and classification (Gaussian, sigma 1.1)",
              [PYTHON, "blurred_images.py", "--src_dir", lay.data, "--dst_dir", lay.blurred,
               "--method", "gaussian", "--sigma", BLUR_SIGMA, "--exclude", "seg"])
    steps.run("blur_seg", "blurred copy for segmentation (images_gaussian/)",
              [PYTHON, "blurred_images.py", "--src_dir", lay.seg_data / "images", "--dst_dir",
               lay.seg_data / "images_gaussian", "--method", "gaussian", "--sigma", BLUR_SIGMA])


def pretrain(steps: Steps, lay: Layout, arm: Arm, scale: Scale, seed: int, workers: int) -> Path:
    """Pretrain ``arm``'s tiny model; return its final checkpoint."""
    out = lay.pretrain / arm.key
    epochs = scale.pretrain_epochs
    # the deblurring model sees the blurred copy and reconstructs the sharp original; the vanilla
    # one reads the originals as its input and target (the published convention)
    data = (["--data_path_blurred", lay.blurred / "pretrain", "--data_path_orig",
             lay.data / "pretrain"] if arm.blurred else
            ["--data_path_blurred", lay.data / "pretrain"])
    steps.run(f"pretrain_{arm.key}", f"pretraining {arm.method} ({arm.pretrain_model}, "
              f"{epochs} epochs)",
              [PYTHON, "main_pretrain.py", "--model", arm.pretrain_model, "--output_dir", out,
               *data, "--input_size", IMAGE_SIZE, "--batch_size", scale.batch_size, "--epochs", epochs,
               # a tiny model and a short schedule: a higher base lr than the published 1.5e-4
               "--blr", "4e-3", "--warmup_epochs", max(1, epochs // 10),
               "--save_freq", epochs, "--eval_freq", epochs, "--num_workers", workers,
               "--seed", seed])
    checkpoint = out / f"checkpoint-{epochs - 1}.pth"
    if not checkpoint.is_file():
        raise DemoError(f"main_pretrain.py did not write {checkpoint}")
    return checkpoint


def reconstruction_figure(steps: Steps, lay: Layout, checkpoint: Path) -> Path:
    """Rows: blurred input, masked input, reconstruction, sharp target, for 4 val images."""
    images = sorted((lay.data / "pretrain" / "val").rglob("*.png"))[:4]
    out = lay.figures / "reconstruction.png"
    steps.run("reconstruction", "reconstruction figure of the Deblurring MAE",
              [PYTHON, "tools/visualize_reconstruction.py", checkpoint, *images, "--out", out,
               "--blur", "gaussian", "--blur_sigma", BLUR_SIGMA])
    return out


def finetune(steps: Steps, lay: Layout, arm: Arm, checkpoint: Path | None, scale: Scale,
             seed: int, workers: int) -> Path:
    """Classification fine-tuning with test evaluation; return its output folder."""
    out = lay.classification / arm.key
    epochs = scale.finetune_epochs
    data = (lay.blurred if arm.blurred else lay.data) / "cls"
    start = ["--finetune", checkpoint] if checkpoint else []
    steps.run(f"finetune_{arm.key}", f"classification fine-tuning, {arm.method} ({epochs} epochs)",
              [PYTHON, "main_finetune.py", "--model", FINETUNE_MODEL, *start, "--data_path", data,
               "--output_dir", out, "--input_size", IMAGE_SIZE, "--batch_size", scale.batch_size,
               "--epochs", epochs, "--warmup_epochs", max(1, epochs // 10), "--blr", "2e-3",
               "--n_boot", scale.n_boot, "--num_workers", workers, "--seed", seed])
    if not (out / "results.json").is_file():
        raise DemoError(f"main_finetune.py did not write {out / 'results.json'}")
    return out


def seg_schedule(iters: int) -> list[str]:
    """--cfg-options that set the demo config's schedule to ``iters`` iterations (one validation
    at the end, which also saves the best-mDice checkpoint)."""
    warmup = min(20, max(1, iters // 2))
    return [f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}",
            f"default_hooks.checkpoint.interval={iters}", f"param_scheduler.0.end={warmup}",
            f"param_scheduler.1.begin={warmup}", f"param_scheduler.1.end={iters}"]


def segment(steps: Steps, lay: Layout, arm: Arm, checkpoint: Path | None, scale: Scale,
            seed: int) -> dict:
    """UPerNet fine-tuning and test evaluation; return the nodule IoU/Dice and the overlays."""
    work_dir = lay.segmentation / arm.key
    config = SEG_CONFIGS[arm.blurred]
    data_root = f"data_root={lay.seg_data}"
    steps.run(f"seg_train_{arm.key}", f"segmentation fine-tuning, {arm.method} "
              f"({scale.seg_iters} iterations)",
              [PYTHON, "tools/train.py", config, "--work-dir", work_dir, "--launcher", "none",
               "--cfg-options", data_root, f"model.pretrained={checkpoint or None}",
               f"randomness.seed={seed}", *seg_schedule(scale.seg_iters)], cwd=SEG_DIR)
    best = sorted(work_dir.glob("best_mDice_iter_*.pth"))
    if not best:
        raise DemoError(f"SEG/tools/train.py wrote no best_mDice_iter_*.pth in {work_dir}")
    overlays = work_dir / "test_overlays"
    output = steps.run(f"seg_test_{arm.key}", f"segmentation test, {arm.method}",
                       [PYTHON, "tools/test.py", config, best[-1], "--work-dir",
                        work_dir / "test", "--launcher", "none", "--show-dir", overlays,
                        "--cfg-options", data_root], cwd=SEG_DIR)
    iou, dice = nodule_row(output)
    per_image = json.loads((work_dir / "test" / "per_image_metrics.json").read_text())
    return dict(iou=iou, dice=dice, per_image_dice=per_image["summary"]["dice"],
                overlays=str(overlays))


def nodule_row(test_output: str) -> tuple[float, float]:
    """Nodule IoU and Dice (%) of the per-class table that SEG/tools/test.py prints (pixels pooled
    over the test split, the published table's convention)."""
    match = re.search(r"^\|\s*nodule\s*\|\s*([\d.]+|nan)\s*\|\s*([\d.]+|nan)\s*\|"
                      r"\s*([\d.]+|nan)\s*\|", test_output, flags=re.M)
    if match is None:
        raise DemoError("no 'nodule' row in the output of SEG/tools/test.py")
    return float(match.group(1)), float(match.group(3))


# ----------------------------------------------------------------------------------- results
def classification_result(out: Path) -> dict:
    test = json.loads((out / "results.json").read_text())["test"]
    pick = ("value", "ci_low", "ci_high")
    return dict(n=test["n"], **{name: {k: test["metrics"][name][k] for k in pick}
                                for name in ("auroc", "accuracy")})


def with_ci(metric: dict) -> str:
    if metric["value"] is None:
        return "n/a"
    if metric.get("ci_low") is None:
        return f"{metric['value']:.3f}"
    return f"{metric['value']:.3f} [{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"


def pretraining_label(arm: Arm, scale: Scale) -> str:
    if arm.pretrain_model is None:
        return "none"
    blur = f", blurred (sigma {BLUR_SIGMA}) -> sharp" if arm.blurred else ""
    return f"Synthetic-US-{scale.num_pretrain}, {scale.pretrain_epochs} ep.{blur}"


def results_table(rows: list[dict], scale: Scale) -> str:
    """Markdown table: the published table's columns (method, architecture, pretraining,
    segmentation IoU) plus the classification metrics and Dice."""
    n_test = rows[0]["classification"]["n"]
    header = ["Method", "Architecture", "Pretraining",
              f"Cls. AUROC (95% CI, n={n_test})", "Cls. accuracy (95% CI)",
              "Seg. IoU (%)", "Seg. Dice (%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        arm, cls, seg = row["arm"], row["classification"], row["segmentation"]
        cells = [arm.method, "ViT-Tiny/16 (cls.), UPerNet(ViT-Tiny) (seg.)",
                 pretraining_label(arm, scale), with_ci(cls["auroc"]), with_ci(cls["accuracy"]),
                 f"{seg['iou']:.2f}", f"{seg['dice']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_predictions(path: Path) -> tuple[list[int], list[float]]:
    """Labels (1 = malignant) and malignant probabilities from main_finetune's predictions.csv."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return ([int(r["label"] == "malignant") for r in rows],
            [float(r["prob_malignant"]) for r in rows])


def roc_figure(rows: list[dict], path: Path) -> Path:
    """The three test-split ROC curves in one plot (main_finetune.py draws one per run)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = Figure(figsize=(4.2, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="chance")
    for row in rows:
        labels, probs = read_predictions(Path(row["classification_dir"]) / "predictions.csv")
        if len(set(labels)) < 2:
            continue  # a --quick test split may hold one class only: no curve
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, linewidth=2,
                label=f"{row['arm'].method} (AUROC {roc_auc_score(labels, probs):.2f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity",
           title="Benign vs malignant, synthetic test split", aspect="equal")
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def segmentation_figure(rows: list[dict], seg_images: Path, path: Path, n_images: int = 4) -> Path:
    """Test images (columns) with the ground-truth (green) and predicted (red) outlines, one row
    per starting point; the first row shows the plain images."""
    import cv2
    import numpy as np

    names = sorted(p.name for p in (seg_images / "test").glob("*.png"))[:n_images]
    label_width = 150

    def strip(title: str, tiles: list) -> np.ndarray:
        label = np.full((tiles[0].shape[0], label_width, 3), 255, np.uint8)
        for i, word in enumerate(title.split("\n")):
            cv2.putText(label, word, (4, 20 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                        (0, 0, 0), 1, cv2.LINE_AA)
        return np.hstack([label, *tiles])

    def read(folder: Path, name: str) -> np.ndarray:
        image = cv2.imread(str(folder / name), cv2.IMREAD_COLOR)
        if image is None:
            raise DemoError(f"cannot read {folder / name}")
        return cv2.resize(image, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)

    strips = [strip("test image", [read(seg_images / "test", n) for n in names])]
    for row in rows:
        seg = row["segmentation"]
        title = f"{row['arm'].method}\nIoU {seg['iou']:.1f}%".replace(" (random init.)", "\n(random init.)")
        strips.append(strip(title, [read(Path(seg["overlays"]), n) for n in names]))
    canvas = np.vstack(strips)
    legend = np.full((24, canvas.shape[1], 3), 255, np.uint8)
    cv2.putText(legend, "green: ground truth   red: prediction", (4, 17),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), np.vstack([canvas, legend]))
    return path


# -------------------------------------------------------------------------------------- main
def device_name() -> str:
    import torch
    return f"GPU ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores)"


def prepare_output(lay: Layout) -> None:
    """Start from a clean slate in the folders this script owns (a previous demo's outputs would
    otherwise be skipped or mixed in); anything else under --out is left alone."""
    for folder in lay.owned_folders():
        shutil.rmtree(folder, ignore_errors=True)
    for folder in (lay.figures, lay.logs):
        folder.mkdir(parents=True)


def run_demo(out: Path, scale: Scale, seed: int, workers: int) -> dict:
    lay = Layout(out)
    prepare_output(lay)
    device = device_name()
    print(f"Deblurring MIM demo on {device}: outputs in {out}")
    steps = Steps(lay.logs, total=3 + 1 + (len(ARMS) - 1) + 3 * len(ARMS))
    start = time.perf_counter()

    make_data(steps, lay, scale, seed)
    checkpoints = {arm.key: pretrain(steps, lay, arm, scale, seed, workers) if arm.pretrain_model
                   else None for arm in ARMS}
    figures = {"reconstruction": reconstruction_figure(steps, lay, checkpoints["dmae"])}
    rows = []
    for arm in ARMS:
        cls_dir = finetune(steps, lay, arm, checkpoints[arm.key], scale, seed, workers)
        rows.append(dict(arm=arm, classification_dir=str(cls_dir),
                         classification=classification_result(cls_dir)))
    for arm, row in zip(ARMS, rows):
        row["segmentation"] = segment(steps, lay, arm, checkpoints[arm.key], scale, seed)

    figures["roc"] = roc_figure(rows, lay.figures / "roc_test.png")
    figures["segmentation"] = segmentation_figure(rows, lay.seg_data / "images",
                                                  lay.figures / "segmentation_overlays.png")
    total = time.perf_counter() - start
    table = results_table(rows, scale)
    notice = NOTICE.format(minutes=f"{total / 60:.1f} min in all",
                           images=scale.num_pretrain + scale.num_labelled, device=device)
    write_results(lay, table, notice, rows, figures, steps, scale, seed, total, device)
    print(f"\n{table}\n\n{notice}\n")
    print(f"Total {total:.0f} s. Table: {out / 'results.md'}; figures: {lay.figures}; "
          f"logs: {lay.logs}")
    return dict(table=table, rows=rows, figures=figures, seconds=total)


def write_results(lay: Layout, table: str, notice: str, rows: list[dict], figures: dict,
                  steps: Steps, scale: Scale, seed: int, total: float, device: str) -> None:
    timing_lines = "\n".join(f"| {title} | {seconds:.0f} |" for title, seconds in steps.timings)
    (lay.out / "results.md").write_text(
        f"# Deblurring MIM demo (synthetic data, tiny models)\n\n{table}\n\n{notice}\n\n"
        "Classification: test split, 95 % bootstrap CIs. Segmentation: nodule class, pixels "
        "pooled over the test split.\n\n"
        f"| step | seconds |\n|---|---|\n{timing_lines}\n| total | {total:.0f} |\n")
    record = dict(
        device=device, seed=seed, scale=asdict(scale), seconds=total, notice=notice,
        timings=[dict(step=t, seconds=s) for t, s in steps.timings],
        figures={k: str(v) for k, v in figures.items()},
        rows=[dict(asdict(r["arm"]), classification=r["classification"],
                   segmentation={k: v for k, v in r["segmentation"].items() if k != "overlays"})
              for r in rows])
    (lay.out / "results.json").write_text(json.dumps(record, indent=2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="a few images and iterations: every step and output, in about a minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="DataLoader workers of the pretraining and classification runs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run_demo(Path(args.out).resolve(), QUICK if args.quick else FULL, args.seed,
                 args.num_workers)
    except DemoError as err:
        print(f"\nmake demo: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
