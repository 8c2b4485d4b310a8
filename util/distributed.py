"""Process-group set-up for ``torchrun`` (one node or many) and plain ``python`` runs.

NCCL on CUDA devices, gloo on CPU, so every command also runs (slowly) on a laptop. Non-main ranks
print nothing unless asked (``force=True``).
"""
from __future__ import annotations

import builtins
import datetime
import os
import warnings

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def resolve_device(requested: str | None) -> str:
    """``--device`` default: CUDA when available, else CPU with a warning."""
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        warnings.warn("no CUDA device found: running on the CPU (slow); pass --device cpu to silence this")
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    return requested


def init_distributed(args) -> None:
    """Fill ``args.distributed, rank, world_size, local_rank, device`` from torchrun's environment."""
    args.device = resolve_device(getattr(args, "device", None))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        args.distributed, args.rank, args.world_size, args.local_rank = False, 0, 1, 0
        return
    args.rank = int(os.environ["RANK"])
    args.world_size = int(os.environ["WORLD_SIZE"])
    args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    args.distributed = True
    use_cuda = args.device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.local_rank)
        args.device = f"cuda:{args.local_rank}"
    timeout = datetime.timedelta(seconds=getattr(args, "dist_timeout", 1800))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    _silence_non_main(args.rank == 0)


def _silence_non_main(is_main: bool) -> None:
    builtin_print = builtins.print

    def print_(*a, **kw):
        if is_main or kw.pop("force", False):
            builtin_print(*a, **kw)
        else:
            kw.pop("force", None)
    builtins.print = print_


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed or timed-out collective: another process died, hung or lost its
    network. gloo raises these as plain RuntimeErrors whose message names gloo (``Connection reset by
    peer``, ``Timed out waiting ... for recv``); newer backends raise ``dist.DistError``."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(word in str(err) for word in ("gloo", "NCCL"))


def collective_failure_message(err: BaseException, args) -> str:
    """The one message every surviving rank ends with (instead of a traceback from the autograd
    engine or the backend)."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"error on rank {getattr(args, 'rank', 0)}: lost contact with the other processes ({detail}). "
            "Another process probably died, was killed or hung: its own log says why (a hung one is given "
            f"up after --dist_timeout {getattr(args, 'dist_timeout', 1800)} s). The checkpoints in "
            f"{args.output_dir} are intact: re-run the same command with --auto_resume to continue.")
