"""Frozen-encoder evaluation of a pretrained encoder: linear probing (default) and k-NN (``--knn``).

    python main_linprobe.py --data_path /data/cls --output_dir out_linprobe --model vit_base_patch16 \
        --finetune pretrain.pth
    python main_linprobe.py --data_path /data/cls --output_dir out_knn --model vit_base_patch16 \
        --finetune pretrain.pth --knn
    python main_linprobe.py --data_path /data/cls --output_dir results --model vit_base_patch16 \
        --resume out_linprobe/checkpoint-best.pth --eval

Linear probing as facebookresearch/mae's main_linprobe.py: the encoder is frozen (no gradients, eval
mode), its pooled features pass a BatchNorm without affine parameters (eps 1e-6) and a linear layer
(weights drawn from a truncated normal, std 0.01) -- together ``model.head``, so checkpoint keys are
``head.0.*`` (BatchNorm statistics) and ``head.1.*`` (linear layer). Defaults are the published
recipe: LARS, blr 0.1, weight decay 0, 90 epochs with 10 warm-up epochs, RandomResizedCrop + flip
only, the cls token. ``--cache_features`` computes the features of the un-augmented images once and
trains the head on them. Validation and test features never change (no augmentation), so they are
computed once in every mode.

k-NN (``--knn``): cosine similarity to the training split's features, the ``--knn_k`` nearest vote with
weights exp(similarity / ``--knn_t``); the class probability is the class's share of the votes
(util/knn.py). Nothing is trained.

Data layout, model selection on val, evaluation of the test split with the best head, the metrics
and the output files (results.json / results.txt, predictions.csv, ROC and confusion-matrix PNGs) are
those of main_finetune.py, whose functions this script uses.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from torch.utils.data import DistributedSampler

from main_finetune import (SELECT_METRICS, apply_recorded_inputs, autocast, build_datasets, build_model,
                           check_split_folders, describe_data, input_hw, is_improvement, load_finetuned,
                           load_pretrained, make_loader, normalisation, resolve_model_inputs, restore_training_state,
                           resume_path, save_best, save_last, seed_everything, start_epoch_data, train_one_epoch,
                           validation_log)
from models_vit import ConvViT
from util import distributed as du
from util.blur import add_blur_arguments
from util.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file, load_weights
from util.cls_datasets import SPLITS, build_transform, find_class_names, resolve_class_names
from util.datasets import DatasetError
from util.fileio import check_writable
from util.knn import knn_class_probabilities
from util.lars import LARS
from util.lr_sched import effective_lr
from util.metrics import evaluate_and_write, format_results_table, gather_unique_predictions, resolve_pos_class
from util.provenance import recorded_args
from util.training import NonFiniteGuard, StopTraining, append_log, install_sigterm_handler, run_cli

PROBE_HEAD_KEYS = ("head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Deblurring MIM linear probing and k-NN evaluation of a frozen encoder", add_help=True)
    p.add_argument("--batch_size", default=512, type=int,
                   help="images (or cached features) per process per iteration (512 as published, where 32 GPUs "
                        "made an effective batch of 16384; lower it for small datasets)")
    p.add_argument("--epochs", default=90, type=int)
    p.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    # model
    p.add_argument("--model", default="convvit_base_patch16", type=str,
                   help="vit_{base,large}_patch16, vit_huge_patch14, convvit_{base,large,huge}_patch16, tiny "
                        "variants (wrong names list the valid ones)")
    p.add_argument("--input_size", default=None, type=int, nargs="+",
                   help="input size: one number (square) or H W (default: the --resume checkpoint's, else 224)")
    p.add_argument("--in_chans", default=None, type=int, choices=(1, 3),
                   help="input channels (default: those of the --resume/--finetune checkpoint's first layer, else 3)")
    p.add_argument("--global_pool", action="store_true", default=None,
                   help="features: average of the patch tokens + fc_norm (not trained here: a LayerNorm "
                        "without learnt scale unless the checkpoint has one)")
    p.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="features: the cls token after the final norm (default, as published; with --resume: "
                        "the checkpoint's choice); ConvViT has no cls token and averages its normalised patch tokens")
    # optimisation
    p.add_argument("--optimizer", default="lars", choices=("lars", "sgd"),
                   help="lars (published) or sgd (SGD with momentum: for small datasets, where LARS's small "
                        "relative steps need more iterations than the data gives)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight_decay", type=float, default=0.0, help="on the linear weights only (0 as published)")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * eff. batch / 256)")
    p.add_argument("--blr", type=float, default=0.1, help="base lr: lr = blr * effective batch / 256")
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--warmup_epochs", type=float, default=10)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                   help="precision of the frozen encoder (auto: bf16 on GPUs that support it, fp16 on older "
                        "ones, none on CPU); the head always runs in fp32")
    p.add_argument("--max_nonfinite", type=int, default=20,
                   help="stop after this many consecutive steps with a non-finite loss")
    p.add_argument("--cache_features", action="store_true",
                   help="compute the features of the un-augmented training images once and train the head on "
                        "them (no augmentation; fast on small datasets)")
    # k-NN
    p.add_argument("--knn", action="store_true",
                   help="k-NN evaluation of the --finetune encoder instead of linear probing (nothing is trained)")
    p.add_argument("--knn_k", default=20, type=int, help="neighbours that vote")
    p.add_argument("--knn_t", default=0.07, type=float, help="temperature of the vote weights exp(cos / T)")
    # checkpoints
    p.add_argument("--finetune", default="",
                   help="checkpoint whose encoder is evaluated: pretraining (all four families, published ones "
                        "included), fine-tuned or linear-probe; its classifier, if any, is not used")
    p.add_argument("--resume", default="", help="linear-probe checkpoint: continue training, or evaluate with --eval")
    p.add_argument("--auto_resume", action="store_true", help="resume from output_dir/checkpoint-last.pth if present")
    p.add_argument("--start_epoch", default=0, type=int)
    # data
    p.add_argument("--data_path", default="", type=str,
                   help="folder with train/, val/, test/ (one sub-folder per class)")
    p.add_argument("--nb_classes", default=None, type=int, help="number of classes (default: the class folders)")
    p.add_argument("--pos_class", default=None,
                   help="positive class of the binary metrics, by name or index (default: class 1, the "
                        "second folder alphabetically)")
    add_blur_arguments(p, prefix="blur_", method_flag="--blur", default_method=None)
    p.add_argument("--strict_data", action="store_true", help="stop at an unreadable image instead of skipping it")
    p.add_argument("--keep_channels", action="store_true",
                   help="keep colour images in colour (default: converted to grey, as in pretraining and "
                        "fine-tuning); needs --in_chans 3")
    p.add_argument("--data_mean", type=float, nargs="+", default=None)
    p.add_argument("--data_std", type=float, nargs="+", default=None)
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--pin_mem", action="store_true", default=True)
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    # selection and evaluation
    p.add_argument("--select_metric", default="acc", choices=tuple(SELECT_METRICS),
                   help="validation metric that selects the best epoch's head")
    p.add_argument("--eval", action="store_true", help="only evaluate the --resume linear-probe checkpoint")
    p.add_argument("--eval_split", default="test", choices=("val", "test"), help="split evaluated by --eval")
    p.add_argument("--n_boot", default=1000, type=int, help="bootstrap resamples for the 95%% CIs (0: none)")
    # outputs
    p.add_argument("--output_dir", "--output", default="./output_dir", type=str)
    p.add_argument("--log_dir", default=None, type=str, help="TensorBoard folder (default: output_dir)")
    p.add_argument("--print_freq", default=20, type=int, help="log every N iterations")
    p.add_argument("--seed", default=0, type=int)
    du.add_launch_arguments(p)
    # read by the main_finetune functions used here: no stochastic depth (the encoder is frozen and in
    # eval mode anyway), no gradient clipping (as published)
    p.set_defaults(drop_path=0.0, clip_grad=None)
    return p


def check_flags(args) -> None:
    if args.knn and (args.eval or args.resume or args.auto_resume):
        raise SystemExit("--knn evaluates the encoder of a --finetune checkpoint and trains nothing: leave out "
                         "--eval / --resume / --auto_resume")
    if args.knn and not args.finetune:
        warnings.warn("--knn without --finetune: evaluating a randomly initialised encoder")
    if args.knn_k < 1 or args.knn_t <= 0:
        raise SystemExit(f"--knn_k must be >= 1 and --knn_t > 0 (got {args.knn_k}, {args.knn_t})")
    if not args.knn and not args.eval and args.batch_size < 2:
        raise SystemExit("--batch_size must be at least 2: the BatchNorm before the linear head normalises "
                         "with the statistics of each batch")


# ------------------------------------------------------------------------------ model
def pooled_features(model, images: torch.Tensor) -> torch.Tensor:
    """What the classifier of ``model`` sees: the pooled, normalised encoder output, (N, D)."""
    if isinstance(model, ConvViT):
        return model.forward_features(images)
    return model.forward_head(model.forward_features(images), pre_logits=True)


def attach_probe_head(model) -> None:
    """MAE's linear probe: ``head`` becomes BatchNorm1d(affine=False, eps 1e-6) + a fresh linear layer
    (trunc. normal std 0.01, as MoCo v3), and only the head is trainable."""
    linear = model.head
    trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    model.head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)


class FrozenEncoderProbe(nn.Module):
    """The training view of a probe for ``main_finetune.train_one_epoch``: the encoder stays in eval
    mode and runs without autograd (under the caller's autocast); the head runs in fp32. ``head`` may
    be the DDP-wrapped ``model.head``; with ``features_in`` the inputs are cached features."""

    def __init__(self, model, head, features_in: bool):
        super().__init__()
        self.model, self.head, self.features_in = model, head, features_in

    def train(self, mode: bool = True):
        self.training = mode
        self.model.eval()
        self.head.train(mode)
        return self

    def no_sync(self):
        return self.head.no_sync()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.features_in:
            with torch.no_grad():
                x = pooled_features(self.model, x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.head(x.float())


def check_probe_checkpoint(state: dict, nb_classes: int, class_names, path: str) -> None:
    if not all(k in state for k in PROBE_HEAD_KEYS):
        raise CheckpointError(f"{path} is not a linear-probe checkpoint of main_linprobe.py (no "
                              f"{', '.join(PROBE_HEAD_KEYS)}). --resume/--eval take this script's "
                              "checkpoint-last.pth / checkpoint-best.pth; to probe the encoder of any other "
                              "checkpoint, pass it to --finetune.")
    classes = state["head.1.weight"].shape[0]
    if classes != nb_classes:
        raise CheckpointError(f"{path} has a {classes}-class head but the data has {nb_classes} classes "
                              f"({', '.join(class_names)}); pass it to --finetune to probe its encoder anew.")


def build_optimizer(head, args):
    """LARS over the head (published) or SGD with momentum; weight decay only on the linear weights."""
    matrices = [p for p in head.parameters() if p.ndim >= 2]
    vectors = [p for p in head.parameters() if p.ndim < 2]
    if args.optimizer == "lars":
        return LARS(head.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.SGD([{"params": matrices, "weight_decay": args.weight_decay},
                            {"params": vectors, "weight_decay": 0.0}], lr=args.lr, momentum=args.momentum)


# ------------------------------------------------------------------------------ data and features
def attach_probe_transforms(datasets, args) -> None:
    """Training images: RandomResizedCrop (bicubic) + flip only, the published probe's weak augmentation
    (no RandAugment, erasing or mixup). Everything else, and every split when features are cached or
    for k-NN: the evaluation resize + centre crop."""
    for split, dataset in datasets.items():
        augment = split == "train" and not (args.cache_features or args.knn)
        dataset.transform = build_transform(augment, input_hw(args), args.in_chans, args.data_mean, args.data_std,
                                            auto_augment=None, re_prob=0.0, color_jitter=None)


@dataclass
class SplitFeatures:
    """The features of one split, every readable image once, in dataset order (the same on every process)."""
    dataset: object
    indices: np.ndarray
    labels: torch.Tensor
    features: torch.Tensor  # (N, D) float32 on the device

    def files(self):
        return [self.dataset.sample_name(int(i)) for i in self.indices]


@torch.no_grad()
def extract_features(model, dataset, args) -> SplitFeatures:
    """Encode a split (sharded over the processes, then gathered); unreadable images are left out
    with a warning, as main_finetune's evaluation does."""
    model.eval()
    loader = make_loader(dataset, args, train=False)
    indices, labels, feats, skipped, start = [], [], [], 0, time.time()
    for it, (images, batch_labels, batch_indices, n_bad) in enumerate(loader):
        skipped += n_bad
        if images is not None:
            with autocast(args):
                feats.append(pooled_features(model, images.to(args.device, non_blocking=True)).float())
            labels.append(batch_labels)
            indices.append(batch_indices)
        if (it + 1) % args.print_freq == 0:
            print(f"features of {dataset.split} [{it + 1}/{len(loader)}]")
    feats = torch.cat(feats).cpu() if feats else torch.zeros(0, model.head[0].num_features)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)
    bad = int(du.all_reduce_sum(torch.tensor([float(skipped)], device=args.device)).item())
    # rows of any width gather like probabilities: each image once, sorted by index, on every process
    idx, lab, table = gather_unique_predictions(indices, labels, feats, dataset_size=None if bad else len(dataset))
    if len(idx) == 0:
        raise DatasetError(f"no image of {dataset.split_root} could be read")
    if bad:
        print(f"warning: {bad} unreadable image(s) of {dataset.split_root} are left out (named in the warnings "
              "above); --strict_data stops instead")
    print(f"features of {dataset.split}: {len(idx)} images x {table.shape[1]} in {time.time() - start:.1f} s")
    return SplitFeatures(dataset, idx, torch.from_numpy(lab),
                         torch.from_numpy(table).to(device=args.device, dtype=torch.float32))


