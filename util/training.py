"""Training-loop helpers shared by main_pretrain.py and main_finetune.py.

Mixed-precision choice, the optimizer step that skips non-finite losses without a host sync, the
non-finite stop rule, per-epoch seeding for exact resume, SIGTERM handling and the JSON-lines log.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import time

import numpy as np
import torch

from util import distributed as du


def amp_dtype(args):
    device = str(args.device)
    if args.amp == "none" or (args.amp == "auto" and not device.startswith("cuda")):
        return None
    if args.amp == "fp16":
        return torch.float16
    if args.amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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


def step_optimizer(optimizer, scaler, finite, fused_skip):
    """Apply the update unless the loss (``finite`` False) or a gradient was non-finite, without a
    host sync where possible."""
    if scaler is not None:
        scaler.step(optimizer)  # GradScaler skips non-finite gradients itself
        scaler.update()
        return
    # a 0-d flag: the fused kernel subtracts it from the 0-d step counters when it skips
    found_inf = torch.maximum(nonfinite_gradients(optimizer).reshape(()), (~finite).float().reshape(()))
    if fused_skip:
        # fused AdamW reads `found_inf` and skips the update on the device when it is non-zero
        optimizer.found_inf = found_inf
        optimizer.step()
        optimizer.found_inf = None
    elif not bool(found_inf):  # other optimizers/devices: a host check
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
    print(json.dumps(log))
    if writer is not None:
        for key, value in log.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"epoch/{key}", value, epoch)


def log_progress(epoch, it, steps, mean_loss, images, start, lr, writer, args):
    elapsed = time.time() - start
    rate = images / max(elapsed, 1e-9)
    eta = (steps - it - 1) * elapsed / (it + 1)
    mean_loss = mean_loss.item()
    print(f"epoch {epoch} [{it + 1}/{steps}] loss {mean_loss:.4f} lr {lr:.3e} "
          f"{rate:.1f} img/s eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
    if writer is not None:
        step = int((epoch + (it + 1) / steps) * 1000)
        writer.add_scalar("train_loss", mean_loss, step)
        writer.add_scalar("lr", lr, step)


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
