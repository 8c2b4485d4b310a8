"""Classification metrics for evaluation: point estimates, bootstrap CIs, distributed gathering, reports.

Conventions used everywhere in this module
- ``labels``: N integer class ids in ``[0, C)``; ``probs``: N x C softmax probabilities. Torch tensors
  (any device / dtype) and numpy arrays are both accepted.
- The prediction is ``argmax(probs)``, or for two classes with an operating ``threshold``: the positive
  class where ``probs[:, pos_class] >= threshold`` (``predicted_classes``).
- Groups: images that are not independent (the frames of one cine file, the images of one patient)
  form a group. ``evaluate_predictions`` reports per-image metrics whose bootstrap resamples whole
  groups, and per-group metrics on each group's mean probability (``group_scores``), also
  bootstrapped over groups.
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

import copy
import csv
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

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

def classification_metrics(labels, probs, pos_class: int = 1, class_names: Sequence[str] | None = None,
                           threshold: float | None = None, unit: str = "images") -> dict:
    """Point estimates of all METRIC_NAMES plus confusion matrix, support, n, notes and warnings.

    Returns ``{"accuracy": float, ..., "auroc": float, "confusion_matrix": [[int]] (rows = true,
    columns = predicted), "support": [int] per class, "n": int, "notes": [str], "warnings": [str]}``.
    ``pos_class`` only matters for two classes. NaN marks an undefined metric; ``notes`` says why.
    ``warnings`` flags degenerate scores (``score_warnings``; ``unit`` names what is counted in them).
    ``threshold``: see ``predicted_classes``.
    """
    labels, probs = _check_inputs(labels, probs, pos_class)
    n, c = probs.shape
    names = _default_class_names(c, class_names)
    preds = predicted_classes(probs, pos_class, threshold)
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
    result["warnings"] = score_warnings(labels, probs, preds, pos_class, names, unit)
    return result


def predicted_classes(probs, pos_class: int = 1, threshold: float | None = None) -> np.ndarray:
    """The predicted class of each row: ``argmax``, or with a ``threshold`` (two classes only) the
    positive class where its probability is >= threshold and the other class elsewhere."""
    probs = _to_numpy(probs)
    if threshold is None:
        return probs.argmax(axis=1)
    if probs.shape[1] != 2:
        raise ValueError(f"an operating threshold needs two classes; got {probs.shape[1]}")
    if not 0 <= threshold <= 1 + 1e-9:  # a threshold above every score (1 + ulp) predicts no positive
        raise ValueError(f"threshold must be a probability in [0, 1]; got {threshold}")
    return np.where(probs[:, pos_class] >= threshold, pos_class, 1 - pos_class)


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
                            seed: int = 0, pos_class: int = 1, clusters=None,
                            threshold: float | None = None) -> dict[str, np.ndarray]:
    """Metric values on ``n_boot`` resamples (with replacement) of the samples.

    ``clusters``: optional cluster index (0 .. G-1) of each sample, e.g. its patient or cine file. A
    resample then draws G clusters with replacement and takes every sample of each drawn cluster: a
    cluster is never split, so correlated samples do not pass for independent evidence. Without it,
    each sample is its own cluster (the same draws as clusters ``0 .. N-1``).
    Returns ``{name: array of shape (n_boot,)}`` with NaN where the metric is undefined on a resample.
    Deterministic for a given seed and data.
    """
    labels, probs = _check_inputs(labels, probs, pos_class)
    clusters = _check_clusters(clusters, len(labels))
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
        weights = _resample_weights(rng, b, clusters)
        for name, values in _batched_metrics(labels, probs, weights, metric_names, pos_class, threshold).items():
            parts[name].append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def bootstrap_ci(labels, probs, metric_names: Sequence[str] = METRIC_NAMES, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, pos_class: int = 1, clusters=None,
                 threshold: float | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap ``(1 - alpha)`` confidence interval per metric: ``{name: (low, high)}``.

    Resamples on which a metric is undefined are dropped for that metric (``bootstrap_distributions``
    exposes how many); ``(nan, nan)`` if none is left.
    """
    samples = bootstrap_distributions(labels, probs, metric_names, n_boot, seed, pos_class, clusters, threshold)
    return {name: _percentile_interval(values, alpha) for name, values in samples.items()}


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    valid = values[~np.isnan(values)]
    if valid.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _check_clusters(clusters, n: int) -> np.ndarray:
    """Cluster index per sample as int64 0 .. G-1 (each sample its own cluster when None)."""
    if clusters is None:
        return np.arange(n)
    clusters = _to_numpy(clusters).reshape(-1)
    if clusters.shape != (n,):
        raise ValueError(f"clusters must give one cluster per sample ({n}); got {clusters.shape[0]}")
    _, clusters = np.unique(clusters, return_inverse=True)  # any ids -> 0 .. G-1
    return clusters.astype(np.int64)


