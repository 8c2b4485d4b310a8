r"""Classification fine-tuning of ViT / ConvViT encoders, and evaluation (``--eval``).

    python main_finetune.py --seed 0 --data_path /data/cls --output_dir out --model vit_base_patch16 \
        --finetune pretrain.pth --blr 1e-4 --batch_size 256
    python main_finetune.py --batch_size 256 --model vit_base_patch16 --data_path /data/cls \
        --nb_classes 2 --output_dir results --resume out/checkpoint-best.pth --eval

Data: ``data_path/{train,val,test}/<class>/*`` (util/cls_datasets.py). The model is selected on the
validation split (``--select_metric``), training stops early after ``--early_stops`` epochs without
improvement, and the test split is always evaluated with the best model at the end. Only
``checkpoint-best.pth`` (weights) and ``checkpoint-last.pth`` (weights + optimizer, for resuming) are
kept. Evaluation writes results.json / results.txt, predictions.csv and ROC / confusion-matrix PNGs
(util/metrics.py), per image and per group of images (``--group_by``: the frames of one cine file by
default; the bootstrap resamples groups); under torchrun every image is counted exactly once.
"""
from __future__ import annotations

import argparse
import os
import random
import warnings

from util.arguments import (RANDAUGMENT, SELECT_METRICS, add_checkpoint_arguments, add_classification_data_arguments,
                            add_classifier_model_group, add_evaluation_arguments, add_launch_arguments,
                            add_output_arguments, add_precision_arguments, add_schedule_arguments, input_hw,
                            make_parser)

# The published script trains "forever" and relies on early stopping; its cosine schedule over
# 10 million epochs is therefore flat after the warm-up. Kept so the published commands behave alike.
PUBLISHED_EPOCHS = 10_000_000
PRETRAINED_HEAD_KEYS = ("head.", "fc_norm.")


def get_args_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    model = add_classifier_model_group(p)
    model.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    model.add_argument("--global_pool", action="store_true", default=True,
                       help="average-pool the patch tokens + fc_norm (default)")
    model.add_argument("--cls_token", action="store_false", dest="global_pool",
                       help="classify from the cls token (ViT) instead of global pooling")
    model.add_argument("--first_patch_token", action="store_const", const="first_patch", dest="global_pool",
                       help="ConvViT only: classify from the first patch token after norm, as the published "
                            "--cls_token did for ConvViT (here --cls_token averages the normalised tokens)")

    optimisation = p.add_argument_group("optimisation")
    add_schedule_arguments(optimisation, batch_size=128, epochs=PUBLISHED_EPOCHS, blr=1e-3, min_lr=1e-6,
                           warmup_epochs=5, weight_decay=0.05,
                           epochs_help="last epoch of the schedule (default as published: effectively until "
                                       "early stopping, with a flat lr after warm-up; set e.g. 100 for a real "
                                       "cosine decay)")
    optimisation.add_argument("--layer_decay", type=float, default=0.75,
                              help="layer-wise lr decay: each block closer to the input gets this factor (1: none)")
    optimisation.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm (default: off)")
    add_precision_arguments(optimisation)

    augmentation = p.add_argument_group("augmentation (timm)")
    augmentation.add_argument("--aa", type=str, default=RANDAUGMENT, help="RandAugment policy ('none' to disable)")
    augmentation.add_argument("--color_jitter", type=float, default=None,
                              help="colour jitter strength, used only with --aa none (default: off)")
    augmentation.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    augmentation.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    augmentation.add_argument("--remode", type=str, default="pixel", help="random erasing mode (timm)")
    augmentation.add_argument("--recount", type=int, default=1, help="random erasing count")
    # published flags without effect (there too: evaluation is always distributed here)
    augmentation.add_argument("--resplit", action="store_true", help=argparse.SUPPRESS)
    augmentation.add_argument("--mixup", type=float, default=0, help="mixup alpha (enabled if > 0)")
    augmentation.add_argument("--cutmix", type=float, default=0, help="cutmix alpha (enabled if > 0)")
    augmentation.add_argument("--cutmix_minmax", type=float, nargs="+", default=None, metavar="F",
                              help="cutmix min/max box ratio (enables cutmix; overrides --cutmix)")
    augmentation.add_argument("--mixup_prob", type=float, default=1.0,
                              help="probability of applying mixup or cutmix to a batch")
    augmentation.add_argument("--mixup_switch_prob", type=float, default=0.5,
                              help="probability of cutmix instead of mixup when both are enabled")
    augmentation.add_argument("--mixup_mode", type=str, default="batch", choices=("batch", "pair", "elem"),
                              help="mix per batch, per pair or per element")

    add_checkpoint_arguments(p, finetune_help="pretrained checkpoint to start from (head re-initialised)",
                             resume_help="fine-tuned checkpoint: continue training, or evaluate with --eval")
    add_classification_data_arguments(p)
    evaluation = add_evaluation_arguments(
        p, select_help="validation metric that selects the best epoch (default acc, as published)",
        eval_help="only evaluate the --resume checkpoint")
    evaluation.add_argument("--early_stops", default=200, type=int,
                            help="stop after this many epochs without improvement on val")
    evaluation.add_argument("--tta", action="store_true",
                            help="average the probabilities of the image and its mirror")
    evaluation.add_argument("--dist_eval", action="store_true", help=argparse.SUPPRESS)
    add_output_arguments(p)
    add_launch_arguments(p)
    return p


