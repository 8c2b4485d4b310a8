#!/usr/bin/env python
"""`make demo`: the whole Deblurring MIM method on synthetic thyroid ultrasound, in minutes on CPU.

    python tools/demo.py [--out demo_out] [--quick] [--seed 0] [--figure_dir figure]

Every step runs one of the repository's own scripts as a subprocess, with small arguments:

  1. tools/synthetic_us.py          synthetic B-mode images: unlabelled ones for pretraining,
                                    benign/malignant ones for classification, the same with nodule
                                    masks for segmentation
  2. blurred_images.py              the Gaussian-blurred copies (sigma 1.1), as for real data
  3. main_pretrain.py               a tiny Deblurring MAE (blurred input, sharp target) and a tiny
                                    vanilla MAE (input = target)
  4. main_finetune.py               classification from scratch, from the MAE and from the
                                    Deblurring MAE (on blurred images, as published)
     SEG/tools/train.py             UPerNet segmentation from the same three starting points
     tools/visualize_reconstruction.py   what the Deblurring MAE reconstructs
  5. SEG/tools/test.py              segmentation test metrics and outlines
  6. one table shaped like the published results table, and the figures

Runs of one stage are independent and share the CPU cores (one thread each: tiny models gain little
from more threads, and several threads per process slow down badly when anything else runs on the
machine). With a GPU the runs use it (the scripts' --device default) one after the other.

Outputs go to --out: results.md / results.json (the table), figures/, logs/ (one log per run),
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
NOTICE = ("Tiny models (ViT-Tiny: 2 blocks, 96 channels) trained on {images} synthetic images "
          "made by tools/synthetic_us.py; the whole demo took {minutes} on {device}. These "
          "numbers show that the pipeline runs end to end; they say nothing about the method on "
          "real ultrasound (see the published results).")
# the README copies of the figures (--figure_dir) must stay small
FIGURE_COPIES = {"reconstruction": "demo_reconstruction.png", "roc": "demo_roc.png",
                 "segmentation": "demo_segmentation.png"}


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


FULL = Scale(num_pretrain=300, num_labelled=240, pretrain_epochs=40, finetune_epochs=30,
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
    blurred: bool  # pretrained and fine-tuned on blurred images (the deblurring arm, as published)


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
        self.seg_data = self.data / "seg"  # images/, images_gaussian/ (blurred), masks/
        self.cls_data = out / "data_cls"  # nodule-centred crops of data/cls (see crop_nodules)
        self.blurred = out / "data_blurred"  # blurred copies: pretrain/, cls/
        self.pretrain = out / "pretrain"
        self.classification = out / "classification"
        self.segmentation = out / "segmentation"
        self.figures = out / "figures"
        self.logs = out / "logs"

    def owned_folders(self):
        return (self.data, self.cls_data, self.blurred, self.pretrain, self.classification,
                self.segmentation, self.figures, self.logs)


@dataclass
class Job:
    """One script run: its log is logs/<name>.log."""
    name: str
    title: str
    cmd: list
    cwd: Path = REPO


class Runner:
    """Runs jobs as subprocesses, ``parallel`` at a time, each with its own log; numbers and times
    them, and stops everything at the first failure."""

    def __init__(self, logs: Path, total: int, parallel: int, threads: int | None):
        self.logs = logs
        self.total = total
        self.parallel = max(1, parallel)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if threads:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.done = 0
        self.timings: list[tuple[str, float]] = []

    def run(self, *jobs: Job) -> dict[str, str]:
        """Run ``jobs`` (independent of each other); return each one's log text by name."""
        pending, running, outputs = list(jobs), [], {}
        try:
            while pending or running:
                while pending and len(running) < self.parallel:
                    running.append(self._start(pending.pop(0)))
                time.sleep(0.1)
                for entry in [e for e in running if e[1].poll() is not None]:
                    running.remove(entry)
                    job, _, _, _ = entry
                    outputs[job.name] = self._finish(*entry)
        finally:
            for _, proc, _, log in running:  # only after a failure or an interrupt
                proc.kill()
                proc.wait()
                log.close()
        return outputs

    def run_here(self, title: str, function, *args):
        """A data-preparation step of a few lines of Python, run in this process."""
        start = time.perf_counter()
        result = function(*args)
        self._report(title, time.perf_counter() - start)
        return result

    def _start(self, job: Job):
        log = open(self.logs / f"{job.name}.log", "w")
        log.write("$ " + " ".join(map(str, job.cmd)) + f"\n(in {job.cwd})\n\n")
        log.flush()
        proc = subprocess.Popen([str(c) for c in job.cmd], cwd=job.cwd, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)
        return job, proc, time.perf_counter(), log

    def _finish(self, job: Job, proc, start: float, log) -> str:
        log.close()
        output = (self.logs / f"{job.name}.log").read_text(errors="replace")
        if proc.returncode != 0:
            raise DemoError(f"'{job.title}' failed (exit status {proc.returncode}); the end of "
                            f"its log {self.logs / (job.name + '.log')}:\n{output[-4000:]}")
        self._report(job.title, time.perf_counter() - start)
        return output

    def _report(self, title: str, seconds: float) -> None:
        self.done += 1
        print(f"[{self.done:2d}/{self.total}] {title}: {seconds:.0f} s", flush=True)
        self.timings.append((title, seconds))


