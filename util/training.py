"""A run's plumbing, shared by main_pretrain.py, main_finetune.py and main_linprobe.py.

The start of a run (flags refused before any work, process group, seeds), the device type, mixed
precision (autocast, GradScaler), DDP wrapping, the TensorBoard writer, the checkpoint to resume from,
the optimizer step that skips non-finite losses without a host sync, the non-finite stop rule, the
epoch's running numbers (:class:`EpochMeter`), per-epoch seeding for exact resume, SIGTERM handling
and the JSON-lines log.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import signal
import sys
import time
import warnings

import numpy as np
import torch

from util import distributed as du
from util.fileio import check_writable


def device_type(args) -> str:
    """``cuda`` for ``cuda:1``, ``cpu`` for ``cpu``: what autocast and GradScaler take."""
    return torch.device(args.device).type


def amp_dtype(args):
    if args.amp == "none" or (args.amp == "auto" and device_type(args) != "cuda"):
        return None
    if args.amp == "fp16":
        return torch.float16
    if args.amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(args):
    """The autocast context of ``--amp`` (a disabled one for fp32)."""
    dtype = amp_dtype(args)
    return torch.autocast(device_type=device_type(args), dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(args):
    """A GradScaler for fp16 (whose range needs the loss scaled); None for bf16 and fp32."""
    return torch.amp.GradScaler(device_type(args)) if amp_dtype(args) == torch.float16 else None


def wrap_ddp(module, args, **options):
    """``module`` in DistributedDataParallel under torchrun, as it is otherwise."""
    if not args.distributed:
        return module
    device_ids = [args.local_rank] if device_type(args) == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **options)


def open_writer(args):
    """The TensorBoard writer of the main process (None on the others)."""
    if not du.is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=args.log_dir or args.output_dir)


def resume_path(args) -> str:
    """``--resume``, or with ``--auto_resume`` the output folder's checkpoint-last.pth if there is one; "" for none."""
    if args.resume:
        return args.resume
    last = os.path.join(args.output_dir, "checkpoint-last.pth")
    return last if args.auto_resume and os.path.isfile(last) else ""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# cuBLAS's workspace setting for deterministic results (CUDA >= 10.2), read when cuBLAS starts
DETERMINISTIC_CUBLAS_WORKSPACE = ":4096:8"


def use_deterministic_algorithms(enabled: bool) -> None:
    """``--deterministic``: only deterministic algorithms (torch raises for an operation that has none),
    cuDNN without benchmarking (which may pick another algorithm in each run). To be called before any
    CUDA work: the cuBLAS workspace setting is read when cuBLAS starts (a value the user set is kept)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled


def start_run(args, problems) -> None:
    """The start of every training script: refuse flags that cannot work (``problems``, before any work),
    set ``--deterministic``, join the process group, check the output folder and seed every generator
    (per rank)."""
    refuse_invalid_flags(problems)
    if args.deterministic:
        use_deterministic_algorithms(True)
    du.init_distributed(args)
    check_writable(args.output_dir)
    check_log_not_linked(args.output_dir)
    seed_everything(args.seed + du.get_rank())
    # fixed input shapes: let cuDNN pick the fastest convolutions (it may pick others in another run)
    torch.backends.cudnn.benchmark = device_type(args) == "cuda" and not args.deterministic


def schedule_problem(args) -> str | None:
    """What this run's epochs cannot do, known once a resume has set ``--start_epoch``: nothing left to
    train, or a warm-up that lasts the whole run (the lr rises linearly to ``--lr`` over
    ``--warmup_epochs``, so it never reaches ``--lr``, or only at the last step, and never decays)."""
    first, end, warmup = args.start_epoch, args.epochs, args.warmup_epochs
    if first >= end:
        return (f"epoch {first} is past the last epoch of --epochs {end}: nothing left to train (raise --epochs "
                "to train on)")
    if warmup < end:
        return None
    return (f"--warmup_epochs {warmup:g} is not shorter than the run (--epochs {end}): the learning rate rises "
            f"linearly through all of it, here from {first / warmup:.0%} to at most {end / warmup:.0%} of "
            f"{args.lr:.3e}, and never decays. The warm-up is kept as asked: pass e.g. --warmup_epochs "
            f"{end / 10:g} (a tenth of the run) to train at the full rate.")


def warn_on_schedule(args) -> None:
    """:func:`schedule_problem` as a warning, once (the main process)."""
    problem = schedule_problem(args)
    if problem and du.is_main_process():
        warnings.warn(problem, stacklevel=2)


def epoch_seed(args, epoch: int) -> int:
    """Seed of the data augmentation of one epoch on this rank: a resumed run draws the same crops."""
    return int(np.random.SeedSequence([args.seed, du.get_rank(), epoch]).generate_state(1)[0])


class StopTraining(RuntimeError):
    pass


def nonfinite_gradients(optimizer) -> torch.Tensor:
    """(1,) float tensor on the gradients' device: 1 if any gradient holds an inf or NaN.

    One fused kernel (the check GradScaler uses), no host sync. Checking the gradients rather than
    the local loss matters under DDP: a NaN on one rank reaches every rank's gradients through the
    all-reduce, so all ranks agree to skip the step.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    found = torch.zeros(1, device=device)
    if grads:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=device))
    return found