# `--help` and usage errors answer here, before the imports below (torch, timm, OpenCV: seconds), which
# therefore follow code
if __name__ == "__main__":
    get_args_parser().parse_args()

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

import models_vit  # noqa: F401  (registers the fine-tuning models)
from models_mae import is_deblurring_model
from util import distributed as du
from util.blur import blur_spec_from_args
from util.checkpoint import (FIRST_CONV_KEYS, CheckpointError, extract_state_dict, load_auto_resume_checkpoint,
                             load_checkpoint_file, load_weights, save_checkpoint)
from util.cls_datasets import (SPLITS, ClassificationDataset, build_transform, collate_labelled, find_class_names,
                               pixel_mean_std, read_groups_csv, resolve_class_names)
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, DatasetError, worker_options
from util.lr_decay import param_groups
from util.lr_sched import adjust_learning_rate, effective_lr
from util.metrics import (METRIC_NAMES, choose_threshold, evaluate_and_write, evaluate_predictions,
                          format_results_table, gather_unique_predictions, resolve_pos_class)
from util.provenance import recorded_args, recorded_input_blur, resolve_colour, resolve_input_blur
from util.registry import finetune_models
from util.training import (EpochMeter, NonFiniteGuard, RunProgress, StopTraining, accumulate_backward, amp_dtype,
                           append_log, autocast, device_type, epoch_seed, epoch_summary, grad_scaler,
                           install_sigterm_handler, invalid_training_flags, open_writer, plain_args, progress_bar,
                           resume_path, run_cli, start_run, step_optimizer, warn_on_schedule, wrap_ddp)


# ------------------------------------------------------------------------------ checkpoints in
def first_layer_channels(state: dict):
    for key in FIRST_CONV_KEYS:
        if key in state and state[key].ndim == 4:
            return int(state[key].shape[1])
    return None


def resolve_model_inputs(args, source_ckpt, recorded: dict) -> None:
    """Fill ``args.in_chans`` and ``args.input_size`` when not given: the --resume / --finetune
    checkpoint defines them (a grey model must not silently get its first layer widened to 3
    channels; a model is fine-tuned and evaluated at the size it was trained at)."""
    if args.in_chans is None:
        state = extract_state_dict(source_ckpt) if source_ckpt is not None else {}
        args.in_chans = first_layer_channels(state) or 3
    if args.input_size is None:
        size = recorded.get("input_size")
        args.input_size = [size] if isinstance(size, int) else list(size or [224])
        if size:
            print(f"input size {' x '.join(map(str, input_hw(args)))}, as {checkpoint_of(args)} was trained "
                  "(--input_size changes it)")
    if len(args.input_size) not in (1, 2):
        raise SystemExit("--input_size takes one number (square) or two (H W)")


def checkpoint_of(args) -> str:
    """The checkpoint this run starts from: --resume (or --auto_resume's), else --finetune ('' if none)."""
    return getattr(args, "resume_path", "") or args.finetune


def apply_recorded_inputs(args, recorded: dict) -> None:
    """Prepare the inputs as the checkpoint's model was trained: its blur (a deblurring-pretrained
    encoder is fine-tuned on inputs blurred the same way) and its colour decision, unless overridden
    (``--blur``, ``--blur none``). Sets what this run's checkpoints record (``args.input_blur``)."""
    checkpoint = checkpoint_of(args)
    recorded_blur = (recorded_input_blur(recorded, is_deblurring_model(str(recorded.get("model") or "")))
                     if checkpoint else None)
    resolve_input_blur(args, recorded_blur, checkpoint, args.data_path)
    if checkpoint:
        resolve_colour(args, recorded, checkpoint)


# ------------------------------------------------------------------------------ data
def required_splits(args):
    if not args.eval:
        return SPLITS
    # an operating point chosen on val needs the val predictions also when test is evaluated
    return (args.eval_split,) if args.eval_split == "val" or not target_operating_point(args) else ("val", "test")


def check_split_folders(args) -> None:
    if not args.data_path or not os.path.isdir(args.data_path):
        raise SystemExit(f"--data_path '{args.data_path}' is not a folder. Pass the dataset folder that holds "
                         "train/, val/ and test/, each with one sub-folder per class.")
    missing = [s for s in required_splits(args) if not os.path.isdir(os.path.join(args.data_path, s))]
    if missing:
        raise SystemExit(f"{args.data_path} has no {', '.join(missing)} folder(s). "
                         f"{'--eval' if args.eval else 'Fine-tuning'} needs "
                         f"{', '.join(os.path.join(args.data_path, s) for s in required_splits(args))}, "
                         "each with one sub-folder per class.")


def build_datasets(args, class_names):
    """Datasets of the required splits, without transforms yet (normalisation may need the data)."""
    blur = blur_spec_from_args(args, prefix="blur_")
    if args.keep_channels and args.in_chans == 1:
        raise SystemExit("error: --keep_channels keeps colour, which a 1-channel model cannot take; "
                         "use --in_chans 3 or leave out --keep_channels")
    return {split: ClassificationDataset(args.data_path, split, class_names, blur=blur, in_chans=args.in_chans,
                                         strict=args.strict_data, keep_channels=args.keep_channels)
            for split in required_splits(args)}


