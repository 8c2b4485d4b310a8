"""The method end to end with the repository's own scripts: the jobs, and a runner for them.

Shared by tools/demo.py (`make demo`: one seed, a table and figures) and tools/study.py (several
seeds and arms, with statistics). Every step is one of the repository's scripts run as a
subprocess, with its log in ``logs/<job>.log``:

  tools/synthetic_us.py   synthetic B-mode images, labels, masks
  blurred_images.py       the blurred copies (deblurring arms)
  main_pretrain.py        MAE / Deblurring MAE / ConvMAE / Deblurring ConvMAE pretraining
  main_finetune.py        classification fine-tuning and test
  main_linprobe.py        linear probe and k-NN of the frozen encoder
  SEG/tools/train.py, test.py   UPerNet segmentation

:class:`Runner` runs jobs side by side within a number of CPU threads, in the order their
dependencies allow, skips those whose results are already there (so an interrupted run continues
where it stopped), prints a line per finished job and, while jobs run, a status line per job with
its time so far and its latest progress line.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
SEG_DIR = REPO / "SEG"
PYTHON = sys.executable
if str(REPO) not in sys.path:  # run as a script: util/ lives beside tools/
    sys.path.insert(0, str(REPO))

from util.blur import BlurSpec  # noqa: E402
from util.fileio import atomic_write_text  # noqa: E402

SEG_CONFIGS = {True: SEG_DIR / "configs/demo/upernet_de_mae_vit_tiny_synthetic_128.py",
               False: SEG_DIR / "configs/demo/upernet_mae_vit_tiny_synthetic_128.py"}
SEG_IMAGE_SIZE = 128  # the SEG demo configs are written for 128x128 crops
PUBLISHED_BLUR = BlurSpec("gaussian", sigma=1.1)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class PipelineError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ runner
@dataclass
class Job:
    """One step. ``cmd`` (a list, or a function that returns it when the job starts, for
    arguments that earlier jobs produce) runs as a subprocess logged to logs/<name>.log; ``call``
    runs a few lines of Python in this process instead. ``after``: names of jobs to wait for.
    ``done``: True when the job's results are already there (the job is then skipped).
    ``finish(log_text)``: called after a successful run, e.g. to record results from the log."""
    name: str
    title: str
    cmd: list | Callable[[], list] | None = None
    cwd: Path = REPO
    call: Callable[[], object] | None = None
    after: Sequence[str] = ()
    done: Callable[[], bool] | None = None
    finish: Callable[[str], None] | None = None


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    start: float
    log: object


@dataclass
class Runner:
    """Runs jobs ``parallel`` at a time, each subprocess limited to ``threads`` CPU threads
    (None: the libraries' defaults), and stops everything at the first failure.

    ``total``: how many jobs the numbering counts (default: those of each ``run`` call).
    ``status_every``: seconds between status lines while jobs run (0: none).
    """
    logs: Path
    total: int | None = None
    parallel: int = 1
    threads: int | None = None
    status_every: float = 30.0
    out: object = None
    done_count: int = 0
    skipped: int = 0
    timings: list = field(default_factory=list)

    def __post_init__(self):
        self.parallel = max(1, self.parallel)
        self.out = self.out or sys.stdout
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.threads:
            self.env.update({name: str(self.threads) for name in THREAD_VARIABLES})
        self.logs = Path(self.logs)
        self.logs.mkdir(parents=True, exist_ok=True)

    def run(self, *jobs: Job) -> dict[str, str]:
        """Run ``jobs`` in an order their ``after`` allows; return each one's log text by name
        (jobs skipped as done: the log of the run that completed them, if any)."""
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"job names repeat: {names}")
        unknown = {dep for job in jobs for dep in job.after} - set(names)
        if unknown:
            raise ValueError(f"jobs wait for unknown jobs {sorted(unknown)}")
        total = self.total if self.total is not None else len(jobs)
        pending, running, finished, outputs = list(jobs), [], set(), {}
        last_status = time.perf_counter()
        try:
            while pending or running:
                for job in [j for j in pending if set(j.after) <= finished]:
                    if len(running) >= self.parallel and not self._is_done(job):
                        break
                    pending.remove(job)
                    if self._is_done(job):
                        outputs[job.name] = self._log_text(job)
                        finished.add(job.name)
                        self.skipped += 1
                        self._report(total, job.title, None)
                    elif job.call is not None:
                        start = time.perf_counter()
                        outputs[job.name] = str(job.call())
                        finished.add(job.name)
                        self._report(total, job.title, time.perf_counter() - start)
                    else:
                        running.append(self._start(job))
                if not running:
                    if pending and not any(set(j.after) <= finished for j in pending):
                        raise PipelineError("jobs wait for each other: "
                                            + ", ".join(j.name for j in pending))
                    continue
                time.sleep(0.2)
                for entry in [e for e in running if e.proc.poll() is not None]:
                    running.remove(entry)
                    outputs[entry.job.name] = self._finish(entry, total)
                    finished.add(entry.job.name)
                if self.status_every and running and \
                        time.perf_counter() - last_status >= self.status_every:
                    self._status(running)
                    last_status = time.perf_counter()
        finally:
            for entry in running:  # only after a failure or an interrupt
                entry.proc.kill()
                entry.proc.wait()
                entry.log.close()
        return outputs

    @staticmethod
    def _is_done(job: Job) -> bool:
        return job.done is not None and bool(job.done())

    def _log_path(self, job: Job) -> Path:
        return self.logs / f"{job.name}.log"

    def _log_text(self, job: Job) -> str:
        path = self._log_path(job)
        return path.read_text(errors="replace") if path.is_file() else ""

    def _start(self, job: Job) -> _Running:
        cmd = [str(c) for c in (job.cmd() if callable(job.cmd) else job.cmd)]
        log = open(self._log_path(job), "w")
        log.write("$ " + " ".join(cmd) + f"\n(in {job.cwd})\n\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=job.cwd, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT)
        return _Running(job, proc, time.perf_counter(), log)

    def _finish(self, entry: _Running, total: int) -> str:
        entry.log.close()
        output = self._log_text(entry.job)
        if entry.proc.returncode != 0:
            raise PipelineError(
                f"'{entry.job.title}' failed (exit status {entry.proc.returncode}); the end of its "
                f"log {self._log_path(entry.job)}:\n{output[-4000:]}")
        if entry.job.finish is not None:
            entry.job.finish(output)
        self._report(total, entry.job.title, time.perf_counter() - entry.start)
        return output

    def _report(self, total: int, title: str, seconds: float | None) -> None:
        self.done_count += 1
        width = len(str(total))
        what = "already done, skipped" if seconds is None else f"{seconds:.0f} s"
        print(f"[{self.done_count:{width}d}/{total}] {title}: {what}", file=self.out, flush=True)
        if seconds is not None:
            self.timings.append((title, seconds))

    def _status(self, running: list) -> None:
        now = time.perf_counter()
        for entry in running:
            line = latest_progress_line(self._log_path(entry.job))
            print(f"      ... {entry.job.title}: {now - entry.start:.0f} s"
                  + (f" | {line}" if line else ""), file=self.out, flush=True)


def latest_progress_line(log: Path, width: int = 100) -> str:
    """The last non-empty line a job printed (progress bars redraw with carriage returns: the
    latest state counts), JSON records left out, cut to ``width`` characters."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    tail = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", tail)  # terminal colour and cursor codes
    for line in reversed(re.split(r"[\r\n]", tail)):
        line = _MMENGINE_PREFIX.sub("", " ".join(line.split()))
        if line and not line.startswith(("{", "$ ", "(in ")):  # JSON records, the log's header
            return line if len(line) <= width else line[:width - 3] + "..."
    return ""


