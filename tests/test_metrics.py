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


# ------------------------------------------------------------------------------ intervals
def test_wilson_interval_matches_published_values():
    from threengan_cli.metrics import wilson_interval

    # 5 of 10: 0.2366 to 0.7634; 0 of 10: 0 to z^2 / (n + z^2) = 0.2775 (Wilson 1927;
    # Newcombe 1998, Table I, method 3)
    np.testing.assert_allclose(wilson_interval(5, 10), [0.2366, 0.7634], atol=5e-5)
    np.testing.assert_allclose(wilson_interval(0, 10), [0.0, 0.2775], atol=5e-5)
    # 81 of 263 (Newcombe 1998, example (c)): 0.2553 to 0.3662
    np.testing.assert_allclose(wilson_interval(81, 263), [0.2553, 0.3662], atol=5e-5)
    assert wilson_interval(0, 0) is None


def test_delong_interval_by_hand():
    from threengan_cli.metrics import delong_interval

    # positives 0.8, 0.6; negatives 0.7, 0.2: AUC 3/4. Placements: per positive, the share of
    # negatives below it: 1, 1/2; per negative, of positives above it: 1/2, 1. Both have
    # sample variance 1/8, so var = 1/8 / 2 + 1/8 / 2 = 1/8.
    is_pos = np.array([True, True, False, False])
    lo, hi = delong_interval(is_pos, np.array([0.8, 0.6, 0.7, 0.2]))
    half = 1.959963984540054 * np.sqrt(1 / 8)
    assert lo == pytest.approx(0.75 - half) and hi == 1.0  # clipped at 1
    # ties count one half, as in the AUC: all scores equal gives AUC 1/2 and no spread
    assert delong_interval(is_pos, np.ones(4)) == [0.5, 0.5]
    assert delong_interval(np.array([True, False, False]), np.array([0.3, 0.2, 0.1])) is None


def test_delong_standard_error_matches_the_hanley_mcneil_formula_on_large_samples():
    from threengan_cli.metrics import delong_interval

    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1.0, 4000), rng.normal(0.0, 1.0, 4000)
    is_pos = np.r_[np.ones(4000, bool), np.zeros(4000, bool)]
    lo, hi = delong_interval(is_pos, np.r_[pos, neg])
    a = (lo + hi) / 2
    # Hanley and McNeil (1982), for comparison: a different estimate of the same variance
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt((a * (1 - a) + 3999 * (q1 - a * a) + 3999 * (q2 - a * a)) / 4000**2)
    assert (hi - lo) / 2 == pytest.approx(1.959963984540054 * se, rel=0.05)


def test_every_metric_gets_an_interval_around_it_and_the_same_one_each_time():
    from threengan_cli.metrics import confidence_intervals

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 600)
    probs = _binary(np.clip(0.3 * labels + 0.7 * rng.random(600), 0, 1))
    point = classification_metrics(labels, probs)
    found = confidence_intervals(labels, probs)
    keys = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "f1")
    assert set(found) == {f"{k}_ci" for k in (*keys, "ece", "brier")}
    for key in (*keys, "ece", "brier"):
        lo, hi = found[f"{key}_ci"]
        assert lo < point[key] < hi and hi - lo < 0.2, key
    assert confidence_intervals(labels, probs) == found  # seeded: deterministic
    # the bootstrap agrees with the Wilson interval where both apply (balanced classes)
    np.testing.assert_allclose(
        found["balanced_accuracy_ci"], found["accuracy_ci"], atol=0.015
    )


def test_intervals_of_undefined_metrics_are_none():
    from threengan_cli.metrics import confidence_intervals

    found = confidence_intervals(np.array([0, 0, 0]), _binary([0.2, 0.7, 0.1]))
    assert found["sensitivity_ci"] is None and found["auc_ci"] is None
    assert found["f1_ci"] is None
    assert found["specificity_ci"] == pytest.approx([0.2077, 0.9385], abs=5e-4)  # 2 of 3
