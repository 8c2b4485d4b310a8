"""Training-loop helpers shared by main_pretrain.py and main_finetune.py.

Mixed-precision choice, the optimizer step that skips non-finite losses without a host sync, the
non-finite stop rule, per-epoch seeding for exact resume, SIGTERM handling and the JSON-lines log.
"""
from __future__ import annotations

import contextlib
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


def check_nonfinite(consecutive_bad, args):
    bad = int(consecutive_bad.item())
    if bad >= args.max_nonfinite:
        raise StopTraining(f"the loss was non-finite for {bad} consecutive steps; stopping. The last "
                           f"good checkpoint in {args.output_dir} is intact. Lower --blr, use --amp bf16 "
                           "or --amp none, or check the data for corrupt images.")


def install_sigterm_handler(stop_flag):
    """Schedulers send SIGTERM before pre-empting: finish the step, save, exit cleanly."""
    def handler(signum, frame):
        stop_flag["stop"] = True
    signal.signal(signal.SIGTERM, handler)


def append_log(out_dir, log, writer, epoch):
    with open(os.path.join(out_dir, "log.txt"), "a") as f:
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
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}


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
        raise SystemExit(f"error: {err}")
    except Exception as err:
        if not (getattr(args, "distributed", False) and du.is_collective_failure(err)):
            raise
        raise SystemExit(du.collective_failure_message(err, args)) from None