_MMENGINE_PREFIX = re.compile(r"^\d\d/\d\d \d\d:\d\d:\d\d - mmengine - [A-Z]+ - ")


# --------------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class Recipe:
    """How much data and training, and the few settings a short CPU run needs."""
    num_pretrain: int
    num_labelled: int
    pretrain_epochs: int
    finetune_epochs: int
    seg_iters: int
    n_boot: int
    batch_size: int  # pretraining, classification and linear probing
    image_size: int = SEG_IMAGE_SIZE
    linprobe_epochs: int = 0  # 0: no linear probe
    knn_k: int = 0  # 0: no k-NN evaluation
    # a tiny model and a short schedule: higher base learning rates than the published ones
    pretrain_blr: float = 4e-3
    finetune_blr: float = 1e-2
    linprobe_blr: float = 0.1


@dataclass(frozen=True)
class Arm:
    """A starting point: how the encoder is pretrained (``pretrain_model`` None: random
    initialisation) and which images it sees (``blur``: blurred pretraining input with the sharp
    image as target, and blurred downstream images, as published; None: sharp images)."""
    key: str
    method: str
    pretrain_model: str | None
    finetune_model: str
    blur: BlurSpec | None = None

    @property
    def segmentation(self) -> bool:
        """The SEG demo configs hold ViT encoders (a ConvViT one would need its own config)."""
        return self.finetune_model.startswith("vit_")