class FeatureBatches:
    """Shuffled training batches of cached features, sharded like a DataLoader with a
    DistributedSampler (``start_epoch_data`` seeds it per epoch); yields what ``collate_labelled`` does."""

    def __init__(self, split: SplitFeatures, args):
        # the whole table lives on the device: a batch is one gather, no host-to-device copy
        self.features, self.labels = split.features, split.labels.to(split.features.device)
        self.batch_size = args.batch_size
        self.sampler = DistributedSampler(split.labels, num_replicas=du.get_world_size(), rank=du.get_rank(),
                                          shuffle=True, seed=args.seed, drop_last=False)
        self.generator = torch.Generator()  # unused (no workers); seeded for the same interface
        if len(self) == 0:
            raise SystemExit(f"{split.dataset.split_root}: {len(split.labels)} training images make no full batch "
                             f"of --batch_size {args.batch_size} per process x {du.get_world_size()} processes; "
                             "lower --batch_size.")

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        order = torch.tensor(list(self.sampler), dtype=torch.int64).to(self.features.device)
        for b in range(len(self)):
            rows = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.features[rows], self.labels[rows], rows, 0


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def head_probabilities(model, split: SplitFeatures, chunk: int = 8192) -> torch.Tensor:
    model.head.eval()
    return torch.cat([model.head(split.features[i:i + chunk]).float().softmax(-1)
                      for i in range(0, len(split.labels), chunk)]).cpu()