def normalisation(args, datasets, recorded: dict):
    """Mean/std: given > recorded by the checkpoint > measured on the training images (grey inputs)
    > ImageNet (the published 3-channel checkpoints)."""
    c = args.in_chans
    if (args.data_mean is None) != (args.data_std is None):
        raise SystemExit("pass --data_mean and --data_std together (or neither)")
    if args.data_mean is not None:
        mean, std = args.data_mean, args.data_std
    elif len(recorded.get("data_mean") or []) == c and len(recorded.get("data_std") or []) == c:
        mean, std = recorded["data_mean"], recorded["data_std"]
    elif c == 1:
        mean, std = pixel_mean_std(training_images(args, datasets), seed=args.seed)
        print(f"training-image mean {mean[0]:.4f}, std {std[0]:.4f}")
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if len(mean) != c or len(std) != c:
        raise SystemExit(f"--data_mean/--data_std need {c} values each (one per input channel)")
    return [float(m) for m in mean], [float(s) for s in std]


def training_images(args, datasets):
    """The training split, also under --eval when the checkpoint did not record its normalisation."""
    if "train" in datasets:
        return datasets["train"]
    if not os.path.isdir(os.path.join(args.data_path, "train")):
        raise SystemExit("--in_chans 1: the checkpoint does not record the normalisation it was trained with "
                         f"and {args.data_path} has no train/ folder to measure it; pass --data_mean M --data_std S")
    any_split = next(iter(datasets.values()))
    return ClassificationDataset(args.data_path, "train", any_split.class_names, blur=any_split.blur,
                                 in_chans=args.in_chans, strict=args.strict_data, keep_channels=args.keep_channels)


def attach_transforms(datasets, args, mean, std) -> None:
    for split, dataset in datasets.items():
        dataset.transform = build_transform(
            split == "train", input_hw(args), args.in_chans, mean, std,
            auto_augment=None if args.aa.lower() == "none" else args.aa, re_prob=args.reprob,
            re_mode=args.remode, re_count=args.recount, color_jitter=args.color_jitter)


def make_loader(dataset, args, train: bool):
    # Evaluation shards too: DistributedSampler pads with repeats, which the gathering removes.
    sampler = DistributedSampler(dataset, num_replicas=du.get_world_size(), rank=du.get_rank(),
                                 shuffle=train, seed=args.seed, drop_last=False)
    generator = torch.Generator().manual_seed(args.seed + du.get_rank())
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and device_type(args) == "cuda", drop_last=train,
                        collate_fn=collate_labelled, generator=generator, persistent_workers=False,
                        **worker_options(args.num_workers))
    if train and len(loader) == 0:
        raise SystemExit(f"{dataset.split_root}: {len(dataset)} training images make no full batch of "
                         f"--batch_size {args.batch_size} per process x {du.get_world_size()} processes; "
                         "lower --batch_size.")
    return loader


def start_epoch_data(loader, epoch: int, args) -> None:
    """Every random draw of an epoch (shuffle, augmentation in workers or here, mixup, drop path)
    follows from (seed, rank, epoch), so a resumed run continues as an uninterrupted one."""
    loader.sampler.set_epoch(epoch)
    seed = epoch_seed(args, epoch)
    loader.generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed + 1)


def describe_data(datasets, class_names, pos_class, args) -> None:
    blur = blur_spec_from_args(args, prefix="blur_")
    averaging = (f"positive class '{class_names[pos_class]}'" if len(class_names) == 2
                 else "metrics macro-averaged over the classes")
    print(f"classes {class_names}; {averaging}; blur applied on the fly: {blur.describe() if blur else 'none'}")
    for split, dataset in datasets.items():
        counts = ", ".join(f"{k} {v}" for k, v in dataset.class_counts().items())
        print(f"{split}: {len(dataset)} images ({counts})")
    if du.is_main_process():  # reads headers: once, not on every rank
        for i, dataset in enumerate(datasets.values()):  # the colour census of the first split only
            report = dataset.start_report(colour=i == 0)
            if report:
                print(report)


# ------------------------------------------------------------------------------ model
def build_model(args):
    registry = finetune_models()
    if args.model not in registry:
        raise SystemExit(f"unknown --model '{args.model}'. Valid names: {', '.join(registry.names())}")
    try:
        return registry.create(args.model, img_size=input_hw(args), in_chans=args.in_chans,
                               num_classes=args.nb_classes, drop_path_rate=args.drop_path,
                               global_pool=args.global_pool)
    except ValueError as err:
        raise SystemExit(f"--model {args.model} --input_size {' '.join(map(str, args.input_size))}: {err}")


def load_pretrained(model, path: str):
    """``--finetune``: only the classifier (head, fc_norm) may be missing; a head of another class
    count is dropped; decoders and other pretraining-only weights are reported and ignored."""
    report = load_weights(model, path, allowed_missing=PRETRAINED_HEAD_KEYS, allow_unexpected=True,
                          drop_mismatched=("head.",))
    if not any(k.startswith("head.") for k in report.loaded):
        # MAE's head initialisation: tiny weights, so the pretrained features dominate at first
        from timm.layers import trunc_normal_
        trunc_normal_(model.head.weight, std=2e-5)
        torch.nn.init.zeros_(model.head.bias)
    return report


