"""Command-line options of the training scripts, one function per group of options.

main_pretrain.py, main_finetune.py and main_linprobe.py build their parsers from these functions, each
with its own defaults, so a flag means the same in every script. Plain Python (argparse only): a
parser is built without importing torch or the image libraries, so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import os

from util.blur_options import add_blur_arguments

# Choices of options whose code lives in modules that import torch; tests check that they agree.
LOSS_REGIONS = ("masked", "all")  # models_mae.LOSS_REGIONS
GROUP_BY = ("file", "patient", "study", "csv")  # util.cls_datasets.GROUP_BY
RANDAUGMENT = "rand-m9-mstd0.5-inc1"  # util.cls_datasets.RANDAUGMENT
# --select_metric choices (published names) -> util.metrics names
SELECT_METRICS = {"acc": "accuracy", "auc": "auroc", "f1": "f1", "balanced_acc": "balanced_accuracy"}
AMP_CHOICES = ("auto", "bf16", "fp16", "none")


# The model names of util/registry.py, as shell-style patterns (tests check they list exactly the registered ones).
PRETRAIN_MODELS = ("{mae,dmae}_vit_{tiny,base,large}_patch16, {mae,dmae}_vit_base_patch{8,28}, "
                   "{mae,dmae}_vit_huge_patch14 (MAE, Deblurring MAE), "
                   "{convmae,dconvmae}_convvit_{tiny,base,large,huge}_patch16 (ConvMAE, Deblurring ConvMAE); "
                   "every name but the tiny ones also with the published suffix _dec512d8b")
CLASSIFIER_MODELS = ("vit_{tiny,base,large}_patch16, vit_base_patch{8,28}, vit_huge_patch14, "
                     "convvit_{tiny,base,large,huge}_patch16")
TINY_MODELS_NOTE = "the tiny ones (well under a million parameters) are for CPU demos and tests"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help text, unless the text already says it (a default computed at
    run time) or there is nothing to show (None; on/off flags, whose text says what they do); the
    description keeps its layout (command examples)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.nargs == 0 or default in (None, "") or default is argparse.SUPPRESS
                or "default" in text):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first two paragraphs (what it does, example commands) as the
    description, defaults shown."""
    description = "\n\n".join(doc.strip().split("\n\n")[:2]).replace("``", "")  # docstring markup
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter,
                                   epilog="README.md describes every option and output in detail.")


def input_hw(args) -> tuple[int, int]:
    """``--input_size`` as (height, width): one number is a square."""
    size = args.input_size
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def available_cores() -> int:
    """The CPU cores this process may run on (a limit set by a scheduler or taskset included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers(cap: int = 10) -> int:
    """Data-loading workers per training process: the cores available to this process, shared among the
    processes torchrun starts on this machine (``LOCAL_WORLD_SIZE``), at most ``cap`` (the published 10).
    More workers than cores only add switching (and a DataLoader warning): 10 on 2 cores ran 3x slower."""
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    return min(cap, available_cores() // local_processes)


# ------------------------------------------------------------------------------ model
def add_model_group(parser: argparse.ArgumentParser, *, default: str, names: str, kind: str):
    """The "model" group with ``--model``; returns it for the script's own model options."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default, type=str, metavar="NAME",
                       help=f"{kind}: {names}; {TINY_MODELS_NOTE} (a wrong name lists the valid ones)")
    return group


def add_classifier_model_group(parser: argparse.ArgumentParser):
    """--model and the input of the classification scripts (both from the checkpoint when not given)."""
    group = add_model_group(parser, default="convvit_base_patch16", names=CLASSIFIER_MODELS,
                            kind="classifier (ViT or ConvViT encoder)")
    add_channel_arguments(group, from_checkpoint=True)
    return group


