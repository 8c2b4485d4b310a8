"""Tests for util/metrics.py and util/fileio.py: metrics vs scikit-learn, bootstrap, writers, dedup."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from sklearn import metrics as skm
from torch.utils.data import DistributedSampler

from util.fileio import atomic_path, atomic_write_text
import util.metrics as metrics_module
from util.metrics import (
    METRIC_NAMES,
    _batched_metrics,
    _resample_weights,
    choose_threshold,
    group_scores,
    bootstrap_ci,
    bootstrap_distributions,
    classification_metrics,
    evaluate_and_write,
    evaluate_predictions,
    gather_unique_predictions,
    plot_confusion_matrix,
    plot_roc,
    resolve_pos_class,
    unique_predictions,
    write_predictions_csv,
    write_results,
)


def _probs_from_scores(scores_pos):
    """Binary probabilities whose positive-class column is ``scores_pos``."""
    scores_pos = np.asarray(scores_pos, dtype=float)
    return np.stack([1 - scores_pos, scores_pos], axis=1)


def _synthetic(n, n_classes, seed, signal=1.0):
    """Labels and softmax probabilities of a moderately good classifier."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), labels] += signal
    probs = np.exp(logits)
    return labels, probs / probs.sum(axis=1, keepdims=True)


# Hand-made binary example. Predictions (threshold 0.5): TP=2, FN=1, TN=3, FP=2.
BIN_LABELS = np.array([1, 1, 1, 0, 0, 0, 0, 0])
BIN_SCORES = np.array([0.9, 0.6, 0.3, 0.2, 0.4, 0.1, 0.7, 0.8])

# Hand-made 3-class example.
MC_LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
MC_PROBS = np.array([
    [0.7, 0.2, 0.1],
    [0.5, 0.4, 0.1],
    [0.2, 0.5, 0.3],
    [0.1, 0.8, 0.1],
    [0.3, 0.3, 0.4],
    [0.1, 0.1, 0.8],
    [0.2, 0.2, 0.6],
    [0.6, 0.1, 0.3],
    [0.1, 0.3, 0.6],
])


# ---------------------------------------------------------------------------------------------
# Point estimates
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pos_class", [1, 0])
def test_binary_metrics_match_sklearn(pos_class):
    probs = _probs_from_scores(BIN_SCORES)
    preds = probs.argmax(1)
    got = classification_metrics(BIN_LABELS, probs, pos_class=pos_class)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(BIN_LABELS, preds))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(BIN_LABELS, preds))
    assert got["precision"] == pytest.approx(skm.precision_score(BIN_LABELS, preds, pos_label=pos_class))
    assert got["recall"] == pytest.approx(skm.recall_score(BIN_LABELS, preds, pos_label=pos_class))
    assert got["f1"] == pytest.approx(skm.f1_score(BIN_LABELS, preds, pos_label=pos_class))
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(BIN_LABELS == pos_class, probs[:, pos_class]))
    assert got["confusion_matrix"] == [[3, 2], [1, 2]]
    assert got["support"] == [5, 3]
    assert got["n"] == 8
    assert got["notes"] == []


def test_binary_hand_computed_values():
    got = classification_metrics(BIN_LABELS, _probs_from_scores(BIN_SCORES), pos_class=1)
    assert got["precision"] == pytest.approx(2 / 4)       # TP / (TP + FP)
    assert got["recall"] == pytest.approx(2 / 3)          # TP / (TP + FN)
    assert got["specificity"] == pytest.approx(3 / 5)     # TN / (TN + FP)
    assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 5) / 2)
    # Positives 0.9, 0.6, 0.3 against negatives 0.2 0.4 0.1 0.7 0.8: 5 + 3 + 2 = 10 of 15 pairs won.
    assert got["auroc"] == pytest.approx(10 / 15)
    # With class 0 as positive, specificity becomes the recall of class 1.
    flipped = classification_metrics(BIN_LABELS, _probs_from_scores(BIN_SCORES), pos_class=0)
    assert flipped["specificity"] == pytest.approx(2 / 3)
    assert flipped["recall"] == pytest.approx(3 / 5)


