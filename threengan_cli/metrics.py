"""Classification metrics from labels and predicted probabilities, in numpy alone.

``classification_metrics`` reports accuracy, balanced accuracy, AUC, sensitivity,
specificity, F1 and the calibration of the probabilities (ECE over 15 bins, Brier score) as
plain Python numbers (JSON-ready). A metric that is undefined on the
given labels (AUC, sensitivity or F1 without positives; specificity without negatives) is
``None``, never NaN.

Decision rule (its one owner: ``classify`` and ``evaluate`` call :func:`predict`): for two
classes an image is called ``positive`` when its probability for that class is >= ``threshold``
(default 0.5, DESIGN section 5); for more classes it is the argmax. The comparison is made in
float32, the precision the models compute in and the digits ``classify`` writes read back as,
so a probability read from classify's output and a threshold of up to 7 significant digits
give the same decision as the model did.
Sensitivity, specificity, F1 and AUC are then about ``positive`` against all other classes
(one-vs-rest); accuracy and balanced accuracy use every class.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (K, K): row = true class, column = predicted class."""
    flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, -1)


def predict(probs: np.ndarray, threshold: float = 0.5, positive: int = 1) -> np.ndarray:
    """Predicted class per row: threshold on ``positive`` for K=2, argmax otherwise."""
    if probs.shape[1] == 2:
        called = np.asarray(probs[:, positive], dtype=np.float32) >= np.float32(threshold)
        return np.where(called, positive, 1 - positive)
    return probs.argmax(axis=1)


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks, tied scores sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    mean_rank = last - (counts - 1) / 2.0
    return mean_rank[inverse.reshape(-1)]


def roc_auc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve as the Mann-Whitney U statistic; ties count one half.

    None when positives or negatives are missing, where the AUC is undefined, or when a
    score is not finite (a diverged model has no ranking to measure).
    """
    if not np.isfinite(scores).all():
        return None
    n_pos = int(is_positive.sum())
    n_neg = is_positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(scores)
    u = ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5, positive: int = 1
) -> dict[str, Any]:
    """accuracy, balanced_accuracy, auc, sensitivity, specificity, f1, n and the confusion
    matrix (``confusion[true][predicted]``) of probabilities ``probs`` (N, K) for ``labels``."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (N, K) with N = {labels.shape[0]}, got {probs.shape}")
    num_classes = probs.shape[1]
    if not 0 <= positive < num_classes:
        raise ValueError(f"positive class {positive} is not one of the {num_classes} classes")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")

    predictions = predict(probs, threshold, positive)
    cm = confusion_matrix(labels, predictions, num_classes)
    support = cm.sum(axis=1)
    recalls = [cm[k, k] / support[k] for k in range(num_classes) if support[k]]

    tp = cm[positive, positive]
    fn = support[positive] - tp
    fp = cm[:, positive].sum() - tp
    tn = cm.sum() - tp - fn - fp
    return {
        "n": int(labels.size),
        "accuracy": _ratio(np.trace(cm), cm.sum()),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "auc": roc_auc(labels == positive, probs[:, positive]),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn) if tp + fn else None,
        "ece": expected_calibration_error(labels, probs),
        "brier": brier_score(labels, probs, positive),
        "confusion": cm.tolist(),
    }


# --------------------------------------------------------------------------- calibration
ECE_BINS = 15  # Guo et al. 2017's number of equal-width confidence bins


def expected_calibration_error(
    labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> float | None:
    """Top-label ECE: the confidences (each row's largest probability) in ``bins`` equal-width
    bins over [0, 1]; the mean |accuracy - confidence| of the bins, weighted by their counts.
    None for no rows or a probability that is not finite."""
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if not labels.size or not np.isfinite(probs).all():
        return None
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # bin b holds confidences in (b/bins, (b+1)/bins]; bin 0 also takes 0
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = 0.0
    for b in np.unique(which):
        inside = which == b
        gap += abs(correct[inside].mean() - confidence[inside].mean()) * inside.sum()
    return float(gap / labels.size)


def brier_score(labels: np.ndarray, probs: np.ndarray, positive: int = 1) -> float | None:
    """Mean squared error of the probabilities: for two classes, of the ``positive`` class's
    probability against 0/1 (the usual binary Brier score); for more, summed over classes.
    None for no rows or a probability that is not finite."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if not labels.size or not np.isfinite(probs).all():
        return None
    if probs.shape[1] == 2:
        return float(np.mean((probs[:, positive] - (labels == positive)) ** 2))
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(((probs - onehot) ** 2).sum(axis=1)))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in the logits' precision."""
    z = np.asarray(logits) / np.asarray(temperature, dtype=np.asarray(logits).dtype)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the mean negative log-likelihood of softmax(logits / T)
    on ``labels`` (Guo et al. 2017), searched in [0.05, 20].

    The likelihood is convex in 1/T, so a golden-section search over log T finds the
    optimum; 100 steps narrow it far below float32 precision, and the search is the same
    arithmetic on every machine (no BLAS), so a fit is reproducible.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if not len(y):
        return 1.0

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(y)), y]))

    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5.0) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(100):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2))


# ------------------------------------------------------------------------------ intervals
Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: two-sided 95%
RESAMPLES = 1000  # bootstrap resamples: the 2.5th and 97.5th percentiles settle to ~0.005
RESAMPLE_SEED = 0  # a fixed seed: the same data gives the same interval, run after run
BOOTSTRAPPED = ("balanced_accuracy", "f1", "ece", "brier")