def report(split: SplitFeatures, probs: torch.Tensor, name: str, args, class_names, pos_class):
    """Every output file of one split (main process) and its results dict."""
    if not du.is_main_process():
        return None
    results = evaluate_and_write(args.output_dir, name, split.files(), split.labels, probs, class_names, pos_class,
                                 n_boot=args.n_boot, seed=args.seed)
    print(format_results_table(results, name))
    return results


def summarise(summary: dict, results_by_split: dict) -> dict:
    for split, results in results_by_split.items():
        if results is not None:
            summary.update({f"{split}_{k}": m["value"] for k, m in results["metrics"].items()})
    return summary


# ------------------------------------------------------------------------------ main
def prepare(args):
    """Data, classes and the model with its weights and probe head. Returns
    (model, datasets, class_names, pos_class, resume checkpoint or None)."""
    check_split_folders(args)
    args.resume_path = "" if args.knn else resume_path(args)
    if args.eval and not args.resume_path:
        raise SystemExit("--eval evaluates a linear probe: pass its checkpoint with --resume /path/to/checkpoint.pth")
    if args.finetune and args.resume_path:
        print(f"--resume {args.resume_path} given: --finetune {args.finetune} is not loaded")
    resume_ckpt = load_checkpoint_file(args.resume_path) if args.resume_path else None
    finetune_ckpt = load_checkpoint_file(args.finetune) if args.finetune and not resume_ckpt else None
    recorded = recorded_args(resume_ckpt or finetune_ckpt)
    resolve_model_inputs(args, resume_ckpt or finetune_ckpt, recorded)
    if args.global_pool is None:
        args.global_pool = bool(recorded.get("global_pool", False)) if resume_ckpt is not None else False
    apply_recorded_inputs(args, recorded)
    found = find_class_names(args.data_path, SPLITS)
    class_names = resolve_class_names(found, recorded.get("class_names") if resume_ckpt else None,
                                      args.nb_classes, args.data_path)
    args.nb_classes, args.class_names = len(class_names), class_names
    if resume_ckpt is not None:  # before any data is read
        check_probe_checkpoint(extract_state_dict(resume_ckpt, args.resume_path), args.nb_classes, class_names,
                               args.resume_path)
        if recorded.get("optimizer", args.optimizer) != args.optimizer and not args.eval:
            raise SystemExit(f"{args.resume_path} was trained with --optimizer {recorded['optimizer']}: resume it "
                             "with the same optimizer")
    try:
        pos_class = resolve_pos_class(args.pos_class if args.pos_class is not None else 1, class_names)
    except ValueError as err:
        raise SystemExit(str(err))
    datasets = build_datasets(args, class_names)
    args.data_mean, args.data_std = normalisation(args, datasets, recorded)
    attach_probe_transforms(datasets, args)
    describe_data(datasets, class_names, pos_class, args)

    model = build_model(args)
    if resume_ckpt is not None:
        attach_probe_head(model)
        print(load_finetuned(model, args.resume_path))
    else:
        if args.finetune:
            print(load_pretrained(model, args.finetune))
        elif not args.knn:
            warnings.warn("no --finetune checkpoint: probing a randomly initialised encoder")
        attach_probe_head(model)  # any classifier the checkpoint had is replaced by a fresh probe head
    del finetune_ckpt
    return model.to(args.device), datasets, class_names, pos_class, resume_ckpt