def check_head(state: dict, nb_classes: int, class_names, path: str) -> None:
    head = state.get("head.weight")
    if head is not None and head.shape[0] != nb_classes:
        raise CheckpointError(
            f"{path} has a {head.shape[0]}-class head but the data has {nb_classes} classes "
            f"({', '.join(class_names)}). "
            f"--resume/--eval need a checkpoint fine-tuned on these classes; to train a new head from it, "
            f"pass it to --finetune instead.")


def load_finetuned(model, path: str):
    """``--resume`` / ``--eval``: the fine-tuned weights must match the model exactly."""
    report = load_weights(model, path, allowed_missing=(), allow_unexpected=False)
    if report.adapted:
        raise CheckpointError(f"{path} was fine-tuned with another number of input channels "
                              f"({report.adapted[0]}); leave out --in_chans or pass the checkpoint's.")
    return report


def build_optimizer(model, args):
    groups = param_groups(model, args.weight_decay, layer_decay=args.layer_decay)
    return torch.optim.AdamW(groups, lr=args.lr, fused=device_type(args) in ("cuda", "cpu"))


def build_mixup(args):
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


def build_criterion(args, mixup_fn):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # mixup makes soft targets and applies the smoothing itself
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


# ------------------------------------------------------------------------------ training
def mix_batch(mixup_fn, images, labels):
    """timm's Mixup needs an even batch: the odd sample out (after skipped files) waits an epoch."""
    even = images.shape[0] - images.shape[0] % 2
    return mixup_fn(images[:even], labels[:even])


def train_one_epoch(model, loader, optimizer, scaler, criterion, mixup_fn, epoch, args, writer, stop_flag, guard,
                    run=None):
    model.train()
    device = args.device
    steps = len(loader)
    meter = EpochMeter(epoch, steps, args, guard, writer, run)
    # an update is skipped if any micro-batch of its accumulation window was non-finite
    window_finite = torch.ones((), dtype=torch.bool, device=device)
    interrupted = False
    optimizer.zero_grad(set_to_none=True)
    for it, (images, labels, _, n_bad) in enumerate(loader):
        meter.skipped(n_bad)
        if it % args.accum_iter == 0:
            meter.lr = adjust_learning_rate(optimizer, epoch + it / steps, args)
        update = (it + 1) % args.accum_iter == 0
        if images is not None:
            images = images.to(device, non_blocking=True)
            targets = labels.to(device, non_blocking=True)
            if mixup_fn is not None:
                images, targets = mix_batch(mixup_fn, images, targets)
        if images is None or images.shape[0] == 0:
            continue
        with autocast(args):
            logits = model(images)
        loss = criterion(logits.float(), targets)  # the loss in fp32 whatever the autocast dtype
        finite = torch.isfinite(loss.detach())
        window_finite &= finite
        accumulate_backward(model, loss, scaler, args, update)
        if update:
            clip_gradients(model, optimizer, scaler, args.clip_grad)
            step_optimizer(optimizer, scaler, window_finite)
            optimizer.zero_grad(set_to_none=True)
            window_finite = torch.ones((), dtype=torch.bool, device=device)
        meter.step(it, loss.detach(), finite, images.shape[0])
        if stop_flag.get("stop"):
            interrupted = it + 1 < steps
            break
    return meter.finish(interrupted)


def clip_gradients(model, optimizer, scaler, max_norm):
    if not max_norm:
        return
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
    # returns the norm as a device tensor: no host sync here
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def class_probabilities(model, images, args):
    with autocast(args):
        logits = model(images)
        flipped = model(images.flip(-1)) if args.tta else None
    probs = logits.float().softmax(-1)
    if flipped is not None:
        probs = (probs + flipped.float().softmax(-1)) / 2
    return probs


@torch.no_grad()
def predict(model, loader, args, outputs=class_probabilities, width=None):
    """(indices, labels, rows, unreadable count) of the whole split, each image once, on every rank.
    ``outputs(model, images, args)`` gives a batch's rows: class probabilities by default (``width``:
    their number, default the class count)."""
    model.eval()
    indices, labels, rows, skipped = [], [], [], 0
    bar = progress_bar(len(loader), f"{loader.dataset.split} split", unit="batch")
    for images, batch_labels, batch_indices, n_bad in loader:
        skipped += n_bad
        if bar is not None:
            bar.update(1)
        if images is None:
            continue
        rows.append(outputs(model, images.to(args.device, non_blocking=True), args).float())
        labels.append(batch_labels)
        indices.append(batch_indices)
    if bar is not None:
        bar.close()
    rows = torch.cat(rows).cpu() if rows else torch.zeros(0, width or args.nb_classes)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)
    bad = du.all_reduce_sum(torch.tensor([float(skipped)], device=args.device)).item()
    dataset_size = None if bad else len(loader.dataset)  # without skips: check every image came back once
    idx, lab, table = gather_unique_predictions(indices, labels, rows, dataset_size=dataset_size)
    if len(idx) == 0:
        raise DatasetError(f"no image of {loader.dataset.split_root} could be read")
    if bad:
        print(f"warning: {int(bad)} unreadable image(s) of {loader.dataset.split_root} are not in its metrics "
              "(named in the warnings above); --strict_data stops instead")
    return idx, lab, table, int(bad)