def _resample_weights(rng: np.random.Generator, b: int, clusters: np.ndarray) -> np.ndarray:
    """(b, N) multiplicities of each sample in b resamples that draw the G clusters (``clusters``: the
    cluster index 0 .. G-1 of each of the N samples) G times with replacement. Every sample of a
    cluster gets that cluster's multiplicity."""
    g = int(clusters.max()) + 1
    draws = rng.integers(0, g, size=(b, g)) + np.arange(b)[:, None] * g
    per_cluster = np.bincount(draws.ravel(), minlength=b * g).reshape(b, g).astype(np.float64)
    return per_cluster[:, clusters]


def _batched_metrics(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray,
                     metric_names: Sequence[str], pos_class: int,
                     threshold: float | None = None) -> dict[str, np.ndarray]:
    """Metrics for each row of ``weights`` (sample multiplicities); same definitions as
    ``classification_metrics``, NaN where undefined."""
    c = probs.shape[1]
    preds = predicted_classes(probs, pos_class, threshold)
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

@dataclass(frozen=True)
class GroupedScores:
    """Images pooled into groups (``group_scores``).

    A *case* is one (group, true class) pair: a group normally holds images of one class (a file sits
    in one class folder), but a patient may have a benign and a malignant nodule; such a group gives
    one case per class. Its score is the mean of its images' probabilities (rows still sum to 1), so it
    stays on the scale of the per-image probabilities and a threshold means the same at both levels.
    """
    names: list[str]          # (G,) group names, sorted
    image_group: np.ndarray   # (N,) group index of each image
    labels: np.ndarray        # (U,) true class of each case
    probs: np.ndarray         # (U, C) mean probabilities of each case's images
    case_group: np.ndarray    # (U,) group index of each case
    n_images: np.ndarray      # (U,) images per case

    @property
    def mixed_groups(self) -> int:
        """Groups that hold images of more than one class."""
        return int(np.sum(np.bincount(self.case_group, minlength=len(self.names)) > 1))


