r"""Pretraining: MAE, Deblurring MAE, ConvMAE and Deblurring ConvMAE, on one device or under torchrun.

    torchrun --nproc_per_node=8 main_pretrain.py --model dmae_vit_base_patch16 \
        --output /path/to/weights --data_path_blurred /data/blurred --data_path_orig /data/orig --batch_size 32

Data modes (see util/datasets.py): paired blurred/original trees (published), ``--blur METHOD`` to
blur the originals on the fly, or vanilla models reading ``--data_path_blurred`` only.
"""
from __future__ import annotations

import argparse
import os
import re
import warnings

from util.arguments import (LOSS_REGIONS, PRETRAIN_MODELS, add_blur_arguments, add_channel_arguments,
                            add_launch_arguments, add_loader_arguments, add_model_group, add_output_arguments,
                            add_precision_arguments, add_resume_arguments, add_schedule_arguments, input_hw,
                            make_parser)


def get_args_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    model = add_model_group(p, default="dmae_vit_base_patch16", names=PRETRAIN_MODELS, kind="pretraining model")
    add_channel_arguments(model, from_checkpoint=False)
    model.add_argument("--mask_ratio", default=0.75, type=float,
                       help="fraction of the patches hidden from the encoder, in [0, 1)")
    model.add_argument("--norm_pix_loss", action="store_true",
                       help="normalise each target patch by its mean and variance before the loss")
    model.add_argument("--loss_on", default=None, choices=LOSS_REGIONS,
                       help="masked patches or all patches (default: all for d* models, masked otherwise)")

    optimisation = p.add_argument_group("optimisation")
    add_schedule_arguments(optimisation, batch_size=64, epochs=800, blr=1.5e-4, min_lr=0.0, warmup_epochs=40,
                           weight_decay=0.05)
    add_precision_arguments(optimisation)
    optimisation.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                              help="torch.compile the model (default: on for CUDA, where it is measured to be "
                                   "faster; off on CPU, where compiling costs more than it saves)")

    data = p.add_argument_group("data")
    data.add_argument("--data_path_blurred", default="", type=str,
                      help="blurred tree (deblurring models) or the images (vanilla models)")
    data.add_argument("--data_path_orig", default="", type=str, help="original (sharp) tree")
    data.add_argument("--num_train", type=int, default=-1, help="use this many training images (-1: all)")
    add_loader_arguments(data)
    data.add_argument("--compute_stats", action="store_true",
                      help="compute the normalisation mean/std from the training images (default with --in_chans 1)")
    data.add_argument("--cache_dir", default="", type=str,
                      help="keep the decoded (and blurred) images in a memory-mapped cache here, built once "
                           "(about H x W x channels bytes per image, twice for pairs); later epochs and runs "
                           "skip decoding and blurring. Keyed by the files and blur settings, safe to delete")
    data.add_argument("--cache_only", action="store_true", help="build the --cache_dir cache, then exit")
    add_blur_arguments(p, prefix="blur_", method_flag="--blur", default_method=None)

    outputs = add_output_arguments(p)
    outputs.add_argument("--eval_freq", default=10, type=int,
                         help="validation loss and reconstruction figure every N epochs (and at the end)")
    outputs.add_argument("--max_steps_per_epoch", type=int, default=0, help=argparse.SUPPRESS)  # tests/benchmarks
    checkpoints = p.add_argument_group("checkpoints")
    checkpoints.add_argument("--save_freq", default=10, type=int,
                             help="save checkpoint-{epoch}.pth every N epochs (and at the end); "
                                  "checkpoint-last.pth every epoch")
    checkpoints.add_argument("--keep_last", default=0, type=int,
                             help="keep only the N newest numbered checkpoints (0: all)")
    add_resume_arguments(checkpoints, resume_help="checkpoint to resume from (weights, optimizer, epoch)")
    add_launch_arguments(p)
    return p


# `--help` and usage errors answer here, before the imports below (torch, timm, OpenCV: seconds), which
# therefore follow code
if __name__ == "__main__":
    get_args_parser().parse_args()

import torch
from torch.utils.data import DataLoader, DistributedSampler

import models_convmae  # noqa: F401  (registers the pretraining models; it imports models_mae)
from models_mae import is_deblurring_model
from util import distributed as du
from util.blur import BLUR_SETTINGS_FILE, blur_spec_from_args
from util.checkpoint import (load_auto_resume_checkpoint, load_checkpoint_file, load_weights, numbered_checkpoints,
                             save_checkpoint)
from util.datasets import (IMAGENET_MEAN, IMAGENET_STD, PixelNormaliser, PretrainDataset, SeededSampler,
                           collate_skip_bad, dataset_mean_std, split_folder, worker_options)
from util.lr_decay import param_groups
from util.lr_sched import adjust_learning_rate, effective_lr
from util.provenance import (ON_THE_FLY, PUBLISHED_BLUR, data_blur, describe_blur_record, input_blur_record,
                             recorded_args, same_blur_record, size_hw, unknown_blur_record)
from util.registry import pretrain_models
from util.training import (EpochMeter, NonFiniteGuard, RunProgress, StopTraining, accumulate_backward, amp_dtype,
                           append_log, autocast, device_type, epoch_seed, epoch_summary, grad_scaler,
                           install_sigterm_handler, invalid_training_flags, open_writer, plain_args, resume_path,
                           run_cli, start_run, step_optimizer, warn_on_schedule, wrap_ddp)
from util.visualize import panels_to_grid, reconstruction_panels, save_grid_png


