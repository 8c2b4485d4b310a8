#!/usr/bin/env python
"""`make demo`: the whole Deblurring MIM method on synthetic thyroid ultrasound, in minutes on CPU.

    python tools/demo.py [--out demo_out] [--quick] [--seed 0] [--figure_dir figure]
    python tools/demo.py --update_readme

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

Each run starts as soon as the runs whose outputs it reads have finished, and the runs share the CPU
cores (one thread each: tiny models gain little from more threads, and several threads per process
slow down badly when anything else runs on the machine); tools/pipeline.py holds the jobs and the
runner. With a GPU the runs use it (the scripts' --device default) one after the other. A line per
finished run, and every 20 s a line per running one with its time so far and its latest progress
line, show where the demo is.

`--update_readme` regenerates every number and figure of the README's Demo section: the full run's
table (between the README's demo markers) and figures (figure/demo_*.png), and the quick run's table
in docs/demo-quick-table.md, which tests/test_demo.py compares with a fresh quick run.

Outputs go to --out: results.md / results.json (the table), figures/, logs/ (one log per run),
and each run's own folder (checkpoints, results files, TensorBoard events). The numbers are those
of tiny models trained for seconds to minutes on a few hundred synthetic images: they show that
the pipeline runs end to end, not how the method compares on real data.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: tools/ is a package of the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.pipeline import (PUBLISHED_BLUR, REPO, Arm, Layout, PipelineError,  # noqa: E402
                            Recipe, Runner, classification_result, data_jobs, device_name,
                            fill_import_caches, finetune_job, pretrain_job, reconstruction_job,
                            seg_test_job, seg_train_job, segmentation_result, with_ci,
                            compact_copy, replace_between, table_between)
from util.fileio import atomic_write_text  # noqa: E402
# the building blocks tests and tools/study.py use by these names
from tools.pipeline import Job, crop_nodules, nodule_row, seg_schedule  # noqa: E402,F401

IMAGE_SIZE = 128  # the SEG demo configs are written for 128x128 crops
FINETUNE_MODEL = "vit_tiny_patch16"
NOTICE = ("Tiny models (ViT-Tiny: 2 blocks, 96 channels) trained on {images} synthetic images "
          "made by tools/synthetic_us.py; the whole demo took {minutes} on {device}. These "
          "numbers show that the pipeline runs end to end; they say nothing about the method on "
          "real ultrasound (see the published results).")
# the README copies of the figures (--figure_dir) must stay small
FIGURE_COPIES = {"reconstruction": "demo_reconstruction.png", "roc": "demo_roc.png",
                 "segmentation": "demo_segmentation.png"}
README = REPO / "README.md"
README_MARKERS = ("<!-- demo-results:begin (python tools/demo.py --update_readme) -->",
                  "<!-- demo-results:end -->")
# the quick run's table as the current code prints it: tests/test_demo.py compares a fresh quick
# run with it (--update_readme rewrites it)
QUICK_RECORD = REPO / "docs" / "demo-quick-table.md"
# the full run the README's table shows (its results.json), which the README's table must match
FULL_RECORD = REPO / "docs" / "demo-results.json"
DemoError = PipelineError

FULL = Recipe(num_pretrain=300, num_labelled=240, pretrain_epochs=40, finetune_epochs=30,
              seg_iters=300, n_boot=1000, batch_size=32, image_size=IMAGE_SIZE)
# --quick: every step and output of the full run, on a handful of images (for tests)
QUICK = Recipe(num_pretrain=16, num_labelled=40, pretrain_epochs=1, finetune_epochs=1,
               seg_iters=2, n_boot=20, batch_size=8, image_size=IMAGE_SIZE)

ARMS = (
    Arm("scratch", "ViT (random init.)", None, FINETUNE_MODEL),
    Arm("mae", "MAE", "mae_vit_tiny_patch16", FINETUNE_MODEL),
    Arm("dmae", "Deblurring MAE", "dmae_vit_tiny_patch16", FINETUNE_MODEL, PUBLISHED_BLUR),
)


def demo_jobs(lay: Layout, scale: Recipe, seed: int, workers: int, data_workers: int) -> list:
    """Every job of the demo, each waiting for the ones whose outputs it reads."""
    pretrained = [arm for arm in ARMS if arm.pretrain_model]
    dmae = next(arm for arm in ARMS if arm.blur)
    data = data_jobs(lay, scale, seed, [PUBLISHED_BLUR], workers=data_workers)
    ready = [job.name for job in data]  # every arm reads the data and the blurred copies
    jobs = data + [pretrain_job(lay, arm, scale, seed, workers, after=ready) for arm in pretrained]
    for arm in ARMS:
        after = ready + ([f"pretrain_{arm.key}"] if arm.pretrain_model else [])
        jobs += [seg_train_job(lay, arm, scale, seed, after=after),
                 finetune_job(lay, arm, scale, seed, workers, after=after)]
    jobs.append(reconstruction_job(lay, dmae, scale, lay.figures / "reconstruction.png",
                                   after=[f"pretrain_{dmae.key}"]))
    jobs += [seg_test_job(lay, arm, after=[f"seg_train_{arm.key}"]) for arm in ARMS]
    return jobs


# -------------------------------------------------------------------------------- results
def pretraining_label(arm: Arm, scale: Recipe) -> str:
    if arm.pretrain_model is None:
        return "none"
    blur = f", blurred (sigma {arm.blur.sigma:g}) -> sharp" if arm.blur else ""
    return f"Synthetic-US-{scale.num_pretrain}, {scale.pretrain_epochs} ep.{blur}"


def results_table(rows: list[dict], scale: Recipe) -> str:
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


def table_from_record(record: dict) -> str:
    """The table of a demo's results.json, as the demo printed it."""
    arms = {arm.key: arm for arm in ARMS}
    rows = [dict(arm=arms[row["key"]], classification=row["classification"],
                 segmentation=row["segmentation"]) for row in record["rows"]]
    return results_table(rows, Recipe(**record["scale"]))


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
    n_test = set()
    for arm in ARMS:
        labels, probs = read_predictions(lay.classification / arm.key / "predictions.csv")
        n_test.add(f"{len(labels)} images ({sum(labels)} malignant)")
        if len(set(labels)) < 2:
            continue  # a --quick test split may hold one class only: no curve
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, linewidth=2,
                label=f"{arm.method} (AUROC {roc_auc_score(labels, probs):.2f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity",
           title=f"Benign vs malignant, synthetic test split:\n{', '.join(sorted(n_test))}",
           aspect="equal")
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


