r"""Frozen-encoder evaluation of a pretrained encoder: linear probing (default) and k-NN (``--knn``).

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

Data layout and flags, the epoch loop, model selection on val, evaluation of the test split with the
best head, the metrics per image and per group (``--group_by``), the operating point (``--threshold``,
``--target_*``) and the output files are those of main_finetune.py: :class:`LinearProbe` changes the
steps of its ``prepare`` that differ, and this script passes its own predictions to its evaluation.
"""
from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass

from util.arguments import (SELECT_METRICS, add_checkpoint_arguments, add_classification_data_arguments,
                            add_classifier_model_group, add_evaluation_arguments, add_launch_arguments,
                            add_output_arguments, add_precision_arguments, add_schedule_arguments, input_hw,
                            make_parser)

PROBE_HEAD_KEYS = ("head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias")


def get_args_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    model = add_classifier_model_group(p)
    model.add_argument("--global_pool", action="store_true", default=None,
                       help="features: average of the patch tokens + fc_norm (not trained here: a LayerNorm "
                            "without learnt scale unless the checkpoint has one)")
    model.add_argument("--cls_token", action="store_false", dest="global_pool",
                       help="features: the cls token after the final norm (default, as published; with --resume: "
                            "the checkpoint's choice); ConvViT has no cls token and averages its normalised patch "
                            "tokens")

    optimisation = p.add_argument_group("optimisation")
    add_schedule_arguments(optimisation, batch_size=512, epochs=90, blr=0.1, min_lr=0.0, warmup_epochs=10,
                           weight_decay=0.0,
                           weight_decay_help="weight decay, on the linear weights only (0 as published)",
                           batch_help="images (or cached features) per process per iteration (512 as published, "
                                      "where 32 GPUs made an effective batch of 16384; lower it for small datasets)")
    optimisation.add_argument("--optimizer", default="lars", choices=("lars", "sgd"),
                              help="lars (published) or sgd (SGD with momentum: for small datasets, where LARS's "
                                   "small relative steps need more iterations than the data gives)")
    optimisation.add_argument("--momentum", type=float, default=0.9, help="momentum of LARS / SGD")
    add_precision_arguments(optimisation, amp_help="precision of the frozen encoder (auto: bf16 on GPUs that "
                                                   "support it, fp16 on older ones, none on CPU); the head always "
                                                   "runs in fp32")
    optimisation.add_argument("--cache_features", action="store_true",
                              help="compute the features of the un-augmented training images once and train the "
                                   "head on them (no augmentation; fast on small datasets)")

    knn = p.add_argument_group("k-NN")
    knn.add_argument("--knn", action="store_true",
                     help="k-NN evaluation of the --finetune encoder instead of linear probing (nothing is trained)")
    knn.add_argument("--knn_k", default=20, type=int, help="neighbours that vote")
    knn.add_argument("--knn_t", default=0.07, type=float, help="temperature of the vote weights exp(cos / T)")

    add_checkpoint_arguments(p, finetune_help="checkpoint whose encoder is evaluated: pretraining (all four "
                                              "families, published ones included), fine-tuned or linear-probe; "
                                              "its classifier, if any, is not used",
                             resume_help="linear-probe checkpoint: continue training, or evaluate with --eval")
    add_classification_data_arguments(p)
    add_evaluation_arguments(p, select_help="validation metric that selects the best epoch's head",
                             eval_help="only evaluate the --resume linear-probe checkpoint")
    add_output_arguments(p)
    add_launch_arguments(p)
    # read by the main_finetune functions used here: no stochastic depth (the encoder is frozen and in
    # eval mode anyway), no gradient clipping and no early stopping (as published)
    p.set_defaults(drop_path=0.0, clip_grad=None, early_stops=None)
    return p


# `--help` and usage errors answer here, before the imports below (torch, timm, OpenCV: seconds), which
# therefore follow code
if __name__ == "__main__":
    get_args_parser().parse_args()

import numpy as np
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from torch.utils.data import DistributedSampler

from main_finetune import (FineTuning, evaluate_and_report, evaluate_best, keep_best_on_disk, load_finetuned,
                           load_pretrained, make_loader, named_predictions, predict, prepare_and_run,
                           restore_training_state, results_summary, run_evaluation, train_epochs)
from models_vit import ConvViT
from util import distributed as du
from util.checkpoint import CheckpointError
from util.cls_datasets import build_transform
from util.knn import knn_class_probabilities
from util.lars import LARS
from util.lr_sched import effective_lr
from util.training import append_log, autocast, invalid_training_flags, run_cli, start_run, wrap_ddp


def invalid_linprobe_flags(args) -> list:
    """One message per flag, or combination, that cannot work (before any work)."""
    problems = []
    if args.knn and (args.eval or args.resume or args.auto_resume):
        problems.append("--knn evaluates the encoder of a --finetune checkpoint and trains nothing: leave out "
                        "--eval / --resume / --auto_resume")
    if args.knn_k < 1 or args.knn_t <= 0:
        problems.append(f"--knn_k must be >= 1 and --knn_t > 0 (got {args.knn_k}, {args.knn_t})")
    if not args.knn and not args.eval and args.batch_size < 2:
        problems.append("--batch_size must be at least 2: the BatchNorm before the linear head normalises "
                        "with the statistics of each batch")
    return problems


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


def encoded(model, images: torch.Tensor, args) -> torch.Tensor:
    with autocast(args):
        return pooled_features(model, images)