def blur_tag(spec: BlurSpec) -> str:
    """Folder-name form of a blur, e.g. gaussian_1.1, median_5."""
    detail = {"gaussian": f"{spec.sigma:g}", "srad": f"{spec.srad_iterations}_{spec.srad_time_step:g}",
              "motion": f"{spec.kernel_size}_seed{spec.seed}"}.get(spec.method, str(spec.kernel_size))
    return f"{spec.method}_{detail}"


def blur_options(spec: BlurSpec, prefix: str = "") -> list[str]:
    """Command-line options for ``spec``: blurred_images.py's (``prefix`` "") or the training and
    visualisation scripts' (``prefix`` "blur_": --blur METHOD --blur_sigma ...)."""
    method_flag = "--blur" if prefix else "--method"
    opts = [method_flag, spec.method]
    if spec.method == "gaussian":
        opts += [f"--{prefix}sigma", f"{spec.sigma:g}"]
    elif spec.method == "srad":
        opts += [f"--{prefix}srad_iterations", str(spec.srad_iterations),
                 f"--{prefix}srad_time_step", f"{spec.srad_time_step:g}"]
    else:
        opts += [f"--{prefix}kernel_size", str(spec.kernel_size)]
        if spec.method == "motion":
            opts += [f"--{prefix}seed", str(spec.seed)]
    return opts


class Layout:
    """Where every step of one seed reads and writes under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"  # synthetic_us.py output: pretrain/, cls/, seg/
        self.seg_data = self.data / "seg"  # images/, images_<blur>/ (blurred), masks/
        self.cls_data = root / "data_cls"  # nodule-centred crops of data/cls (see crop_nodules)
        self.pretrain = root / "pretrain"
        self.classification = root / "classification"
        self.linprobe = root / "linprobe"
        self.knn = root / "knn"
        self.segmentation = root / "segmentation"
        self.figures = root / "figures"
        self.logs = root / "logs"
        self.markers = root / ".complete"  # done markers of steps without a results file

    def blurred(self, spec: BlurSpec) -> Path:
        """Blurred copies of the pretraining and classification images: pretrain/, cls/."""
        return self.root / "data_blurred" / blur_tag(spec)

    def seg_images(self, spec: BlurSpec | None) -> str:
        """Folder of the segmentation images beside masks/ (images_gaussian for the published
        blur, as SEG/README.md describes for TN3K)."""
        if spec is None:
            return "images"
        return "images_gaussian" if spec == PUBLISHED_BLUR else f"images_{blur_tag(spec)}"

    def owned_folders(self):
        return (self.data, self.cls_data, self.root / "data_blurred", self.pretrain,
                self.classification, self.linprobe, self.knn, self.segmentation, self.figures,
                self.logs, self.markers)

    def pretrain_checkpoint(self, arm: Arm, recipe: Recipe) -> Path | None:
        if arm.pretrain_model is None:
            return None
        return self.pretrain / arm.key / f"checkpoint-{recipe.pretrain_epochs - 1}.pth"


def file_exists(path: Path) -> Callable[[], bool]:
    return lambda: Path(path).is_file()


def has_test_results(run_dir: Path) -> Callable[[], bool]:
    """A classification run is complete once its results.json holds the test split (written
    last, after training and the validation results)."""
    def check() -> bool:
        try:
            return "test" in json.loads((Path(run_dir) / "results.json").read_text())
        except (OSError, ValueError):
            return False
    return check


def write_text(path: Path, text: str = "complete") -> None:
    """Atomically, creating the folder: a done marker or a small results file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, f"{text}\n")