def test_multiclass_metrics_match_sklearn_macro():
    preds = MC_PROBS.argmax(1)
    got = classification_metrics(MC_LABELS, MC_PROBS)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(MC_LABELS, preds))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(MC_LABELS, preds))
    assert got["precision"] == pytest.approx(skm.precision_score(MC_LABELS, preds, average="macro"))
    assert got["recall"] == pytest.approx(skm.recall_score(MC_LABELS, preds, average="macro"))
    assert got["f1"] == pytest.approx(skm.f1_score(MC_LABELS, preds, average="macro"))
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(MC_LABELS, MC_PROBS, multi_class="ovr", average="macro"))
    assert got["confusion_matrix"] == skm.confusion_matrix(MC_LABELS, preds).tolist()
    assert got["support"] == [3, 2, 4]


def test_multiclass_specificity_is_macro_one_vs_rest():
    # Confusion matrix (rows true): [[2,1,0],[0,1,1],[1,0,3]].
    # Class 0: FP=1, TN=9-3-1=5 -> 5/6; class 1: FP=1, TN=9-2-1=6 -> 6/7; class 2: FP=1, TN=9-4-1=4 -> 4/5.
    got = classification_metrics(MC_LABELS, MC_PROBS)
    assert got["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert got["specificity"] == pytest.approx((5 / 6 + 6 / 7 + 4 / 5) / 3)


def test_f1_is_not_accuracy_on_imbalanced_data():
    # 90 negatives all right, 10 positives of which 2 found, 1 false alarm: accuracy 0.91, F1 = 4/13.
    labels = np.array([0] * 90 + [1] * 10)
    scores = np.array([0.1] * 89 + [0.9] + [0.9] * 2 + [0.1] * 8)
    got = classification_metrics(labels, _probs_from_scores(scores))
    assert got["accuracy"] == pytest.approx(0.91)
    assert got["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 8))
    assert got["f1"] < 0.5 < got["accuracy"]


def test_auroc_uses_probabilities_not_hard_predictions():
    # Every prediction is class 0, yet the ranking of the positive probability is perfect.
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    got = classification_metrics(labels, _probs_from_scores(scores))
    assert got["auroc"] == pytest.approx(1.0)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(labels, scores))
    assert got["accuracy"] == pytest.approx(0.5)


def test_torch_tensors_are_accepted():
    got = classification_metrics(torch.tensor(MC_LABELS), torch.tensor(MC_PROBS, dtype=torch.bfloat16))
    # bf16 rounding keeps the argmax here; values must match the float64 evaluation.
    assert got["accuracy"] == pytest.approx(classification_metrics(MC_LABELS, MC_PROBS)["accuracy"])


def test_undefined_auroc_binary_one_class_gives_nan_and_note():
    labels = np.zeros(5, dtype=int)
    probs = _probs_from_scores([0.1, 0.7, 0.2, 0.3, 0.4])
    got = classification_metrics(labels, probs, class_names=["benign", "malignant"])
    assert math.isnan(got["auroc"])
    assert math.isnan(got["recall"])  # no positives: sensitivity undefined, not 0
    assert got["specificity"] == pytest.approx(4 / 5)
    assert any("auroc undefined" in n and "benign" in n for n in got["notes"])
    assert any(n.startswith("recall undefined") for n in got["notes"])


def test_undefined_auroc_multiclass_absent_class():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]])
    got = classification_metrics(labels, probs, class_names=["a", "b", "c"])
    assert math.isnan(got["auroc"])
    assert any("absent: c" in n for n in got["notes"])
    # Recall of the absent class is undefined and skipped by the macro mean (as scikit-learn does).
    assert got["recall"] == pytest.approx(0.5)


def test_rejects_logits_and_bad_labels():
    with pytest.raises(ValueError, match="softmax"):
        classification_metrics(BIN_LABELS, np.stack([BIN_SCORES * 5, -BIN_SCORES], axis=1))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        classification_metrics(np.array([0, 2]), _probs_from_scores([0.2, 0.8]))
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(BIN_LABELS[:-1], _probs_from_scores(BIN_SCORES))


def test_resolve_pos_class():
    assert resolve_pos_class("malignant", ["benign", "malignant"]) == 1
    assert resolve_pos_class("0", ["benign", "malignant"]) == 0
    with pytest.raises(ValueError, match="not one of"):
        resolve_pos_class("tumour", ["benign", "malignant"])


