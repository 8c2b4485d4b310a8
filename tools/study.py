#!/usr/bin/env python
"""Does deblurring pretraining help? Several seeds x several starting points, with statistics.

    python tools/study.py --preset cpu --out study_cpu     # 3 seeds x 3 arms, tiny models, 2 cores
    python tools/study.py --preset gpu --out study_gpu     # 5 seeds, ViT-Base, more data (a GPU)
    python tools/study.py --preset cpu --seeds 0 1 2 3 4 --arms scratch mae dmae convmae dconvmae \\
        --blur_arms gaussian:2.0 median:5 --out study_more

For every seed the study writes one synthetic data set (tools/synthetic_us.py --seed SEED: the
images, the labels and the splits change with the seed) and runs, for every arm on that same data
(a paired design: the arms of one seed differ only in their starting point), with the repository's
own scripts as subprocesses (tools/pipeline.py):

  pretraining                main_pretrain.py (arms with a pretraining model)
  fine-tuning                main_finetune.py, then its test split
  linear probe and k-NN      main_linprobe.py --cache_features --optimizer sgd, and --knn
  segmentation               SEG/tools/train.py and test.py (ViT arms: the SEG demo configs)

The seed also seeds every training run, so a seed's spread covers both the data and the training.
Deblurring arms are pretrained on blurred input with the sharp image as target and evaluated on
images blurred the same way (as published); the others see the sharp images.

Reported per metric (test split: AUROC and accuracy of fine-tuning, linear probe and k-NN;
segmentation nodule IoU and Dice), in results.md / results.json and figures/:
  - each arm's mean over seeds with its 95 % t-interval;
  - the paired difference Deblurring MAE - MAE (same seed, same data), its mean and 95 %
    t-interval over seeds, and how many seeds favour each arm (more in --compare);
  - a plot with every seed's value and the mean with its interval, per metric, and one of the
    paired differences.

The runs are resumable: a run whose results file is there is skipped, so the same command
continues an interrupted study (and --seeds with more seeds extends one). Runs go side by side
within --cores CPU cores, each subprocess limited to --threads threads (OMP/MKL/OpenBLAS).
docs/synthetic-data.md describes what the synthetic labels depend on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import shlex
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: tools/ is a package of the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.pipeline import (PUBLISHED_BLUR, REPO, Arm, BlurSpec, Layout,  # noqa: E402
                            PipelineError, Recipe, Runner, blur_tag, classification_result,
                            compact_copy, data_jobs, device_name, replace_between,
                            fill_import_caches, finetune_job, knn_job, linprobe_job,
                            pretrain_job, seg_test_job, seg_train_job, segmentation_result)
from util.fileio import atomic_write_text  # noqa: E402

README = REPO / "README.md"
README_MARKERS = ("<!-- study-results:begin (python tools/study.py --preset cpu --update_readme) -->",
                  "<!-- study-results:end -->")
# the CPU study the README shows (its results.json); its figures in figure/
README_RECORD = REPO / "docs" / "study-cpu-results.json"
README_FIGURES = {"metrics": "study_cpu_metrics.png", "differences": "study_cpu_differences.png"}


# ------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    recipe: Recipe
    size: str  # model size: tiny, base
    seeds: tuple
    arms: tuple
    what: str


PRESETS = {
    # 3 seeds x 3 arms within 30 min on 2 CPU cores (measured: README, Study)
    "cpu": Preset(Recipe(num_pretrain=200, num_labelled=200, pretrain_epochs=30,
                         finetune_epochs=20, seg_iters=150, n_boot=200, batch_size=32,
                         linprobe_epochs=50, knn_k=20),
                  "tiny", (0, 1, 2), ("scratch", "mae", "dmae"),
                  "tiny models (ViT-Tiny: 2 blocks, 96 channels), 128x128 synthetic images"),
    # larger models and data, for a GPU
    "gpu": Preset(Recipe(num_pretrain=4000, num_labelled=1000, pretrain_epochs=200,
                         finetune_epochs=50, seg_iters=2000, n_boot=1000, batch_size=64,
                         linprobe_epochs=90, knn_k=20, pretrain_blr=1.5e-4, finetune_blr=1e-3),
                  "base", (0, 1, 2, 3, 4), ("scratch", "mae", "dmae"),
                  "ViT-Base/16, 128x128 synthetic images"),
}


def arm_catalogue(size: str) -> dict[str, Arm]:
    """The starting points --arms can name (``size``: the models' size, tiny or base)."""
    vit, convvit = f"vit_{size}_patch16", f"convvit_{size}_patch16"
    return {arm.key: arm for arm in (
        Arm("scratch", "ViT (random init.)", None, vit),
        Arm("mae", "MAE", f"mae_vit_{size}_patch16", vit),
        Arm("dmae", "Deblurring MAE", f"dmae_vit_{size}_patch16", vit, PUBLISHED_BLUR),
        Arm("convmae", "ConvMAE", f"convmae_convvit_{size}_patch16", convvit),
        Arm("dconvmae", "Deblurring ConvMAE", f"dconvmae_convvit_{size}_patch16", convvit,
            PUBLISHED_BLUR),
    )}


def parse_blur(text: str) -> BlurSpec:
    """METHOD[:VALUE]: gaussian:2.0 (sigma), median:5 / mean:5 / defocus:3 / motion:9 (kernel
    size), srad:40 (iterations)."""
    method, _, value = text.partition(":")
    try:
        if not value:
            return BlurSpec(method)
        if method == "gaussian":
            return BlurSpec(method, sigma=float(value))
        if method == "srad":
            return BlurSpec(method, srad_iterations=int(value))
        return BlurSpec(method, kernel_size=int(value))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"blur {text!r}: {err}") from None