def validation_log(labels, probs, class_names, pos_class) -> dict:
    """Per-epoch validation: the point metrics (no bootstrap) and the cross-entropy."""
    results = evaluate_predictions(labels, probs, class_names, pos_class, n_boot=0)
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()
    log = {"val_loss": float(nll)}
    log.update({f"val_{name}": results["metrics"][name]["value"] for name in METRIC_NAMES})
    return log


def target_operating_point(args):
    """``("target_sensitivity", S)`` / ``("target_specificity", S)`` when asked for, else None."""
    for name in ("target_sensitivity", "target_specificity"):
        if getattr(args, name, None) is not None:
            return name, getattr(args, name)
    return None


def prepare_evaluation(datasets, class_names, args) -> None:
    """Check the evaluation flags and give every sample its group (``--group_by``, ``--groups``)."""
    if args.groups and args.group_by not in (None, "csv"):
        raise SystemExit(f"--groups {args.groups} gives the groups of a CSV file; it cannot be combined with "
                         f"--group_by {args.group_by}. Drop one of them.")
    args.group_by = "csv" if args.groups else (args.group_by or "file")
    if args.group_by == "csv" and not args.groups:
        raise SystemExit("--group_by csv reads the groups from a CSV file: pass it with --groups FILE "
                         "(columns file,group)")
    target = target_operating_point(args)
    if (args.threshold is not None or target) and len(class_names) != 2:
        raise SystemExit(f"--threshold / --target_sensitivity / --target_specificity set the operating point of "
                         f"a two-class model; these data have {len(class_names)} classes")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise SystemExit(f"--threshold {args.threshold}: a probability in [0, 1] is needed")
    if target and not 0 < target[1] <= 1:
        raise SystemExit(f"--{target[0]} {target[1]}: a value in (0, 1] is needed (e.g. 0.9)")
    mapping = read_groups_csv(args.groups) if args.groups else None
    for dataset in datasets.values():
        dataset.assign_groups(args.group_by, mapping, source=f"--groups {args.groups}")
    counts = ", ".join(f"{split} {len(set(d.groups))}" for split, d in datasets.items())
    print(f"groups (--group_by {args.group_by}): {counts}")
    warn_on_groups_shared_between_splits(datasets, args.group_by)


def warn_on_groups_shared_between_splits(datasets, group_by: str) -> None:
    """A patient in train and test inflates every test metric; say so (a file cannot be in two splits)."""
    if group_by == "file":
        return
    names = {split: set(dataset.groups) for split, dataset in datasets.items()}
    splits = list(names)
    for i, first in enumerate(splits):
        for second in splits[i + 1:]:
            shared = sorted(names[first] & names[second])
            if shared:
                warnings.warn(f"{len(shared)} group(s) (--group_by {group_by}) have images in both {first} and "
                              f"{second}, e.g. {', '.join(shared[:5])}: the {second} metrics are not those of "
                              "unseen patients. tools/split_by_patient.py splits a dataset by group.")


def split_predictions(model, dataset, args):
    """(files, labels, probs, groups) of one split on the main process (None elsewhere); a collective."""
    idx, labels, probs, _ = predict(model, make_loader(dataset, args, train=False), args)
    return named_predictions(dataset, idx, labels, probs)


def named_predictions(dataset, indices, labels, probs):
    """(files, labels, probs, groups) of the samples ``indices`` of ``dataset`` on the main process, None elsewhere."""
    if not du.is_main_process():
        return None
    return ([dataset.sample_name(int(i)) for i in indices], labels, probs,
            [dataset.sample_group(int(i)) for i in indices])


def operating_threshold(predictions, pos_class, args):
    """(threshold, how it was chosen) of ``--threshold`` / ``--target_*``; (None, None) for argmax."""
    if args.threshold is not None:
        return args.threshold, {"rule": "fixed"}
    target = target_operating_point(args)
    if target is None:
        return None, None
    _, labels, probs, groups = predictions["val"]
    try:
        threshold, achieved = choose_threshold(labels, probs, pos_class, groups=groups, **{target[0]: target[1]})
    except ValueError as err:
        raise SystemExit(f"--{target[0]} {target[1]}: {err} (the val split of {args.data_path})")
    return threshold, {"rule": target[0], target[0]: target[1], "chosen_on": "val", "level": "groups",
                       "achieved": achieved}


def evaluate_and_report(predict_split, splits, args, class_names, pos_class) -> dict:
    """Full evaluation of ``splits`` (val first when an operating point is chosen on it): every output
    file and the printed tables on the main process. ``predict_split(split)`` gives a split's
    (files, labels, probs, groups) on the main process and None elsewhere (a collective: every process
    calls it). Returns ``{split: results}`` on the main process, ``{}`` elsewhere."""
    needed = list(splits)
    if target_operating_point(args) and "val" not in needed:
        needed.insert(0, "val")
    predictions = {split: predict_split(split) for split in needed}
    if not du.is_main_process():
        return {}
    threshold, point = operating_threshold(predictions, pos_class, args)
    reports = {}
    for split, (files, labels, probs, groups) in predictions.items():
        reports[split] = evaluate_and_write(args.output_dir, split, files, labels, probs, class_names, pos_class,
                                            n_boot=args.n_boot, seed=args.seed, groups=groups,
                                            group_by=args.group_by, threshold=threshold, operating_point=point)
        print(format_results_table(reports[split], split))
    return reports