def group_scores(labels, probs, groups: Sequence) -> GroupedScores:
    """Pool the images (``labels``, ``probs``) by ``groups`` (one group name per image)."""
    labels, probs = _check_inputs(labels, probs, pos_class=0)
    groups = np.asarray(groups)
    if groups.dtype.kind not in "iu":  # integer ids keep their numeric order; anything else as text
        groups = groups.astype(str)
    if groups.shape != labels.shape:
        raise ValueError(f"{len(groups)} group names for {len(labels)} images")
    names, image_group = np.unique(groups, return_inverse=True)
    names = [str(name) for name in names]
    c = probs.shape[1]
    keys, image_case = np.unique(image_group * c + labels, return_inverse=True)
    n_images = np.bincount(image_case, minlength=len(keys))
    case_probs = np.zeros((len(keys), c))
    np.add.at(case_probs, image_case, probs)
    return GroupedScores(names=names, image_group=image_group, labels=keys % c,
                         probs=case_probs / n_images[:, None], case_group=keys // c, n_images=n_images)


def choose_threshold(labels, probs, pos_class: int = 1, *, groups: Sequence | None = None,
                     target_sensitivity: float | None = None,
                     target_specificity: float | None = None) -> tuple[float, dict]:
    """Operating threshold on ``probs[:, pos_class]`` that reaches a target on these (validation) data.

    ``target_sensitivity S``: the highest threshold whose sensitivity is >= S (so the best specificity
    among those reaching S); ``target_specificity S``: the lowest threshold whose specificity is >= S
    (the best sensitivity among those). With ``groups`` the cases of ``group_scores`` are used (a
    patient, not each of its frames, is one case). The threshold is one of the scores (ties included:
    ``p >= threshold`` is positive), or just above the highest one when only "no positive" reaches
    the target. Returns ``(threshold, {"sensitivity", "specificity", "n"})`` achieved on these data.
    """
    if (target_sensitivity is None) == (target_specificity is None):
        raise ValueError("give exactly one of target_sensitivity and target_specificity")
    target = target_sensitivity if target_specificity is None else target_specificity
    if not 0 < target <= 1:
        raise ValueError(f"a target sensitivity/specificity must be in (0, 1]; got {target}")
    labels, probs = _check_inputs(labels, probs, pos_class)
    if probs.shape[1] != 2:
        raise ValueError(f"an operating threshold needs two classes; got {probs.shape[1]}")
    if groups is not None:
        grouped = group_scores(labels, probs, groups)
        labels, probs = grouped.labels, grouped.probs
    is_pos, scores = labels == pos_class, probs[:, pos_class]
    if is_pos.all() or not is_pos.any():
        raise ValueError("choosing a threshold for a target sensitivity or specificity needs both classes "
                         "in the data it is chosen on")
    fpr, tpr, thresholds = roc_curve(is_pos, scores, drop_intermediate=False)  # thresholds descending
    tolerance = 1e-12  # 9/10 must count as reaching 0.9
    if target_sensitivity is not None:
        i = int(np.flatnonzero(tpr >= target - tolerance)[0])
    else:
        i = int(np.flatnonzero(1 - fpr >= target - tolerance)[-1])
    threshold = float(thresholds[i]) if np.isfinite(thresholds[i]) else float(np.nextafter(scores.max(), np.inf))
    return threshold, {"sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i]), "n": int(len(labels))}


def _level_results(labels, probs, clusters, names, pos_class, n_boot, alpha, seed, threshold, unit) -> dict:
    """Point estimates, bootstrap CIs (resampling ``clusters``), confusion matrix, notes and warnings
    of one level (images or group cases)."""
    point = classification_metrics(labels, probs, pos_class, names, threshold, unit)
    if n_boot > 0:
        samples = bootstrap_distributions(labels, probs, METRIC_NAMES, n_boot, seed, pos_class, clusters, threshold)
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
    return {"n": point["n"], "metrics": metrics, "confusion_matrix": point["confusion_matrix"],
            "support": point["support"], "notes": notes, "warnings": point["warnings"]}


# How results name the group_by choices of main_finetune.py (any other string is shown as it is).
GROUP_BY_DESCRIPTIONS = {
    "image": "each image its own group",
    "file": "by source file",
    "patient": "by DICOM PatientID",
    "study": "by DICOM StudyInstanceUID",
    "csv": "by the --groups file",
}


def evaluate_predictions(labels, probs, class_names: Sequence[str] | None = None, pos_class: int = 1,
                         n_boot: int = 1000, alpha: float = 0.05, seed: int = 0, *,
                         groups: Sequence | None = None, group_by: str = "image",
                         threshold: float | None = None, operating_point: dict | None = None) -> dict:
    """Per-image and per-group point estimates with bootstrap CIs, in the structure ``write_results``
    writes::

        {"n": int (images), "n_images": int, "n_groups": int, "group_by": str,
         "class_names": [str], "pos_class": int | None (None for > 2 classes),
         "averaging": "binary" | "macro",
         "operating_point": {"threshold": float | None (None: argmax), "rule": str, ...},
         "metrics": {name: {"value", "ci_low", "ci_high", "n_boot_valid"}},
         "confusion_matrix": [[int]], "support": [int], "notes": [str], "warnings": [str],
         "bootstrap": {"n_boot", "alpha", "seed", "method": "percentile", "resamples": "groups",
                       "n_groups": int},
         "group_level": {"n": cases, "n_groups", "aggregation", "metrics", "confusion_matrix",
                         "support", "notes", "warnings"}}

    ``groups`` names the group of each image (None: each image alone). Per-image metrics count images;
    their CI resamples whole groups. Per-group metrics score each case of ``group_scores`` (a group,
    or a group's images of one class) by its mean probability; their CI resamples groups too.
    ``threshold`` (two classes): the operating point of the threshold metrics at both levels;
    ``operating_point`` describes how it was chosen (recorded as given). ``n_boot=0`` skips the
    bootstrap (CIs NaN), e.g. for per-epoch validation.
    """
    labels, probs = _check_inputs(labels, probs, pos_class)
    c = probs.shape[1]
    names = _default_class_names(c, class_names)
    if groups is None:
        groups, group_by = np.arange(len(labels)), "image"
    grouped = group_scores(labels, probs, groups)
    n_groups = len(grouped.names)
    level_args = (pos_class, n_boot, alpha, seed, threshold)
    per_image = _level_results(labels, probs, grouped.image_group, names, *level_args, "images")
    if len(grouped.labels) == len(labels):  # one image per group: the same numbers, without a second bootstrap
        per_group = copy.deepcopy(per_image)
    else:
        per_group = _level_results(grouped.labels, grouped.probs, grouped.case_group, names, *level_args, "groups")
    if grouped.mixed_groups:
        per_group["notes"].append(f"{grouped.mixed_groups} group(s) hold images of more than one class; each "
                                  f"class of such a group is scored as its own case ({per_group['n']} cases "
                                  f"in {n_groups} groups)")
    if threshold is None:
        point = {"threshold": None, "rule": "argmax"}
    else:
        point = {"threshold": float(threshold), "rule": "fixed", **(operating_point or {})}
    return {
        "n": per_image["n"],
        "n_images": per_image["n"],
        "n_groups": n_groups,
        "group_by": group_by,
        "class_names": names,
        "pos_class": pos_class if c == 2 else None,
        "averaging": "binary" if c == 2 else "macro",
        "operating_point": point,
        "metrics": per_image["metrics"],
        "confusion_matrix": per_image["confusion_matrix"],
        "support": per_image["support"],
        "notes": per_image["notes"],
        "warnings": per_image["warnings"],
        "bootstrap": {"n_boot": n_boot, "alpha": alpha, "seed": seed, "method": "percentile",
                      "resamples": "groups", "n_groups": n_groups},
        "group_level": {**per_group, "n_groups": n_groups,
                        "aggregation": "mean probability of the group's images of each class"},
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
    from util.distributed import get_world_size  # torch only when predictions are gathered

    if get_world_size() > 1:
        indices, labels, probs = _all_gather_rows(indices, labels, probs)
    return unique_predictions(indices, labels, probs, dataset_size)


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
    """Readable text: header, operating point, warnings, then per image and per group: one row per
    metric with its CI, the confusion matrix and the notes."""
    names = results["class_names"]
    pos = results.get("pos_class")
    averaging = (f"binary, positive class '{names[pos]}'" if pos is not None
                 else "macro average over classes (one-vs-rest)")
    n_groups = results.get("n_groups", results["n"])
    group_by = results.get("group_by", "image")
    lines = [f"== {split_name}: n = {results['n']} images in {n_groups} groups "
             f"({GROUP_BY_DESCRIPTIONS.get(group_by, group_by)}); classes {', '.join(names)}; {averaging}"]
    if pos is not None:
        lines.append(f"operating point: {describe_operating_point(results.get('operating_point'), names[pos])}")
    lines += [f"WARNING: {warning}" for warning in results.get("warnings", [])]
    lines.append(f"-- per image (n = {results['n']}; the CI resamples the {n_groups} groups, not the images)")
    lines += _level_table(results, results)
    grouped = results.get("group_level")
    if grouped is not None and grouped["n"] == results["n"]:
        lines.append("-- per group: every group holds one image, so the per-group results equal the per-image ones")
    elif grouped is not None:
        lines.append(f"-- per group (n = {grouped['n']} cases in {n_groups} groups, each scored by the "
                     f"{grouped['aggregation']}; the CI resamples the groups)")
        lines += [f"WARNING (per group): {warning}" for warning in grouped.get("warnings", [])]
        lines += _level_table(grouped, results)
    return "\n".join(lines) + "\n"


def describe_operating_point(point: dict | None, positive: str) -> str:
    """One line: how the predicted class of the threshold metrics is decided."""
    if not point or point.get("threshold") is None:
        return f"argmax of the probabilities (p({positive}) against 0.5; an exact tie goes to the first class)"
    text = f"p({positive}) >= {point['threshold']:.6g}"
    target = point.get("target_sensitivity", point.get("target_specificity"))
    if target is None:
        return text + " (--threshold)"
    aim = "sensitivity" if "target_sensitivity" in point else "specificity"
    achieved = point.get("achieved", {})
    return (text + f", chosen on {point.get('chosen_on', 'val')} for {aim} >= {target:g} over its "
            f"{point.get('level', 'groups')} (there: sensitivity {_fmt(achieved.get('sensitivity'))}, "
            f"specificity {_fmt(achieved.get('specificity'))}, n = {achieved.get('n', '?')})")


def _level_table(level: dict, results: dict) -> list[str]:
    """Metric rows with CIs, confusion matrix and notes of one level (per image or per group)."""
    names = results["class_names"]
    ci_level = 100 * (1 - results["bootstrap"]["alpha"])
    lines = [f"{'metric':<22}{'value':>8}   {ci_level:g}% CI (bootstrap, {results['bootstrap']['n_boot']} resamples)"]
    degenerate = any(w.startswith("degenerate scores") for w in level.get("warnings", []))
    for name, m in level["metrics"].items():
        ci = f"[{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"
        flag = "   (degenerate scores: see WARNING)" if degenerate and name == "auroc" else ""
        lines.append(f"{DISPLAY_NAMES.get(name, name):<22}{_fmt(m['value']):>8}   {ci}{flag}")
    widest_count = max(len(str(v)) for v in level["support"])  # a row total bounds every cell
    width = max(*(len(n) for n in names), len("support"), widest_count) + 2
    lines.append("confusion matrix (rows = true class, columns = predicted class):")
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in names) + f"{'support':>{width}}")
    for name, row, support in zip(names, level["confusion_matrix"], level["support"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row) + f"{support:>{width}}")
    lines += [f"note: {note}" for note in level.get("notes", [])]
    return lines


def write_predictions_csv(path: str | os.PathLike, files: Sequence[str], labels, probs,
                          class_names: Sequence[str] | None = None, *, groups: Sequence | None = None,
                          pos_class: int = 1, threshold: float | None = None) -> None:
    """One row per sample: file, label, predicted (class names; at ``threshold`` if given),
    prob_<class> for every class, and the sample's group when ``groups`` is given."""
    labels, probs = _check_inputs(labels, probs, pos_class=pos_class)
    names = _default_class_names(probs.shape[1], class_names)
    if len(files) != len(labels):
        raise ValueError(f"{len(files)} file names for {len(labels)} predictions")
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"{len(groups)} group names for {len(labels)} predictions")
    preds = predicted_classes(probs, pos_class, threshold)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    group_column = ["group"] if groups is not None else []
    writer.writerow(["file", "label", "predicted"] + [f"prob_{n}" for n in names] + group_column)
    for i, (file, label, row) in enumerate(zip(files, labels, probs)):
        # repr(float) is the shortest text that round-trips exactly, so metrics recomputed from the CSV match.
        group = [str(groups[i])] if groups is not None else []
        writer.writerow([os.fspath(file), names[label], names[int(preds[i])]] + [repr(float(p)) for p in row] + group)
    atomic_write_text(path, buffer.getvalue())