# ------------------------------------------------------------------------------ optimisation
def add_schedule_arguments(group, *, batch_size: int, epochs: int, blr: float, min_lr: float,
                           warmup_epochs: float, weight_decay: float, batch_help: str = "",
                           epochs_help: str = "epochs to train", weight_decay_help: str = "") -> None:
    """Batch, epochs and the learning-rate schedule: linear warm-up, then half-cycle cosine to --min_lr,
    set every iteration (util/lr_sched.py)."""
    group.add_argument("--batch_size", default=batch_size, type=int,
                       help=batch_help or "images per process (GPU) per iteration; effective batch = batch_size x "
                                          "accum_iter x processes")
    group.add_argument("--epochs", default=epochs, type=int, help=epochs_help)
    group.add_argument("--accum_iter", default=1, type=int,
                       help="gradient accumulation: update the weights every N iterations (a larger effective "
                            "batch without more memory)")
    group.add_argument("--blr", type=float, default=blr, help="base learning rate: lr = blr x effective batch / 256")
    group.add_argument("--lr", type=float, default=None,
                       help="absolute learning rate (default: from --blr and the effective batch)")
    group.add_argument("--min_lr", type=float, default=min_lr, help="learning rate at the end of the cosine decay")
    group.add_argument("--warmup_epochs", type=float, default=warmup_epochs,
                       help="epochs of linear warm-up from 0 to lr (a warning says so when it is not shorter "
                            "than the run)")
    group.add_argument("--weight_decay", type=float, default=weight_decay,
                       help=weight_decay_help or "AdamW weight decay (none on biases and 1-D parameters)")


def add_precision_arguments(group, *, amp_help: str = "") -> None:
    """Mixed precision and the non-finite-loss stop rule."""
    group.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                       help=amp_help or "mixed precision: auto = bf16 on GPUs that support it, fp16 (with a "
                                        "GradScaler) on older ones, none (fp32) on CPU; the loss is always fp32")
    group.add_argument("--max_nonfinite", type=int, default=20,
                       help="a step whose loss is not finite is skipped; stop after this many in a row "
                            "(counted across epochs)")


# ------------------------------------------------------------------------------ data
def add_channel_arguments(group, *, from_checkpoint: bool) -> None:
    """--input_size, --in_chans, --keep_channels (the model's input)."""
    if from_checkpoint:
        group.add_argument("--input_size", default=None, type=int, nargs="+", metavar="SIZE",
                           help="input size: one number (square) or H W, divisible by the patch size "
                                "(default: the --resume checkpoint's, else 224)")
        group.add_argument("--in_chans", default=None, type=int, choices=(1, 3),
                           help="input channels (default: those of the --resume/--finetune checkpoint's first "
                                "layer, else 3)")
    else:
        group.add_argument("--input_size", default=[224], type=int, nargs="+", metavar="SIZE",
                           help="input size: one number (square) or H W, divisible by the patch size")
        group.add_argument("--in_chans", default=3, type=int, choices=(1, 3),
                           help="1 trains on grey images with the dataset's mean/std; 3 uses ImageNet "
                                "normalisation, as the published checkpoints")
    group.add_argument("--keep_channels", action="store_true",
                       help="keep colour images in colour (default: converted to grey, input and target alike, "
                            "as blurred_images.py does); needs 3 input channels")


def add_loader_arguments(group) -> None:
    """Reading the images: workers, pinned memory, unreadable files, normalisation."""
    workers = default_num_workers()
    group.add_argument("--num_workers", default=workers, type=int,
                       help=f"data-loading processes per training process, 0: load in the training process "
                            f"(default: {workers} here: the cores available to this process shared among the "
                            "processes on this machine, at most 10)")
    group.add_argument("--pin_mem", action="store_true", default=True,
                       help="pinned host memory for faster copies to the GPU (default: on)")
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="turn --pin_mem off")
    group.add_argument("--strict_data", action="store_true",
                       help="stop at the first unreadable image (default: skip it with a warning naming it)")
    group.add_argument("--data_mean", type=float, nargs="+", default=None, metavar="M",
                       help="normalisation mean, one value per input channel (with --data_std; default: "
                            "ImageNet's for 3 channels, measured on the training images for 1)")
    group.add_argument("--data_std", type=float, nargs="+", default=None, metavar="S",
                       help="normalisation standard deviation, one value per input channel (with --data_mean)")


