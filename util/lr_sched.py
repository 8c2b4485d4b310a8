"""Learning-rate schedule: linear warm-up then half-cycle cosine, a pure function of the
*fractional* epoch, applied every iteration (as MAE). Parameter groups may carry ``lr_scale``
(layer-wise decay), which multiplies the scheduled rate."""
from __future__ import annotations

import math


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, total_epochs: float) -> float:
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-8)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """Set every group's lr for ``epoch`` (fractional) from ``args.lr/min_lr/warmup_epochs/epochs``."""
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        # a Python float, not a tensor: no device work and no host sync per step
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def effective_lr(args, world_size: int) -> float:
    """``--lr`` if given, else ``blr * effective batch / 256`` (the published linear scaling rule)."""
    if args.lr is not None:
        return args.lr
    return args.blr * args.batch_size * args.accum_iter * world_size / 256