@torch.no_grad()
def extract_features(model, dataset, args) -> SplitFeatures:
    """Encode a split (sharded over the processes, then gathered on every process: rows of any width
    gather like probabilities); unreadable images are left out with a warning, as in main_finetune's
    evaluation."""
    start = time.time()
    idx, labels, table, _ = predict(model, make_loader(dataset, args, train=False), args, outputs=encoded,
                                    width=model.head[0].num_features)
    print(f"features of {dataset.split}: {len(idx)} images x {table.shape[1]} in {time.time() - start:.1f} s")
    return SplitFeatures(dataset, idx, torch.from_numpy(labels),
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


def probe_predictions(model, split: SplitFeatures):
    """(files, labels, probs, groups) of the probe on a split's features, on the main process (None elsewhere)."""
    probs = head_probabilities(model, split).numpy()
    return named_predictions(split.dataset, split.indices, split.labels.numpy(), probs)


# ------------------------------------------------------------------------------ main
class LinearProbe(FineTuning):
    """main_finetune.prepare with a probe: a frozen encoder under a new BatchNorm + linear head."""

    eval_needs_resume = "--eval evaluates a linear probe: pass its checkpoint with --resume /path/to/checkpoint.pth"

    def settings_from_checkpoint(self, args, recorded: dict, resume_ckpt) -> None:
        if args.global_pool is None:
            args.global_pool = bool(recorded.get("global_pool", False)) if resume_ckpt is not None else False

    def check_resume_checkpoint(self, state: dict, class_names, recorded: dict, args) -> None:
        check_probe_checkpoint(state, args.nb_classes, class_names, args.resume_path)
        if recorded.get("optimizer", args.optimizer) != args.optimizer and not args.eval:
            raise SystemExit(f"{args.resume_path} was trained with --optimizer {recorded['optimizer']}: resume it "
                             "with the same optimizer")

    def attach_transforms(self, datasets, args) -> None:
        attach_probe_transforms(datasets, args)

    def load_weights(self, model, resume_ckpt, args) -> None:
        if resume_ckpt is not None:
            attach_probe_head(model)
            print(load_finetuned(model, args.resume_path))
            return
        if args.finetune:
            print(load_pretrained(model, args.finetune))
        elif not args.knn:
            warnings.warn("no --finetune checkpoint: probing a randomly initialised encoder")
        attach_probe_head(model)  # any classifier the checkpoint had is replaced by a fresh probe head

    def run(self, model, datasets, class_names, pos_class, resume_ckpt, args) -> None:
        if args.knn:
            run_knn(model, datasets, class_names, pos_class, args)
        elif args.eval:
            run_evaluation(lambda split: probe_predictions(model, extract_features(model, datasets[split], args)),
                           class_names, pos_class, args)
        else:
            run_training(model, datasets, class_names, pos_class, resume_ckpt, args)


def run_knn(model, datasets, class_names, pos_class, args) -> None:
    bank = extract_features(model, datasets["train"], args)
    if args.knn_k > len(bank.labels):
        warnings.warn(f"--knn_k {args.knn_k} exceeds the {len(bank.labels)} training images: all of them vote")

    def predict_split(split):
        queries = extract_features(model, datasets[split], args)
        probs = knn_class_probabilities(bank.features, bank.labels, queries.features, args.nb_classes,
                                        k=args.knn_k, temperature=args.knn_t).cpu().numpy()
        return named_predictions(queries.dataset, queries.indices, queries.labels.numpy(), probs)

    reports = evaluate_and_report(predict_split, ("val", "test"), args, class_names, pos_class)
    if du.is_main_process():
        summary = results_summary(reports, mode="knn", knn_k=min(args.knn_k, len(bank.labels)), knn_t=args.knn_t)
        append_log(args.output_dir, summary, None, 0)


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
    # only the head learns: under torchrun only its gradients are all-reduced
    probe = FrozenEncoderProbe(model, wrap_ddp(model.head, args), features_in=args.cache_features)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(f"linear probe of {args.model} ({frozen / 1e6:.2f} M frozen parameters, "
          f"{'cls token' if not args.global_pool else 'global pool'}), head {model.head[1].in_features} -> "
          f"{args.nb_classes}; {args.optimizer} lr {args.lr:.3e}, effective batch "
          f"{args.batch_size * args.accum_iter * du.get_world_size()}, "
          f"{'cached features' if args.cache_features else 'RandomResizedCrop + flip'}, device {args.device}; "
          f"selecting on val {SELECT_METRICS[args.select_metric]}")

    def validate():
        return val.labels.numpy(), head_probabilities(model, val).numpy()

    def predict_split(split):  # val's features were computed once: the encoder is frozen
        return probe_predictions(model, val if split == "val" else extract_features(model, datasets[split], args))

    best, finished = train_epochs(model, probe, train_batches, optimizer, None, torch.nn.CrossEntropyLoss(), None,
                                  validate, best, class_names, pos_class, args)
    if finished:
        evaluate_best(model, best, predict_split, class_names, pos_class, args)


def main(args):
    start_run(args, invalid_training_flags(args) + invalid_linprobe_flags(args))
    if args.knn and not args.finetune:
        warnings.warn("--knn without --finetune: evaluating a randomly initialised encoder")
    prepare_and_run(args, LinearProbe())


def cli(argv=None):
    run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    cli()