# ---------------------------------------------------------------------------------------------
# Degenerate scores (a classifier that has not learnt)
# ---------------------------------------------------------------------------------------------

def test_tied_scores_give_auroc_one_half_with_a_warning_everywhere(tmp_path):
    labels = np.array([0, 1] * 10)
    probs = _probs_from_scores(np.full(20, 0.5))
    results = evaluate_predictions(labels, probs, ["benign", "malignant"], n_boot=200)
    auroc = results["metrics"]["auroc"]
    assert auroc["value"] == 0.5 and auroc["ci_low"] == auroc["ci_high"] == 0.5  # ties count 1/2
    assert any("same p(malignant)" in w and "0.5 by definition" in w for w in results["warnings"])
    assert any("predicted 'benign'" in w for w in results["warnings"])  # argmax of a tie: the first class
    write_results(tmp_path, results, split_name="test")
    assert _strict_json_load(tmp_path / "results.json")["test"]["warnings"] == results["warnings"]
    text = (tmp_path / "results.txt").read_text()
    assert "WARNING: degenerate scores" in text
    assert [line for line in text.splitlines() if line.startswith("AUROC")][0].endswith("see WARNING)")
    plot_roc(tmp_path / "roc.png", labels, probs, 1, ["benign", "malignant"])
    _assert_valid_png(tmp_path / "roc.png")


def test_near_tied_scores_that_rank_perfectly_are_flagged():
    # The reported case: every p = 0.5 +- 1e-5, yet ordered with the labels, so AUROC is 1.
    labels = np.array([0] * 10 + [1] * 10)
    scores = 0.5 + np.linspace(-1e-5, 1e-5, 20)
    results = evaluate_predictions(labels, _probs_from_scores(scores), ["benign", "malignant"], n_boot=100)
    assert results["metrics"]["auroc"]["value"] == 1.0
    degenerate = [w for w in results["warnings"] if w.startswith("degenerate scores")]
    assert len(degenerate) == 1 and "spans only 2e-05" in degenerate[0]
    # multi-class: each one-vs-rest column is checked
    probs = np.full((6, 3), 1 / 3) + np.linspace(-1e-6, 1e-6, 6)[:, None] * np.array([1, -1, 0])
    got = classification_metrics(np.array([0, 1, 2, 0, 1, 2]), probs, class_names=["a", "b", "c"])
    assert sum(w.startswith("degenerate scores") for w in got["warnings"]) == 3


def test_few_distinct_scores_are_flagged_and_a_good_classifier_is_not():
    # Three distinct scores among 40 images: 40 % of the pairs are tied.
    labels = np.array([0] * 20 + [1] * 20)
    scores = np.array([0.1] * 12 + [0.6] * 8 + [0.6] * 8 + [0.9] * 12)
    got = classification_metrics(labels, _probs_from_scores(scores), class_names=["benign", "malignant"])
    assert [w for w in got["warnings"] if "pairs have equal p(malignant)" in w and "3 distinct values" in w]
    assert classification_metrics(BIN_LABELS, _probs_from_scores(BIN_SCORES))["warnings"] == []
    labels, probs = _synthetic(200, 3, seed=1)
    assert classification_metrics(labels, probs)["warnings"] == []


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_classes,pos_class", [(2, 1), (2, 0), (3, 1)])
def test_vectorised_metrics_equal_sklearn_on_a_resample(n_classes, pos_class):
    """The bootstrap's numpy metrics, on a resample given as multiplicities, equal scikit-learn on the
    explicitly repeated samples (ties in scores included)."""
    labels, probs = _synthetic(60, n_classes, seed=3)
    probs = np.round(probs, 1)  # create score ties
    probs /= probs.sum(1, keepdims=True)
    multiplicity = np.random.default_rng(4).integers(0, 3, size=60)
    batched = _batched_metrics(labels, probs, multiplicity[None].astype(float), METRIC_NAMES, pos_class)
    expected = classification_metrics(np.repeat(labels, multiplicity), np.repeat(probs, multiplicity, axis=0),
                                      pos_class=pos_class)
    for name in METRIC_NAMES:
        assert batched[name][0] == pytest.approx(expected[name]), name


