"""LARS: SGD with momentum and a layer-wise trust ratio (You, Gitman, Ginsburg 2017,
"Large Batch Training of Convolutional Networks", arXiv:1708.03888).

The variant of the MAE / MoCo v3 linear-probing recipe: for every parameter with two or more
dimensions (weight matrices, convolution filters) the step direction ``d = grad + weight_decay * w``
is rescaled by ``trust_coefficient * ||w|| / ||d||`` (by 1 where either norm is 0); one-dimensional
parameters (biases, normalisation scales) take ``d = grad`` unscaled and without weight decay. Then
``buf = momentum * buf + d`` and ``w -= lr * buf`` (momentum without dampening, as torch's SGD).

Each step moves a matrix by about ``lr * trust_coefficient`` of its norm, whatever the gradient's
scale: what makes very large batches stable, and why a small dataset (few steps) may need plain SGD.
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """Args:
        params: parameters or parameter groups.
        lr: learning rate (set per iteration by the schedule).
        momentum: momentum factor (0.9 in the published recipe).
        weight_decay: L2 factor added to the gradient of >= 2-D parameters (0 in the published recipe).
        trust_coefficient: eta of the trust ratio (0.001).
    """

    def __init__(self, params, lr: float = 0.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS needs lr, momentum, weight_decay >= 0 and trust_coefficient > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @staticmethod
    def direction(p: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """The step direction of one parameter before momentum: gradient, weight decay, trust ratio."""
        if p.ndim < 2:
            return grad
        d = grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else grad
        w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
        # torch.where keeps the choice on the device: no host sync
        ratio = torch.where((w_norm > 0) & (d_norm > 0),
                            group["trust_coefficient"] * w_norm / d_norm.clamp_min(torch.finfo(d_norm.dtype).tiny),
                            torch.ones_like(w_norm))
        return d * ratio

    # Like torch's fused optimizers, a step reads ``self.found_inf`` (a 0-d tensor set by the training
    # loop, non-zero when a gradient or the loss was non-finite) and then leaves weights and momentum
    # as they were, decided on the device: the training loop needs no host sync per step.
    skips_found_inf = True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf != 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = self.direction(p, p.grad, group)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if skip is None:
                    buf.mul_(group["momentum"]).add_(d)
                    p.add_(buf, alpha=-group["lr"])
                    continue
                # torch.where, not a product: a skipped step's direction may hold inf or NaN
                buf.copy_(torch.where(skip, buf, buf * group["momentum"] + d))
                p.sub_(torch.where(skip, torch.zeros_like(buf), buf * group["lr"]))
        return loss
