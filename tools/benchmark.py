"""Throughput benchmark for pretraining: the model step, the data pipeline, or both end to end.

    python tools/benchmark.py model --model dmae_vit_base_patch16 --batch_size 256 --precision bf16 --compile
    python tools/benchmark.py data  --data_path /data/orig --blur gaussian --num_workers 16 --batch_size 64
    python tools/benchmark.py e2e   --model dmae_vit_base_patch16 --data_path /data/orig --blur gaussian ...

``model`` times forward + backward + AdamW on synthetic tensors (mask ratio 0.75) and reports
images/s, step time, peak GPU memory and model TFLOP/s (FLOPs of one step counted by
``torch.utils.flop_counter``). ``data`` times the DataLoader of ``main_pretrain.py`` over a folder
(paired, on-the-fly blur or plain). ``e2e`` feeds that loader into the model step. Every mode prints
a table and, with ``--json``, writes the numbers. On a CPU use a tiny model and few steps
(``--tiny`` sets both).

The performance levers of the model step are flags, so that each can be measured on its own:
``--precision`` (with ``--scaler`` for the GradScaler), ``--optimizer`` (AdamW implementation),
``--compile`` / ``--compile_mode`` and ``--channels_last``. Every setting is recorded in the result.
``tools/benchmark_suite.py`` runs a list of such configurations, one process each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models_convmae  # noqa: E402,F401  (registers the pretraining models)
from util.blur import add_blur_arguments, blur_spec_from_args  # noqa: E402
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, PixelNormaliser, PretrainDataset  # noqa: E402
from util.fileio import atomic_write_text  # noqa: E402
from util.lr_decay import param_groups  # noqa: E402
from util.registry import pretrain_models  # noqa: E402
from util.training import step_optimizer  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# AdamW implementations. "plain" passes neither flag, as the published code does: torch then picks
# the multi-tensor (foreach) kernels on CUDA and the per-parameter loop elsewhere.
OPTIMIZERS = ("fused", "foreach", "plain")
DEFAULT_STEPS, DEFAULT_WARMUP = 30, 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("model", "data", "e2e"))
    p.add_argument("--model", default="dmae_vit_base_patch16")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--in_chans", type=int, default=3)
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="autocast precision (default bf16; fp32 with --tiny on a CPU)")
    p.add_argument("--scaler", choices=("auto", "on", "off"), default="auto",
                   help="GradScaler: auto = on for fp16 only (as in training); on/off force it, to time its cost")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="fused",
                   help="AdamW implementation: fused=True, foreach=True, or plain (neither flag: torch's "
                        "default, what the published code uses)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile_mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode (with --compile)")
    p.add_argument("--channels_last", action="store_true",
                   help="model and inputs in torch.channels_last (acts on the ConvViT stages; harmless for ViT)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps (model) or batches (data/e2e); default {DEFAULT_STEPS} (2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps first (compilation, caches); default {DEFAULT_WARMUP} (1 with --tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data_path", default="", help="images (originals; or the blurred copy with --data_path_orig)")
    p.add_argument("--data_path_orig", default="", help="paired mode: the original tree")
    p.add_argument("--num_workers", type=int, default=8)
    p.add_argument("--cache_dir", default="", help="read decoded images from a memory-mapped cache here "
                   "(built first when missing; as main_pretrain.py --cache_dir)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke settings: tiny model, batch 4, 64 px, 2+1 steps")
    p.add_argument("--json", default="", help="also write the results here")
    add_blur_arguments(p, prefix="blur_", method_flag="--blur", default_method=None)
    args = p.parse_args(argv)
    if args.compile_mode != "default" and not args.compile:
        p.error(f"--compile_mode {args.compile_mode} needs --compile")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if args.tiny:
        args.model = args.model.replace("base", "tiny").replace("large", "tiny").replace("huge", "tiny")
        args.batch_size, args.input_size = 4, 64
        args.steps = 2 if args.steps is None else args.steps
        args.warmup = 1 if args.warmup is None else args.warmup
        if args.precision is None and args.device == "cpu":
            args.precision = "fp32"
    args.precision = args.precision or "bf16"
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    args.warmup = DEFAULT_WARMUP if args.warmup is None else args.warmup
    return args


# ------------------------------------------------------------------------------ model step
def uses_scaler(args) -> bool:
    setting = getattr(args, "scaler", "auto")
    return setting == "on" or (setting == "auto" and args.precision == "fp16")


def make_optimizer(model, name: str):
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {}}[name]
    return torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), **kwargs)


def optimizer_impl(name: str, device: str) -> str:
    """The AdamW kernels that run: "plain" resolves as torch resolves it."""
    if name == "plain":
        return "foreach" if device.startswith("cuda") else "for-loop"
    return name


def build_step(args):
    """Model, optimizer and a ``step(inputs, targets) -> loss`` closure as in main_pretrain.py.

    The levers (``args.optimizer``, ``args.scaler``, ``args.compile_mode``, ``args.channels_last``)
    default to the training configuration when absent from ``args``.
    """
    device_type = args.device.split(":")[0]
    channels_last = getattr(args, "channels_last", False)
    opt_name = getattr(args, "optimizer", "fused")
    mode = getattr(args, "compile_mode", "default")
    model = pretrain_models().create(args.model, img_size=args.input_size, in_chans=args.in_chans).to(args.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, opt_name)
    fused = opt_name == "fused"
    dtype = PRECISIONS[args.precision]
    scaler = torch.amp.GradScaler(device_type) if uses_scaler(args) else None
    run = torch.compile(model, mode=None if mode == "default" else mode) if args.compile else model
    # CUDA graphs (reduce-overhead) reuse their output buffers: mark where each training step begins
    cudagraphs = args.compile and mode == "reduce-overhead"
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def step(inputs, targets):
        inputs = inputs.contiguous(memory_format=layout)  # no copy when already in that layout
        if targets is not None:
            targets = targets.contiguous(memory_format=layout)
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        ctx = torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            loss, _, _ = run(inputs, targets, mask_ratio=args.mask_ratio)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None or fused:
            step_optimizer(optimizer, scaler, torch.isfinite(loss.detach()), fused_skip=fused and scaler is None)
        else:
            # foreach / plain without a scaler: training would check for non-finite values on the
            # host (a sync per step); the benchmark times the optimizer implementation alone.
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def lever_settings(args) -> dict:
    """The model-step levers of a run, as recorded in its result."""
    scaler = uses_scaler(args)
    opt_name = getattr(args, "optimizer", "fused")
    if scaler:
        nonfinite = "GradScaler"
    elif opt_name == "fused":
        nonfinite = "on device (fused found_inf)"
    else:
        nonfinite = "none (benchmark only)"
    return {"compile_mode": getattr(args, "compile_mode", "default") if args.compile else None,
            "channels_last": bool(getattr(args, "channels_last", False)),
            "optimizer": opt_name, "optimizer_impl": optimizer_impl(opt_name, args.device),
            "scaler": scaler, "nonfinite_check": nonfinite}


def count_step_flops(model, args) -> float:
    """FLOPs of one forward + backward on one image (fp32, eager; the optimizer is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, args.in_chans, args.input_size, args.input_size, device=args.device)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = model(x, x, mask_ratio=args.mask_ratio)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def split_steps(steps: int, windows: int = 3):
    """``steps`` as up to ``windows`` nearly equal chunks (each timed on its own, for the spread)."""
    windows = max(1, min(windows, steps))
    return [steps // windows + (1 if i < steps % windows else 0) for i in range(windows)]


def time_model(args):
    model, step = build_step(args)
    flops = count_step_flops(model, args)
    layout = torch.channels_last if getattr(args, "channels_last", False) else torch.contiguous_format
    x = torch.randn(args.batch_size, args.in_chans, args.input_size, args.input_size,
                    device=args.device).contiguous(memory_format=layout)
    y = torch.randn_like(x)
    cuda = args.device.startswith("cuda")
    begin = time.perf_counter()
    for _ in range(args.warmup):
        step(x, y)
    synchronize(args.device)
    warmup_s = time.perf_counter() - begin
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    window_rates, elapsed = [], 0.0
    for n in split_steps(args.steps):
        start = time.perf_counter()
        for _ in range(n):
            loss = step(x, y)
        synchronize(args.device)
        took = time.perf_counter() - start
        elapsed += took
        window_rates.append(n * args.batch_size / took)
    images_per_sec = args.steps * args.batch_size / elapsed
    spread = (max(window_rates) - min(window_rates)) / images_per_sec * 100
    return {"mode": "model", "model": args.model, "batch": args.batch_size, "input_size": args.input_size,
            "in_chans": args.in_chans, "precision": args.precision, "compile": args.compile,
            **lever_settings(args),
            "img_per_s": images_per_sec, "step_ms": 1000 * elapsed / args.steps,
            "window_img_per_s": [round(r, 1) for r in window_rates], "spread_pct": spread,
            "gflop_per_img": flops / 1e9, "model_tflops": flops * images_per_sec / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
            "warmup_s": warmup_s, "steps": args.steps, "warmup": args.warmup,
            "final_loss": float(loss), "device": device_name(args.device), "torch": torch.__version__}


# ------------------------------------------------------------------------------ data
def build_loader(args):
    """The training loader of main_pretrain.py: seeded sampler, persistent workers, compact pixels."""
    blur = blur_spec_from_args(args, prefix="blur_")
    if not args.data_path:
        raise SystemExit("data/e2e modes need --data_path")
    dataset = PretrainDataset(args.data_path, orig_root=args.data_path_orig or None, blur=blur,
                              input_size=args.input_size, in_chans=args.in_chans)
    if args.cache_dir:
        dataset.use_cache(args.cache_dir, build=True, num_workers=args.num_workers)
    from main_pretrain import make_loader  # the very loader training uses (one process: rank 0 of 1)
    return make_loader(dataset, argparse.Namespace(**vars(args), seed=0, pin_mem=True), train=True)


def time_loader(args, consume=None):
    """Images/s of the loader, its batches copied to the device and normalised there (as in
    training), each then passed to ``consume`` when given."""
    loader = build_loader(args)
    norm = PixelNormaliser(IMAGENET_MEAN[:args.in_chans], IMAGENET_STD[:args.in_chans], args.device)
    # While the warm-up steps run (compiling: a minute) the workers fill their prefetch queues; those
    # batches come for free afterwards, so the timing starts once they are used up.
    warmup = args.warmup + (loader.prefetch_factor or 0) * args.num_workers
    needed = warmup + args.steps
    if len(loader) < 1:
        raise SystemExit(f"{args.data_path}: fewer images than one batch of {args.batch_size}")
    images, start, seen, epoch = 0, None, 0, 0
    while seen < needed:
        loader.sampler.set_epoch(epoch, epoch)
        epoch += 1
        for inputs, targets, _ in loader:
            if seen == warmup:
                synchronize(args.device)
                start = time.perf_counter()
            inputs = norm(inputs)
            targets = norm(targets) if targets is not None else None
            if consume is not None:
                consume(inputs, targets)
            if seen >= warmup:
                images += inputs.shape[0]
            seen += 1
            if seen >= needed:
                break
    synchronize(args.device)
    elapsed = time.perf_counter() - start
    return images / elapsed, epoch


def data_settings(args) -> dict:
    return {"workers": args.num_workers, "batch": args.batch_size, "input_size": args.input_size,
            "blur": args.blur_method or ("paired" if args.data_path_orig else "none"),
            "cache": bool(args.cache_dir)}


def time_data(args):
    rate, epochs = time_loader(args)
    return {"mode": "data", **data_settings(args), "img_per_s": rate, "epochs_started": epochs,
            "device": device_name(args.device)}


def time_e2e(args):
    """The loader feeding the model step, and the same step on synthetic tensors in the same process
    (same compiled code, same shapes): ``e2e_fraction`` is the share of model-only speed that the
    data pipeline lets training keep."""
    _, step = build_step(args)
    rate, epochs = time_loader(args, consume=lambda x, y: step(x, y))
    x = torch.randn(args.batch_size, args.in_chans, args.input_size, args.input_size, device=args.device)
    y = torch.randn_like(x)
    for _ in range(2):
        step(x, y)
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(x, y)
    synchronize(args.device)
    model_rate = args.steps * args.batch_size / (time.perf_counter() - start)
    return {"mode": "e2e", "model": args.model, **data_settings(args), "precision": args.precision,
            "compile": args.compile, **lever_settings(args), "img_per_s": rate,
            "model_only_img_per_s": model_rate, "e2e_fraction": rate / model_rate,
            "epochs_started": epochs, "device": device_name(args.device)}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def print_table(result: dict) -> None:
    width = max(len(k) for k in result)
    for key, value in result.items():
        text = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {text}")


def main(argv=None):
    args = parse_args(argv)
    result = {"model": time_model, "data": time_data, "e2e": time_e2e}[args.mode](args)
    print_table(result)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