def add_classification_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The labelled dataset of main_finetune.py and main_linprobe.py, and its on-the-fly blur."""
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default="", type=str,
                       help="folder with train/, val/ and test/, each with one sub-folder per class")
    group.add_argument("--nb_classes", default=None, type=int,
                       help="number of classes (default: the number of class folders)")
    group.add_argument("--pos_class", default=None,
                       help="positive class of the binary metrics, by name or index (default: class 1, the "
                            "second folder alphabetically)")
    add_loader_arguments(group)
    add_blur_arguments(parser, prefix="blur_", method_flag="--blur", default_method=None)


# ------------------------------------------------------------------------------ checkpoints
def add_resume_arguments(group, *, resume_help: str) -> None:
    group.add_argument("--resume", default="", metavar="CKPT", help=resume_help)
    group.add_argument("--auto_resume", action="store_true",
                       help="resume from output_dir/checkpoint-last.pth when it exists (a re-run of the same "
                            "command continues where it stopped)")
    group.add_argument("--start_epoch", default=0, type=int,
                       help="first epoch (a resumed checkpoint sets it to the epoch after its own)")


def add_checkpoint_arguments(parser: argparse.ArgumentParser, *, finetune_help: str, resume_help: str) -> None:
    """--finetune (the weights to start from) and the resume flags of the classification scripts."""
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--finetune", default="", metavar="CKPT", help=finetune_help)
    add_resume_arguments(group, resume_help=resume_help)


# ------------------------------------------------------------------------------ evaluation
def add_evaluation_arguments(parser: argparse.ArgumentParser, *, select_help: str, eval_help: str):
    """Model selection, --eval, bootstrap CIs, per-group metrics and the operating point of the
    classification scripts (util/metrics.py). Returns the group, for a script's own additions."""
    group = parser.add_argument_group("evaluation")
    group.add_argument("--select_metric", default="acc", choices=tuple(SELECT_METRICS), help=select_help)
    group.add_argument("--eval", action="store_true", help=eval_help)
    group.add_argument("--eval_split", default="test", choices=("val", "test"), help="split evaluated by --eval")
    group.add_argument("--n_boot", default=1000, type=int,
                       help="bootstrap resamples for the 95%% confidence intervals (0: none)")
    group.add_argument("--group_by", default=None, choices=GROUP_BY,
                       help="images that form one case for the per-group metrics, whose bootstrap resamples "
                            "whole groups: file (default; the frames of one multi-frame DICOM), patient (DICOM "
                            "PatientID), study (DICOM StudyInstanceUID), csv (the --groups file)")
    group.add_argument("--groups", default=None, metavar="CSV",
                       help="CSV with the columns file,group (file relative to --data_path, e.g. "
                            "test/benign/a.png); implies --group_by csv")
    operating = group.add_mutually_exclusive_group()
    operating.add_argument("--threshold", type=float, default=None, metavar="T",
                           help="two classes: predict the positive class when its probability is >= T "
                                "(default: the larger probability)")
    operating.add_argument("--target_sensitivity", type=float, default=None, metavar="S",
                           help="two classes: choose the threshold on the val split (per group) as the highest "
                                "one with sensitivity >= S and apply it to val and test")
    operating.add_argument("--target_specificity", type=float, default=None, metavar="S",
                           help="two classes: choose the threshold on the val split (per group) as the lowest "
                                "one with specificity >= S and apply it to val and test")
    return group


# ------------------------------------------------------------------------------ outputs and launch
def add_output_arguments(parser: argparse.ArgumentParser):
    """Where results go and how often the console hears from the run. Returns the group."""
    group = parser.add_argument_group("outputs")
    group.add_argument("--output_dir", "--output", default="./output_dir", type=str,
                       help="checkpoints, log.txt, results and TensorBoard files")
    group.add_argument("--log_dir", default=None, type=str, help="TensorBoard folder (default: --output_dir)")
    group.add_argument("--print_freq", default=20, type=int, help="log the running loss every N iterations")
    return group


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """``--seed``, ``--device``, ``--dist_timeout`` and the published scripts' launcher flags, which are
    accepted (so their launch lines keep working) but not used: torchrun's environment says the rank."""
    group = parser.add_argument_group("distributed / launch",
                                      "one process per GPU under torchrun (NCCL; gloo on CPU); plain python for "
                                      "one device")
    group.add_argument("--seed", default=0, type=int,
                       help="seed of every random draw (each process adds its rank)")
    group.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms only: torch.use_deterministic_algorithms, cuDNN without "
                            "benchmarking, CUBLAS_WORKSPACE_CONFIG=:4096:8, no torch.compile; slower on GPUs (README "
                            "says what stays non-deterministic there). On CPU the same command, --seed and thread "
                            "count repeat bit for bit without it too")
    group.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    group.add_argument("--dist_timeout", default=1800, type=int,
                       help="seconds a process waits for the others in a collective before failing "
                            "(a dead or hung rank then stops the run instead of hanging it)")
    group.add_argument("--world_size", default=1, type=int, help=argparse.SUPPRESS)
    group.add_argument("--local_rank", "--local-rank", default=-1, type=int, help=argparse.SUPPRESS)
    group.add_argument("--dist_on_itp", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--dist_url", default="env://", help=argparse.SUPPRESS)