def test_ci_contains_point_estimate_and_shrinks_with_more_samples():
    widths = {}
    for n in (100, 2000):
        labels, probs = _synthetic(n, 2, seed=n)
        point = classification_metrics(labels, probs)
        cis = bootstrap_ci(labels, probs, METRIC_NAMES, n_boot=500, seed=0)
        for name, (low, high) in cis.items():
            assert low <= point[name] <= high, (n, name)
        widths[n] = {name: high - low for name, (low, high) in cis.items()}
    for name in METRIC_NAMES:
        # Standard errors scale ~ 1/sqrt(n): 20x the samples, ~4.5x narrower; demand at least 2x.
        assert widths[2000][name] < widths[100][name] / 2, name


def test_ci_is_the_central_percentile_interval_of_the_resamples():
    labels, probs = _synthetic(300, 2, seed=5)
    samples = bootstrap_distributions(labels, probs, ["auroc"], n_boot=1000, seed=0)["auroc"]
    for alpha in (0.05, 0.5):
        low, high = bootstrap_ci(labels, probs, ["auroc"], n_boot=1000, alpha=alpha, seed=0)["auroc"]
        inside = np.mean((samples >= low) & (samples <= high))
        assert inside == pytest.approx(1 - alpha, abs=0.01)


def test_bootstrap_deterministic_for_a_seed():
    labels, probs = _synthetic(200, 3, seed=1)
    first = bootstrap_ci(labels, probs, ["accuracy", "auroc"], n_boot=200, seed=7)
    again = bootstrap_ci(labels, probs, ["accuracy", "auroc"], n_boot=200, seed=7)
    other = bootstrap_ci(labels, probs, ["accuracy", "auroc"], n_boot=200, seed=8)
    assert first == again
    assert first != other


def test_bootstrap_drops_and_counts_undefined_resamples():
    # One positive in 20: about (19/20)^20 = 36 % of resamples have no positive -> recall/AUROC undefined.
    labels = np.array([1] + [0] * 19)
    scores = np.linspace(0.05, 0.95, 20)
    samples = bootstrap_distributions(labels, _probs_from_scores(scores), ["accuracy", "recall", "auroc"],
                                      n_boot=1000, seed=0)
    assert not np.isnan(samples["accuracy"]).any()
    n_undefined = np.isnan(samples["auroc"]).sum()
    assert 250 < n_undefined < 470
    assert np.array_equal(np.isnan(samples["recall"]), np.isnan(samples["auroc"]))
    results = evaluate_predictions(labels, _probs_from_scores(scores), n_boot=1000)
    assert results["metrics"]["auroc"]["n_boot_valid"] == 1000 - n_undefined
    assert any(f"auroc {n_undefined}/1000" in n for n in results["notes"])
    low, high = results["metrics"]["auroc"]["ci_low"], results["metrics"]["auroc"]["ci_high"]
    assert 0 <= low <= high <= 1


def test_bootstrap_is_fast_enough():
    import time

    labels, probs = _synthetic(1000, 2, seed=0)
    start = time.perf_counter()
    bootstrap_ci(labels, probs, METRIC_NAMES, n_boot=1000)
    assert time.perf_counter() - start < 3.0


def test_evaluate_predictions_structure_and_undefined_auroc():
    labels = np.zeros(6, dtype=int)
    probs = _probs_from_scores([0.1, 0.2, 0.6, 0.3, 0.1, 0.2])
    results = evaluate_predictions(labels, probs, ["benign", "malignant"], n_boot=100)
    assert set(results["metrics"]) == set(METRIC_NAMES)
    assert results["n"] == 6 and results["pos_class"] == 1 and results["averaging"] == "binary"
    auroc = results["metrics"]["auroc"]
    assert math.isnan(auroc["value"]) and math.isnan(auroc["ci_low"]) and auroc["n_boot_valid"] == 0
    assert results["metrics"]["accuracy"]["value"] == pytest.approx(5 / 6)
    assert results["confusion_matrix"] == [[5, 1], [0, 0]]


# ---------------------------------------------------------------------------------------------
# Groups (cine files, patients) and operating points
# ---------------------------------------------------------------------------------------------

def _one_cine_and_single_images():
    """A 40-frame malignant cine, every frame right, and 10 single images of which half are wrong:
    90 % of the images but only 6 of the 11 groups are right."""
    labels = np.array([1] * 40 + [0, 1] * 5)
    scores = np.r_[np.linspace(0.8, 0.95, 40), [0.2, 0.8, 0.3, 0.7, 0.1, 0.4, 0.7, 0.3, 0.9, 0.1]]
    groups = ["cine.dcm"] * 40 + [f"single{i}.png" for i in range(10)]
    return labels, _probs_from_scores(scores), groups