def results_summary(reports: dict, **first) -> dict:
    """The summary line of log.txt: ``first``, then each split's per-image and per-group metrics."""
    summary = dict(first)
    for split, results in reports.items():
        summary.update({f"{split}_{k}": m["value"] for k, m in results["metrics"].items()})
        summary.update({f"{split}_groups_{k}": m["value"] for k, m in results["group_level"]["metrics"].items()})
        summary.update({f"{split}_n_images": results["n_images"], f"{split}_n_groups": results["n_groups"]})
    return summary


# ------------------------------------------------------------------------------ checkpoints out
def save_last(model, optimizer, scaler, epoch, best, args) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "scaler": scaler.state_dict() if scaler is not None else None, "best": best, "args": plain_args(args)}
    save_checkpoint(state, os.path.join(args.output_dir, "checkpoint-last.pth"))


def save_best(model, epoch, best, args) -> None:
    # weights only: it is the model to evaluate or deploy; checkpoint-last.pth resumes training
    state = {"model": model.state_dict(), "epoch": epoch, "best": best, "args": plain_args(args)}
    save_checkpoint(state, os.path.join(args.output_dir, "checkpoint-best.pth"))


def restore_training_state(ckpt, path, optimizer, scaler, args) -> dict:
    """Optimizer, epoch and early-stopping state of a --resume checkpoint; returns the best-so-far."""
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        print(f"{path} holds weights only: training starts at epoch {args.start_epoch} with a fresh optimizer")
        return {}
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError):
        warnings.warn(f"{path}: its optimizer state has another parameter grouping (e.g. a published "
                      "checkpoint, made without layer decay); continuing with a fresh optimizer")
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    args.start_epoch = int(ckpt["epoch"]) + 1
    best = dict(ckpt.get("best") or {})
    if best and best.get("metric") != SELECT_METRICS[args.select_metric]:
        warnings.warn(f"{path} selected on {best.get('metric')}; this run selects on "
                      f"{SELECT_METRICS[args.select_metric]}: the best epoch is chosen afresh")
        best = {}
    so_far = f" (best so far: epoch {best['epoch']}, {best['metric']} {best['value']:.4f})" if best else ""
    print(f"resuming at epoch {args.start_epoch} from {path}{so_far}")
    return best


def is_improvement(value: float, best: dict) -> bool:
    """The first epoch is always the best so far; later ones must be strictly better. An undefined
    (NaN) value -- e.g. AUROC on a one-class split -- never beats a defined one."""
    if not best:
        return True
    if np.isnan(best["value"]):
        return not np.isnan(value)
    return value > best["value"]


def keep_best_on_disk(best: dict, model, args) -> dict:
    """A run resumed into another --output_dir must still end with its best model in that folder."""
    if not best or os.path.isfile(os.path.join(args.output_dir, "checkpoint-best.pth")):
        return best
    if best["epoch"] == args.start_epoch - 1:  # the resumed model is the best so far
        if du.is_main_process():
            save_best(model, best["epoch"], best, args)
        return best
    warnings.warn(f"the best model so far (epoch {best['epoch']}) is not in {args.output_dir}: the best epoch is "
                  f"chosen afresh from epoch {args.start_epoch} (resume in the run's own folder to keep it)")
    return {}


# ------------------------------------------------------------------------------ main
class FineTuning:
    """What this script does to the model that :func:`prepare` builds; main_linprobe.py's LinearProbe
    changes these steps and shares everything else."""

    eval_needs_resume = "--eval evaluates a fine-tuned model: pass it with --resume /path/to/checkpoint.pth"

    def settings_from_checkpoint(self, args, recorded: dict, resume_ckpt) -> None:
        """Settings the checkpoint decides when not given (none besides the model inputs here)."""

    def check_resume_checkpoint(self, state: dict, class_names, recorded: dict, args) -> None:
        check_head(state, args.nb_classes, class_names, args.resume_path)

    def attach_transforms(self, datasets, args) -> None:
        attach_transforms(datasets, args, args.data_mean, args.data_std)

    def load_weights(self, model, resume_ckpt, args) -> None:
        if resume_ckpt is not None:
            print(load_finetuned(model, args.resume_path))
        elif args.finetune:
            print(load_pretrained(model, args.finetune))
        else:
            warnings.warn("no --finetune checkpoint: training from random initialisation")

    def run(self, model, datasets, class_names, pos_class, resume_ckpt, args) -> None:
        """After :func:`prepare`: --eval, or training."""
        if args.eval:
            run_evaluation(lambda split: split_predictions(model, datasets[split], args), class_names, pos_class,
                           args)
        else:
            run_training(model, datasets, class_names, pos_class, resume_ckpt, args)