def accumulate_backward(model, loss, scaler, args, update: bool) -> None:
    """Backward of ``loss / accum_iter`` (scaled when a GradScaler is in use). Between updates DDP's
    gradient all-reduce is skipped (``no_sync``): the gradients only add up locally until the
    backward of the update step, which synchronises their sum once."""
    sync = model.no_sync() if (args.distributed and not update) else contextlib.nullcontext()
    loss = loss / args.accum_iter
    with sync:
        (scaler.scale(loss) if scaler is not None else loss).backward()


def skips_on_device(optimizer) -> bool:
    """Whether ``optimizer`` skips a step itself, on the device, when ``optimizer.found_inf`` is
    non-zero: torch's fused optimizers (GradScaler's protocol) and LARS."""
    return bool(optimizer.defaults.get("fused") or getattr(optimizer, "skips_found_inf", False))


def step_optimizer(optimizer, scaler, finite):
    """Apply the update unless the loss (``finite`` False) or a gradient was non-finite, without a
    host sync where the optimizer can skip on the device."""
    if scaler is not None:
        scaler.step(optimizer)  # GradScaler skips non-finite gradients itself
        scaler.update()
        return
    # a 0-d flag: the fused kernel subtracts it from the 0-d step counters when it skips
    found_inf = torch.maximum(nonfinite_gradients(optimizer).reshape(()), (~finite).float().reshape(()))
    if skips_on_device(optimizer):
        optimizer.found_inf = found_inf
        optimizer.step()
        optimizer.found_inf = None
    elif not bool(found_inf):  # other optimizers (torch's SGD without fused): a host check
        optimizer.step()


class NonFiniteGuard:
    """Stops a run whose loss stays non-finite: ``limit`` consecutive non-finite steps, counted
    across epochs, or an epoch without a single finite step.

    The count lives on the device and is read only at log intervals and at the end of each epoch
    (one host sync each), except on a single CPU process, where reading it is free and every step is
    checked. The longest run of non-finite steps so far is kept too, so a run that reached the limit
    between two checks still stops at the next one: the stop rule does not depend on where the log
    intervals fall. Under torchrun the ranks agree (a max over ranks) so that all stop together.
    """

    def __init__(self, limit: int, device, output_dir: str, distributed: bool = False):
        self.limit, self.output_dir, self.distributed = limit, output_dir, distributed
        self.consecutive = torch.zeros((), device=device)
        self.longest = torch.zeros((), device=device)
        self.check_every_step = torch.device(device).type == "cpu" and not distributed

    def step(self, finite: torch.Tensor) -> None:
        """Record one step (``finite``: 0-d bool tensor, the step's loss was finite)."""
        self.consecutive = (self.consecutive + 1) * (~finite).float()
        self.longest = torch.maximum(self.longest, self.consecutive)
        if self.check_every_step:
            self.check()

    def check(self) -> None:
        longest = self.longest.clone()
        if self.distributed:
            du.all_reduce_max(longest)
        bad = int(longest.item())
        if bad >= self.limit:
            raise StopTraining(f"the loss was non-finite for {bad} consecutive steps (--max_nonfinite "
                               f"{self.limit}); stopping. The checkpoints already in {self.output_dir} "
                               "are intact. Lower --blr, use --amp bf16 or --amp none, check --data_mean / "
                               "--data_std, or check the data for corrupt images.")

    def end_epoch(self, epoch: int, steps_run: int, finite_steps: float) -> None:
        """At the end of an epoch (``finite_steps`` summed over ranks): stop if nothing was learned."""
        self.check()
        if steps_run == 0:
            raise StopTraining(f"epoch {epoch} ran no training step: every batch was empty (unreadable "
                               "images?). Nothing was saved for it; check the data.")
        if finite_steps == 0:
            raise StopTraining(f"epoch {epoch}: the loss was non-finite in every one of its {steps_run} "
                               "steps, so nothing was learned; stopping without saving it. The "
                               f"checkpoints already in {self.output_dir} are intact. Check --data_mean / --data_std, "
                               "lower --blr, or use --amp bf16 or --amp none.")


