"""Pretraining: MAE, Deblurring MAE, ConvMAE and Deblurring ConvMAE, on one device or under torchrun.

    torchrun --nproc_per_node=8 main_pretrain.py --model dmae_vit_base_patch16 \
        --output /path/to/weights --data_path_blurred /data/blurred --data_path_orig /data/orig --batch_size 32

Data modes (see util/datasets.py): paired blurred/original trees (published), ``--blur METHOD`` to
blur the originals on the fly, or vanilla models reading ``--data_path_blurred`` only.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import time
import warnings

import torch
from torch.utils.data import DataLoader, DistributedSampler

import models_convmae  # noqa: F401  (registers the pretraining models; it imports models_mae)
from models_mae import LOSS_REGIONS, is_deblurring_model
from util import distributed as du
from util.blur import BLUR_SETTINGS_FILE, add_blur_arguments, blur_spec_from_args
from util.checkpoint import (load_auto_resume_checkpoint, load_checkpoint_file, load_weights, numbered_checkpoints,
                             save_checkpoint)
from util.datasets import (IMAGENET_MEAN, IMAGENET_STD, PixelNormaliser, PretrainDataset, SeededSampler,
                           collate_skip_bad, dataset_mean_std, split_folder, worker_options)
from util.fileio import check_writable
from util.lr_decay import param_groups
from util.lr_sched import adjust_learning_rate, effective_lr
from util.provenance import (ON_THE_FLY, PUBLISHED_BLUR, data_blur, describe_blur_record, input_blur_record,
                             recorded_args, same_blur_record, size_hw, unknown_blur_record)
from util.registry import pretrain_models
from util.training import (NonFiniteGuard, StopTraining, accumulate_backward, amp_dtype, append_log,
                            check_log_not_linked, epoch_seed, install_sigterm_handler, invalid_training_flags,
                            log_progress, plain_args, refuse_invalid_flags, run_cli, step_optimizer)
from util.visualize import panels_to_grid, reconstruction_panels, save_grid_png


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Deblurring MIM pretraining", add_help=True)
    p.add_argument("--model", default="dmae_vit_base_patch16", type=str,
                   help="pretraining model; see README for the list (wrong names list the valid ones)")
    p.add_argument("--batch_size", default=64, type=int, help="images per GPU per iteration")
    p.add_argument("--epochs", default=800, type=int)
    p.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--input_size", default=[224], type=int, nargs="+",
                   help="input size: one number (square) or H W; divisible by the patch size")
    p.add_argument("--in_chans", default=3, type=int, choices=(1, 3),
                   help="1 trains on grey images with the dataset's mean/std; 3 (default) uses "
                        "ImageNet normalisation, as the published checkpoints")
    p.add_argument("--keep_channels", action="store_true",
                   help="keep colour images in colour, for the input and the target alike (default: both "
                        "converted to grey, as blurred_images.py does); needs --in_chans 3")
    p.add_argument("--mask_ratio", default=0.75, type=float)
    p.add_argument("--norm_pix_loss", action="store_true", help="normalise each target patch")
    p.add_argument("--loss_on", default=None, choices=LOSS_REGIONS,
                   help="masked patches or all patches (default: all for d* models, masked otherwise)")
    # optimisation
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * eff. batch / 256)")
    p.add_argument("--blr", type=float, default=1.5e-4)
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--warmup_epochs", type=float, default=40)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                   help="mixed precision (auto: bf16 on GPUs that support it, fp16 on older ones, none on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, where it is measured to be "
                        "faster; off on CPU, where compiling costs more than it saves)")
    p.add_argument("--max_nonfinite", type=int, default=20,
                   help="stop after this many consecutive steps with a non-finite loss")
    # data
    p.add_argument("--data_path_blurred", default="", type=str,
                   help="blurred tree (deblurring models) or the images (vanilla models)")
    p.add_argument("--data_path_orig", default="", type=str, help="original (sharp) tree")
    add_blur_arguments(p, prefix="blur_", method_flag="--blur", default_method=None)
    p.add_argument("--num_train", type=int, default=-1, help="use this many training images (-1: all)")
    p.add_argument("--strict_data", action="store_true", help="stop at an unreadable image instead of skipping it")
    p.add_argument("--data_mean", type=float, nargs="+", default=None)
    p.add_argument("--data_std", type=float, nargs="+", default=None)
    p.add_argument("--compute_stats", action="store_true",
                   help="compute the normalisation mean/std from the training images (default with --in_chans 1)")
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--cache_dir", default="", type=str,
                   help="keep the decoded (and blurred) images in a memory-mapped cache here, built once "
                        "(about H x W x channels bytes per image, twice for pairs); later epochs and runs "
                        "skip decoding and blurring. Keyed by the files and blur settings, safe to delete")
    p.add_argument("--cache_only", action="store_true", help="build the --cache_dir cache, then exit")
    p.add_argument("--pin_mem", action="store_true", default=True)
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    # outputs
    p.add_argument("--output_dir", "--output", default="./output_dir", type=str)
    p.add_argument("--log_dir", default=None, type=str, help="TensorBoard folder (default: output_dir)")
    p.add_argument("--save_freq", default=10, type=int, help="save checkpoint-{epoch}.pth every N epochs")
    p.add_argument("--keep_last", default=0, type=int, help="keep only the N newest numbered checkpoints (0: all)")
    p.add_argument("--eval_freq", default=10, type=int, help="validation loss + figure every N epochs")
    p.add_argument("--print_freq", default=20, type=int, help="log every N iterations")
    p.add_argument("--resume", default="", help="checkpoint to resume from")
    p.add_argument("--auto_resume", action="store_true", help="resume from output_dir/checkpoint-last.pth if present")
    p.add_argument("--start_epoch", default=0, type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--max_steps_per_epoch", type=int, default=0, help=argparse.SUPPRESS)  # tests/benchmarks
    du.add_launch_arguments(p)
    return p


# ------------------------------------------------------------------------------ set-up
def input_hw(args):
    size = args.input_size
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def loss_region(args) -> str:
    return args.loss_on or ("all" if is_deblurring_model(args.model) else "masked")


def patch_size_of(model_name: str):
    """The patch size a model name states (``..._patch16``), None if it states none."""
    match = re.search(r"patch(\d+)", model_name)
    return int(match.group(1)) if match else None


def invalid_pretrain_flags(args) -> list:
    """One message per pretraining flag whose value cannot train anything (before any work)."""
    problems = [f"--{flag} {getattr(args, flag)}: must be at least {low}"
                for flag, low in (("save_freq", 1), ("eval_freq", 1), ("keep_last", 0))
                if getattr(args, flag) < low]
    size = " ".join(map(str, args.input_size))
    patch = patch_size_of(args.model)
    if len(args.input_size) not in (1, 2) or min(args.input_size) < 1:
        return problems + [f"--input_size {size}: one positive number (square) or two (H W)"]
    if patch and any(side % patch for side in input_hw(args)):
        # the model would refuse it too, but only after the data (and any --cache_dir) were prepared
        return problems + [f"--input_size {size}: not divisible by the patch size {patch} of {args.model}"]
    return problems + invalid_mask_ratio(args, patch)


def invalid_mask_ratio(args, patch) -> list:
    """0 <= r < 1, at least one visible patch, and something to reconstruct: with r = 0 nothing is
    masked, so a loss on the masked patches is 0 (or undefined) and only a deblurring model with the
    loss on all patches still has a task (the sharp image from the blurred one)."""
    r = args.mask_ratio
    if not 0 <= r < 1:
        return [f"--mask_ratio {r}: must be in [0, 1) (the fraction of patches hidden from the encoder)"]
    if r == 0 and not (is_deblurring_model(args.model) and loss_region(args) == "all"):
        return [f"--mask_ratio 0 with {args.model} (loss on {loss_region(args)} patches): nothing is masked, so "
                "there is nothing to learn; use a ratio > 0 (published: 0.75), or a deblurring model (d*) "
                "with the loss on all patches"]
    if patch:
        h, w = input_hw(args)
        num_patches = (h // patch) * (w // patch)
        if int(num_patches * (1 - r)) < 1:
            return [f"--mask_ratio {r}: keeps no patch visible of the {num_patches} of a {h}x{w} input; "
                    "lower it or use a larger --input_size"]
    return []


def resolve_data_mode(args):
    """(input root, original root or None, BlurSpec or None) from the data flags; clear errors."""
    blur = blur_spec_from_args(args, prefix="blur_")
    deblurring = is_deblurring_model(args.model)
    if blur is not None:
        source = args.data_path_orig or args.data_path_blurred
        if not source:
            raise SystemExit("--blur needs the original images: pass --data_path_orig /path/to/dataset_orig")
        if args.data_path_orig and args.data_path_blurred and args.data_path_blurred != args.data_path_orig:
            warnings.warn("--blur makes the blurred input on the fly: --data_path_blurred is ignored")
        return source, None, blur
    if not args.data_path_blurred:
        raise SystemExit("pass --data_path_blurred (the images; for deblurring models the blurred copy "
                         "made by blurred_images.py) or --blur METHOD with --data_path_orig")
    if deblurring:
        if not args.data_path_orig:
            raise SystemExit(f"{args.model} reconstructs the sharp image: pass --data_path_orig (the "
                             "original tree) or blur on the fly with --blur gaussian")
        if os.path.realpath(args.data_path_orig) == os.path.realpath(args.data_path_blurred):
            warnings.warn("--data_path_blurred and --data_path_orig are the same folder: the model will "
                          "learn plain reconstruction, not deblurring")
        return args.data_path_blurred, args.data_path_orig, None
    return args.data_path_blurred, None, None


def record_input_blur(args, root: str, orig, blur) -> None:
    """``args.input_blur``, which every checkpoint records (with input_size, in_chans, keep_channels):
    the blur on the fly, or the settings file of the blurred copy read as input (blurred_images.py
    writes it), so that fine-tuning and evaluation can prepare their inputs the same way."""
    copy = data_blur(root)
    if blur is not None:
        if copy is not None:
            raise SystemExit(f"--blur {blur.method}: {root} is already a blurred copy ({copy.path}); blurring it "
                             "again gives inputs blurred twice. Pass the original images as --data_path_orig.")
        args.input_blur = input_blur_record(blur, ON_THE_FLY)
        return
    if copy is not None:
        args.input_blur = input_blur_record(copy.spec, copy.path)
        print(f"input blur: {root} is a copy blurred with {copy.describe()} ({copy.path})")
    elif orig is not None:
        args.input_blur = unknown_blur_record(f"{root} (no {BLUR_SETTINGS_FILE})")
        print(f"input blur: not recorded: {root} has no {BLUR_SETTINGS_FILE} (blurred_images.py writes one); the "
              "checkpoints cannot say how their inputs were blurred, and fine-tuning from them assumes the "
              f"published {PUBLISHED_BLUR.describe()} unless told otherwise (--blur)")
    else:
        args.input_blur = None
    target_copy = data_blur(orig) if orig is not None else None
    if target_copy is not None:
        warnings.warn(f"--data_path_orig {orig} is itself a blurred copy ({target_copy.path}): the "
                      "reconstruction targets are blurred images, not the originals")


def build_datasets(args):
    root, orig, blur = resolve_data_mode(args)
    for folder in filter(None, (root, orig)):
        if not os.path.isdir(folder):
            raise SystemExit(f"error: the data folder {folder} does not exist or is not a folder; check "
                             "--data_path_blurred / --data_path_orig")
    record_input_blur(args, root, orig, blur)
    if args.keep_channels and args.in_chans == 1:
        raise SystemExit("error: --keep_channels keeps colour, which a 1-channel model cannot take; "
                         "use --in_chans 3 or leave out --keep_channels")
    common = dict(blur=blur, input_size=input_hw(args), in_chans=args.in_chans, strict=args.strict_data,
                  keep_channels=args.keep_channels)
    splits = {}
    for split in ("train", "val"):
        folder = split_folder(root, split)
        orig_folder = split_folder(orig, split) if orig else None
        if folder is None or (orig and orig_folder is None):
            splits[split] = None
            continue
        splits[split] = PretrainDataset(folder, orig_root=orig_folder, train=split == "train",
                                        num_samples=args.num_train if split == "train" and args.num_train > 0 else None,
                                        seed=args.seed, **common)
    if splits["train"] is None:
        raise SystemExit(f"no training images: {root} has neither a train/ folder nor images")
    return splits["train"], splits["val"]


def normalisation(args, train_set):
    if args.data_mean is not None and args.data_std is not None:
        mean, std = args.data_mean, args.data_std
    elif args.in_chans == 1 or args.compute_stats:
        mean, std = dataset_mean_std(train_set, seed=args.seed)
        print(f"dataset mean {', '.join(f'{m:.4f}' for m in mean)}, std {', '.join(f'{s:.4f}' for s in std)}")
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if len(mean) != args.in_chans or len(std) != args.in_chans:
        raise SystemExit(f"--data_mean/--data_std need {args.in_chans} values each")
    return [float(m) for m in mean], [float(s) for s in std]


def attach_caches(datasets, args) -> None:
    """``--cache_dir``: the first process of each machine builds what is missing, the others wait
    for it on the file system (no collective, so a long build cannot hit the NCCL timeout)."""
    if not args.cache_dir:
        if args.cache_only:
            raise SystemExit("--cache_only needs --cache_dir")
        return
    for dataset in filter(None, datasets):
        dataset.use_cache(args.cache_dir, build=args.local_rank <= 0, num_workers=args.num_workers)


def make_loader(dataset, args, train: bool):
    # the epoch's seed travels with every index, so the training workers can stay alive across epochs
    sampler = SeededSampler(DistributedSampler(dataset, num_replicas=du.get_world_size(), rank=du.get_rank(),
                                               shuffle=train, seed=args.seed, drop_last=False))
    # Its own generator: without one, starting the workers draws their base seed from the global
    # generator, shifting the masks drawn from it in that epoch (and only in the epoch where the
    # persistent workers start, which differs between a resumed and an uninterrupted run).
    generator = torch.Generator().manual_seed(args.seed + du.get_rank())
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and str(args.device).startswith("cuda"), drop_last=train,
                        persistent_workers=train and args.num_workers > 0, collate_fn=collate_skip_bad,
                        generator=generator, **worker_options(args.num_workers))
    if train and len(loader) == 0:  # incomplete batches are dropped: not one step would run
        raise SystemExit(f"{len(dataset)} training images make no full batch of --batch_size {args.batch_size} "
                         f"per process x {du.get_world_size()} processes; lower --batch_size (or add images).")
    return loader


def start_epoch_data(loader, epoch: int, args) -> None:
    seed = epoch_seed(args, epoch)
    loader.sampler.set_epoch(epoch, seed)  # shuffling, and the crops drawn for each sample
    # The masking noise comes from the global generator: seeding it per (seed, rank, epoch) makes
    # every random draw of an epoch a function of the epoch, so a resumed run continues exactly
    # as an uninterrupted one without storing generator states in the checkpoint.
    torch.manual_seed(seed + 1)


def build_optimizer(model, args):
    groups = param_groups(model, args.weight_decay)
    # fused AdamW (CUDA and CPU): one kernel per step, and it can skip a step on the device
    fused = str(args.device).split(":")[0] in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused)


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_state(model, optimizer, scaler, epoch, args):
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "args": plain_args(args)}


def save_epoch_checkpoint(state, epoch, args, numbered: bool):
    """checkpoint-{epoch}.pth when ``numbered``, then checkpoint-last.pth; both atomic.

    checkpoint-last.pth is written last: it is what --auto_resume continues from, so a kill between
    the two writes re-runs this epoch and writes checkpoint-{epoch}.pth again, instead of resuming
    past it and never writing it.
    """
    out = args.output_dir
    if numbered:
        save_checkpoint(state, os.path.join(out, f"checkpoint-{epoch}.pth"))
    save_checkpoint(state, os.path.join(out, "checkpoint-last.pth"))
    if numbered:
        prune_checkpoints(out, args.keep_last)


def prune_checkpoints(out_dir, keep_last):
    """Delete the oldest numbered checkpoints beyond ``keep_last``: only regular files of ours."""
    if keep_last <= 0:
        return
    for _, path in numbered_checkpoints(out_dir)[:-keep_last]:
        os.remove(path)


def resume_path(args):
    if args.resume:
        return args.resume
    last = os.path.join(args.output_dir, "checkpoint-last.pth")
    if args.auto_resume and os.path.isfile(last):
        return last
    return None


def restore(model, optimizer, scaler, args):
    path = resume_path(args)
    if path is None:
        return
    ckpt = load_checkpoint_file(path) if args.resume else load_auto_resume_checkpoint(path)
    report = load_weights(model, ckpt, allow_unexpected=False, source_name=path)
    print(f"resumed weights: {report}")
    warn_on_changed_inputs(args, recorded_args(ckpt), path)
    if "optimizer" in ckpt and "epoch" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        args.start_epoch = int(ckpt["epoch"]) + 1
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        print(f"resuming at epoch {args.start_epoch} from {path}")
    else:
        print(f"{path} holds weights only: starting at epoch {args.start_epoch} with a fresh optimizer")


def warn_on_changed_inputs(args, recorded: dict, path: str) -> None:
    """A resumed run whose inputs are prepared otherwise than the checkpoint's (another blur, size or
    colour decision) continues another experiment: say so."""
    changes = []
    if "input_blur" in recorded and not same_blur_record(recorded["input_blur"], args.input_blur):
        changes.append(f"input blur {describe_blur_record(recorded['input_blur'])} -> "
                       f"{describe_blur_record(args.input_blur)}")
    if "input_size" in recorded and size_hw(recorded["input_size"]) != input_hw(args):
        changes.append(f"input size {size_hw(recorded['input_size'])} -> {input_hw(args)}")
    for name in ("in_chans", "keep_channels"):
        if name in recorded and recorded[name] != getattr(args, name):
            changes.append(f"{name} {recorded[name]} -> {getattr(args, name)}")
    if changes:
        warnings.warn(f"{path} was trained with other inputs than this run prepares ({'; '.join(changes)}): the "
                      "resumed run continues a different experiment")


# ------------------------------------------------------------------------------ loops
def train_one_epoch(model, loader, optimizer, scaler, epoch, args, norm, writer, stop_flag, guard):
    model.train()
    device = args.device
    dtype = amp_dtype(args)
    steps = len(loader) if not args.max_steps_per_epoch else min(len(loader), args.max_steps_per_epoch)
    # Running totals stay on the device; they are read (one sync) only at log intervals.
    loss_sum = torch.zeros((), device=device)
    finite_steps = torch.zeros((), device=device)
    nonfinite = torch.zeros((), device=device)
    images, skipped, start, steps_run = 0, 0, time.time(), 0
    fused_skip = bool(optimizer.defaults.get("fused")) and scaler is None
    interrupted = False
    optimizer.zero_grad(set_to_none=True)
    lr = 0.0
    for it, (inputs, targets, n_bad) in enumerate(loader):
        if it >= steps:
            break
        skipped += n_bad
        if it % args.accum_iter == 0:
            lr = adjust_learning_rate(optimizer, epoch + it / steps, args)
        inputs = norm(inputs)
        targets = norm(targets) if targets is not None else None
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _, _ = model(inputs, targets, mask_ratio=args.mask_ratio)
        finite = torch.isfinite(loss.detach())
        nonfinite += (~finite).float()
        finite_steps += finite.float()
        loss_sum += torch.where(finite, loss.detach(), torch.zeros_like(loss.detach()))
        update = (it + 1) % args.accum_iter == 0
        accumulate_backward(model, loss, scaler, args, update)
        if update:
            step_optimizer(optimizer, scaler, finite, fused_skip)
            optimizer.zero_grad(set_to_none=True)
        images += inputs.shape[0]
        steps_run += 1
        guard.step(finite)
        if (it + 1) % args.print_freq == 0 or it + 1 == steps:
            guard.check()
            log_progress(epoch, it, steps, loss_sum / finite_steps.clamp_min(1), images, start, lr, writer, args)
        if stop_flag.get("stop"):
            interrupted = it + 1 < steps
            break
    totals = torch.stack([loss_sum, finite_steps, nonfinite, torch.tensor(float(images), device=device),
                          torch.tensor(float(skipped), device=device)])
    du.all_reduce_sum(totals)
    loss_total, good_steps, bad_total, images_total, skipped_total = totals.tolist()
    guard.end_epoch(epoch, steps_run, good_steps)
    elapsed = time.time() - start
    return {"loss": loss_total / max(good_steps, 1), "lr": lr, "nonfinite_steps": int(bad_total),
            "skipped_files": int(skipped_total), "images_per_sec": images_total / max(elapsed, 1e-9),
            "interrupted": interrupted}


@torch.no_grad()
def evaluate(model, loader, args, norm):
    """Validation loss with a fixed mask per batch position, comparable across epochs."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    total = torch.zeros(2, device=args.device)
    dtype = amp_dtype(args)
    for inputs, targets, _ in loader:
        inputs = norm(inputs)
        targets = norm(targets) if targets is not None else None
        noise = torch.rand(inputs.shape[0], model.num_patches, generator=gen).to(args.device)
        with torch.autocast(device_type=args.device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _, _ = model(inputs, targets, mask_ratio=args.mask_ratio, noise=noise)
        total += torch.stack([loss.float() * inputs.shape[0], torch.tensor(float(inputs.shape[0]), device=args.device)])
    du.all_reduce_sum(total)
    loss_sum, count = total.tolist()
    return loss_sum / count if count else float("nan")


def write_figure(model, dataset, norm, epoch, args, writer):
    pixels, target_pixels, _ = collate_skip_bad([dataset[i] for i in range(min(4, len(dataset)))])
    inputs = norm(pixels)
    targets = norm(target_pixels) if target_pixels is not None else inputs
    noise = torch.rand(len(inputs), model.num_patches, generator=torch.Generator().manual_seed(args.seed))
    model.eval()
    panels = reconstruction_panels(model, inputs, targets, norm.mean, norm.std, args.mask_ratio,
                                   noise.to(args.device))
    grid = panels_to_grid(panels)
    path = os.path.join(args.output_dir, f"reconstruction-{epoch}.png")
    save_grid_png(path, grid)
    if writer is not None:
        writer.add_image("reconstruction", grid, epoch, dataformats="HWC")


def compiled(model, args):
    """``torch.compile`` when asked, or by default on CUDA. Measured on the H200 for the published
    models (the anchors in docs/performance.md): +38 % img/s for Deblurring MAE-B, +43 % for Deblurring
    ConvMAE-B. When compiling was not asked for explicitly, a compiler failure (e.g. no C compiler
    for Triton) falls back to eager execution with a warning instead of stopping the run."""
    if args.compile is None:
        args.compile = str(args.device).startswith("cuda")
        if args.compile:
            import torch._dynamo
            torch._dynamo.config.suppress_errors = True
    return torch.compile(model) if args.compile else model


# ------------------------------------------------------------------------------ main
def main(args):
    refuse_invalid_flags(invalid_training_flags(args) + invalid_pretrain_flags(args))
    du.init_distributed(args)
    check_writable(args.output_dir)
    check_log_not_linked(args.output_dir)
    if str(args.device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest convs
    seed = args.seed + du.get_rank()
    torch.manual_seed(seed)
    random.seed(seed)
    registry = pretrain_models()
    if args.model not in registry:
        raise SystemExit(f"unknown --model '{args.model}'. Valid names: {', '.join(registry.names())}")
    args.lr = effective_lr(args, du.get_world_size())

    train_set, val_set = build_datasets(args)
    attach_caches((train_set, val_set), args)
    if args.cache_only:
        print(f"decoded cache ready in {args.cache_dir}")
        du.cleanup()
        return
    mean, std = normalisation(args, train_set)
    norm = PixelNormaliser(mean, std, args.device)

    train_loader = make_loader(train_set, args, train=True)
    val_loader = make_loader(val_set, args, train=False) if val_set is not None else None
    print(f"training images: {len(train_set)}; validation images: {len(val_set) if val_set else 0}")
    if du.is_main_process():  # reads headers: once, not on every rank
        print(train_set.start_report())  # non-image files left out, colour census and conversion

    loss_on = loss_region(args)
    model = registry.create(args.model, img_size=input_hw(args), in_chans=args.in_chans,
                            norm_pix_loss=args.norm_pix_loss, loss_on=loss_on).to(args.device)
    dtype = amp_dtype(args)
    scaler = torch.amp.GradScaler(str(args.device).split(":")[0]) if dtype == torch.float16 else None
    optimizer = build_optimizer(model, args)
    restore(model, optimizer, scaler, args)
    # recorded in the checkpoint's args, so tools can rebuild the model and its normalisation
    args.loss_on, args.data_mean, args.data_std = loss_on, mean, std

    train_model = compiled(model, args)
    if args.distributed:
        device_ids = [args.local_rank] if str(args.device).startswith("cuda") else None
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=device_ids,
                                                                gradient_as_bucket_view=True)
    writer = None
    if du.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=args.log_dir or args.output_dir)
    print(f"model {args.model} (loss on {loss_on} patches), lr {args.lr:.3e}, effective batch "
          f"{args.batch_size * args.accum_iter * du.get_world_size()}, amp {dtype}, device {args.device}")

    stop_flag = {}
    install_sigterm_handler(stop_flag)
    guard = NonFiniteGuard(args.max_nonfinite, args.device, args.output_dir, args.distributed)
    for epoch in range(args.start_epoch, args.epochs):
        start_epoch_data(train_loader, epoch, args)
        try:
            stats = train_one_epoch(train_model, train_loader, optimizer, scaler, epoch, args, norm, writer,
                                    stop_flag, guard)
        except StopTraining as err:
            raise SystemExit(str(err))
        interrupted = stats.pop("interrupted")
        log = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
        if interrupted:
            # a partial epoch: label the checkpoint with the previous epoch so that a resume
            # runs this epoch again (with the weights as they are now), then stop
            state = checkpoint_state(model, optimizer, scaler, epoch - 1, args)
            if du.is_main_process():
                save_checkpoint(state, os.path.join(args.output_dir, "checkpoint-last.pth"))
            print(f"SIGTERM received during epoch {epoch}: saved checkpoint-last.pth; exiting", flush=True)
            break
        last = epoch + 1 == args.epochs
        if val_loader is not None and ((epoch + 1) % args.eval_freq == 0 or last):
            log["val_loss"] = evaluate(model, val_loader, args, norm)
        if du.is_main_process():
            if (epoch + 1) % args.eval_freq == 0 or last:
                write_figure(model, val_set or train_set, norm, epoch, args, writer)
            state = checkpoint_state(model, optimizer, scaler, epoch, args)
            save_epoch_checkpoint(state, epoch, args, numbered=(epoch + 1) % args.save_freq == 0 or last)
            append_log(args.output_dir, log, writer, epoch)
        if stop_flag.get("stop"):
            print(f"SIGTERM received: checkpoint of epoch {epoch} saved; exiting", flush=True)
            break
    if writer is not None:
        writer.close()
    du.cleanup()


def cli(argv=None):
    run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    cli()