def run_evaluation(model, datasets, class_names, pos_class, args) -> None:
    split = args.eval_split
    features = extract_features(model, datasets[split], args)
    report(features, head_probabilities(model, features), split, args, class_names, pos_class)
    if du.is_main_process():
        print(f"results written to {os.path.join(args.output_dir, 'results.json')} (and .txt, predictions, figures)")


def run_knn(model, datasets, class_names, pos_class, args) -> None:
    bank = extract_features(model, datasets["train"], args)
    if args.knn_k > len(bank.labels):
        warnings.warn(f"--knn_k {args.knn_k} exceeds the {len(bank.labels)} training images: all of them vote")
    results = {}
    for split in ("val", "test"):
        queries = extract_features(model, datasets[split], args)
        probs = knn_class_probabilities(bank.features, bank.labels, queries.features, args.nb_classes,
                                        k=args.knn_k, temperature=args.knn_t).cpu()
        results[split] = report(queries, probs, split, args, class_names, pos_class)
    if du.is_main_process():
        append_log(args.output_dir, summarise({"mode": "knn", "knn_k": min(args.knn_k, len(bank.labels)),
                                               "knn_t": args.knn_t}, results), None, 0)


def run_training(model, datasets, class_names, pos_class, resume_ckpt, args) -> None:
    args.lr = effective_lr(args, du.get_world_size())
    if args.cache_features:
        train_batches = FeatureBatches(extract_features(model, datasets["train"], args), args)
    else:
        train_batches = make_loader(datasets["train"], args, train=True)
    val = extract_features(model, datasets["val"], args)
    optimizer = build_optimizer(model.head, args)
    best = restore_training_state(resume_ckpt, args.resume_path, optimizer, None, args) if resume_ckpt else {}
    best = keep_best_on_disk(best, model, args)
    del resume_ckpt
    criterion = torch.nn.CrossEntropyLoss()
    metric = SELECT_METRICS[args.select_metric]

    head = model.head
    if args.distributed:  # only the head learns: only its gradients are all-reduced
        device_ids = [args.local_rank] if str(args.device).startswith("cuda") else None
        head = torch.nn.parallel.DistributedDataParallel(model.head, device_ids=device_ids)
    probe = FrozenEncoderProbe(model, head, features_in=args.cache_features)
    writer = None
    if du.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=args.log_dir or args.output_dir)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(f"linear probe of {args.model} ({frozen / 1e6:.2f} M frozen parameters, "
          f"{'cls token' if not args.global_pool else 'global pool'}), head {model.head[1].in_features} -> "
          f"{args.nb_classes}; {args.optimizer} lr {args.lr:.3e}, effective batch "
          f"{args.batch_size * args.accum_iter * du.get_world_size()}, "
          f"{'cached features' if args.cache_features else 'RandomResizedCrop + flip'}, device {args.device}; "
          f"selecting on val {metric}")

    stop_flag = {}
    install_sigterm_handler(stop_flag)
    guard = NonFiniteGuard(args.max_nonfinite, args.device, args.output_dir, args.distributed)
    finished = True
    for epoch in range(args.start_epoch, args.epochs):
        start_epoch_data(train_batches, epoch, args)
        try:
            stats = train_one_epoch(probe, train_batches, optimizer, None, criterion, None, epoch, args, writer,
                                    stop_flag, guard)
        except StopTraining as err:
            raise SystemExit(str(err))
        if stats.pop("interrupted"):
            if du.is_main_process():  # labelled as the previous epoch: a resume runs this one again
                save_last(model, optimizer, None, epoch - 1, best, args)
            print(f"SIGTERM received during epoch {epoch}: saved checkpoint-last.pth; exiting", flush=True)
            finished = False
            break
        log = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()},
               **validation_log(val.labels.numpy(), head_probabilities(model, val).numpy(), class_names, pos_class)}
        if is_improvement(log[f"val_{metric}"], best):
            best = {"epoch": epoch, "metric": metric, "value": log[f"val_{metric}"]}
            if du.is_main_process():
                save_best(model, epoch, best, args)
        log.update(best_epoch=best["epoch"], **{f"best_val_{metric}": best["value"]})
        if du.is_main_process():
            save_last(model, optimizer, None, epoch, best, args)
            append_log(args.output_dir, log, writer, epoch)
        if stop_flag.get("stop"):
            print(f"SIGTERM received: checkpoint of epoch {epoch} saved; exiting", flush=True)
            finished = False
            break
    if writer is not None:
        writer.close()
    if finished:
        evaluate_best(model, datasets, val, class_names, pos_class, best, args)