# ----------------------------------------------------------------------------------- main
def prepare_output(lay: Layout) -> None:
    """Start from a clean slate in the folders this script owns (a previous demo's outputs would
    otherwise be skipped or mixed in); anything else under --out is left alone."""
    for folder in lay.owned_folders():
        shutil.rmtree(folder, ignore_errors=True)
    for folder in (lay.figures, lay.logs):
        folder.mkdir(parents=True)


def run_demo(out: Path, scale: Recipe, seed: int, workers: int, parallel: int,
             threads: int | None, figure_dir: Path | None = None,
             status_every: float = 20.0) -> dict:
    lay = Layout(out)
    prepare_output(lay)
    fill_import_caches()
    device = device_name()
    print(f"Deblurring MIM demo on {device}, {parallel} run(s) at a time: outputs in {out}\n"
          f"(a line per finished step; every {status_every:.0f} s a line per running step with "
          "its time so far and its latest progress line)", flush=True)
    jobs = demo_jobs(lay, scale, seed, workers, data_workers=parallel * (threads or 1))
    runner = Runner(lay.logs, total=len(jobs), parallel=parallel, threads=threads,
                    status_every=status_every)
    start = time.perf_counter()
    runner.run(*jobs)
    rows = [dict(arm=arm, classification=classification_result(lay.classification / arm.key),
                 segmentation=segmentation_result(lay, arm)) for arm in ARMS]
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
    return dict(table=table, notice=notice, rows=rows, figures=figures, seconds=total)


def write_results(lay: Layout, table: str, notice: str, rows: list[dict], figures: dict,
                  runner: Runner, scale: Recipe, seed: int, total: float, device: str) -> None:
    timing_lines = "\n".join(f"| {title} | {seconds:.0f} |" for title, seconds in runner.timings)
    (lay.root / "results.md").write_text(
        f"# Deblurring MIM demo (synthetic data, tiny models)\n\n{table}\n\n{notice}\n\n"
        "Classification: test split, 95 % bootstrap CIs. Segmentation: nodule class, pixels "
        "pooled over the test split.\n\n"
        f"| run ({runner.parallel} at a time) | seconds |\n|---|---|\n{timing_lines}\n"
        f"| total (wall clock) | {total:.0f} |\n")
    record = dict(
        device=device, seed=seed, scale=asdict(scale), seconds=total, notice=notice,
        date=datetime.date.today().isoformat(),
        timings=[dict(step=t, seconds=s) for t, s in runner.timings],
        figures={k: str(v) for k, v in figures.items()},
        rows=[dict(key=r["arm"].key, method=r["arm"].method,
                   pretrain_model=r["arm"].pretrain_model, finetune_model=r["arm"].finetune_model,
                   blurred=r["arm"].blur is not None, classification=r["classification"],
                   segmentation=r["segmentation"]) for r in rows])
    (lay.root / "results.json").write_text(json.dumps(record, indent=2))