def stamp(path: Path, what: Callable[[], object]) -> Callable[[], str]:
    """A data-preparation step that leaves ``path`` behind once complete (its done marker)."""
    def run() -> str:
        result = what()
        write_text(path, str(result))
        return str(result)
    return run


# ----------------------------------------------------------------------------------- data
def data_jobs(lay: Layout, recipe: Recipe, seed: int, blurs: Sequence[BlurSpec],
              workers: int = 1, prefix: str = "") -> list[Job]:
    """Synthetic data, nodule-centred crops and one blurred copy per blur. Job names start with
    ``prefix``; the returned jobs wait for each other as needed."""
    jobs = [Job(f"{prefix}synthetic_us", f"synthetic data: {recipe.num_pretrain} "
                f"unlabelled + {recipe.num_labelled} labelled images",
                [PYTHON, "tools/synthetic_us.py", "--out", lay.data, "--num_pretrain",
                 recipe.num_pretrain, "--num_labelled", recipe.num_labelled, "--size",
                 recipe.image_size, "--seed", seed, "--workers", workers, "--quiet"],
                done=file_exists(lay.data / "features.jsonl")),
            Job(f"{prefix}crop_nodules", "nodule-centred classification images",
                call=stamp(lay.markers / "crop_nodules",
                           lambda: crop_nodules(lay.data / "cls", lay.seg_data / "masks",
                                                lay.cls_data)),
                after=[f"{prefix}synthetic_us"], done=file_exists(lay.markers / "crop_nodules"))]
    for spec in blurs:
        tag = blur_tag(spec)
        for what, src, dst, after in (
                ("pretraining", lay.data / "pretrain", lay.blurred(spec) / "pretrain",
                 "synthetic_us"),
                ("classification", lay.cls_data, lay.blurred(spec) / "cls", "crop_nodules"),
                ("segmentation", lay.seg_data / "images", lay.seg_data / lay.seg_images(spec),
                 "synthetic_us")):
            name = f"{prefix}blur_{tag}_{what}"
            # blurred_images.py skips the files it already wrote, so a re-run is cheap; the
            # marker tells a complete copy from an interrupted one
            marker = lay.markers / f"blur_{tag}_{what}"
            jobs.append(Job(name, f"blurred copy ({spec.describe()}) for {what}",
                            [PYTHON, "blurred_images.py", *blur_options(spec), "--src_dir", src,
                             "--dst_dir", dst, "--workers", workers],
                            after=[prefix + after], done=file_exists(marker),
                            finish=lambda _log, m=marker: write_text(m)))
    return jobs


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
            raise PipelineError(f"no nodule mask for {image_path} in {masks_root / split}")
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
def pretrain_job(lay: Layout, arm: Arm, recipe: Recipe, seed: int, workers: int,
                 prefix: str = "", after: Sequence[str] = ()) -> Job:
    epochs = recipe.pretrain_epochs
    # the deblurring model sees the blurred copy and reconstructs the sharp original; the vanilla
    # one reads the originals as its input and target (the published convention)
    data = (["--data_path_blurred", lay.blurred(arm.blur) / "pretrain", "--data_path_orig",
             lay.data / "pretrain"] if arm.blur else
            ["--data_path_blurred", lay.data / "pretrain"])
    checkpoint = lay.pretrain_checkpoint(arm, recipe)
    return Job(f"{prefix}pretrain_{arm.key}", f"pretraining {arm.method} "
               f"({arm.pretrain_model}, {epochs} epochs)",
               [PYTHON, "main_pretrain.py", "--model", arm.pretrain_model, "--output_dir",
                checkpoint.parent, *data, "--input_size", recipe.image_size, "--batch_size",
                recipe.batch_size, "--epochs", epochs, "--blr", recipe.pretrain_blr,
                "--warmup_epochs", max(1, epochs // 10), "--save_freq", epochs,
                "--eval_freq", epochs, "--num_workers", workers, "--seed", seed, "--auto_resume"],
               after=after, done=file_exists(checkpoint))


def reconstruction_job(lay: Layout, arm: Arm, recipe: Recipe, out: Path,
                       after: Sequence[str] = ()) -> Job:
    """Rows: 4 validation images; columns: (blurred) input, visible patches, reconstruction,
    (sharp) target."""
    def cmd():
        images = sorted((lay.data / "pretrain" / "val").rglob("*.png"))[:4]
        return [PYTHON, "tools/visualize_reconstruction.py", lay.pretrain_checkpoint(arm, recipe),
                *images, "--out", out, *(blur_options(arm.blur, "blur_") if arm.blur else [])]
    return Job("reconstruction", f"reconstruction figure of the {arm.method}", cmd, after=after)


def _classifier_data(lay: Layout, arm: Arm) -> Path:
    return lay.blurred(arm.blur) / "cls" if arm.blur else lay.cls_data


def finetune_job(lay: Layout, arm: Arm, recipe: Recipe, seed: int, workers: int,
                 prefix: str = "", after: Sequence[str] = ()) -> Job:
    """Classification fine-tuning; main_finetune.py then tests the best model."""
    epochs = recipe.finetune_epochs
    checkpoint = lay.pretrain_checkpoint(arm, recipe)
    start = ["--finetune", checkpoint] if checkpoint else []
    out = lay.classification / arm.key
    return Job(f"{prefix}finetune_{arm.key}", f"classification fine-tuning, "
               f"{arm.method} ({epochs} epochs)",
               [PYTHON, "main_finetune.py", "--model", arm.finetune_model, *start, "--data_path",
                _classifier_data(lay, arm), "--output_dir", out, "--input_size",
                recipe.image_size, "--batch_size", recipe.batch_size, "--epochs", epochs,
                "--warmup_epochs", max(1, epochs // 10), "--blr", recipe.finetune_blr,
                # the published regularisation (RandAugment, random erasing, label smoothing,
                # drop path) is made for hundreds of epochs; over 30 it keeps a tiny model at chance
                "--aa", "none", "--reprob", "0", "--smoothing", "0", "--drop_path", "0",
                "--n_boot", recipe.n_boot, "--num_workers", workers, "--seed", seed,
                "--auto_resume"],
               after=after, done=has_test_results(out))


def linprobe_job(lay: Layout, arm: Arm, recipe: Recipe, seed: int, workers: int,
                 prefix: str = "", after: Sequence[str] = ()) -> Job:
    """Linear probe of the frozen encoder on features computed once (the small-data recipe of
    main_linprobe.py: --cache_features --optimizer sgd)."""
    epochs = recipe.linprobe_epochs
    checkpoint = lay.pretrain_checkpoint(arm, recipe)
    out = lay.linprobe / arm.key
    return Job(f"{prefix}linprobe_{arm.key}", f"linear probe, {arm.method} "
               f"({epochs} epochs)",
               [PYTHON, "main_linprobe.py", "--model", arm.finetune_model,
                *(["--finetune", checkpoint] if checkpoint else []), "--data_path",
                _classifier_data(lay, arm), "--output_dir", out, "--input_size",
                recipe.image_size, "--cache_features", "--optimizer", "sgd", "--batch_size",
                recipe.batch_size, "--epochs", epochs, "--warmup_epochs", max(1, epochs // 10),
                "--blr", recipe.linprobe_blr, "--n_boot", recipe.n_boot, "--num_workers", workers,
                "--seed", seed, "--auto_resume"],
               after=after, done=has_test_results(out))


def knn_job(lay: Layout, arm: Arm, recipe: Recipe, seed: int, workers: int,
            prefix: str = "", after: Sequence[str] = ()) -> Job:
    checkpoint = lay.pretrain_checkpoint(arm, recipe)
    out = lay.knn / arm.key
    return Job(f"{prefix}knn_{arm.key}", f"k-NN (k={recipe.knn_k}), {arm.method}",
               [PYTHON, "main_linprobe.py", "--knn", "--knn_k", recipe.knn_k, "--model",
                arm.finetune_model, *(["--finetune", checkpoint] if checkpoint else []),
                "--data_path", _classifier_data(lay, arm), "--output_dir", out, "--input_size",
                recipe.image_size, "--batch_size", recipe.batch_size, "--n_boot", recipe.n_boot,
                "--num_workers", workers, "--seed", seed],
               after=after, done=has_test_results(out))


def seg_schedule(iters: int) -> list[str]:
    """--cfg-options that set the demo config's schedule to ``iters`` iterations (one validation
    at the end, which also saves the best-mDice checkpoint)."""
    warmup = min(20, max(1, iters // 2))
    return [f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}",
            f"default_hooks.checkpoint.interval={iters}", f"param_scheduler.0.end={warmup}",
            f"param_scheduler.1.begin={warmup}", f"param_scheduler.1.end={iters}"]


# ViT encoders other than the demo configs' tiny one: the options that size the UPerNet around
# them (block outputs 3/5/7/11 of a 12-block encoder, as mmseg's MAE configs take them)
SEG_BACKBONES = {
    "vit_tiny_patch16": [],
    "vit_base_patch16": ["model.backbone.arch=base_patch16", "model.backbone.out_indices=[3,5,7,11]",
                         "model.neck.embed_dim=768", "model.decode_head.in_channels=[768,768,768,768]",
                         "model.decode_head.channels=256", "model.auxiliary_head.in_channels=768",
                         "model.auxiliary_head.channels=128",
                         "optim_wrapper.paramwise_cfg.num_layers=12"],
}


def seg_data_options(lay: Layout, arm: Arm) -> list[str]:
    options = [f"data_root={lay.seg_data}"]
    folder = lay.seg_images(arm.blur)
    if folder not in ("images", "images_gaussian"):  # the configs' own folders
        options += [f"{split}_dataloader.dataset.data_prefix.img_path={folder}/{split}"
                    for split in ("train", "val", "test")]
    return options


def seg_train_job(lay: Layout, arm: Arm, recipe: Recipe, seed: int, prefix: str = "",
                  after: Sequence[str] = ()) -> Job:
    if arm.finetune_model not in SEG_BACKBONES:
        raise PipelineError(f"no segmentation setting for {arm.finetune_model} (one of "
                            f"{', '.join(SEG_BACKBONES)})")
    checkpoint = lay.pretrain_checkpoint(arm, recipe)
    work_dir = lay.segmentation / arm.key
    return Job(f"{prefix}seg_train_{arm.key}", f"segmentation fine-tuning, {arm.method} "
               f"({recipe.seg_iters} iterations)",
               [PYTHON, "tools/train.py", SEG_CONFIGS[arm.blur is not None], "--work-dir",
                work_dir, "--launcher", "none", "--resume", "--cfg-options",
                *seg_data_options(lay, arm), f"model.pretrained={checkpoint or None}",
                f"randomness.seed={seed}", *SEG_BACKBONES[arm.finetune_model],
                *seg_schedule(recipe.seg_iters)],
               cwd=SEG_DIR, after=after, done=lambda: bool(best_seg_checkpoints(work_dir)))


def best_seg_checkpoints(work_dir: Path) -> list[Path]:
    return sorted(Path(work_dir).glob("best_mDice_iter_*.pth"))


def seg_result_path(lay: Layout, arm: Arm) -> Path:
    return lay.segmentation / arm.key / "test" / "nodule_metrics.json"


def seg_test_job(lay: Layout, arm: Arm, prefix: str = "", after: Sequence[str] = ()) -> Job:
    """Test split with the best-by-val checkpoint; outlines of every test image. The nodule row
    of the printed table is kept in test/nodule_metrics.json (the job's results file)."""
    work_dir = lay.segmentation / arm.key

    def cmd():
        best = best_seg_checkpoints(work_dir)
        if not best:
            raise PipelineError(f"SEG/tools/train.py wrote no best_mDice_iter_*.pth in {work_dir}")
        return [PYTHON, "tools/test.py", SEG_CONFIGS[arm.blur is not None], best[-1],
                "--work-dir", work_dir / "test", "--launcher", "none", "--show-dir",
                work_dir / "overlays", "--cfg-options", *seg_data_options(lay, arm),
                *SEG_BACKBONES[arm.finetune_model]]

    def record(log_text: str) -> None:
        iou, dice = nodule_row(log_text)
        write_text(seg_result_path(lay, arm), json.dumps(dict(iou=iou, dice=dice)))

    return Job(f"{prefix}seg_test_{arm.key}", f"segmentation test, {arm.method}", cmd,
               cwd=SEG_DIR, after=after, done=file_exists(seg_result_path(lay, arm)),
               finish=record)


# -------------------------------------------------------------------------------- results
def nodule_row(test_output: str) -> tuple[float, float]:
    """Nodule IoU and Dice (%) of the per-class table that SEG/tools/test.py prints (pixels pooled
    over the test split, the published table's convention)."""
    match = re.search(r"^\|\s*nodule\s*\|\s*([\d.]+|nan)\s*\|\s*([\d.]+|nan)\s*\|"
                      r"\s*([\d.]+|nan)\s*\|", test_output, flags=re.M)
    if match is None:
        raise PipelineError("no 'nodule' row in the output of SEG/tools/test.py")
    return float(match.group(1)), float(match.group(3))


def segmentation_result(lay: Layout, arm: Arm) -> dict:
    path = seg_result_path(lay, arm)
    if not path.is_file():
        raise PipelineError(f"no segmentation test result {path}")
    result = json.loads(path.read_text())
    per_image = lay.segmentation / arm.key / "test" / "per_image_metrics.json"
    if per_image.is_file():
        result["per_image_mean_dice"] = json.loads(per_image.read_text())["summary"]["dice"]
    return result


def classification_result(run_dir: Path) -> dict:
    """Test-split n, AUROC and accuracy (value and 95 % bootstrap CI) of a main_finetune.py or
    main_linprobe.py run."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise PipelineError(f"no results file {path}")
    test = json.loads(path.read_text())["test"]
    pick = ("value", "ci_low", "ci_high")
    return dict(n=test["n"], **{name: {k: test["metrics"][name][k] for k in pick}
                                for name in ("auroc", "accuracy")})


def with_ci(metric: dict) -> str:
    """0.812 [0.651, 0.938] from a results.json metric (value and bootstrap CI)."""
    if metric["value"] is None:
        return "n/a"
    if metric.get("ci_low") is None:
        return f"{metric['value']:.3f}"
    return f"{metric['value']:.3f} [{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"


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


def replace_between(text: str, markers: tuple, block: str, source: str = "README.md") -> str:
    """``text`` with what lies between the two marker lines replaced by ``block``."""
    begin, end = markers
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise PipelineError(f"{source} needs exactly one '{begin}' line followed by one '{end}' "
                            "line around the generated block")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{block}\n{end}{tail}"


def table_between(text: str, markers: tuple) -> str:
    """The table lines (those starting with '|') between the two marker lines."""
    begin, end = markers
    if begin not in text or end not in text:
        return ""
    block = text.split(begin)[1].split(end)[0]
    return "\n".join(line for line in block.splitlines() if line.startswith("|"))


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