def format_duration(seconds: float) -> str:
    """``1:02:03``, ``2 d 01:02:03`` beyond a day, ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days} d " if days else "") + f"{hours}:{minutes:02d}:{secs:02d}"


def eta_seconds(elapsed: float, steps_done: int, steps_left: int) -> float:
    """Time left at the mean time per step so far (nan before the first step)."""
    return elapsed / steps_done * steps_left if steps_done else float("nan")


class RunProgress:
    """The whole run's progress, for its ETA (not just the epoch's): the mean wall time per training step
    since the run's first step -- validation, checkpoints and figures of the epochs done included --
    times the steps left (this epoch's and ``steps_per_epoch`` for each later epoch up to ``end_epoch``).
    ``early_stop``: ``end_epoch`` is where early stopping ends the run unless the validation metric
    improves (the caller moves it on), not ``--epochs``."""

    def __init__(self, end_epoch: int, early_stop: bool = False):
        self.end_epoch, self.early_stop = end_epoch, early_stop
        self.epoch, self.steps_per_epoch, self.steps_done, self.start = 0, 0, 0, None

    def start_epoch(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps_per_epoch = epoch, steps
        if self.start is None:
            self.start = time.time()

    def eta(self, steps_left_in_epoch: int) -> float:
        later_epochs = max(self.end_epoch - self.epoch - 1, 0)
        elapsed = time.time() - self.start if self.start is not None else 0.0
        return eta_seconds(elapsed, self.steps_done, steps_left_in_epoch + later_epochs * self.steps_per_epoch)

    def describe_eta(self, steps_left_in_epoch: int) -> str:
        note = " (at the early stop, unless val improves)" if self.early_stop else ""
        return format_duration(self.eta(steps_left_in_epoch)) + note

    def epochs_to_go(self) -> int:
        """Epochs after the current one (to the early stop, with ``early_stop``)."""
        return max(self.end_epoch - self.epoch - 1, 0)


def progress_bar(total: int, description: str, unit: str = "step"):
    """A tqdm bar on the main process when the console is a terminal (None otherwise: logs redirected
    to a file get the lines of :class:`EpochMeter` only)."""
    if not (du.is_main_process() and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=description, unit=unit, leave=False, dynamic_ncols=True)


class EpochMeter:
    """The running numbers of one training epoch (after the MetricLogger of facebookresearch/mae's
    util/misc.py), without a host sync per step: the loss sum and the step counts stay on the device and
    are read at log intervals (``--print_freq``), where the non-finite guard is checked too, one human
    line is printed (with the epoch's and the run's ETA) and TensorBoard gets the running loss; and
    once at the end of the epoch, summed over the processes. On a terminal a progress bar counts the
    steps in between (a host-side counter: no sync)."""

    def __init__(self, epoch: int, steps: int, args, guard: NonFiniteGuard, writer=None,
                 run: RunProgress | None = None):
        self.epoch, self.steps, self.args, self.guard, self.writer = epoch, steps, args, guard, writer
        self.run = run or RunProgress(epoch + 1)
        self.run.start_epoch(epoch, steps)
        self.loss_sum = torch.zeros((), device=args.device)  # over the steps with a finite loss
        self.finite_steps = torch.zeros((), device=args.device)
        self.nonfinite_steps = torch.zeros((), device=args.device)
        self.images, self.skipped_files, self.steps_run = 0, 0, 0
        self.lr = 0.0
        self.start = time.time()
        self.bar = progress_bar(steps, f"epoch {epoch}")

    def skipped(self, files: int) -> None:
        """Unreadable files left out of a batch."""
        self.skipped_files += files

    def step(self, it: int, loss: torch.Tensor, finite: torch.Tensor, images: int) -> None:
        """Record step ``it`` (``loss``: detached 0-d tensor, ``finite``: 0-d bool tensor, both on the
        device) of ``images`` images; log at the interval and at the last step."""
        self.nonfinite_steps += (~finite).float()
        self.finite_steps += finite.float()
        self.loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
        self.images += images
        self.steps_run += 1
        self.run.steps_done += 1
        self.guard.step(finite)
        if self.bar is not None:
            self.bar.update(1)
        if (it + 1) % self.args.print_freq == 0 or it + 1 == self.steps:
            self.guard.check()
            log_progress(self.epoch, it, self)

    def finish(self, interrupted: bool = False) -> dict:
        """The epoch's numbers over every process (one collective); stops the run if nothing was learned."""
        if self.bar is not None:
            self.bar.close()
        device = self.loss_sum.device
        totals = torch.stack([self.loss_sum, self.finite_steps, self.nonfinite_steps,
                              torch.tensor(float(self.images), device=device),
                              torch.tensor(float(self.skipped_files), device=device)])
        du.all_reduce_sum(totals)
        loss_total, good_steps, bad_steps, images_total, skipped_total = totals.tolist()
        self.guard.end_epoch(self.epoch, self.steps_run, good_steps)
        elapsed = time.time() - self.start
        return {"loss": loss_total / max(good_steps, 1), "lr": self.lr, "nonfinite_steps": int(bad_steps),
                "skipped_files": int(skipped_total), "images_per_sec": images_total / max(elapsed, 1e-9),
                "interrupted": interrupted}


def log_progress(epoch: int, it: int, meter: EpochMeter) -> None:
    """The log interval after step ``it`` of ``epoch``: one console line (one host sync: the running
    mean loss) with the epoch's and the run's ETA, the bar's loss, TensorBoard's running loss and lr.
    A module-level function: the one place where every log interval passes, for hooks."""
    elapsed = time.time() - meter.start
    mean_loss = (meter.loss_sum / meter.finite_steps.clamp_min(1)).item()
    left = meter.steps - it - 1
    line = (f"epoch {epoch} [{it + 1}/{meter.steps}] loss {mean_loss:.4f} lr {meter.lr:.3e} "
            f"{meter.images / max(elapsed, 1e-9):.1f} img/s, eta epoch "
            f"{format_duration(eta_seconds(elapsed, it + 1, left))}, run {meter.run.describe_eta(left)}")
    if meter.bar is not None:
        meter.bar.write(line)
        meter.bar.set_postfix(loss=f"{mean_loss:.4f}", run_eta=meter.run.describe_eta(left), refresh=False)
    else:
        print(line, flush=True)
    if meter.writer is not None:
        step = int((epoch + (it + 1) / meter.steps) * 1000)
        meter.writer.add_scalar("train_loss", mean_loss, step)
        meter.writer.add_scalar("lr", meter.lr, step)


def epoch_summary(log: dict, keys, run: RunProgress) -> str:
    """The console's line for a finished epoch (log.txt gets the whole record as JSON): ``keys`` of
    ``log`` that it has, numbers with 4 significant digits, and the run's ETA."""
    parts = [f"{key} {log[key]:.4g}" if isinstance(log[key], float) else f"{key} {log[key]}"
             for key in keys if key in log]
    to_go = run.epochs_to_go()
    return (f"epoch {log['epoch']} done: {', '.join(parts)}; run eta {run.describe_eta(0)}, "
            f"{to_go} epoch{'' if to_go == 1 else 's'} to go")


# Largest --blur_sigma accepted. OpenCV derives the Gaussian kernel from sigma (side about 6 sigma + 1
# for 8-bit images, 8 sigma + 1 otherwise: 9 x 9 at the published 1.1). At 25 the kernel is 151 (201)
# pixels wide and a 512 x 512 image takes 0.04 s (8-bit) to 0.07 s (16-bit) per blur on one core; at
# 100 it is about 1 s, and at 1000 about 20 s, which no training run can afford per image. A sigma of 25 already wipes out
# everything but the coarsest structure of an ultrasound image.
MAX_BLUR_SIGMA = 25.0


def invalid_training_flags(args) -> list[str]:
    """One message per flag (shared by both training scripts) whose value cannot train anything."""
    problems = []
    for flag, low in (("epochs", 1), ("batch_size", 1), ("accum_iter", 1), ("max_nonfinite", 1),
                      ("print_freq", 1), ("num_workers", 0), ("start_epoch", 0)):
        value = getattr(args, flag)
        if value < low:
            problems.append(f"--{flag} {value}: must be at least {low}")
    for flag in ("warmup_epochs", "min_lr", "weight_decay"):
        value = getattr(args, flag)
        if not (_finite(value) and value >= 0):
            problems.append(f"--{flag} {value}: must be a number >= 0")
    if args.lr is not None and not (_finite(args.lr) and args.lr > 0):
        problems.append(f"--lr {args.lr}: must be > 0 (a zero learning rate learns nothing)")
    if args.lr is None and not (_finite(args.blr) and args.blr > 0):
        problems.append(f"--blr {args.blr}: must be > 0 (a zero learning rate learns nothing)")
    if args.data_std is not None and not all(_finite(s) and s > 0 for s in args.data_std):
        problems.append(f"--data_std {' '.join(map(str, args.data_std))}: every value must be > 0 (the "
                        "pixels are divided by it; 0 makes every loss non-finite)")
    if args.data_mean is not None and not all(_finite(m) for m in args.data_mean):
        problems.append(f"--data_mean {' '.join(map(str, args.data_mean))}: every value must be a finite number")
    problems += invalid_blur_flags(args)
    return problems


def invalid_blur_flags(args) -> list[str]:
    """``--blur*`` settings the blur itself refuses, and a Gaussian too wide to finish."""
    from util.blur import blur_spec_from_args

    try:
        spec = blur_spec_from_args(args, prefix="blur_")
    except ValueError as err:
        return [f"--blur {args.blur_method}: {err}"]
    if spec is not None and spec.method == "gaussian" and not spec.sigma <= MAX_BLUR_SIGMA:
        return [f"--blur_sigma {spec.sigma}: at most {MAX_BLUR_SIGMA:g} (the kernel grows with sigma: about "
                f"{int(6 * spec.sigma) + 1} pixels wide here, far too slow to apply to every image; "
                "ultrasound blurs of interest are a few pixels, published 1.1)"]
    return []


def refuse_invalid_flags(problems) -> None:
    """End the run before any work, with every invalid flag on its own line."""
    if problems:
        raise SystemExit("error: invalid settings, nothing was run:\n  " + "\n  ".join(problems))


def _finite(value) -> bool:
    return math.isfinite(value)


def install_sigterm_handler(stop_flag):
    """Schedulers send SIGTERM before pre-empting: finish the step, save, exit cleanly."""
    def handler(signum, frame):
        stop_flag["stop"] = True
    signal.signal(signal.SIGTERM, handler)


LOG_FILE = "log.txt"
# The fields of log.txt that measure time, not the run: the only ones that differ between two runs of
# the same command on CPU (same --seed and thread count; tests/test_reproducibility.py, README).
TIMING_FIELDS = ("train_images_per_sec",)


def _linked_log(path: str) -> str:
    return (f"error: {path} is a symbolic link (to {os.readlink(path)}): refusing to write the training log "
            "through it, out of the output folder. Remove the link (or pass another --output_dir), then re-run "
            "the same command with --auto_resume.")


def check_log_not_linked(out_dir) -> None:
    """At start-up: the log is appended to, which would follow a link out of the output folder
    (checkpoints replace a link instead). Fail before any work rather than after the first epoch."""
    path = os.path.join(out_dir, LOG_FILE)
    if os.path.islink(path):
        raise SystemExit(_linked_log(path))


def append_log(out_dir, log, writer, epoch):
    """One JSON line in log.txt (not followed through a link) and the record's numbers in TensorBoard;
    nothing on the console (the scripts print a human line)."""
    path = os.path.join(out_dir, LOG_FILE)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)  # O_NOFOLLOW: a link made after start-up is not followed either
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SystemExit(_linked_log(path)) from None
        raise
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(log) + "\n")
    if writer is not None:
        for key, value in log.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"epoch/{key}", value, epoch)