def test_bootstrap_resamples_whole_groups():
    clusters = np.array([2, 0, 0, 1, 2, 2, 0, 3])
    weights = _resample_weights(np.random.default_rng(0), 500, clusters)
    assert weights.shape == (500, 8)
    for g in range(4):  # every member of a group is drawn as often as the group
        members = weights[:, clusters == g]
        assert np.all(members == members[:, :1])
    per_group = np.stack([weights[:, clusters == g][:, 0] for g in range(4)], axis=1)
    assert np.all(per_group.sum(axis=1) == 4)  # 4 groups drawn per resample, not 8 images
    assert len(np.unique(per_group, axis=0)) > 20  # and they vary
    # each image its own group: the image bootstrap, with the same draws as before groups existed
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    draws = rng_b.integers(0, 8, size=(3, 8)) + np.arange(3)[:, None] * 8
    expected = np.bincount(draws.ravel(), minlength=24).reshape(3, 8)
    assert np.array_equal(_resample_weights(rng_a, 3, np.arange(8)), expected)


def test_group_bootstrap_ci_is_wider_than_the_image_bootstrap_when_one_group_dominates():
    labels, probs, groups = _one_cine_and_single_images()
    naive = evaluate_predictions(labels, probs, ["benign", "malignant"], n_boot=1000)
    grouped = evaluate_predictions(labels, probs, ["benign", "malignant"], n_boot=1000, groups=groups,
                                   group_by="file")
    width = lambda m: m["ci_high"] - m["ci_low"]  # noqa: E731
    acc_naive, acc_grouped = naive["metrics"]["accuracy"], grouped["metrics"]["accuracy"]
    assert acc_naive["value"] == acc_grouped["value"] == pytest.approx(0.9)  # same images, same point
    assert width(acc_naive) < 0.2 and width(acc_grouped) > 2 * width(acc_naive)
    assert grouped["n"] == grouped["n_images"] == 50 and grouped["n_groups"] == 11 and naive["n_groups"] == 50
    assert grouped["bootstrap"]["resamples"] == "groups" and grouped["bootstrap"]["n_groups"] == 11
    # per group: 11 cases, each scored by its mean probability
    level = grouped["group_level"]
    assert level["n"] == 11 and level["support"] == [5, 6]
    assert level["metrics"]["accuracy"]["value"] == pytest.approx(6 / 11)
    expected_scores = np.r_[np.linspace(0.8, 0.95, 40).mean(), probs[40:, 1]]
    expected_labels = np.r_[1, labels[40:]]
    assert level["metrics"]["auroc"]["value"] == pytest.approx(skm.roc_auc_score(expected_labels, expected_scores))
    assert width(level["metrics"]["accuracy"]) > 2 * width(acc_naive)


def test_group_scores_pool_each_class_of_a_group_and_note_mixed_groups():
    labels = np.array([0, 0, 1, 1, 1])
    probs = _probs_from_scores([0.2, 0.4, 0.9, 0.7, 0.6])
    grouped = group_scores(labels, probs, ["p1", "p1", "p1", "p2", "p2"])
    assert grouped.names == ["p1", "p2"] and grouped.mixed_groups == 1
    assert grouped.labels.tolist() == [0, 1, 1] and grouped.case_group.tolist() == [0, 0, 1]
    assert grouped.n_images.tolist() == [2, 1, 2]
    np.testing.assert_allclose(grouped.probs[:, 1], [0.3, 0.9, 0.65])
    results = evaluate_predictions(labels, probs, n_boot=20, groups=["p1", "p1", "p1", "p2", "p2"])
    assert results["n_groups"] == 2 and results["group_level"]["n"] == 3
    assert any("1 group(s) hold images of more than one class" in n for n in results["group_level"]["notes"])