def keep_best_on_disk(best: dict, model, args) -> dict:
    """A run resumed into another --output_dir must still end with its best head in that folder."""
    if not best or os.path.isfile(os.path.join(args.output_dir, "checkpoint-best.pth")):
        return best
    if best["epoch"] == args.start_epoch - 1:  # the resumed head is the best so far
        if du.is_main_process():
            save_best(model, best["epoch"], best, args)
        return best
    warnings.warn(f"the best head so far (epoch {best['epoch']}) is not in {args.output_dir}: the best epoch is "
                  f"chosen afresh from epoch {args.start_epoch} (resume in the run's own folder to keep it)")
    return {}


def evaluate_best(model, datasets, val: SplitFeatures, class_names, pos_class, best, args) -> None:
    """Val and test with the best epoch's head (always, however training ended)."""
    du.barrier()  # the main process has finished writing checkpoint-best.pth
    path = os.path.join(args.output_dir, "checkpoint-best.pth")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing on this node: --output_dir must be on a file system that every "
                         "process can read")
    load_weights(model, path, allowed_missing=(), allow_unexpected=False)
    print(f"evaluating the best head (epoch {best.get('epoch')}) on val and test")
    test = extract_features(model, datasets["test"], args)
    results = {split: report(features, head_probabilities(model, features), split, args, class_names, pos_class)
               for split, features in (("val", val), ("test", test))}
    if du.is_main_process():
        append_log(args.output_dir, summarise({"best_epoch": best.get("epoch"), "select_metric": best.get("metric")},
                                              results), None, 0)


def main(args):
    du.init_distributed(args)
    check_flags(args)
    check_writable(args.output_dir)
    seed_everything(args.seed + du.get_rank())
    if str(args.device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    try:
        model, datasets, class_names, pos_class, resume_ckpt = prepare(args)
        if args.knn:
            run_knn(model, datasets, class_names, pos_class, args)
        elif args.eval:
            run_evaluation(model, datasets, class_names, pos_class, args)
        else:
            run_training(model, datasets, class_names, pos_class, resume_ckpt, args)
    finally:
        du.cleanup()


def cli(argv=None):
    run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    cli()
