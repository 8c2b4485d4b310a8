"""Throughput benchmark for pretraining: the model step, the data pipeline, or both end to end.

    python tools/benchmark.py model --model dmae_vit_base_patch16 --batch_size 256 --precision bf16 --compile
    python tools/benchmark.py data  --data_path /data/orig --blur gaussian --num_workers 16 --batch_size 64
    python tools/benchmark.py e2e   --model dmae_vit_base_patch16 --data_path /data/orig --blur gaussian ...

``model`` times forward + backward + fused AdamW on synthetic tensors (mask ratio 0.75) and reports
images/s, step time, peak GPU memory and model TFLOP/s (FLOPs of one step counted by
``torch.utils.flop_counter``). ``data`` times the DataLoader of ``main_pretrain.py`` over a folder
(paired, on-the-fly blur or plain). ``e2e`` feeds that loader into the model step. Every mode prints
a table and, with ``--json``, writes the numbers. On a CPU use a tiny model and few steps
(``--tiny`` sets both).
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

from util.blur import add_blur_arguments, blur_spec_from_args  # noqa: E402
from util.datasets import PretrainDataset, collate_skip_bad, limit_worker_threads  # noqa: E402
from util.fileio import atomic_write_text  # noqa: E402
from util.lr_decay import param_groups  # noqa: E402
from util.registry import pretrain_models  # noqa: E402
from util.training import step_optimizer  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("model", "data", "e2e"))
    p.add_argument("--model", default="dmae_vit_base_patch16")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--in_chans", type=int, default=3)
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=30, help="timed steps (model) or batches (data/e2e)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, caches)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data_path", default="", help="images (originals; or the blurred copy with --data_path_orig)")
    p.add_argument("--data_path_orig", default="", help="paired mode: the original tree")
    p.add_argument("--num_workers", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="CPU smoke settings: tiny model, batch 4, 64 px, 2+1 steps")
    p.add_argument("--json", default="", help="also write the results here")
    add_blur_arguments(p, prefix="blur_", method_flag="--blur", default_method=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.model = args.model.replace("base", "tiny").replace("large", "tiny").replace("huge", "tiny")
        args.batch_size, args.input_size, args.steps, args.warmup = 4, 64, 2, 1
        args.precision = "fp32" if args.device == "cpu" else args.precision
    return args


# ------------------------------------------------------------------------------ model step
def build_step(args):
    """Model, optimizer and a ``step(inputs, targets) -> loss`` closure as in main_pretrain.py."""
    model = pretrain_models().create(args.model, img_size=args.input_size, in_chans=args.in_chans).to(args.device)
    fused = args.device.split(":")[0] in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=fused)
    dtype = PRECISIONS[args.precision]
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    run = torch.compile(model) if args.compile else model
    device_type = args.device.split(":")[0]

    def step(inputs, targets):
        ctx = torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            loss, _, _ = run(inputs, targets, mask_ratio=args.mask_ratio)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        step_optimizer(optimizer, scaler, torch.isfinite(loss.detach()), fused_skip=fused and scaler is None)
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


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


def time_model(args):
    model, step = build_step(args)
    flops = count_step_flops(model, args)
    x = torch.randn(args.batch_size, args.in_chans, args.input_size, args.input_size, device=args.device)
    y = torch.randn_like(x)
    for _ in range(args.warmup):
        step(x, y)
    synchronize(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(x, y)
    synchronize(args.device)
    elapsed = time.perf_counter() - start
    images_per_sec = args.steps * args.batch_size / elapsed
    return {"mode": "model", "model": args.model, "batch": args.batch_size, "precision": args.precision,
            "compile": args.compile, "img_per_s": images_per_sec, "step_ms": 1000 * elapsed / args.steps,
            "gflop_per_img": flops / 1e9, "model_tflops": flops * images_per_sec / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if args.device.startswith("cuda") else None,
            "final_loss": float(loss), "device": device_name(args.device)}


# ------------------------------------------------------------------------------ data
def build_loader(args):
    blur = blur_spec_from_args(args, prefix="blur_")
    if not args.data_path:
        raise SystemExit("data/e2e modes need --data_path")
    dataset = PretrainDataset(args.data_path, orig_root=args.data_path_orig or None, blur=blur,
                              input_size=args.input_size, in_chans=args.in_chans)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                       num_workers=args.num_workers, collate_fn=collate_skip_bad,
                                       pin_memory=args.device.startswith("cuda"),
                                       persistent_workers=args.num_workers > 0,
                                       worker_init_fn=limit_worker_threads)


def time_loader(args, consume=None):
    loader = build_loader(args)
    needed = args.warmup + args.steps
    if len(loader) < 1:
        raise SystemExit(f"{args.data_path}: fewer images than one batch of {args.batch_size}")
    images, start, seen = 0, None, 0
    while seen < needed:
        for inputs, targets, _ in loader:
            if seen == args.warmup:
                synchronize(args.device)
                start = time.perf_counter()
            if consume is not None:
                consume(inputs.to(args.device, non_blocking=True),
                        targets.to(args.device, non_blocking=True) if targets is not None else None)
            if seen >= args.warmup:
                images += inputs.shape[0]
            seen += 1
            if seen >= needed:
                break
    synchronize(args.device)
    elapsed = time.perf_counter() - start
    return images / elapsed


def time_data(args):
    return {"mode": "data", "workers": args.num_workers, "batch": args.batch_size,
            "blur": args.blur_method or ("paired" if args.data_path_orig else "none"),
            "img_per_s": time_loader(args), "device": device_name(args.device)}


def time_e2e(args):
    _, step = build_step(args)
    rate = time_loader(args, consume=lambda x, y: step(x, y))
    return {"mode": "e2e", "model": args.model, "workers": args.num_workers, "batch": args.batch_size,
            "precision": args.precision, "compile": args.compile, "img_per_s": rate,
            "device": device_name(args.device)}


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