def prepare_and_run(args, task=None) -> None:
    """The classification scripts after :func:`util.training.start_run`: prepare, run, leave the process group."""
    task = task or FineTuning()
    try:
        task.run(*prepare(args, task), args)
    finally:
        du.cleanup()


def prepare(args, task=None):
    """Everything both modes need: data, classes, model with its weights (``task``: this script's
    FineTuning by default). Returns (model, datasets, class_names, pos_class, resume checkpoint or None)."""
    task = task or FineTuning()
    check_split_folders(args)
    args.resume_path = resume_path(args)
    if args.eval and not args.resume_path:
        raise SystemExit(task.eval_needs_resume)
    if args.finetune and args.resume_path:
        print(f"--resume {args.resume_path} given: --finetune {args.finetune} is not loaded")
    resume_ckpt = None
    if args.resume_path:
        load = load_checkpoint_file if args.resume else load_auto_resume_checkpoint
        resume_ckpt = load(args.resume_path)
    finetune_ckpt = load_checkpoint_file(args.finetune) if args.finetune and not resume_ckpt else None
    recorded = recorded_args(resume_ckpt or finetune_ckpt)
    resolve_model_inputs(args, resume_ckpt or finetune_ckpt, recorded)
    apply_recorded_inputs(args, recorded)
    task.settings_from_checkpoint(args, recorded, resume_ckpt)
    found = find_class_names(args.data_path, SPLITS)
    class_names = resolve_class_names(found, recorded.get("class_names") if resume_ckpt else None,
                                      args.nb_classes, args.data_path)
    args.nb_classes, args.class_names = len(class_names), class_names
    if resume_ckpt is not None:  # before any data is read: the cheapest and most telling check
        task.check_resume_checkpoint(extract_state_dict(resume_ckpt, args.resume_path), class_names, recorded, args)
    try:
        pos_class = resolve_pos_class(args.pos_class if args.pos_class is not None else 1, class_names)
    except ValueError as err:
        raise SystemExit(str(err))
    datasets = build_datasets(args, class_names)
    prepare_evaluation(datasets, class_names, args)
    args.data_mean, args.data_std = normalisation(args, datasets, recorded)
    task.attach_transforms(datasets, args)
    describe_data(datasets, class_names, pos_class, args)

    model = build_model(args)
    task.load_weights(model, resume_ckpt, args)
    del finetune_ckpt
    return model.to(args.device), datasets, class_names, pos_class, resume_ckpt


def run_evaluation(predict_split, class_names, pos_class, args) -> None:
    """``--eval``: the full evaluation of ``--eval_split`` (see :func:`evaluate_and_report`)."""
    evaluate_and_report(predict_split, (args.eval_split,), args, class_names, pos_class)
    if du.is_main_process():
        print(f"results written to {os.path.join(args.output_dir, 'results.json')} (and .txt, predictions, figures)")


def early_stop_end(best: dict, args) -> int:
    """The epoch before which early stopping ends the run if the validation metric does not improve
    (``--epochs`` without early stopping)."""
    if args.early_stops is None:
        return args.epochs
    last_best = best["epoch"] if best else args.start_epoch
    return min(args.epochs, last_best + args.early_stops + 1)


def train_epochs(model, train_model, loader, optimizer, scaler, criterion, mixup_fn, validate, best,
                 class_names, pos_class, args):
    """The epochs of a classifier's training: train, validate (``validate()`` gives the val split's
    labels and probabilities on every process), keep checkpoint-best.pth by the selection metric and
    checkpoint-last.pth, log, and stop early after ``--early_stops`` epochs without improvement (None:
    never). ``train_model`` is ``model`` as trained (DDP-wrapped, or a view of it). Returns (the best
    epoch's record, whether training finished rather than being interrupted by SIGTERM)."""
    metric = SELECT_METRICS[args.select_metric]
    patience = args.early_stops
    warn_on_schedule(args)
    writer = open_writer(args)
    stop_flag = {}
    install_sigterm_handler(stop_flag)
    guard = NonFiniteGuard(args.max_nonfinite, args.device, args.output_dir, args.distributed)
    run = RunProgress(early_stop_end(best, args), early_stop=early_stop_end(best, args) < args.epochs)
    finished = True
    for epoch in range(args.start_epoch, args.epochs):
        if best and patience is not None and epoch - best["epoch"] > patience:
            break  # a resumed run that had already stopped early
        start_epoch_data(loader, epoch, args)
        try:
            stats = train_one_epoch(train_model, loader, optimizer, scaler, criterion, mixup_fn, epoch, args, writer,
                                    stop_flag, guard, run)
        except StopTraining as err:
            raise SystemExit(str(err))
        if stats.pop("interrupted"):
            # a partial epoch: labelled as the previous one, so a resume runs this epoch again
            if du.is_main_process():
                save_last(model, optimizer, scaler, epoch - 1, best, args)
            print(f"SIGTERM received during epoch {epoch}: saved checkpoint-last.pth; exiting", flush=True)
            finished = False
            break
        log = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()},
               **validation_log(*validate(), class_names, pos_class)}
        if is_improvement(log[f"val_{metric}"], best):
            best = {"epoch": epoch, "metric": metric, "value": log[f"val_{metric}"]}
            if du.is_main_process():
                save_best(model, epoch, best, args)
        log.update(best_epoch=best["epoch"], **{f"best_val_{metric}": best["value"]})
        run.end_epoch = early_stop_end(best, args)
        if du.is_main_process():
            save_last(model, optimizer, scaler, epoch, best, args)
            append_log(args.output_dir, log, writer, epoch)
            print(epoch_summary(log, ("train_loss", "val_loss", f"val_{metric}", "best_epoch", "train_lr",
                                      "train_images_per_sec"), run), flush=True)
        if stop_flag.get("stop"):
            print(f"SIGTERM received: checkpoint of epoch {epoch} saved; exiting", flush=True)
            finished = False
            break
        if patience is not None and epoch - best["epoch"] >= patience:
            print(f"early stop: no better val {metric} for {patience} epochs since epoch {best['epoch']}")
            break
    if writer is not None:
        writer.close()
    return best, finished


