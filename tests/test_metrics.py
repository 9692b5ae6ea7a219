"""Metrics: hand-computed confusion matrices, AUC against a brute-force pair count."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from threengan_cli.metrics import classification_metrics, confusion_matrix, roc_auc


def _binary(p_positive):
    p = np.asarray(p_positive, dtype=float)
    return np.stack([1 - p, p], axis=1)


def _brute_force_auc(labels, scores, positive=1):
    pos = [s for y, s in zip(labels, scores, strict=True) if y == positive]
    neg = [s for y, s in zip(labels, scores, strict=True) if y != positive]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_binary_metrics_from_a_hand_counted_confusion_matrix():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    probs = _binary([0.9, 0.6, 0.2, 0.1, 0.7, 0.3, 0.4, 0.5])
    # predicted (>= 0.5): 1, 1, 0, 0, 1, 0, 0, 1 -> TP=3, FN=1, TN=3, FP=1
    m = classification_metrics(labels, probs)
    assert m["confusion"] == [[3, 1], [1, 3]]
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert m["auc"] == pytest.approx(_brute_force_auc(labels, probs[:, 1]))


def test_unbalanced_binary_metrics_by_hand():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    probs = _binary([0.1, 0.2, 0.6, 0.3, 0.1, 0.2, 0.8, 0.4])
    # TP=1, FN=1, FP=1, TN=5
    m = classification_metrics(labels, probs)
    assert m["confusion"] == [[5, 1], [1, 1]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(1 / 2)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 5 / 6) / 2)
    assert m["f1"] == pytest.approx(2 / (2 + 1 + 1))


def test_threshold_moves_the_decision_on_the_positive_class():
    labels = np.array([1, 0, 1, 0])
    probs = _binary([0.7, 0.6, 0.4, 0.2])
    assert classification_metrics(labels, probs, threshold=0.5)["confusion"] == [[1, 1], [1, 1]]
    assert classification_metrics(labels, probs, threshold=0.65)["confusion"] == [[2, 0], [1, 1]]
    # a probability equal to the threshold counts as positive
    assert classification_metrics(labels, probs, threshold=0.4)["sensitivity"] == 1.0


def test_positive_class_zero_swaps_sensitivity_and_specificity():
    labels = np.array([0, 0, 1, 1, 1])
    probs = _binary([0.2, 0.7, 0.9, 0.3, 0.6])  # columns: p(class 0), p(class 1)
    one = classification_metrics(labels, probs, positive=1)
    zero = classification_metrics(labels, probs, positive=0)
    # p(class 0) = 0.8, 0.3, 0.1, 0.7, 0.4 >= 0.5 -> 0, 1, 1, 0, 1 for positive=0
    assert zero["confusion"] == [[1, 1], [1, 2]]
    assert one["confusion"] == [[1, 1], [1, 2]]
    assert zero["sensitivity"] == one["specificity"]
    assert zero["auc"] == pytest.approx(_brute_force_auc(labels, probs[:, 0], positive=0))


def test_auc_counts_ties_as_one_half():
    labels = np.array([1, 0, 1, 0, 1, 0])
    scores = np.array([0.5, 0.5, 0.8, 0.5, 0.2, 0.2])
    assert roc_auc(labels == 1, scores) == pytest.approx(_brute_force_auc(labels, scores))
    assert roc_auc(np.array([True, False]), np.array([0.3, 0.3])) == 0.5


def test_auc_matches_the_brute_force_pair_count_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 2, size=40)
        scores = rng.integers(0, 6, size=40) / 5  # many ties
        assert roc_auc(labels == 1, scores) == pytest.approx(_brute_force_auc(labels, scores))


def test_auc_of_perfect_and_reversed_rankings():
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels == 1, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(labels == 1, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0


def test_metrics_undefined_without_one_class_are_none_not_nan():
    labels = np.array([0, 0, 0])
    m = classification_metrics(labels, _binary([0.1, 0.6, 0.2]))
    assert m["auc"] is None
    assert m["sensitivity"] is None
    assert m["f1"] is None
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)  # over the classes present
    only_positive = classification_metrics(np.array([1, 1]), _binary([0.9, 0.2]))
    assert only_positive["specificity"] is None and only_positive["auc"] is None


def test_auc_and_calibration_of_non_finite_scores_are_none():
    m = classification_metrics(np.array([0, 1]), np.array([[0.5, np.nan], [0.5, 0.5]]))
    assert m["auc"] is None and m["ece"] is None and m["brier"] is None


def test_empty_input_gives_n_zero_and_no_rates():
    m = classification_metrics(np.array([], dtype=int), np.zeros((0, 2)))
    assert m["n"] == 0
    assert m["accuracy"] is None and m["auc"] is None


def test_three_classes_use_argmax_and_one_vs_rest_for_the_positive_class():
    labels = np.array([0, 1, 2, 2, 1, 0])
    probs = np.array(
        [
            [0.6, 0.3, 0.1],  # -> 0
            [0.2, 0.5, 0.3],  # -> 1
            [0.1, 0.2, 0.7],  # -> 2
            [0.1, 0.6, 0.3],  # -> 1
            [0.5, 0.4, 0.1],  # -> 0
            [0.3, 0.3, 0.4],  # -> 2
        ]
    )
    m = classification_metrics(labels, probs, positive=2)
    assert m["confusion"] == [[1, 0, 1], [1, 1, 0], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 2) / 3)
    # positive = class 2 against classes 0 and 1: TP=1, FN=1, FP=1, TN=3
    assert m["sensitivity"] == pytest.approx(1 / 2)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 / 4)
    assert m["auc"] == pytest.approx(_brute_force_auc(labels, probs[:, 2], positive=2))


def test_confusion_matrix_rows_are_truth_columns_are_predictions():
    cm = confusion_matrix(np.array([0, 0, 1]), np.array([1, 1, 1]), 2)
    assert cm.tolist() == [[0, 2], [0, 1]]


def test_mismatched_shapes_and_bad_classes_are_refused():
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics(np.array([0, 1]), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="positive class"):
        classification_metrics(np.array([0, 1]), np.zeros((2, 2)), positive=2)
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics(np.array([0, 2]), np.zeros((2, 2)))


def test_values_are_plain_python_numbers():
    m = classification_metrics(np.array([0, 1]), _binary([0.2, 0.9]))
    assert all(type(m[k]) is float for k in ("accuracy", "auc", "f1", "sensitivity"))
    assert type(m["n"]) is int