def write_group_predictions_csv(path: str | os.PathLike, grouped: GroupedScores,
                                class_names: Sequence[str] | None = None, *, pos_class: int = 1,
                                threshold: float | None = None) -> None:
    """One row per group case (``group_scores``): group, label, n_images, predicted, mean prob_<class>."""
    names = _default_class_names(grouped.probs.shape[1], class_names)
    preds = predicted_classes(grouped.probs, pos_class, threshold)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["group", "label", "n_images", "predicted"] + [f"prob_{n}" for n in names])
    for group, label, count, pred, row in zip(grouped.case_group, grouped.labels, grouped.n_images, preds,
                                              grouped.probs):
        writer.writerow([grouped.names[group], names[label], int(count), names[int(pred)]]
                        + [repr(float(p)) for p in row])
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
             class_names: Sequence[str] | None = None, *, split_name: str | None = None,
             grouped: GroupedScores | None = None, group_by: str | None = None) -> None:
    """ROC curve PNG: of ``pos_class`` for two classes, one-vs-rest per class otherwise.

    With ``grouped`` (of several images per group) the per-group curves are drawn dashed beside the
    per-image ones; the title names the split, the number of images and of groups.
    """
    labels, probs = _check_inputs(labels, probs, pos_class)
    c = probs.shape[1]
    names = _default_class_names(c, class_names)
    levels = [("images", labels, probs, "-")]
    if grouped is not None and len(grouped.labels) < len(labels):
        levels.append(("groups", grouped.labels, grouped.probs, "--"))
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="chance")
    curves = [pos_class] if c == 2 else range(c)
    undefined, degenerate = [], False
    for level_index, (unit, level_labels, level_probs, style) in enumerate(levels):
        per = f"per {unit[:-1]}"  # "per image", "per group"
        for k in curves:
            is_pos = level_labels == k
            if is_pos.all() or not is_pos.any():
                if unit == "images":
                    undefined.append(names[k])
                continue
            fpr, tpr, _ = roc_curve(is_pos, level_probs[:, k])
            auc = roc_auc_score(is_pos, level_probs[:, k])
            label = f"{per} (AUC {auc:.3f})" if c == 2 else f"{names[k]}, {per} (AUC {auc:.3f})"
            colour = f"C{level_index}" if c == 2 else f"C{k % 10}"
            ax.plot(fpr, tpr, linewidth=2, linestyle=style, color=colour, label=label)
        preds = predicted_classes(level_probs, pos_class)
        degenerate |= any(w.startswith("degenerate scores")
                          for w in score_warnings(level_labels, level_probs, preds, pos_class, names))
    title = f"ROC, positive class '{names[pos_class]}'" if c == 2 else "ROC, one-vs-rest"
    n_groups = len(grouped.names) if grouped is not None else len(labels)
    by = f" by {group_by}" if group_by and group_by != "image" else ""
    title += f"\n{split_name + ': ' if split_name else ''}{len(labels)} images, {n_groups} groups{by}"
    if undefined:
        title += f"\nundefined for {', '.join(undefined)} (one class only in the labels)"
    if degenerate:
        title += "\ndegenerate scores: see the warnings in results.txt"
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=title, aspect="equal")
    ax.legend(loc="lower right", fontsize="small")
    _save_png(fig, path)