# ------------------------------------------------------------------------------------ data
def make_data(runner: Runner, lay: Layout, scale: Scale, seed: int) -> None:
    runner.run(Job("synthetic_us", f"synthetic data: {scale.num_pretrain} unlabelled + "
                   f"{scale.num_labelled} labelled images",
                   [PYTHON, "tools/synthetic_us.py", "--out", lay.data, "--num_pretrain",
                    scale.num_pretrain, "--num_labelled", scale.num_labelled, "--size",
                    IMAGE_SIZE, "--seed", seed, "--quiet"]))
    runner.run_here("nodule-centred classification images", crop_nodules, lay.data / "cls",
                    lay.seg_data / "masks", lay.cls_data)
    # segmentation reads the blurred images beside the masks (images_gaussian/), as SEG/README.md
    # describes for TN3K; blurred_images.py uses all cores itself, so these run one at a time
    blur = [PYTHON, "blurred_images.py", "--method", "gaussian", "--sigma", BLUR_SIGMA]
    for name, what, src, dst in (
            ("blur_pretrain", "pretraining", lay.data / "pretrain", lay.blurred / "pretrain"),
            ("blur_cls", "classification", lay.cls_data, lay.blurred / "cls"),
            ("blur_seg", "segmentation", lay.seg_data / "images",
             lay.seg_data / "images_gaussian")):
        runner.run(Job(name, f"blurred copy (Gaussian, sigma {BLUR_SIGMA}) for {what}",
                       [*blur, "--src_dir", src, "--dst_dir", dst]))


def crop_nodules(cls_root: Path, masks_root: Path, out_root: Path, margin: float = 2.0) -> int:
    """Write a nodule-centred crop of every classification image to ``out_root`` (same tree).

    Thyroid-nodule classification datasets are made of such crops. On whole 128-pixel frames,
    where the nodule covers ~3 % of the pixels (and a random-resized crop often cuts it out), a
    tiny ViT stays at chance within the demo's minutes. The crop is a square of ``margin`` x the
    nodule's longer side around its bounding box, at the frame's own resolution (main_finetune.py
    resizes it); the nodule comes from the case's segmentation mask (the classification and
    segmentation sets of tools/synthetic_us.py share the cases and splits).
    """
    import cv2
    import numpy as np

    count = 0
    for image_path in sorted(cls_root.rglob("*.png")):
        split, label, name = image_path.relative_to(cls_root).parts
        mask = cv2.imread(str(masks_root / split / name), cv2.IMREAD_GRAYSCALE)
        image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        if mask is None or image is None or not mask.any():
            raise DemoError(f"no nodule mask for {image_path} in {masks_root / split}")
        rows, cols = np.nonzero(mask)
        centre = ((rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2)
        half = max(8.0, margin * (max(np.ptp(rows), np.ptp(cols)) + 1) / 2)
        top, left = (max(0, int(round(c - half))) for c in centre)
        bottom, right = (min(n, int(round(c + half))) for c, n in zip(centre, image.shape[:2]))
        target = out_root / split / label / name
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), image[top:bottom, left:right])
        count += 1
    return count