def blur_arm(size: str, spec: BlurSpec) -> Arm:
    """A Deblurring MAE with another blur than the published Gaussian sigma 1.1."""
    base = arm_catalogue(size)["dmae"]
    return replace(base, key=f"dmae_{blur_tag(spec)}", method=f"Deblurring MAE, {spec.describe()}",
                   blur=spec)


# -------------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    stage: str  # finetune, linprobe, knn, seg

    @property
    def top(self) -> float:
        """The metric's largest value (its range is [0, top]; a difference's [-top, top])."""
        return 100.0 if self.stage == "seg" else 1.0


METRICS = (
    Metric("finetune_auroc", "Fine-tuning AUROC", "finetune"),
    Metric("finetune_accuracy", "Fine-tuning accuracy", "finetune"),
    Metric("linprobe_auroc", "Linear-probe AUROC", "linprobe"),
    Metric("linprobe_accuracy", "Linear-probe accuracy", "linprobe"),
    Metric("knn_auroc", "k-NN AUROC", "knn"),
    Metric("knn_accuracy", "k-NN accuracy", "knn"),
    Metric("seg_iou", "Segmentation IoU (%)", "seg"),
    Metric("seg_dice", "Segmentation Dice (%)", "seg"),
)


def stages(recipe: Recipe) -> set[str]:
    out = {"finetune"}
    if recipe.linprobe_epochs:
        out.add("linprobe")
    if recipe.knn_k:
        out.add("knn")
    if recipe.seg_iters:
        out.add("seg")
    return out


# ----------------------------------------------------------------------------- statistics
def t_interval(values, level: float = 0.95, bounds: tuple[float, float] | None = None) -> dict:
    """Mean and its ``level`` t-interval (mean +- t(n-1) * sd / sqrt(n)); the interval is None
    for fewer than two values. With ``bounds`` (the metric's range) the interval is clipped to
    it: with three seeds the t-interval of an AUROC easily reaches past 1, a value that cannot
    occur; ``clipped`` says when that happened."""
    from scipy import stats

    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return dict(n=0, mean=None, ci_low=None, ci_high=None, sd=None, clipped=False)
    mean = sum(values) / n
    if n < 2:
        return dict(n=1, mean=mean, ci_low=None, ci_high=None, sd=None, clipped=False)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    clipped = bool(bounds is not None and (low < bounds[0] or high > bounds[1]))
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return dict(n=n, mean=mean, ci_low=low, ci_high=high, sd=sd, clipped=clipped)


def paired_differences(first: dict, second: dict) -> dict:
    """Per-seed differences first - second, over the seeds both have a value for."""
    return {seed: first[seed] - second[seed] for seed in sorted(first)
            if seed in second and first[seed] is not None and second[seed] is not None}