def test_threshold_chosen_for_a_target_on_validation_data():
    # positives 0.9 0.8 0.6 0.3, negatives 0.7 0.5 0.4 0.2 0.1
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    probs = _probs_from_scores([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1])
    t, achieved = choose_threshold(labels, probs, target_sensitivity=0.75)
    assert t == 0.6 and achieved == {"sensitivity": 0.75, "specificity": 0.8, "n": 9}
    t, achieved = choose_threshold(labels, probs, target_sensitivity=1.0)
    assert t == 0.3 and achieved["specificity"] == pytest.approx(0.4)
    t, achieved = choose_threshold(labels, probs, target_specificity=0.8)  # lowest threshold with spec >= 0.8
    assert t == 0.6 and achieved["sensitivity"] == 0.75
    t, achieved = choose_threshold(labels, probs, target_specificity=1.0)
    assert t == 0.8 and achieved == {"sensitivity": 0.5, "specificity": 1.0, "n": 9}
    # the top score negative: only "no positive" reaches specificity 1
    t, achieved = choose_threshold(np.array([0, 1]), _probs_from_scores([0.9, 0.5]), target_specificity=1.0)
    assert 0.9 < t < 0.9 + 1e-12 and achieved["sensitivity"] == 0.0
    # per group: a patient's frames are one case
    t, achieved = choose_threshold(np.array([1, 1, 1, 0]), _probs_from_scores([0.9, 0.1, 0.2, 0.3]),
                                   groups=["a", "a", "a", "b"], target_sensitivity=1.0)
    assert t == pytest.approx(0.4) and achieved["n"] == 2
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(np.zeros(3, int), _probs_from_scores([0.1, 0.2, 0.3]), target_sensitivity=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        choose_threshold(labels, probs)


def test_threshold_sets_the_predictions_of_metrics_csv_and_text(tmp_path):
    names = ["benign", "malignant"]
    point = {"target_sensitivity": 1.0, "chosen_on": "val", "level": "groups",
             "achieved": {"sensitivity": 1.0, "specificity": 0.4, "n": 9}}
    files = [f"f{i}.png" for i in range(len(BIN_LABELS))]
    results = evaluate_and_write(tmp_path, "test", files, BIN_LABELS, _probs_from_scores(BIN_SCORES), names,
                                 n_boot=50, threshold=0.3, operating_point=point)
    # p >= 0.3 positive: positives 0.9 0.6 0.3 all found; negatives 0.4 0.7 0.8 false alarms
    assert results["confusion_matrix"] == [[2, 3], [0, 3]]
    assert results["metrics"]["recall"]["value"] == 1.0
    assert results["operating_point"]["threshold"] == 0.3
    assert results["group_level"]["confusion_matrix"] == [[2, 3], [0, 3]]  # one image per group
    import csv
    with open(tmp_path / "predictions.csv", newline="") as f:
        predicted = [row["predicted"] for row in csv.DictReader(f)]
    assert predicted == ["malignant"] * 3 + ["benign", "malignant", "benign", "malignant", "malignant"]
    text = (tmp_path / "results.txt").read_text()
    assert "operating point: p(malignant) >= 0.3, chosen on val for sensitivity >= 1 over its groups" in text
    assert "every group holds one image" in text
    with pytest.raises(ValueError, match="two classes"):
        evaluate_predictions(MC_LABELS, MC_PROBS, threshold=0.5)


def test_group_outputs_state_images_and_groups(tmp_path, monkeypatch):
    labels, probs, groups = _one_cine_and_single_images()
    titles = {}
    real_save = metrics_module._save_png
    monkeypatch.setattr(metrics_module, "_save_png",
                        lambda fig, path: (titles.__setitem__(os.path.basename(path), fig.axes[0].get_title()),
                                           real_save(fig, path)))
    files = [f"cine.dcm#{i}" for i in range(40)] + groups[40:]
    evaluate_and_write(tmp_path, "test", files, labels, probs, ["benign", "malignant"], n_boot=50, groups=groups,
                       group_by="file")
    loaded = _strict_json_load(tmp_path / "results.json")["test"]
    assert loaded["n_images"] == 50 and loaded["n_groups"] == 11 and loaded["group_by"] == "file"
    assert loaded["group_level"]["n"] == 11
    text = (tmp_path / "results.txt").read_text()
    assert "== test: n = 50 images in 11 groups (by source file" in text
    assert "-- per image (n = 50; the CI resamples the 11 groups" in text
    assert "-- per group (n = 11 cases in 11 groups" in text
    assert "test: 50 images, 11 groups by file" in titles["roc_curve.png"]
    assert "50 images" in titles["confusion_matrix.png"]
    assert "11 cases in 11 groups" in titles["confusion_matrix_groups.png"]
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[0].endswith(",group") and rows[1].endswith(",cine.dcm")
    rows = (tmp_path / "predictions_groups.csv").read_text().splitlines()
    assert rows[0] == "group,label,n_images,predicted,prob_benign,prob_malignant" and len(rows) == 12
    assert rows[1].startswith("cine.dcm,malignant,40,malignant,")


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------

def _strict_json_load(path):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    with open(path) as f:
        return json.load(f, parse_constant=reject)


def _assert_valid_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def test_write_results_json_and_text(tmp_path):
    names = ["benign", "malignant"]
    test_results = evaluate_predictions(BIN_LABELS, _probs_from_scores(BIN_SCORES), names, n_boot=100)
    val_results = evaluate_predictions(np.zeros(3, int), _probs_from_scores([0.2, 0.7, 0.1]), names, n_boot=100)
    write_results(tmp_path, val_results, names, "val")
    json_path, txt_path = write_results(tmp_path, test_results, names, "test")

    loaded = _strict_json_load(json_path)  # NaN must have become null
    assert set(loaded) == {"val", "test"}  # writing test kept val
    assert loaded["test"]["metrics"]["f1"]["value"] == pytest.approx(test_results["metrics"]["f1"]["value"])
    assert loaded["test"]["confusion_matrix"] == [[3, 2], [1, 2]]
    assert loaded["val"]["metrics"]["auroc"]["value"] is None

    text = Path(txt_path).read_text()
    assert text.index("== val") < text.index("== test")
    assert "recall / sensitivity" in text and "95% CI" in text
    assert f"{test_results['metrics']['specificity']['value']:.4f}" in text
    assert "auroc undefined" in text
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.txt"]  # no temp files left


def test_write_predictions_csv(tmp_path):
    import csv

    path = tmp_path / "predictions.csv"
    files = [f"img_{i}.png" for i in range(len(MC_LABELS))]
    write_predictions_csv(path, files, MC_LABELS, MC_PROBS, ["a", "b", "c"])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(MC_LABELS)
    assert list(rows[0]) == ["file", "label", "predicted", "prob_a", "prob_b", "prob_c"]
    assert rows[1]["file"] == "img_1.png" and rows[1]["label"] == "a" and rows[1]["predicted"] == "a"
    assert rows[4]["label"] == "b" and rows[4]["predicted"] == "c"
    reread = np.array([[float(r[f"prob_{c}"]) for c in "abc"] for r in rows])
    assert np.array_equal(reread, MC_PROBS)  # exact round trip


def test_plots_are_valid_pngs(tmp_path):
    plot_roc(tmp_path / "roc.png", BIN_LABELS, _probs_from_scores(BIN_SCORES), 1, ["benign", "malignant"])
    plot_roc(tmp_path / "roc_mc.png", MC_LABELS, MC_PROBS, 1, ["a", "b", "c"])
    plot_roc(tmp_path / "roc_undefined.png", np.zeros(3, int), _probs_from_scores([0.1, 0.5, 0.9]), 1)
    plot_confusion_matrix(tmp_path / "cm.png", [[3, 2], [1, 2]], ["benign", "malignant"])
    for name in ("roc.png", "roc_mc.png", "roc_undefined.png", "cm.png"):
        _assert_valid_png(tmp_path / name)
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_evaluate_and_write_names_outputs_by_split(tmp_path):
    names = ["benign", "malignant"]
    files = [f"f{i}.png" for i in range(len(BIN_LABELS))]
    evaluate_and_write(tmp_path, "test", files, BIN_LABELS, _probs_from_scores(BIN_SCORES), names, n_boot=50)
    evaluate_and_write(tmp_path, "val", files, BIN_LABELS, _probs_from_scores(BIN_SCORES), names, n_boot=50)
    assert sorted(os.listdir(tmp_path)) == sorted([
        "results.json", "results.txt",
        "predictions.csv", "predictions_groups.csv", "roc_curve.png", "confusion_matrix.png",
        "confusion_matrix_groups.png",
        "predictions_val.csv", "predictions_groups_val.csv", "roc_curve_val.png", "confusion_matrix_val.png",
        "confusion_matrix_groups_val.png"])


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "results.txt"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("crash while writing")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["results.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # a normal file's mode, not mkstemp's 0600


# ---------------------------------------------------------------------------------------------
# Distributed evaluation
# ---------------------------------------------------------------------------------------------

def _fake_predictions(positions):
    """Labels and probabilities that are a pure function of the dataset index."""
    positions = np.asarray(positions)
    labels = positions % 3
    probs = np.stack([positions, positions + 1.0, positions + 2.0], axis=1)
    return labels, probs / probs.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("dataset_size,world_size", [(10, 4), (7, 2), (3, 4)])
def test_unique_predictions_removes_distributed_sampler_padding(dataset_size, world_size):
    shards = [list(DistributedSampler(range(dataset_size), num_replicas=world_size, rank=r, shuffle=True, seed=1))
              for r in range(world_size)]
    gathered = np.concatenate(shards)
    assert len(gathered) > dataset_size  # the sampler really padded with duplicates
    labels, probs = _fake_predictions(gathered)
    indices, labels_out, probs_out = unique_predictions(gathered, labels, probs, dataset_size=dataset_size)
    assert indices.tolist() == list(range(dataset_size))
    expected_labels, expected_probs = _fake_predictions(range(dataset_size))
    assert np.array_equal(labels_out, expected_labels)
    assert np.allclose(probs_out, expected_probs)
    metrics = classification_metrics(labels_out, probs_out)
    assert metrics["n"] == dataset_size


def test_unique_predictions_detects_missing_and_inconsistent_samples():
    labels, probs = _fake_predictions([0, 1, 3])
    with pytest.raises(ValueError, match="1 missing"):
        unique_predictions([0, 1, 3], labels, probs, dataset_size=4)
    with pytest.raises(ValueError, match="different labels"):
        unique_predictions([0, 0], [0, 1], probs[:2])


def test_gather_without_distributed_sorts_the_input():
    positions = np.array([4, 2, 0, 3, 1])
    labels, probs = _fake_predictions(positions)
    indices, labels_out, probs_out = gather_unique_predictions(torch.tensor(positions), torch.tensor(labels),
                                                               torch.tensor(probs), dataset_size=5)
    assert indices.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(labels_out, _fake_predictions(range(5))[0])


def _gather_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # Case 1: DistributedSampler shards of 7 samples over 2 ranks (one padded duplicate).
        shard = list(DistributedSampler(range(7), num_replicas=world_size, rank=rank, shuffle=True, seed=0))
        labels, probs = _fake_predictions(shard)
        padded = gather_unique_predictions(torch.tensor(shard), torch.tensor(labels), torch.tensor(probs),
                                           dataset_size=7)
        # Case 2: unequal shards (4 and 1 samples), no duplicates.
        shard = [0, 1, 2, 3] if rank == 0 else [4]
        labels, probs = _fake_predictions(shard)
        unequal = gather_unique_predictions(shard, labels, probs, dataset_size=5)
        # Case 3: a rank without any sample still takes part in the collective.
        shard = [0, 1] if rank == 0 else []
        labels, probs = _fake_predictions(shard)
        one_empty = gather_unique_predictions(shard, labels, probs.reshape(-1, 3), dataset_size=2)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"),
                 padded_idx=padded[0], padded_labels=padded[1], padded_probs=padded[2],
                 unequal_idx=unequal[0], unequal_probs=unequal[2], one_empty_idx=one_empty[0])
    finally:
        dist.destroy_process_group()


def test_gather_unique_predictions_with_two_gloo_processes(tmp_path):
    world_size = 2
    mp.spawn(_gather_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size, join=True)
    expected_labels, expected_probs = _fake_predictions(range(7))
    for rank in range(world_size):  # every rank gets the full, deduplicated result
        out = np.load(tmp_path / f"rank{rank}.npz")
        assert out["padded_idx"].tolist() == list(range(7))
        assert np.array_equal(out["padded_labels"], expected_labels)
        assert np.allclose(out["padded_probs"], expected_probs)
        assert out["unequal_idx"].tolist() == list(range(5))
        assert np.allclose(out["unequal_probs"], _fake_predictions(range(5))[1])
        assert out["one_empty_idx"].tolist() == [0, 1]