def run_training(model, datasets, class_names, pos_class, resume_ckpt, args) -> None:
    args.lr = effective_lr(args, du.get_world_size())
    train_loader = make_loader(datasets["train"], args, train=True)
    val_loader = make_loader(datasets["val"], args, train=False)
    scaler = grad_scaler(args)
    optimizer = build_optimizer(model, args)
    best = restore_training_state(resume_ckpt, args.resume_path, optimizer, scaler, args) if resume_ckpt else {}
    best = keep_best_on_disk(best, model, args)
    del resume_ckpt
    mixup_fn = build_mixup(args)
    criterion = build_criterion(args, mixup_fn)
    print(f"model {args.model}, lr {args.lr:.3e} (layer decay {args.layer_decay}, weight decay "
          f"{args.weight_decay}), effective batch {args.batch_size * args.accum_iter * du.get_world_size()}, "
          f"amp {amp_dtype(args)}, device {args.device}; selecting on val {SELECT_METRICS[args.select_metric]}, "
          f"early stop after {args.early_stops} epochs without improvement")

    def validate():
        _, labels, probs, _ = predict(model, val_loader, args)
        return labels, probs

    best, finished = train_epochs(model, wrap_ddp(model, args), train_loader, optimizer, scaler, criterion, mixup_fn,
                                  validate, best, class_names, pos_class, args)
    if finished:
        evaluate_best(model, best, lambda split: split_predictions(model, datasets[split], args), class_names,
                      pos_class, args)


def evaluate_best(model, best, predict_split, class_names, pos_class, args) -> None:
    """Validation and test splits with the best checkpoint (always, however training ended)."""
    du.barrier()  # the main process has finished writing checkpoint-best.pth
    path = os.path.join(args.output_dir, "checkpoint-best.pth")
    if not os.path.isfile(path) and not best:
        raise SystemExit(f"no epoch was trained (resumed at epoch {args.start_epoch}, --epochs {args.epochs}) and "
                         f"{args.output_dir} holds no checkpoint-best.pth to evaluate: evaluate the run's own with "
                         "--eval --resume RUN_FOLDER/checkpoint-best.pth")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing on this node: --output_dir must be on a file system that every "
                         "process can read")
    load_weights(model, path, allowed_missing=(), allow_unexpected=False)
    print(f"evaluating the best model (epoch {best.get('epoch')}) on val and test")
    reports = evaluate_and_report(predict_split, ("val", "test"), args, class_names, pos_class)
    if du.is_main_process():
        summary = results_summary(reports, best_epoch=best.get("epoch"), select_metric=best.get("metric"))
        append_log(args.output_dir, summary, None, 0)


def invalid_finetune_flags(args) -> list:
    """One message per fine-tuning flag whose value is out of its range (before any work)."""
    problems = []
    for flag, low, high in (("drop_path", 0, 1), ("smoothing", 0, 1)):  # [low, high)
        value = getattr(args, flag)
        if not low <= value < high:
            problems.append(f"--{flag} {value}: must be in [{low}, {high})")
    for flag in ("reprob", "mixup_prob", "mixup_switch_prob"):  # probabilities
        value = getattr(args, flag)
        if not 0 <= value <= 1:
            problems.append(f"--{flag} {value}: must be in [0, 1]")
    if not 0 < args.layer_decay <= 1:
        problems.append(f"--layer_decay {args.layer_decay}: must be in (0, 1] (1: no decay)")
    for flag in ("mixup", "cutmix"):
        if not getattr(args, flag) >= 0:
            problems.append(f"--{flag} {getattr(args, flag)}: must be >= 0 (0: off)")
    if args.clip_grad is not None and not args.clip_grad > 0:
        problems.append(f"--clip_grad {args.clip_grad}: must be > 0 (leave it out for no clipping)")
    problems += [f"--{flag} {getattr(args, flag)}: must be at least 0"
                 for flag in ("early_stops", "n_boot", "recount") if getattr(args, flag) < 0]
    if args.input_size is not None and (len(args.input_size) not in (1, 2) or min(args.input_size) < 1):
        problems.append(f"--input_size {' '.join(map(str, args.input_size))}: one positive number (square) "
                        "or two (H W)")
    return problems


def main(args):
    start_run(args, invalid_training_flags(args) + invalid_finetune_flags(args))
    prepare_and_run(args)


def cli(argv=None):
    run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    cli()