def wilson_interval(successes: float, n: float, z: float = Z95) -> list[float] | None:
    """The Wilson score interval of the proportion ``successes / n`` (Wilson 1927): unlike
    p +- z se it stays inside [0, 1] and keeps its coverage near 0 and 1 and for small n.
    None for n = 0."""
    if n <= 0:
        return None
    p, z2 = successes / n, z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def delong_interval(
    is_positive: np.ndarray, scores: np.ndarray, z: float = Z95
) -> list[float] | None:
    """The interval AUC +- z se, se by DeLong et al. (1988) from the placement values, computed
    from mid-ranks as Sun and Xu (2014) do; clipped to [0, 1]. Deterministic (no resampling).
    None where the AUC is undefined or a class has fewer than two images (no variance)."""
    is_positive = np.asarray(is_positive, dtype=bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    pos, neg = scores[is_positive], scores[~is_positive]
    m, n = len(pos), len(neg)
    if m < 2 or n < 2 or not np.isfinite(scores).all():
        return None
    ranks = _average_ranks(np.concatenate([pos, neg]))
    # per positive: the share of negatives below it; per negative: of positives above it
    # (ties count one half)
    v10 = (ranks[:m] - _average_ranks(pos)) / n
    v01 = 1.0 - (ranks[m:] - _average_ranks(neg)) / m
    auc = float(v10.mean())
    se = float(np.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n))
    return [max(0.0, auc - z * se), min(1.0, auc + z * se)]


def _bootstrap_intervals(
    labels: np.ndarray, probs: np.ndarray, threshold: float, positive: int
) -> dict[str, list[float] | None]:
    """Percentile intervals of the metrics that are no simple proportion, from
    :data:`RESAMPLES` resamples drawn within each class (so that every resample keeps the
    class counts and sensitivity-like metrics stay defined), seeded: deterministic. Each
    image's part in each metric is computed once; a resample only sums them (bin counts),
    the same sums :func:`classification_metrics` makes."""
    rng = np.random.default_rng(RESAMPLE_SEED)
    num_classes = probs.shape[1]
    groups = [np.flatnonzero(labels == k) for k in range(num_classes)]
    groups = [g for g in groups if len(g)]
    predicted = predict(probs, threshold, positive)
    hit = (predicted == labels).astype(np.float64)
    confidence = probs.max(axis=1)
    top_right = (probs.argmax(axis=1) == labels).astype(np.float64)
    which = np.clip(np.ceil(confidence * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
    if num_classes == 2:
        squared = (probs[:, positive] - (labels == positive)) ** 2
    else:
        squared = ((probs - np.eye(num_classes)[labels]) ** 2).sum(axis=1)
    is_pos, called = labels == positive, predicted == positive
    found: dict[str, list[float]] = {key: [] for key in BOOTSTRAPPED}
    n = len(labels)
    for _ in range(RESAMPLES):
        parts = [g[rng.integers(0, len(g), len(g))] for g in groups]
        idx = np.concatenate(parts)
        found["balanced_accuracy"].append(float(np.mean([hit[g].mean() for g in parts])))
        tp = float(np.sum(is_pos[idx] & called[idx]))
        wrong = float(np.sum(is_pos[idx] != called[idx]))
        if is_pos.any():
            found["f1"].append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
        right_b = np.bincount(which[idx], weights=top_right[idx], minlength=ECE_BINS)
        sure_b = np.bincount(which[idx], weights=confidence[idx], minlength=ECE_BINS)
        found["ece"].append(float(np.abs(right_b - sure_b).sum() / n))
        found["brier"].append(float(squared[idx].mean()))
    return {
        key: [float(v) for v in np.quantile(values, [0.025, 0.975])]
        if len(values) == RESAMPLES
        else None
        for key, values in found.items()
    }


def confidence_intervals(
    labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5, positive: int = 1
) -> dict[str, list[float] | None]:
    """A 95% interval for each metric of :func:`classification_metrics`, as ``<metric>_ci``:
    Wilson for the proportions (accuracy, sensitivity, specificity), DeLong for the AUC, a
    seeded stratified bootstrap for balanced accuracy, F1, ECE and Brier score. None where
    the metric is undefined. The intervals say how much the metrics
    could move on another sample of as many images: on 100 images, an accuracy of 0.80
    lies in [0.71, 0.87]. Rounded outwards (:func:`rounded_out`)."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if not labels.size or not np.isfinite(probs).all():
        return {f"{key}_ci": None for key in (*_PROPORTIONS, "auc", *BOOTSTRAPPED)}
    cm = confusion_matrix(labels, predict(probs, threshold, positive), probs.shape[1])
    tp = cm[positive, positive]
    fn = cm[positive].sum() - tp
    fp = cm[:, positive].sum() - tp
    tn = cm.sum() - tp - fn - fp
    found = {
        "accuracy": wilson_interval(np.trace(cm), cm.sum()),
        "sensitivity": wilson_interval(tp, tp + fn),
        "specificity": wilson_interval(tn, tn + fp),
        "auc": delong_interval(labels == positive, probs[:, positive]),
        **_bootstrap_intervals(labels, probs, threshold, positive),
    }
    return {f"{key}_ci": rounded_out(pair) for key, pair in found.items()}


def rounded_out(pair: list[float] | None, digits: int = 6) -> list[float] | None:
    """An interval rounded outwards to ``digits`` decimals, so that it still holds every
    value it held (a metric at its bound stays inside)."""
    if pair is None:
        return None
    scale = 10.0**digits
    return [float(np.floor(pair[0] * scale) / scale), float(np.ceil(pair[1] * scale) / scale)]


_PROPORTIONS = ("accuracy", "sensitivity", "specificity")
