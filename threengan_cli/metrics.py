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
