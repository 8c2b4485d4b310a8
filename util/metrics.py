"""Classification metrics for evaluation: point estimates, bootstrap CIs, distributed gathering, reports.

Conventions used everywhere in this module
- ``labels``: N integer class ids in ``[0, C)``; ``probs``: N x C softmax probabilities. Torch tensors
  (any device / dtype) and numpy arrays are both accepted.
- The prediction is ``argmax(probs)``.
- Two classes: precision, recall (= sensitivity), specificity and F1 are those of ``pos_class`` and
  AUROC uses ``probs[:, pos_class]`` (not a sigmoid of one logit, which the published code used).
  More classes: one-vs-rest per class, then the unweighted (macro) mean; AUROC is sklearn's
  one-vs-rest macro AUROC.
- A metric that is undefined on the data (e.g. AUROC when only one class is present, precision when a
  class is never predicted) is NaN and explained in ``notes``; nothing raises. Macro averages skip
  undefined classes, as scikit-learn does with ``zero_division=np.nan``.
- Scores that cannot support the numbers are flagged in ``warnings`` (``score_warnings``): AUROC is a
  ranking statistic, and a classifier that has not learnt (e.g. a run shorter than its learning-rate
  warm-up) gives every image p = 0.5 up to rounding; the rounding noise may still rank the images
  perfectly and print "AUROC 1.000". Exact ties count 1/2 (AUROC 0.5 when every score is equal).

Point estimates come from scikit-learn. The bootstrap recomputes the same metrics from per-resample
confusion matrices and a weighted Mann-Whitney AUROC in numpy, because calling scikit-learn 1000 times
per metric takes tens of seconds; tests check both paths agree.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from util.fileio import atomic_path, atomic_write_text

METRIC_NAMES = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auroc")

# How results.txt names the metrics (clinicians look for "sensitivity").
DISPLAY_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "precision": "precision (PPV)",
    "recall": "recall / sensitivity",
    "specificity": "specificity",
    "f1": "F1",
    "auroc": "AUROC",
}

# Degenerate scores (see score_warnings). A positive-class probability that varies by less than this over
# the whole split is no classifier, whatever it ranks: 1e-3 is far below the probability differences a
# trained model makes between classes, and far above float32 softmax rounding (~1e-7). (bf16 logits are
# quantised more coarsely, to a few distinct probabilities; the tied-pair check below catches that.)
TIED_SCORE_RANGE = 1e-3
# Share of (positive, negative) pairs whose scores are exactly equal above which AUROC is flagged: each
# such pair counts 1/2, so AUROC then says little about the ranking.
TIED_PAIR_SHARE = 0.10

# Rows of probabilities must sum to 1 up to rounding: bf16 softmax outputs are off by up to ~1e-2, TTA
# averages stay at 1. Anything further off is almost certainly logits passed by mistake.
_PROB_SUM_TOLERANCE = 1e-2


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------

def _to_numpy(x) -> np.ndarray:
    """numpy view of a numpy array, list or torch tensor (any device; bf16/fp16 are upcast)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach()
        if x.is_floating_point():
            x = x.float()  # numpy has no bfloat16
        return x.cpu().numpy()
    return np.asarray(x)