def plot_confusion_matrix(path: str | os.PathLike, cm, class_names: Sequence[str] | None = None,
                          title: str = "confusion matrix") -> None:
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
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    _save_png(fig, path)


def output_name(stem: str, ext: str, split_name: str) -> str:
    """``predictions.csv`` etc. for the test split (the names users look for), ``predictions_val.csv``
    for any other split."""
    return f"{stem}{ext}" if split_name == "test" else f"{stem}_{split_name}{ext}"


def evaluate_and_write(out_dir: str | os.PathLike, split_name: str, files: Sequence[str], labels, probs,
                       class_names: Sequence[str] | None = None, pos_class: int = 1, n_boot: int = 1000,
                       alpha: float = 0.05, seed: int = 0, *, groups: Sequence | None = None,
                       group_by: str = "image", threshold: float | None = None,
                       operating_point: dict | None = None) -> dict:
    """``evaluate_predictions`` and every output: results.json/.txt, predictions CSVs (per image and
    per group), ROC and confusion-matrix PNGs (per image and per group; names from ``output_name``).
    Call on one rank only. Returns the results."""
    out_dir = os.fspath(out_dir)
    results = evaluate_predictions(labels, probs, class_names, pos_class, n_boot, alpha, seed, groups=groups,
                                   group_by=group_by, threshold=threshold, operating_point=operating_point)
    names = results["class_names"]
    grouped = group_scores(labels, probs, groups if groups is not None else np.arange(len(files)))
    write_results(out_dir, results, names, split_name)
    write_predictions_csv(os.path.join(out_dir, output_name("predictions", ".csv", split_name)), files, labels,
                          probs, names, groups=groups, pos_class=pos_class, threshold=threshold)
    write_group_predictions_csv(os.path.join(out_dir, output_name("predictions_groups", ".csv", split_name)),
                                grouped, names, pos_class=pos_class, threshold=threshold)
    plot_roc(os.path.join(out_dir, output_name("roc_curve", ".png", split_name)), labels, probs, pos_class, names,
             split_name=split_name, grouped=grouped, group_by=results["group_by"])
    at = ""
    if results["pos_class"] is not None and threshold is not None:
        at = f"\nat p({names[pos_class]}) >= {threshold:.4g}"
    plot_confusion_matrix(os.path.join(out_dir, output_name("confusion_matrix", ".png", split_name)),
                          results["confusion_matrix"], names,
                          title=f"confusion matrix, {split_name}: {results['n']} images{at}")
    group_level = results["group_level"]
    plot_confusion_matrix(os.path.join(out_dir, output_name("confusion_matrix_groups", ".png", split_name)),
                          group_level["confusion_matrix"], names,
                          title=f"confusion matrix, {split_name}: {group_level['n']} cases in "
                                f"{results['n_groups']} groups{at}")
    return results