# ------------------------------------------------------------------------------- training
def pretrain_checkpoint(lay: Layout, arm: Arm, scale: Scale) -> Path | None:
    if arm.pretrain_model is None:
        return None
    return lay.pretrain / arm.key / f"checkpoint-{scale.pretrain_epochs - 1}.pth"


def pretrain_job(lay: Layout, arm: Arm, scale: Scale, seed: int, workers: int) -> Job:
    epochs = scale.pretrain_epochs
    # the deblurring model sees the blurred copy and reconstructs the sharp original; the vanilla
    # one reads the originals as its input and target (the published convention)
    data = (["--data_path_blurred", lay.blurred / "pretrain", "--data_path_orig",
             lay.data / "pretrain"] if arm.blurred else
            ["--data_path_blurred", lay.data / "pretrain"])
    return Job(f"pretrain_{arm.key}", f"pretraining {arm.method} ({arm.pretrain_model}, "
               f"{epochs} epochs)",
               [PYTHON, "main_pretrain.py", "--model", arm.pretrain_model, "--output_dir",
                lay.pretrain / arm.key, *data, "--input_size", IMAGE_SIZE, "--batch_size",
                scale.batch_size, "--epochs", epochs,
                # a tiny model and a short schedule: a higher base lr than the published 1.5e-4
                "--blr", "4e-3", "--warmup_epochs", max(1, epochs // 10),
                "--save_freq", epochs, "--eval_freq", epochs, "--num_workers", workers,
                "--seed", seed])


def reconstruction_job(lay: Layout, checkpoint: Path) -> Job:
    """Rows: blurred input, masked input, reconstruction, sharp target, for 4 val images."""
    images = sorted((lay.data / "pretrain" / "val").rglob("*.png"))[:4]
    return Job("reconstruction", "reconstruction figure of the Deblurring MAE",
               [PYTHON, "tools/visualize_reconstruction.py", checkpoint, *images, "--out",
                lay.figures / "reconstruction.png", "--blur", "gaussian", "--blur_sigma",
                BLUR_SIGMA])


def finetune_job(lay: Layout, arm: Arm, scale: Scale, seed: int, workers: int) -> Job:
    """Classification fine-tuning; main_finetune.py then tests the best model."""
    epochs = scale.finetune_epochs
    checkpoint = pretrain_checkpoint(lay, arm, scale)
    start = ["--finetune", checkpoint] if checkpoint else []
    return Job(f"finetune_{arm.key}", f"classification fine-tuning, {arm.method} "
               f"({epochs} epochs)",
               [PYTHON, "main_finetune.py", "--model", FINETUNE_MODEL, *start, "--data_path",
                lay.blurred / "cls" if arm.blurred else lay.cls_data,
                "--output_dir", lay.classification / arm.key, "--input_size", IMAGE_SIZE,
                "--batch_size", scale.batch_size, "--epochs", epochs,
                "--warmup_epochs", max(1, epochs // 10), "--blr", "1e-2",
                # the published regularisation (RandAugment, random erasing, label smoothing,
                # drop path) is made for hundreds of epochs; over 30 it keeps a tiny model at chance
                "--aa", "none", "--reprob", "0", "--smoothing", "0", "--drop_path", "0",
                "--n_boot", scale.n_boot, "--num_workers", workers, "--seed", seed])


def seg_schedule(iters: int) -> list[str]:
    """--cfg-options that set the demo config's schedule to ``iters`` iterations (one validation
    at the end, which also saves the best-mDice checkpoint)."""
    warmup = min(20, max(1, iters // 2))
    return [f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}",
            f"default_hooks.checkpoint.interval={iters}", f"param_scheduler.0.end={warmup}",
            f"param_scheduler.1.begin={warmup}", f"param_scheduler.1.end={iters}"]


def seg_train_job(lay: Layout, arm: Arm, scale: Scale, seed: int) -> Job:
    checkpoint = pretrain_checkpoint(lay, arm, scale)
    return Job(f"seg_train_{arm.key}", f"segmentation fine-tuning, {arm.method} "
               f"({scale.seg_iters} iterations)",
               [PYTHON, "tools/train.py", SEG_CONFIGS[arm.blurred], "--work-dir",
                lay.segmentation / arm.key, "--launcher", "none", "--cfg-options",
                f"data_root={lay.seg_data}", f"model.pretrained={checkpoint or None}",
                f"randomness.seed={seed}", *seg_schedule(scale.seg_iters)], cwd=SEG_DIR)


def seg_test_job(lay: Layout, arm: Arm) -> Job:
    """Test split with the best-by-val checkpoint; outlines of every test image."""
    work_dir = lay.segmentation / arm.key
    best = sorted(work_dir.glob("best_mDice_iter_*.pth"))
    if not best:
        raise DemoError(f"SEG/tools/train.py wrote no best_mDice_iter_*.pth in {work_dir}")
    return Job(f"seg_test_{arm.key}", f"segmentation test, {arm.method}",
               [PYTHON, "tools/test.py", SEG_CONFIGS[arm.blurred], best[-1], "--work-dir",
                work_dir / "test", "--launcher", "none", "--show-dir", work_dir / "overlays",
                "--cfg-options", f"data_root={lay.seg_data}"], cwd=SEG_DIR)


# -------------------------------------------------------------------------------- results
def nodule_row(test_output: str) -> tuple[float, float]:
    """Nodule IoU and Dice (%) of the per-class table that SEG/tools/test.py prints (pixels pooled
    over the test split, the published table's convention)."""
    match = re.search(r"^\|\s*nodule\s*\|\s*([\d.]+|nan)\s*\|\s*([\d.]+|nan)\s*\|"
                      r"\s*([\d.]+|nan)\s*\|", test_output, flags=re.M)
    if match is None:
        raise DemoError("no 'nodule' row in the output of SEG/tools/test.py")
    return float(match.group(1)), float(match.group(3))


def segmentation_result(lay: Layout, arm: Arm, test_output: str) -> dict:
    iou, dice = nodule_row(test_output)
    per_image = json.loads((lay.segmentation / arm.key / "test" /
                            "per_image_metrics.json").read_text())
    return dict(iou=iou, dice=dice, per_image_mean_dice=per_image["summary"]["dice"])


def classification_result(lay: Layout, arm: Arm) -> dict:
    path = lay.classification / arm.key / "results.json"
    if not path.is_file():
        raise DemoError(f"main_finetune.py did not write {path}")
    test = json.loads(path.read_text())["test"]
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
        cells = [arm.method, "ViT-Tiny/16; UPerNet(ViT-Tiny)", pretraining_label(arm, scale),
                 with_ci(cls["auroc"]), with_ci(cls["accuracy"]), f"{seg['iou']:.2f}",
                 f"{seg['dice']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- figures
def read_predictions(path: Path) -> tuple[list[int], list[float]]:
    """Labels (1 = malignant) and malignant probabilities from main_finetune's predictions.csv."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return ([int(r["label"] == "malignant") for r in rows],
            [float(r["prob_malignant"]) for r in rows])


def roc_figure(lay: Layout, path: Path) -> Path:
    """The three test-split ROC curves in one plot (main_finetune.py draws one per run)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = Figure(figsize=(4.2, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="chance")
    for arm in ARMS:
        labels, probs = read_predictions(lay.classification / arm.key / "predictions.csv")
        if len(set(labels)) < 2:
            continue  # a --quick test split may hold one class only: no curve
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, linewidth=2,
                label=f"{arm.method} (AUROC {roc_auc_score(labels, probs):.2f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity",
           title="Benign vs malignant, synthetic test split", aspect="equal")
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def segmentation_figure(lay: Layout, rows: list[dict], path: Path, n_images: int = 4) -> Path:
    """Test images (columns) with the ground-truth (green) and predicted (red) outlines, one row
    per starting point below a row of the plain images."""
    import cv2
    import numpy as np

    images = lay.seg_data / "images" / "test"
    names = sorted(p.name for p in images.glob("*.png"))[:n_images]

    def read(folder: Path, name: str) -> np.ndarray:
        image = cv2.imread(str(folder / name), cv2.IMREAD_COLOR)
        if image is None:
            raise DemoError(f"cannot read {folder / name}")
        return cv2.resize(image, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)

    def strip(lines: list[str], tiles: list) -> np.ndarray:
        label = np.full((IMAGE_SIZE, 150, 3), 255, np.uint8)
        for i, text in enumerate(lines):
            cv2.putText(label, text, (4, 20 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                        (0, 0, 0), 1, cv2.LINE_AA)
        return np.hstack([label, *tiles])

    strips = [strip(["test image"], [read(images, n) for n in names])]
    for row in rows:
        arm = row["arm"]
        title = arm.method.replace(" (", "\n(").split("\n")
        strips.append(strip([*title, f"IoU {row['segmentation']['iou']:.1f}%"],
                            [read(lay.segmentation / arm.key / "overlays", n) for n in names]))
    canvas = np.vstack(strips)
    legend = np.full((24, canvas.shape[1], 3), 255, np.uint8)
    cv2.putText(legend, "green: ground truth   red: prediction", (4, 17),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), np.vstack([canvas, legend]))
    return path


def compact_copy(src: Path, dst: Path, max_bytes: int = 200_000) -> Path:
    """A PNG under ``max_bytes`` for the README: a palette of 256, 128 or 64 colours (speckle
    compresses badly; grey levels survive 64 well), then 80 % smaller steps if still too big."""
    from PIL import Image

    image = Image.open(src).convert("RGB")
    palettes = [256, 128, 64]
    while True:
        image.quantize(colors=palettes[0], method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
        if dst.stat().st_size <= max_bytes or min(image.size) < 64:
            return dst
        if len(palettes) > 1:
            palettes.pop(0)
        else:
            image = image.resize((image.width * 4 // 5, image.height * 4 // 5),
                                 Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------- main
def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return f"GPU ({torch.cuda.get_device_name(0)})"
    return f"CPU ({os.cpu_count()} cores)"


def fill_import_caches() -> None:
    """Import mmengine once before SEG runs start side by side. Its first import after an
    installation (a fresh clone) makes yapf rewrite its grammar cache in ~/.cache/YAPF; two
    processes doing that at once read each other's half-written file and stop (EOFError)."""
    import mmengine.config  # noqa: F401


def prepare_output(lay: Layout) -> None:
    """Start from a clean slate in the folders this script owns (a previous demo's outputs would
    otherwise be skipped or mixed in); anything else under --out is left alone."""
    for folder in lay.owned_folders():
        shutil.rmtree(folder, ignore_errors=True)
    for folder in (lay.figures, lay.logs):
        folder.mkdir(parents=True)


def run_demo(out: Path, scale: Scale, seed: int, workers: int, parallel: int,
             threads: int | None, figure_dir: Path | None = None) -> dict:
    lay = Layout(out)
    prepare_output(lay)
    fill_import_caches()
    device = device_name()
    print(f"Deblurring MIM demo on {device}, {parallel} run(s) at a time: outputs in {out}")
    pretrained = [arm for arm in ARMS if arm.pretrain_model]
    runner = Runner(lay.logs, total=5 + len(pretrained) + 1 + 3 * len(ARMS), parallel=parallel,
                    threads=threads)
    start = time.perf_counter()

    make_data(runner, lay, scale, seed)
    runner.run(*(pretrain_job(lay, arm, scale, seed, workers) for arm in pretrained))
    for checkpoint in (pretrain_checkpoint(lay, arm, scale) for arm in pretrained):
        if not checkpoint.is_file():
            raise DemoError(f"main_pretrain.py did not write {checkpoint}")
    dmae = next(arm for arm in ARMS if arm.blurred)
    runner.run(*(seg_train_job(lay, arm, scale, seed) for arm in ARMS),
               *(finetune_job(lay, arm, scale, seed, workers) for arm in ARMS),
               reconstruction_job(lay, pretrain_checkpoint(lay, dmae, scale)))
    tests = runner.run(*(seg_test_job(lay, arm) for arm in ARMS))

    rows = [dict(arm=arm, classification=classification_result(lay, arm),
                 segmentation=segmentation_result(lay, arm, tests[f"seg_test_{arm.key}"]))
            for arm in ARMS]
    figures = {"reconstruction": lay.figures / "reconstruction.png",
               "roc": roc_figure(lay, lay.figures / "roc_test.png"),
               "segmentation": segmentation_figure(lay, rows,
                                                   lay.figures / "segmentation_overlays.png")}
    if figure_dir is not None:
        figure_dir.mkdir(parents=True, exist_ok=True)
        for key, name in FIGURE_COPIES.items():
            compact_copy(figures[key], figure_dir / name)
    total = time.perf_counter() - start
    table = results_table(rows, scale)
    notice = NOTICE.format(minutes=f"{total / 60:.1f} min",
                           images=scale.num_pretrain + scale.num_labelled, device=device)
    write_results(lay, table, notice, rows, figures, runner, scale, seed, total, device)
    print(f"\n{table}\n\n{notice}\n")
    print(f"Total {total:.0f} s. Table: {out / 'results.md'}; figures: {lay.figures}; "
          f"logs: {lay.logs}")
    return dict(table=table, rows=rows, figures=figures, seconds=total)


def write_results(lay: Layout, table: str, notice: str, rows: list[dict], figures: dict,
                  runner: Runner, scale: Scale, seed: int, total: float, device: str) -> None:
    timing_lines = "\n".join(f"| {title} | {seconds:.0f} |" for title, seconds in runner.timings)
    (lay.out / "results.md").write_text(
        f"# Deblurring MIM demo (synthetic data, tiny models)\n\n{table}\n\n{notice}\n\n"
        "Classification: test split, 95 % bootstrap CIs. Segmentation: nodule class, pixels "
        "pooled over the test split.\n\n"
        f"| run ({runner.parallel} at a time) | seconds |\n|---|---|\n{timing_lines}\n"
        f"| total (wall clock) | {total:.0f} |\n")
    record = dict(
        device=device, seed=seed, scale=asdict(scale), seconds=total, notice=notice,
        timings=[dict(step=t, seconds=s) for t, s in runner.timings],
        figures={k: str(v) for k, v in figures.items()},
        rows=[dict(asdict(r["arm"]), classification=r["classification"],
                   segmentation=r["segmentation"]) for r in rows])
    (lay.out / "results.json").write_text(json.dumps(record, indent=2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="a few images and iterations: every step and output, in about a minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure_dir", type=Path,
                   help="also write small copies of the figures for the README here "
                        f"({', '.join(FIGURE_COPIES.values())}; e.g. figure/)")
    p.add_argument("--parallel", type=int,
                   help="runs at a time (default: the number of CPU cores without a GPU, 1 with)")
    p.add_argument("--num_workers", type=int,
                   help="DataLoader workers of the pretraining and classification runs (default: "
                        "0 on a CPU, where the tiny images load faster in the training process; "
                        "4 with a GPU)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    gpu = torch.cuda.is_available()
    cores = os.cpu_count() or 1
    parallel = args.parallel or (1 if gpu else cores)
    workers = args.num_workers if args.num_workers is not None else (min(4, cores) if gpu else 0)
    # on a CPU the cores are shared out between the parallel runs
    threads = None if gpu else max(1, cores // parallel)
    try:
        run_demo(Path(args.out).resolve(), QUICK if args.quick else FULL, args.seed, workers,
                 parallel, threads, args.figure_dir)
    except DemoError as err:
        print(f"\nmake demo: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