def _check_inputs(labels, probs, pos_class: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (labels as int64 of shape N, probs as float64 of shape N x C)."""
    probs = _to_numpy(probs).astype(np.float64)
    labels = _to_numpy(labels)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with C >= 2 classes; got shape {probs.shape}")
    n, c = probs.shape
    if n == 0:
        raise ValueError("no predictions to evaluate (N = 0): is the evaluation split empty?")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match probs {probs.shape}; got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError("labels must be integer class ids")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}) for {c} classes; got values "
                         f"{labels.min()}..{labels.max()} (wrong --nb_classes?)")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or inf (did the model diverge?)")
    sums = probs.sum(axis=1)
    if probs.min() < 0 or np.abs(sums - 1).max() > _PROB_SUM_TOLERANCE:
        raise ValueError("probs must be softmax probabilities (non-negative, rows summing to 1); got row "
                         f"sums in [{sums.min():.4g}, {sums.max():.4g}]. Pass softmax(logits), not logits.")
    if not 0 <= pos_class < c:
        raise ValueError(f"pos_class must be a class index in [0, {c}); got {pos_class}")
    # Not renormalised: dividing by row sums that are 1 only up to rounding can split or merge score
    # ties and so change AUROC.
    return labels, probs


def _default_class_names(c: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(c)]
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names {list(class_names)} for {c} classes in probs")
    return [str(name) for name in class_names]


def resolve_pos_class(pos_class: int | str, class_names: Sequence[str]) -> int:
    """Index of the positive class, given as an index or a class name (``--pos_class malignant``)."""
    names = [str(n) for n in class_names]
    if isinstance(pos_class, str) and not pos_class.isdigit():
        if pos_class not in names:
            raise ValueError(f"--pos_class {pos_class!r} is not one of the classes {names}")
        return names.index(pos_class)
    index = int(pos_class)
    if not 0 <= index < len(names):
        raise ValueError(f"--pos_class {index} is out of range for the classes {names}")
    return index


def _nanmean(x: np.ndarray, axis=None):
    """Mean ignoring NaN; NaN (without numpy's 'empty slice' warning) where everything is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


# ----------------------------------------------------------------------------------------------
# Point estimates (scikit-learn)
# ----------------------------------------------------------------------------------------------

def classification_metrics(labels, probs, pos_class: int = 1,
                           class_names: Sequence[str] | None = None) -> dict:
    """Point estimates of all METRIC_NAMES plus confusion matrix, support, n, notes and warnings.

    Returns ``{"accuracy": float, ..., "auroc": float, "confusion_matrix": [[int]] (rows = true,
    columns = predicted), "support": [int] per class, "n": int, "notes": [str], "warnings": [str]}``.
    ``pos_class`` only matters for two classes. NaN marks an undefined metric; ``notes`` says why.
    ``warnings`` flags degenerate scores (``score_warnings``).
    """
    labels, probs = _check_inputs(labels, probs, pos_class)
    n, c = probs.shape
    names = _default_class_names(c, class_names)
    preds = probs.argmax(axis=1)
    class_ids = np.arange(c)

    # Undefined cases are reported through notes, so scikit-learn's warnings would only be noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")  # balanced accuracy
        per_class_kw = dict(labels=class_ids, average=None, zero_division=np.nan)
        per_class = {
            "precision": precision_score(labels, preds, **per_class_kw),
            "recall": recall_score(labels, preds, **per_class_kw),
            "f1": f1_score(labels, preds, **per_class_kw),
            "specificity": _per_class_specificity(labels, preds, class_ids),
        }
        result = {
            "accuracy": float(accuracy_score(labels, preds)),
            "balanced_accuracy": float(balanced_accuracy_score(labels, preds)),
        }
        notes = []
        for name, values in per_class.items():
            result[name] = float(values[pos_class] if c == 2 else _nanmean(values))
            notes += _undefined_notes(name, values, names, pos_class if c == 2 else None)
        result["auroc"], auroc_note = _auroc(labels, probs, pos_class, names)

    if auroc_note:
        notes.append(auroc_note)
    result = {name: result[name] for name in METRIC_NAMES}
    result["confusion_matrix"] = confusion_matrix(labels, preds, labels=class_ids).tolist()
    result["support"] = np.bincount(labels, minlength=c).tolist()
    result["n"] = int(n)
    result["notes"] = notes
    result["warnings"] = score_warnings(labels, probs, preds, pos_class, names)
    return result


def _per_class_specificity(labels: np.ndarray, preds: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """TN / (TN + FP) for each class against the rest; NaN where a class has no negatives."""
    (tn, fp), _ = multilabel_confusion_matrix(labels, preds, labels=class_ids).transpose(1, 2, 0)
    return _safe_ratio(tn, tn + fp)


_UNDEFINED_REASON = {
    "precision": "never predicted",
    "recall": "absent from the labels",
    "f1": "absent from labels and predictions",
    "specificity": "the only class in the labels",
}


def _undefined_notes(metric: str, per_class: np.ndarray, names: list[str], pos_class: int | None) -> list[str]:
    """Human-readable notes for classes on which ``metric`` is undefined (NaN)."""
    bad = np.flatnonzero(np.isnan(per_class))
    reason = _UNDEFINED_REASON[metric]
    if pos_class is not None:  # binary: only the positive class's value is reported
        if pos_class in bad:
            return [f"{metric} undefined: positive class '{names[pos_class]}' is {reason}"]
        return []
    if len(bad) == len(names):
        return [f"{metric} undefined for every class"]
    return [f"{metric} of class '{names[k]}' undefined ({reason}); macro average over the other classes"
            for k in bad]


def _auroc(labels: np.ndarray, probs: np.ndarray, pos_class: int, names: list[str]) -> tuple[float, str | None]:
    """AUROC and a note when it is undefined (a class missing from the labels)."""
    c = probs.shape[1]
    if c == 2:
        is_pos = labels == pos_class
        if is_pos.all() or not is_pos.any():
            only = names[int(labels[0])]
            return math.nan, f"auroc undefined: the labels contain only class '{only}'"
        return float(roc_auc_score(is_pos, probs[:, pos_class])), None
    absent = [names[k] for k in range(c) if not np.any(labels == k)]
    if absent:
        return math.nan, (f"auroc undefined: one-vs-rest AUROC needs every class in the labels; "
                          f"absent: {', '.join(absent)}")
    # The unweighted mean of per-class binary AUROCs is exactly scikit-learn's multi_class="ovr",
    # average="macro"; computed per class because that API also demands rows summing to 1 within
    # 1e-5, which bf16 probabilities miss.
    return float(np.mean([roc_auc_score(labels == k, probs[:, k]) for k in range(c)])), None


def _score_columns(c: int, pos_class: int) -> list[int]:
    """The probability columns AUROC ranks: the positive class's for two classes, every class's
    (one-vs-rest) otherwise."""
    return [pos_class] if c == 2 else list(range(c))


def score_warnings(labels: np.ndarray, probs: np.ndarray, preds: np.ndarray, pos_class: int,
                   names: Sequence[str], unit: str = "images") -> list[str]:
    """Warnings for scores that make the metrics meaningless although they are computable.

    Degenerate means, for the probability column that AUROC ranks (each class's for more classes):
    - every score equal: AUROC is 0.5 by definition (ties count 1/2) and ranks nothing;
    - scores spanning less than ``TIED_SCORE_RANGE`` (1e-3): near-ties, which may still rank perfectly
      (AUROC 1.0 from rounding noise) but are not a classifier;
    - more than ``TIED_PAIR_SHARE`` (10 %) of the (positive, negative) pairs exactly tied, i.e. far
      fewer distinct scores than ``unit``: AUROC is largely made of 1/2 counts.
    Besides: every ``unit`` predicted as one class (the threshold metrics describe a constant).
    """
    found = []
    for k in _score_columns(probs.shape[1], pos_class):
        scores, is_pos = probs[:, k], labels == k
        what = f"p({names[k]})"
        low, high = float(scores.min()), float(scores.max())
        if high == low:
            found.append(f"degenerate scores: every one of the {len(scores)} {unit} has the same {what} = "
                             f"{low:.6g}, so the scores rank nothing; AUROC is 0.5 by definition (ties count 1/2). "
                             "The classifier has not learnt (e.g. a run shorter than its learning-rate warm-up).")
            continue
        if high - low < TIED_SCORE_RANGE:
            found.append(f"degenerate scores: {what} spans only {high - low:.2g} ({low:.6g} to {high:.6g}) over "
                             f"the {len(scores)} {unit}, below the {TIED_SCORE_RANGE:g} tolerance. The classifier "
                             "barely responds to its input (e.g. a run shorter than its learning-rate warm-up); "
                             "AUROC and its CI rank differences this small and do not describe a usable model.")
            continue
        tied = _tied_pair_share(is_pos, scores)
        if tied > TIED_PAIR_SHARE:
            found.append(f"degenerate scores: {100 * tied:.0f}% of the ({names[k]}, other) pairs have equal {what} "
                             f"({len(np.unique(scores))} distinct values among {len(scores)} {unit}); each tie "
                             "counts 1/2 in AUROC, so it says little about the ranking.")
    predicted = np.unique(preds)
    if len(predicted) == 1 and len(np.unique(labels)) > 1:
        found.append(f"every one of the {len(preds)} {unit} is predicted '{names[int(predicted[0])]}': "
                         "accuracy, sensitivity, specificity and F1 describe that constant answer.")
    return found


def _tied_pair_share(is_pos: np.ndarray, scores: np.ndarray) -> float:
    """Share of (positive, negative) pairs with exactly equal scores; 0 when a side is empty."""
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.0
    values, inverse = np.unique(scores, return_inverse=True)
    pos_per_value = np.bincount(inverse, weights=is_pos, minlength=len(values))
    neg_per_value = np.bincount(inverse, weights=~is_pos, minlength=len(values))
    return float((pos_per_value * neg_per_value).sum() / (n_pos * n_neg))


# ----------------------------------------------------------------------------------------------
# Bootstrap (vectorised numpy; a resample is a row of per-sample multiplicities)
# ----------------------------------------------------------------------------------------------

def bootstrap_distributions(labels, probs, metric_names: Sequence[str] = METRIC_NAMES, n_boot: int = 1000,
                            seed: int = 0, pos_class: int = 1) -> dict[str, np.ndarray]:
    """Metric values on ``n_boot`` resamples (with replacement) of the samples.

    Returns ``{name: array of shape (n_boot,)}`` with NaN where the metric is undefined on a resample.
    Deterministic for a given seed and data.
    """
    labels, probs = _check_inputs(labels, probs, pos_class)
    unknown = [m for m in metric_names if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    n = len(labels)
    rng = np.random.default_rng(seed)
    # Resamples are processed in chunks so memory stays ~ a few (chunk x N) float64 arrays.
    chunk = max(1, min(n_boot, 2_000_000 // n))
    parts = {m: [] for m in metric_names}
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        weights = _resample_weights(rng, b, n)
        for name, values in _batched_metrics(labels, probs, weights, metric_names, pos_class).items():
            parts[name].append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def bootstrap_ci(labels, probs, metric_names: Sequence[str] = METRIC_NAMES, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, pos_class: int = 1) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap ``(1 - alpha)`` confidence interval per metric: ``{name: (low, high)}``.

    Resamples on which a metric is undefined are dropped for that metric (``bootstrap_distributions``
    exposes how many); ``(nan, nan)`` if none is left.
    """
    samples = bootstrap_distributions(labels, probs, metric_names, n_boot, seed, pos_class)
    return {name: _percentile_interval(values, alpha) for name, values in samples.items()}


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    valid = values[~np.isnan(values)]
    if valid.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _resample_weights(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """(b, n) multiplicities of each sample in b resamples of size n drawn with replacement."""
    draws = rng.integers(0, n, size=(b, n)) + np.arange(b)[:, None] * n
    return np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def _batched_metrics(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray,
                     metric_names: Sequence[str], pos_class: int) -> dict[str, np.ndarray]:
    """Metrics for each row of ``weights`` (sample multiplicities); same definitions as
    ``classification_metrics``, NaN where undefined."""
    c = probs.shape[1]
    preds = probs.argmax(axis=1)
    # Confusion matrices of all resamples at once: weights (b, N) @ one-hot of the (true, pred) cell.
    cell = np.zeros((len(labels), c * c))
    cell[np.arange(len(labels)), labels * c + preds] = 1.0
    cm = (weights @ cell).reshape(-1, c, c)

    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    total = cm.sum(axis=(1, 2))[:, None]
    fp, fn = predicted - tp, support - tp
    tn = total - tp - fp - fn
    per_class = {
        "precision": _safe_ratio(tp, tp + fp),
        "recall": _safe_ratio(tp, support),
        "specificity": _safe_ratio(tn, tn + fp),
        "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn),
    }
    out = {}
    for name in metric_names:
        if name == "accuracy":
            out[name] = tp.sum(axis=1) / total[:, 0]
        elif name == "balanced_accuracy":
            out[name] = _nanmean(per_class["recall"], axis=1)  # classes absent from the labels skipped
        elif name == "auroc":
            out[name] = _batched_auroc(labels, probs, weights, pos_class)
        else:
            values = per_class[name]
            out[name] = values[:, pos_class] if c == 2 else _nanmean(values, axis=1)
    return out


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _batched_auroc(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray, pos_class: int) -> np.ndarray:
    c = probs.shape[1]
    if c == 2:
        return _weighted_binary_auroc(labels == pos_class, probs[:, pos_class], weights)
    # One-vs-rest macro; NaN (propagated by the mean) when a class is absent, as for the point estimate.
    per_class = [_weighted_binary_auroc(labels == k, probs[:, k], weights) for k in range(c)]
    return np.mean(per_class, axis=0)


def _weighted_binary_auroc(is_pos: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of each weight row as the Mann-Whitney statistic, ties counted 1/2.

    This equals the trapezoidal area under the ROC curve that scikit-learn computes.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_pos, w = scores[order], is_pos[order], weights[:, order]
    # Samples with the same score form one tie group; groups are contiguous after sorting.
    group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    pos_w = np.add.reduceat(w * sorted_pos, group_starts, axis=1)
    neg_w = np.add.reduceat(w * ~sorted_pos, group_starts, axis=1)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    wins = (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=1)
    pairs = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    return _safe_ratio(wins, pairs)


# ----------------------------------------------------------------------------------------------
# One-call evaluation
# ----------------------------------------------------------------------------------------------

def evaluate_predictions(labels, probs, class_names: Sequence[str] | None = None, pos_class: int = 1,
                         n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Point estimates with bootstrap CIs, in the structure ``write_results`` writes::

        {"n": int, "class_names": [str], "pos_class": int | None (None for > 2 classes),
         "averaging": "binary" | "macro",
         "metrics": {name: {"value", "ci_low", "ci_high", "n_boot_valid"}},
         "confusion_matrix": [[int]], "support": [int], "notes": [str], "warnings": [str],
         "bootstrap": {"n_boot", "alpha", "seed", "method": "percentile"}}

    ``n_boot=0`` skips the bootstrap (CIs NaN), e.g. for per-epoch validation.
    """
    point = classification_metrics(labels, probs, pos_class, class_names)
    c = len(point["support"])
    names = _default_class_names(c, class_names)
    if n_boot > 0:
        samples = bootstrap_distributions(labels, probs, METRIC_NAMES, n_boot, seed, pos_class)
    else:
        samples = {name: np.empty(0) for name in METRIC_NAMES}
    metrics = {}
    for name in METRIC_NAMES:
        low, high = _percentile_interval(samples[name], alpha)
        metrics[name] = {"value": point[name], "ci_low": low, "ci_high": high,
                         "n_boot_valid": int(np.sum(~np.isnan(samples[name])))}
    notes = list(point["notes"])
    dropped = {name: n_boot - m["n_boot_valid"] for name, m in metrics.items() if 0 < n_boot - m["n_boot_valid"]}
    if dropped:
        notes.append("bootstrap resamples dropped where the metric was undefined: "
                     + ", ".join(f"{name} {count}/{n_boot}" for name, count in dropped.items()))
    return {
        "n": point["n"],
        "class_names": names,
        "pos_class": pos_class if c == 2 else None,
        "averaging": "binary" if c == 2 else "macro",
        "metrics": metrics,
        "confusion_matrix": point["confusion_matrix"],
        "support": point["support"],
        "notes": notes,
        "warnings": point["warnings"],
        "bootstrap": {"n_boot": n_boot, "alpha": alpha, "seed": seed, "method": "percentile"},
    }


# ----------------------------------------------------------------------------------------------
# Distributed evaluation
# ----------------------------------------------------------------------------------------------

def unique_predictions(indices, labels, probs, dataset_size: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort predictions by dataset index and keep each index once.

    ``DistributedSampler`` pads the dataset by repeating samples so every rank gets the same count;
    those repeats must not be counted twice. If ``dataset_size`` is given, the result must cover
    exactly ``0 .. dataset_size - 1`` (a missing sample is an error, not a silently smaller test set).
    Returns (indices int64 (M,), labels int64 (M,), probs float64 (M, C)).
    """
    indices = _to_numpy(indices).astype(np.int64).reshape(-1)
    labels = _to_numpy(labels).astype(np.int64).reshape(-1)
    probs = _to_numpy(probs).astype(np.float64)
    if not len(indices) == len(labels) == len(probs):
        raise ValueError(f"indices, labels and probs differ in length: {len(indices)}, {len(labels)}, {len(probs)}")
    order = np.argsort(indices, kind="stable")
    indices, labels, probs = indices[order], labels[order], probs[order]
    first = np.ones(len(indices), dtype=bool)
    first[1:] = indices[1:] != indices[:-1]
    # A repeated index must carry the same label; otherwise the index does not identify the sample.
    first_position = np.maximum.accumulate(np.where(first, np.arange(len(indices)), 0))
    if np.any(labels != labels[first_position]):
        raise ValueError("the same dataset index carries different labels on different ranks; "
                         "indices must be positions in one shared dataset")
    indices, labels, probs = indices[first], labels[first], probs[first]
    if dataset_size is not None and not np.array_equal(indices, np.arange(dataset_size)):
        missing = np.setdiff1d(np.arange(dataset_size), indices)
        extra = np.setdiff1d(indices, np.arange(dataset_size))
        raise ValueError(f"gathered predictions do not cover the dataset of {dataset_size} samples exactly "
                         f"once: {len(missing)} missing (first: {missing[:5].tolist()}), "
                         f"{len(extra)} out of range (first: {extra[:5].tolist()})")
    return indices, labels, probs


def gather_unique_predictions(indices, labels, probs, dataset_size: int | None = None
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All predictions of all ranks, each dataset sample exactly once, sorted by dataset index.

    Under an initialised ``torch.distributed`` group with several ranks this is a collective: every
    rank must call it, and every rank gets the full result. Otherwise it only sorts (and dedups) the
    local predictions. ``probs`` must be 2-D (N, C) on every rank, also when N is 0.
    """
    indices = _to_numpy(indices).astype(np.int64).reshape(-1)
    labels = _to_numpy(labels).astype(np.int64).reshape(-1)
    probs = _to_numpy(probs).astype(np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, C); got {probs.shape}")
    if _distributed_world_size() > 1:
        indices, labels, probs = _all_gather_rows(indices, labels, probs)
    return unique_predictions(indices, labels, probs, dataset_size)


def _distributed_world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_gather_rows(indices: np.ndarray, labels: np.ndarray, probs: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate every rank's rows (rank order). Ranks may hold different numbers of rows."""
    import torch
    import torch.distributed as dist

    # NCCL only moves CUDA tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    # One float64 tensor per rank: [index, label, p_0 .. p_C-1]; float64 holds indices exactly up to 2**53.
    rows = torch.from_numpy(np.column_stack([indices, labels, probs]).astype(np.float64)).to(device)
    shape = torch.tensor([rows.shape[0], rows.shape[1]], dtype=torch.int64, device=device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    counts = [int(s[0]) for s in shapes]
    widths = {int(s[1]) for s in shapes}
    if len(widths) != 1:
        raise ValueError(f"ranks disagree on the number of classes: probs widths {sorted(w - 2 for w in widths)}")
    # all_gather needs equal shapes: pad to the largest rank, cut the padding off afterwards.
    padded = torch.zeros((max(counts), rows.shape[1]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    table = torch.cat([g[:count] for g, count in zip(gathered, counts)]).cpu().numpy()
    return table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2:]


# ----------------------------------------------------------------------------------------------
# Writers (all atomic)
# ----------------------------------------------------------------------------------------------

def _json_ready(obj):
    """Plain JSON types; NaN/inf become null (strict JSON has no NaN; jq and browsers reject it)."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


_SPLIT_ORDER = ("train", "val", "test")


def write_results(out_dir: str | os.PathLike, results: dict, class_names: Sequence[str] | None = None,
                  split_name: str = "test") -> tuple[str, str]:
    """Write ``results`` (from ``evaluate_predictions``) to ``out_dir/results.json`` and ``results.txt``.

    ``results.json`` maps split name -> results; writing one split keeps the other splits already in
    the file (val during training, test at the end, test again with ``--eval``). ``results.txt``
    renders every split in the file as a table. Returns the two paths.
    """
    out_dir = os.fspath(out_dir)
    json_path = os.path.join(out_dir, "results.json")
    txt_path = os.path.join(out_dir, "results.txt")
    entry = dict(results, split=split_name)
    if class_names is not None:
        entry["class_names"] = _default_class_names(len(results["support"]), class_names)
    all_splits = _read_results_json(json_path)
    all_splits[split_name] = _json_ready(entry)
    atomic_write_text(json_path, json.dumps(all_splits, indent=2, allow_nan=False) + "\n")
    ordered = sorted(all_splits, key=lambda s: (_SPLIT_ORDER.index(s) if s in _SPLIT_ORDER else len(_SPLIT_ORDER), s))
    atomic_write_text(txt_path, "\n".join(format_results_table(all_splits[s], s) for s in ordered))
    return json_path, txt_path


def _read_results_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        if isinstance(content, dict) and all(isinstance(v, dict) and "metrics" in v for v in content.values()):
            return content
    except (OSError, ValueError):
        pass
    warnings.warn(f"{path} is not a results file written by this code; replacing it")
    return {}


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def format_results_table(results: dict, split_name: str) -> str:
    """Readable text: header, one row per metric with its CI, confusion matrix, notes."""
    names = results["class_names"]
    level = 100 * (1 - results["bootstrap"]["alpha"])
    pos = results.get("pos_class")
    averaging = (f"binary, positive class '{names[pos]}'" if pos is not None
                 else "macro average over classes (one-vs-rest)")
    lines = [f"== {split_name}: n = {results['n']}, classes {', '.join(names)}; {averaging}"]
    lines += [f"WARNING: {warning}" for warning in results.get("warnings", [])]
    lines.append(f"{'metric':<22}{'value':>8}   {level:g}% CI (bootstrap, {results['bootstrap']['n_boot']} resamples)")
    degenerate = any(w.startswith("degenerate scores") for w in results.get("warnings", []))
    for name, m in results["metrics"].items():
        ci = f"[{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"
        flag = "   (degenerate scores: see WARNING)" if degenerate and name == "auroc" else ""
        lines.append(f"{DISPLAY_NAMES.get(name, name):<22}{_fmt(m['value']):>8}   {ci}{flag}")
    widest_count = max(len(str(v)) for v in results["support"])  # a row total bounds every cell
    width = max(*(len(n) for n in names), len("support"), widest_count) + 2
    lines.append("confusion matrix (rows = true class, columns = predicted class):")
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in names) + f"{'support':>{width}}")
    for name, row, support in zip(names, results["confusion_matrix"], results["support"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row) + f"{support:>{width}}")
    lines += [f"note: {note}" for note in results.get("notes", [])]
    return "\n".join(lines) + "\n"


def write_predictions_csv(path: str | os.PathLike, files: Sequence[str], labels, probs,
                          class_names: Sequence[str] | None = None) -> None:
    """One row per sample: file, label, predicted (class names), prob_<class> for every class."""
    labels, probs = _check_inputs(labels, probs, pos_class=0)
    names = _default_class_names(probs.shape[1], class_names)
    if len(files) != len(labels):
        raise ValueError(f"{len(files)} file names for {len(labels)} predictions")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "label", "predicted"] + [f"prob_{n}" for n in names])
    for file, label, row in zip(files, labels, probs):
        # repr(float) is the shortest text that round-trips exactly, so metrics recomputed from the CSV match.
        writer.writerow([os.fspath(file), names[label], names[int(row.argmax())]] + [repr(float(p)) for p in row])
    atomic_write_text(path, buffer.getvalue())


def _new_figure(size=(5.0, 4.5)):
    # A Figure bound to the Agg canvas directly: no pyplot global state, works without a display and
    # does not switch the backend of a caller that uses pyplot interactively.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_roc(path: str | os.PathLike, labels, probs, pos_class: int = 1,
             class_names: Sequence[str] | None = None) -> None:
    """ROC curve PNG: of ``pos_class`` for two classes, one-vs-rest per class otherwise."""
    labels, probs = _check_inputs(labels, probs, pos_class)
    c = probs.shape[1]
    names = _default_class_names(c, class_names)
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    curves = [pos_class] if c == 2 else range(c)
    undefined = []
    for k in curves:
        is_pos = labels == k
        if is_pos.all() or not is_pos.any():
            undefined.append(names[k])
            continue
        fpr, tpr, _ = roc_curve(is_pos, probs[:, k])
        auc = roc_auc_score(is_pos, probs[:, k])
        ax.plot(fpr, tpr, linewidth=2, label=f"{names[k]} (AUC {auc:.3f})")
    title = f"ROC, positive class '{names[pos_class]}'" if c == 2 else "ROC, one-vs-rest"
    if undefined:
        title += f"\nundefined for {', '.join(undefined)} (one class only in the labels)"
    if any(w.startswith("degenerate scores") for w in score_warnings(labels, probs, probs.argmax(1), pos_class, names)):
        title += "\ndegenerate scores: see the warnings in results.txt"
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=title, aspect="equal")
    ax.legend(loc="lower right", fontsize="small")
    _save_png(fig, path)


def plot_confusion_matrix(path: str | os.PathLike, cm, class_names: Sequence[str] | None = None) -> None:
    """Confusion-matrix PNG: counts and the share of each true class (row %)."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square; got shape {cm.shape}")
    names = _default_class_names(cm.shape[0], class_names)
    row_share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = 1.2 + 0.9 * len(names)
    fig = _new_figure((side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    for (i, j), count in np.ndenumerate(cm):
        colour = "white" if row_share[i, j] > 0.5 else "black"
        ax.text(j, i, f"{count}\n{100 * row_share[i, j]:.1f}%", ha="center", va="center", color=colour, fontsize=9)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=45 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    ax.set_yticks(ticks, names)
    ax.set(xlabel="predicted class", ylabel="true class", title="confusion matrix")
    _save_png(fig, path)


def output_name(stem: str, ext: str, split_name: str) -> str:
    """``predictions.csv`` etc. for the test split (the names users look for), ``predictions_val.csv``
    for any other split."""
    return f"{stem}{ext}" if split_name == "test" else f"{stem}_{split_name}{ext}"


def evaluate_and_write(out_dir: str | os.PathLike, split_name: str, files: Sequence[str], labels, probs,
                       class_names: Sequence[str] | None = None, pos_class: int = 1, n_boot: int = 1000,
                       alpha: float = 0.05, seed: int = 0) -> dict:
    """``evaluate_predictions`` and every output: results.json/.txt, predictions CSV, ROC and
    confusion-matrix PNGs (names from ``output_name``). Call on one rank only. Returns the results."""
    out_dir = os.fspath(out_dir)
    results = evaluate_predictions(labels, probs, class_names, pos_class, n_boot, alpha, seed)
    names = results["class_names"]
    write_results(out_dir, results, names, split_name)
    write_predictions_csv(os.path.join(out_dir, output_name("predictions", ".csv", split_name)),
                          files, labels, probs, names)
    plot_roc(os.path.join(out_dir, output_name("roc_curve", ".png", split_name)), labels, probs, pos_class, names)
    plot_confusion_matrix(os.path.join(out_dir, output_name("confusion_matrix", ".png", split_name)),
                          results["confusion_matrix"], names)
    return results