def compare(first: dict, second: dict, level: float = 0.95, top: float | None = None) -> dict:
    """Paired comparison of two arms' per-seed values: the differences, their mean and t-interval
    (clipped to [-top, top] when given), and how many seeds favour each arm (a tie: equal values)."""
    diffs = paired_differences(first, second)
    values = list(diffs.values())
    bounds = None if top is None else (-top, top)
    return dict(t_interval(values, level, bounds), per_seed=diffs,
                favour_first=sum(d > 0 for d in values), favour_second=sum(d < 0 for d in values),
                ties=sum(d == 0 for d in values))


# ------------------------------------------------------------------------------ the study
class Study:
    """The jobs and results of one study folder."""

    def __init__(self, out: Path, recipe: Recipe, arms: list[Arm], seeds: list[int],
                 comparisons: list[tuple[str, str]], workers: int = 0):
        self.out, self.recipe, self.arms, self.seeds = out, recipe, arms, seeds
        self.comparisons = comparisons
        self.workers = workers
        self.stages = stages(recipe)

    def layout(self, seed: int) -> Layout:
        return Layout(self.out / f"seed_{seed}")

    def jobs(self) -> list:
        """Every run, seed after seed (the first seeds finish first); within a seed the long runs
        on the critical path (pretraining, then segmentation training) come first."""
        jobs = []
        for seed in self.seeds:
            jobs += self.seed_jobs(seed)
        return jobs

    def seed_jobs(self, seed: int) -> list:
        lay, prefix = self.layout(seed), f"s{seed}_"
        blurs = list(dict.fromkeys(arm.blur for arm in self.arms if arm.blur))
        data = data_jobs(lay, self.recipe, seed, blurs, workers=1, prefix=prefix)
        ready = [job.name for job in data]
        pretrained = {arm.key: f"{prefix}pretrain_{arm.key}" for arm in self.arms
                      if arm.pretrain_model}
        jobs = data + [pretrain_job(lay, arm, self.recipe, seed, self.workers, prefix,
                                    after=ready) for arm in self.arms if arm.pretrain_model]
        segmented = [arm for arm in self.arms if "seg" in self.stages and arm.segmentation]
        after = {arm.key: ready + ([pretrained[arm.key]] if arm.key in pretrained else [])
                 for arm in self.arms}
        jobs += [seg_train_job(lay, arm, self.recipe, seed, prefix, after=after[arm.key])
                 for arm in segmented]
        for arm in self.arms:
            args = (lay, arm, self.recipe, seed, self.workers, prefix)
            jobs.append(finetune_job(*args, after=after[arm.key]))
            if "linprobe" in self.stages:
                jobs.append(linprobe_job(*args, after=after[arm.key]))
            if "knn" in self.stages:
                jobs.append(knn_job(*args, after=after[arm.key]))
        jobs += [seg_test_job(lay, arm, prefix, after=[f"{prefix}seg_train_{arm.key}"])
                 for arm in segmented]
        for job in jobs:
            job.title = f"seed {seed}: {job.title}"
        return jobs

    def collect(self) -> dict:
        """{metric: {arm: {seed: value}}} from the runs' results files (missing runs left out)."""
        values = {m.key: {arm.key: {} for arm in self.arms} for m in METRICS
                  if m.stage in self.stages}
        for seed in self.seeds:
            lay = self.layout(seed)
            for arm in self.arms:
                for stage, folder in (("finetune", lay.classification), ("linprobe", lay.linprobe),
                                      ("knn", lay.knn)):
                    if stage in self.stages and (folder / arm.key / "results.json").is_file():
                        result = classification_result(folder / arm.key)
                        for name in ("auroc", "accuracy"):
                            values[f"{stage}_{name}"][arm.key][seed] = result[name]["value"]
                if "seg" in self.stages and arm.segmentation:
                    try:
                        seg = segmentation_result(lay, arm)
                    except PipelineError:
                        continue
                    values["seg_iou"][arm.key][seed] = seg["iou"]
                    values["seg_dice"][arm.key][seed] = seg["dice"]
        return values

    def summarise(self, values: dict) -> dict:
        summary = {}
        tops = {m.key: m.top for m in METRICS}
        for metric, by_arm in values.items():
            top = tops[metric]
            arms = {key: t_interval([v for v in per_seed.values() if v is not None], bounds=(0.0, top))
                    for key, per_seed in by_arm.items() if per_seed}
            pairs = {f"{a} - {b}": compare(by_arm[a], by_arm[b], top=top)
                     for a, b in self.comparisons if by_arm.get(a) and by_arm.get(b)}
            summary[metric] = dict(arms=arms, comparisons=pairs)
        return summary