# ------------------------------------------------------------------------- README update
def readme_block(table: str, notice: str, date: str) -> str:
    """What the README shows between its demo markers."""
    return f"{table}\n\n*{notice} Run of {date}, `python tools/demo.py --update_readme`.*"


def replace_between_markers(text: str, block: str, source: str = "README.md") -> str:
    return replace_between(text, README_MARKERS, block, source)


def readme_table(text: str) -> str:
    """The demo table in the README (the lines of the block that start with '|')."""
    return table_between(text, README_MARKERS)


def quick_record(table: str) -> str:
    return ("# The quick demo's table (`python tools/demo.py --quick`, CPU)\n\n"
            "Written by `python tools/demo.py --update_readme`; tests/test_demo.py runs the quick "
            "demo and compares its table with this one, so a change of the code that changes the "
            "demo's numbers shows up (then regenerate the README's demo table and this file with "
            "that command).\n\n" + table + "\n")


def update_readme(out: Path, seed: int, workers: int, parallel: int, threads: int | None,
                  readme: Path = README, figure_dir: Path = REPO / "figure") -> None:
    """The full demo into the README (table, figures; its results.json into FULL_RECORD) and the
    quick demo's table into QUICK_RECORD: every number and figure the README's Demo section shows,
    from the code as it is."""
    replace_between_markers(readme.read_text(), "", str(readme))  # markers there: fail early
    full = run_demo(out, FULL, seed, workers, parallel, threads, figure_dir)
    with tempfile.TemporaryDirectory(prefix="quick_demo_") as quick_out:
        quick = run_demo(Path(quick_out), QUICK, seed, workers, parallel, threads)
    text = replace_between_markers(readme.read_text(), readme_block(
        full["table"], full["notice"], datetime.date.today().isoformat()), str(readme))
    atomic_write_text(readme, text)
    atomic_write_text(FULL_RECORD, (out / "results.json").read_text())
    atomic_write_text(QUICK_RECORD, quick_record(quick["table"]))
    print(f"updated {readme} (demo table), {figure_dir} ({', '.join(FIGURE_COPIES.values())}), "
          f"{FULL_RECORD} and {QUICK_RECORD}; the full demo took {full['seconds']:.0f} s, the "
          f"quick one {quick['seconds']:.0f} s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="a few images and iterations: every step and output, in about two minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure_dir", type=Path,
                   help="also write small copies of the figures for the README here "
                        f"({', '.join(FIGURE_COPIES.values())}; e.g. figure/)")
    p.add_argument("--update_readme", action="store_true",
                   help="run the full demo, write its table into README.md (between the demo "
                        "markers) and its figures into figure/, then run the quick demo and "
                        f"record its table in {QUICK_RECORD.relative_to(REPO)} (what "
                        "tests/test_demo.py compares a fresh quick run with)")
    p.add_argument("--parallel", type=int,
                   help="runs at a time (default: the number of CPU cores without a GPU, 1 with)")
    p.add_argument("--num_workers", type=int,
                   help="DataLoader workers of the pretraining and classification runs (default: "
                        "0 on a CPU, where the tiny images load faster in the training process; "
                        "4 with a GPU)")
    args = p.parse_args(argv)
    if args.update_readme and (args.quick or args.figure_dir):
        p.error("--update_readme runs both the full and the quick demo and writes figure/ itself: "
                "leave out --quick and --figure_dir")
    return args


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
        if args.update_readme:
            update_readme(Path(args.out).resolve(), args.seed, workers, parallel, threads)
        else:
            run_demo(Path(args.out).resolve(), QUICK if args.quick else FULL, args.seed, workers,
                     parallel, threads, args.figure_dir)
    except DemoError as err:
        print(f"\nmake demo: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