def plain_args(args) -> dict:
    """Settings recorded in checkpoints (plain types only: loadable with weights_only=True)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def own_message(err: Exception) -> str:
    """The message an error was raised with, also when a DataLoader worker raised it: torch re-raises
    it in the training process as ``Caught DatasetError in DataLoader worker process 0. Original
    Traceback ...``, the worker's whole traceback in place of the message."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        text = text.rsplit(f"{type(err).__name__}: ", 1)[-1]  # the traceback's last entry: the message
    return text.strip()


def run_cli(main, parser, argv=None) -> None:
    """Parse the command line and run ``main``; the failures a user can cause end in one message.

    Bad data, unusable checkpoints and a damaged or unwritable decoded cache raise DatasetError /
    CheckpointError / CacheError, whose messages name the file and the fix. A dead or hung rank
    surfaces on the survivors as an error from deep inside a collective: that too becomes one
    message instead of a traceback from the autograd engine.
    """
    from util.checkpoint import CheckpointError
    from util.datasets import DatasetError
    from util.decoded_cache import CacheError

    args = parser.parse_args(argv)
    try:
        main(args)
    except (DatasetError, CheckpointError, CacheError) as err:
        raise SystemExit(f"error: {own_message(err)}")
    except Exception as err:
        if not (getattr(args, "distributed", False) and du.is_collective_failure(err)):
            raise
        raise SystemExit(du.collective_failure_message(err, args)) from None