# -------------------------------------------------------------------------------- reports
def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def with_interval(stats: dict, digits: int = 3) -> str:
    if stats["mean"] is None:
        return "n/a"
    if stats["ci_low"] is None:
        return f"{fmt(stats['mean'], digits)} (n=1)"
    return (f"{fmt(stats['mean'], digits)} [{fmt(stats['ci_low'], digits)}, "
            f"{fmt(stats['ci_high'], digits)}]")


def metric_digits(metric: str) -> int:
    return 2 if metric.startswith("seg_") else 3


def summary_table(summary: dict, arms: list[Arm], comparisons: list[tuple[str, str]]) -> str:
    """One row per metric: each arm's mean [95 % CI], then each paired difference with its CI
    and the seeds favouring each arm."""
    names = {arm.key: arm.method for arm in arms}
    header = ["Metric (test split)", *(names[a.key] for a in arms)]
    for a, b in comparisons:
        header += [f"{names[a]} - {names[b]} (paired)", f"seeds {names[a]} / {names[b]} / tie"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    titles = {m.key: m.title for m in METRICS}
    for metric, entry in summary.items():
        digits = metric_digits(metric)
        cells = [titles[metric]]
        cells += [with_interval(entry["arms"][a.key], digits) if a.key in entry["arms"] else "n/a"
                  for a in arms]
        for a, b in comparisons:
            pair = entry["comparisons"].get(f"{a} - {b}")
            if pair is None:
                cells += ["n/a", "n/a"]
                continue
            mean = pair["mean"]
            sign = "+" if mean is not None and mean > 0 else ""
            cells += [sign + with_interval(pair, digits),
                      f"{pair['favour_first']} / {pair['favour_second']} / {pair['ties']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_verdicts(summary: dict, arms, comparisons: list[tuple[str, str]]) -> str:
    """One line per paired comparison: in how many metrics its 95 % interval lies wholly above or
    below 0 (the only differences the study can show), read off the table, never written by hand."""
    names = {arm.key: arm.method for arm in arms}
    titles = {m.key: m.title for m in METRICS}
    lines = []
    for a, b in comparisons:
        pairs = {metric: entry["comparisons"][f"{a} - {b}"] for metric, entry in summary.items()
                 if entry["comparisons"].get(f"{a} - {b}", {}).get("ci_low") is not None}
        if not pairs:
            continue
        higher = [titles[m] for m, p in pairs.items() if p["ci_low"] > 0]
        lower = [titles[m] for m, p in pairs.items() if p["ci_high"] < 0]
        seeds = max(p["n"] for p in pairs.values())
        if not higher and not lower:
            verdict = (f"the paired 95 % interval contains 0 in all {len(pairs)} metrics: with {seeds} "
                       "seeds the study shows no difference between them")
        else:
            verdict = (f"the paired 95 % interval lies above 0 in {len(higher)} and below 0 in "
                       f"{len(lower)} of {len(pairs)} metrics"
                       + (f" (higher: {', '.join(higher)})" if higher else "")
                       + (f" (lower: {', '.join(lower)})" if lower else "")
                       + "; the other intervals contain 0")
        lines.append(f"- {names[a]} - {names[b]}: {verdict}.")
    return "\n".join(lines)


def per_seed_table(values: dict, arms: list[Arm], seeds: list[int]) -> str:
    titles = {m.key: m.title for m in METRICS}
    header = ["Metric", "Arm", *(f"seed {s}" for s in seeds)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric, by_arm in values.items():
        for arm in arms:
            if not by_arm.get(arm.key):
                continue
            cells = [titles[metric], arm.method,
                     *(fmt(by_arm[arm.key].get(s), metric_digits(metric)) for s in seeds)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metrics(values: dict, summary: dict, arms: list[Arm], path: Path) -> Path:
    """One panel per metric: every seed's value per arm (a seed's points joined across arms:
    the design is paired) and each arm's mean with its 95 % t-interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(values)
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows))
    FigureCanvasAgg(fig)
    titles = {m.key: m.title for m in METRICS}
    seeds = sorted({s for by_arm in values.values() for per in by_arm.values() for s in per})
    colours = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    for index, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, index + 1)
        shown = [arm for arm in arms if values[metric].get(arm.key)]
        for seed in seeds:
            xs = [i for i, arm in enumerate(shown) if values[metric][arm.key].get(seed) is not None]
            ys = [values[metric][shown[i].key][seed] for i in xs]
            ax.plot([x - 0.12 for x in xs], ys, "o-", color=colours[seed], alpha=0.55,
                    linewidth=0.8, markersize=4, label=f"seed {seed}")
        for i, arm in enumerate(shown):
            stats = summary[metric]["arms"][arm.key]
            if stats["mean"] is None:
                continue
            low = stats["ci_low"] if stats["ci_low"] is not None else stats["mean"]
            high = stats["ci_high"] if stats["ci_high"] is not None else stats["mean"]
            ax.errorbar([i + 0.12], [stats["mean"]], yerr=[[stats["mean"] - low],
                                                          [high - stats["mean"]]],
                        fmt="D", color="black", capsize=4, markersize=5,
                        label="mean, 95 % CI" if i == 0 else None)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([arm.method.replace(" (", "\n(").replace("Deblurring ", "Deblurring\n")
                            for arm in shown], fontsize=7)
        ax.set_title(titles[metric], fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize=6, loc="best")
    fig.suptitle("Per seed (coloured) and mean with 95 % t-interval (black), test split",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_differences(summary: dict, arms: list[Arm], comparisons: list[tuple[str, str]],
                     path: Path) -> Path | None:
    """The paired differences: one row per metric and comparison, every seed's difference and
    the mean with its 95 % t-interval; 0 = no difference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = {arm.key: arm.method for arm in arms}
    titles = {m.key: m.title for m in METRICS}
    rows = [(metric, f"{a} - {b}", entry["comparisons"][f"{a} - {b}"])
            for metric, entry in summary.items() for a, b in comparisons
            if f"{a} - {b}" in entry["comparisons"]]
    if not rows:
        return None
    fig = Figure(figsize=(6.5, 0.45 * len(rows) + 1.2))
    FigureCanvasAgg(fig)
    # accuracy/AUROC differences and segmentation differences (in %) on their own axes
    groups = [[r for r in rows if not r[0].startswith("seg_")],
              [r for r in rows if r[0].startswith("seg_")]]
    groups = [g for g in groups if g]
    grid = fig.add_gridspec(len(groups), 1, height_ratios=[len(g) for g in groups])
    for index, group in enumerate(groups):
        ax = fig.add_subplot(grid[index])
        ax.set_ylim(len(group) - 0.4, -0.6)
        for y, (metric, key, pair) in enumerate(group):
            diffs = list(pair["per_seed"].values())
            ax.plot(diffs, [y] * len(diffs), "o", color="C0", alpha=0.6, markersize=4)
            if pair["mean"] is not None:
                low = pair["ci_low"] if pair["ci_low"] is not None else pair["mean"]
                high = pair["ci_high"] if pair["ci_high"] is not None else pair["mean"]
                ax.errorbar([pair["mean"]], [y + 0.25],
                            xerr=[[pair["mean"] - low], [high - pair["mean"]]], fmt="D",
                            color="black", capsize=3, markersize=4)
        ax.axvline(0, color="grey", linewidth=1, linestyle="--")
        ax.set_yticks(range(len(group)))
        a_b = [key.split(" - ") for _, key, _ in group]
        ax.set_yticklabels([f"{titles[m]}: {names[a]} - {names[b]}"
                            for (m, _, _), (a, b) in zip(group, a_b)], fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("paired difference (points: seeds; black: mean, 95 % t-interval)"
                      if index == len(groups) - 1 else "", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_reports(study: Study, values: dict, summary: dict, info: dict) -> dict:
    """results.json, results.md and the figures; returns their paths."""
    figures = study.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    paths = dict(metrics=plot_metrics(values, summary, study.arms, figures / "study_metrics.png"),
                 differences=plot_differences(summary, study.arms, study.comparisons,
                                              figures / "study_differences.png"))
    record = dict(info, recipe=asdict(study.recipe), seeds=study.seeds,
                  arms=[dict(asdict(a), blur=a.blur.describe() if a.blur else None)
                        for a in study.arms],
                  comparisons=[f"{a} - {b}" for a, b in study.comparisons],
                  values={m: {a: {str(s): v for s, v in per.items()} for a, per in by_arm.items()}
                          for m, by_arm in values.items()},
                  summary=_json_keys(summary),
                  figures={k: str(v) for k, v in paths.items() if v is not None})
    atomic_write_text(study.out / "results.json", json.dumps(record, indent=2) + "\n")
    table = summary_table(summary, study.arms, study.comparisons)
    recipe = study.recipe
    text = f"""# Deblurring MIM study: {len(study.seeds)} seeds x {len(study.arms)} arms

**Synthetic data; {info['what']}: these numbers measure the method on the images of
tools/synthetic_us.py (docs/synthetic-data.md: what their labels depend on), not on real
ultrasound.**

{invocation_lines(info['invocations'])}

Per seed: {recipe.num_pretrain} unlabelled and {recipe.num_labelled} labelled
{recipe.image_size}x{recipe.image_size} images (70/15/15 % train/val/test); pretraining
{recipe.pretrain_epochs} epochs, fine-tuning {recipe.finetune_epochs} epochs, linear probe
{recipe.linprobe_epochs} epochs, k-NN k={recipe.knn_k}, segmentation {recipe.seg_iters} iterations.

Mean over seeds [95 % t-interval]; paired differences: same seed, same data, mean of the per-seed
differences [95 % t-interval], and the number of seeds in which each arm scored higher. With few
seeds the intervals are wide: an interval that contains 0 does not show a difference. An interval
that reaches past the metric's range (AUROC and accuracy 0-1, IoU and Dice 0-100 %) is cut at its
end.

{table}

{comparison_verdicts(summary, study.arms, study.comparisons)}

![per-seed values and means]({paths['metrics'].relative_to(study.out)})
"""
    if paths["differences"] is not None:
        text += f"\n![paired differences]({paths['differences'].relative_to(study.out)})\n"
    text += "\n## Every seed\n\n" + per_seed_table(values, study.arms, study.seeds) + "\n"
    atomic_write_text(study.out / "results.md", text)
    return dict(paths, table=table)


def invocation_lines(invocations: list) -> str:
    """How the study was run: each invocation's command, time and machine load."""
    lines = []
    for inv in invocations:
        lines.append(
            f"- `{inv['command']}`, started {inv['started']} on {inv['device']}: "
            f"{inv['runs'] - inv['skipped']} of {inv['runs']} runs in "
            f"{inv['wall_seconds'] / 60:.1f} min wall clock ({inv['parallel']} at a time, "
            f"{inv['threads']} thread(s) each; {inv['cpu_seconds'] / 60:.1f} min of CPU time in "
            f"the runs, {inv['cpu_seconds'] / 60 / (inv['parallel'] * inv['threads']):.1f} min "
            f"per core; load average {inv['load']})")
    return "\n".join(lines)


def readme_block(record: dict) -> str:
    """The README's Study results from a study's results.json: how it was run, the table and
    the figures (copied to figure/)."""
    from types import SimpleNamespace

    arms = [SimpleNamespace(key=a["key"], method=a["method"]) for a in record["arms"]]
    comparisons = [tuple(c.split(" - ")) for c in record["comparisons"]]
    figures = "\n".join(f"![{what}](figure/{name})" for what, name in README_FIGURES.items()
                         if what in record["figures"])
    return (f"*Synthetic data, {record['what']}; {len(record['seeds'])} seeds x "
            f"{len(arms)} arms, measured:*\n\n{invocation_lines(record['invocations'])}\n\n"
            f"{summary_table(record['summary'], arms, comparisons)}\n\n"
            f"{comparison_verdicts(record['summary'], arms, comparisons)}\n\n{figures}")


def update_readme(out: Path, readme: Path = README, figure_dir: Path = REPO / "figure") -> None:
    """The README's Study results (between its markers), figure/study_cpu_*.png and the record
    docs/study-cpu-results.json, from the study in ``out``."""
    record = json.loads((out / "results.json").read_text())
    text = replace_between(readme.read_text(), README_MARKERS, readme_block(record), str(readme))
    for what, name in README_FIGURES.items():
        if what in record["figures"]:
            compact_copy(Path(record["figures"][what]), figure_dir / name)
    atomic_write_text(readme, text)
    atomic_write_text(README_RECORD, json.dumps(record, indent=2) + "\n")
    print(f"updated {readme} (Study results), {README_RECORD} and figure/"
          f"{{{','.join(README_FIGURES.values())}}}")


def _json_keys(obj):
    """Seeds as strings in JSON objects (json.dumps would do it, but silently)."""
    if isinstance(obj, dict):
        return {str(k): _json_keys(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------- main
def check_same_recipe(out: Path, recipe: Recipe, size: str) -> None:
    """A study folder holds one recipe: results of another would be skipped as complete and
    mixed in. New seeds and arms may be added."""
    path = out / "study.json"
    current = dict(recipe=asdict(recipe), model_size=size)
    if path.is_file():
        before = json.loads(path.read_text())
        if before != current:
            changed = sorted(k for k in {**before["recipe"], **current["recipe"]}
                             if before["recipe"].get(k) != current["recipe"].get(k))
            if before.get("model_size") != size:
                changed.append("model_size")
            raise SystemExit(f"{out} holds a study with other settings ({', '.join(changed)}; see "
                             f"{path}): its completed runs would be mixed in. Use another --out, "
                             "or the same settings to continue it.")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(current, indent=2) + "\n")


class LoadSampler:
    """The 1-minute load average every ``every`` seconds while the study runs (the machine may
    be shared: the times mean little without it)."""

    def __init__(self, every: float = 30.0):
        self.samples, self.every = [os.getloadavg()[0]], every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> str:
        self._stop.set()
        self.samples.append(os.getloadavg()[0])
        mean = sum(self.samples) / len(self.samples)
        return f"{mean:.1f} (min {min(self.samples):.1f}, max {max(self.samples):.1f})"


def default_comparisons(arms: list[Arm]) -> list[tuple[str, str]]:
    keys = [arm.key for arm in arms]
    pairs = [(a, b) for a, b in (("dmae", "mae"), ("dconvmae", "convmae"))
             if a in keys and b in keys]
    pairs += [(k, "mae") for k in keys if k.startswith("dmae_") and "mae" in keys]
    return pairs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: tiny models, 3 seeds x 3 arms within 30 min on 2 CPU cores; gpu: "
                        "ViT-Base, more data, 5 seeds (default: cpu)")
    p.add_argument("--out", default="study_out", help="study folder (default: study_out); an "
                   "existing one is continued")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the preset's)")
    p.add_argument("--arms", nargs="+", help="starting points: scratch, mae, dmae, convmae, "
                   "dconvmae (default: the preset's: scratch mae dmae). ConvViT arms have no "
                   "segmentation (the SEG demo configs hold ViT encoders)")
    p.add_argument("--blur_arms", nargs="+", type=parse_blur, default=[], metavar="METHOD[:VALUE]",
                   help="extra Deblurring MAE arms with another blur, e.g. gaussian:2.0 (sigma) "
                        "median:5 (kernel size) srad:40 (iterations); each is compared with MAE")
    p.add_argument("--compare", nargs="+", default=None, metavar="A:B",
                   help="paired differences to report, e.g. dmae:mae dmae:scratch (default: "
                        "dmae:mae, dconvmae:convmae, and every --blur_arms arm against mae)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="CPU cores the study may use (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per run (default: 1 on a CPU, where runs side by side beat "
                        "threads for tiny models; cores / 2 with a GPU)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader workers per training run (default: 0 on a CPU, 2 with a GPU)")
    p.add_argument("--update_readme", action="store_true",
                   help="also write the results into README.md's Study section (between its "
                        f"markers), the figures into figure/ and the record into "
                        f"{README_RECORD.relative_to(REPO)} (the CPU preset with its own seeds "
                        "and arms only: the README shows that study)")
    p.add_argument("--dry_run", action="store_true",
                   help="print every run's command (and whether it is already complete)")
    args = p.parse_args(argv)
    if args.update_readme and (args.preset != "cpu" or args.seeds or args.arms or args.blur_arms
                               or args.compare):
        p.error("--update_readme writes the README's CPU study: use it with --preset cpu and the "
                "preset's seeds and arms")
    return args


def build_study(args) -> tuple[Study, Preset]:
    preset = PRESETS[args.preset]
    catalogue = arm_catalogue(preset.size)
    keys = args.arms or list(preset.arms)
    unknown = [k for k in keys if k not in catalogue]
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}: choose from "
                         f"{', '.join(catalogue)}")
    arms = [catalogue[k] for k in dict.fromkeys(keys)]
    arms += [blur_arm(preset.size, spec) for spec in dict.fromkeys(args.blur_arms)]
    if args.compare:
        comparisons = []
        for text in args.compare:
            a, _, b = text.partition(":")
            if a not in {x.key for x in arms} or b not in {x.key for x in arms}:
                raise SystemExit(f"--compare {text}: both arms must be among "
                                 f"{', '.join(x.key for x in arms)}")
            comparisons.append((a, b))
    else:
        comparisons = default_comparisons(arms)
    seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else preset.seeds))
    return Study(Path(args.out).resolve(), preset.recipe, arms, seeds, comparisons,
                 workers=args.num_workers or 0), preset


def main(argv=None) -> int:
    args = parse_args(argv)
    study, preset = build_study(args)
    import torch
    gpu = torch.cuda.is_available()
    cores = max(1, args.cores)
    threads = args.threads or (max(1, cores // 2) if gpu else 1)
    parallel = max(1, cores // threads)
    if gpu and args.num_workers is None:
        study.workers = 2
    jobs = study.jobs()
    if args.dry_run:
        for job in jobs:
            try:
                cmd = job.cmd() if callable(job.cmd) else job.cmd
            except PipelineError:  # its arguments come from a run that has not happened yet
                cmd = ["(made when the runs it waits for have finished)"]
            state = "complete" if job.done and job.done() else "to run"
            print(f"[{state}] {job.title}\n    " + (" ".join(shlex.quote(str(c)) for c in cmd)
                                                    if cmd else "(in-process step)"))
        return 0
    check_same_recipe(study.out, study.recipe, preset.size)
    fill_import_caches()
    device = device_name()
    started = datetime.datetime.now().isoformat(timespec="minutes")
    print(f"Study in {study.out}: seeds {study.seeds}, arms {[a.key for a in study.arms]}, "
          f"{len(jobs)} runs, {parallel} at a time x {threads} thread(s), on {device}", flush=True)
    load = LoadSampler()
    start = time.perf_counter()
    runner = Runner(study.out / "logs", parallel=parallel, threads=threads, status_every=60)
    try:
        runner.run(*jobs)
    except PipelineError as err:
        load.stop()
        print(f"\nstudy: {err}\nFix the cause and run the same command again: completed runs "
              "are kept.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        load.stop()
        print("\nstudy: interrupted; run the same command again to continue (completed runs are "
              "kept, interrupted ones resume from their last checkpoint)", file=sys.stderr)
        return 130
    wall = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    invocation = dict(
        command="python tools/study.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        started=started, device=device, wall_seconds=round(wall, 1),
        cpu_seconds=round(children.ru_utime + children.ru_stime, 1), load=load.stop(),
        runs=len(jobs), skipped=runner.skipped, parallel=parallel, threads=threads,
        timings=[[title, round(seconds, 1)] for title, seconds in runner.timings])
    history_file = study.out / "invocations.jsonl"
    if runner.skipped < len(jobs):  # every invocation of this study that ran something
        with open(history_file, "a") as f:
            f.write(json.dumps(invocation) + "\n")
    history = [json.loads(line) for line in history_file.read_text().splitlines()
               if line.strip()] if history_file.is_file() else [invocation]
    info = dict(what=preset.what, invocations=history)
    values = study.collect()
    summary = study.summarise(values)
    reports = write_reports(study, values, summary, info)
    if args.update_readme:
        update_readme(study.out)
    print(f"\n{reports['table']}\n\nThis invocation took {wall / 60:.1f} min ({runner.skipped} "
          f"of {len(jobs)} runs complete before). Results: {study.out / 'results.md'}, "
          f"results.json, figures/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