# ------------------------------------------------------------------------------ set-up
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
    if args.compile and args.deterministic:
        problems.append("--compile with --deterministic: compiled kernels are not checked for determinism; "
                        "leave out --compile (it is off by default with --deterministic)")
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
                        pin_memory=args.pin_mem and device_type(args) == "cuda", drop_last=train,
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


# AdamW implementations (tools/benchmark.py measures each): "fused" is one kernel per step and can skip a
# step on the device; "plain" passes neither flag, as the published code does, and torch picks for itself.
ADAMW_IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {}}


def build_optimizer(model, args, implementation: str | None = None):
    """AdamW with betas (0.9, 0.95), no weight decay on biases and 1-D parameters; fused (CUDA and CPU)
    unless another ``implementation`` is asked for."""
    if implementation is None:
        implementation = "fused" if device_type(args) in ("cuda", "cpu") else "plain"
    groups = param_groups(model, args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), **ADAMW_IMPLEMENTATIONS[implementation])


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


def restore(model, optimizer, scaler, args):
    path = resume_path(args)
    if not path:
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
def pretrain_step(model, inputs, targets, optimizer, scaler, args, update: bool = True):
    """One training step: the forward pass under autocast (``--amp``; the loss in fp32), the backward of
    loss / ``--accum_iter``, and when ``update`` the optimizer step, skipped on the device when the loss
    or a gradient is not finite. ``model`` may be compiled (:func:`compiled`) and DDP-wrapped.

    Returns the detached loss and whether it was finite, 0-d tensors on the device: no host sync.
    tools/benchmark.py times this very function.
    """
    with autocast(args):
        loss, _, _ = model(inputs, targets, mask_ratio=args.mask_ratio)
    finite = torch.isfinite(loss.detach())
    accumulate_backward(model, loss, scaler, args, update)
    if update:
        step_optimizer(optimizer, scaler, finite)
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), finite


def train_one_epoch(model, loader, optimizer, scaler, epoch, args, norm, writer, stop_flag, guard, run=None):
    model.train()
    steps = len(loader) if not args.max_steps_per_epoch else min(len(loader), args.max_steps_per_epoch)
    meter = EpochMeter(epoch, steps, args, guard, writer, run)
    interrupted = False
    optimizer.zero_grad(set_to_none=True)
    for it, (inputs, targets, n_bad) in enumerate(loader):
        if it >= steps:
            break
        meter.skipped(n_bad)
        if it % args.accum_iter == 0:
            meter.lr = adjust_learning_rate(optimizer, epoch + it / steps, args)
        inputs = norm(inputs)
        targets = norm(targets) if targets is not None else None
        loss, finite = pretrain_step(model, inputs, targets, optimizer, scaler, args,
                                     update=(it + 1) % args.accum_iter == 0)
        meter.step(it, loss, finite, inputs.shape[0])
        if stop_flag.get("stop"):
            interrupted = it + 1 < steps
            break
    return meter.finish(interrupted)


@torch.no_grad()
def evaluate(model, loader, args, norm):
    """Validation loss with a fixed mask per batch position, comparable across epochs."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    total = torch.zeros(2, device=args.device)
    for inputs, targets, _ in loader:
        inputs = norm(inputs)
        targets = norm(targets) if targets is not None else None
        noise = torch.rand(inputs.shape[0], model.num_patches, generator=gen).to(args.device)
        with autocast(args):
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


def compiled(model, args, mode: str | None = None):
    """``torch.compile`` (with ``mode``) when asked, or by default on CUDA (not with --deterministic).
    Measured on the H200 for the published models (the anchors in docs/performance.md): +38 % img/s for
    Deblurring MAE-B, +43 % for Deblurring ConvMAE-B. When compiling was not asked for explicitly, a
    compiler failure (e.g. no C compiler for Triton) falls back to eager execution with a warning
    instead of stopping the run."""
    if args.compile is None:
        args.compile = device_type(args) == "cuda" and not args.deterministic
        if args.compile:
            import torch._dynamo as dynamo  # (a plain `import torch._dynamo` would make `torch` local here)
            dynamo.config.suppress_errors = True
    return torch.compile(model, mode=mode) if args.compile else model


# ------------------------------------------------------------------------------ main
# what the console shows of each epoch's log.txt record
EPOCH_SUMMARY = ("train_loss", "val_loss", "train_lr", "train_images_per_sec", "train_nonfinite_steps",
                 "train_skipped_files")


def main(args):
    start_run(args, invalid_training_flags(args) + invalid_pretrain_flags(args))
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
    scaler = grad_scaler(args)
    optimizer = build_optimizer(model, args)
    restore(model, optimizer, scaler, args)
    warn_on_schedule(args)
    # recorded in the checkpoint's args, so tools can rebuild the model and its normalisation
    args.loss_on, args.data_mean, args.data_std = loss_on, mean, std

    train_model = wrap_ddp(compiled(model, args), args, gradient_as_bucket_view=True)
    writer = open_writer(args)
    print(f"model {args.model} (loss on {loss_on} patches), lr {args.lr:.3e}, effective batch "
          f"{args.batch_size * args.accum_iter * du.get_world_size()}, amp {amp_dtype(args)}, device {args.device}")

    stop_flag = {}
    install_sigterm_handler(stop_flag)
    guard = NonFiniteGuard(args.max_nonfinite, args.device, args.output_dir, args.distributed)
    run = RunProgress(args.epochs)
    for epoch in range(args.start_epoch, args.epochs):
        start_epoch_data(train_loader, epoch, args)
        try:
            stats = train_one_epoch(train_model, train_loader, optimizer, scaler, epoch, args, norm, writer,
                                    stop_flag, guard, run)
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
            print(epoch_summary(log, EPOCH_SUMMARY, run), flush=True)
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
