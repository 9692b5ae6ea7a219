"""Score a model on labelled X-rays: metrics, confusion matrix, ROC, and a threshold chosen on val.

Labelled data comes from a folder of class folders (or a ``train/ val/ test/`` tree of
them, one split chosen), a ``path,label[,split]`` CSV, or a split of a prepared dataset.
Files are classified by :func:`classify.classify` itself (the same decoding, the same
model call, the same float32-exact probabilities and :func:`metrics.predict` decision), so
``evaluate`` and ``classify`` agree on every image; a prepared split's images were decoded
by ``prepare`` with the same :func:`images.load_image` and go to the same model call.

A threshold chosen here (:func:`choose_threshold`) is stored in the checkpoint's metadata by
:func:`modelfile.update_meta`; ``classify`` and ``evaluate`` then use it unless a threshold
is given, and say so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from threengan_cli import classify, metrics, paths

if TYPE_CHECKING:
    from threengan_cli.classify import Classifier

Rule = Literal["youden", "balanced-accuracy"]
RULES: tuple[str, ...] = ("youden", "balanced-accuracy")
_BATCH = 64


class EvaluateError(Exception):
    """Data or a request that cannot be evaluated; one line for the user."""


@dataclass
class Labelled:
    """Labelled inputs: files to decode (``paths``) or a prepared split's decoded ``images``."""

    source: str
    kind: str  # class-folders, split-folders, csv or prepared
    split: str | None
    labels: np.ndarray  # int64 (N,): indices into the model's classes
    names: list[str]  # one per input: its file path (or the path prepare recorded)
    images: np.ndarray | None = field(default=None, repr=False)  # uint8 (N, H, W)


@dataclass
class Prediction:
    path: str
    truth: str
    label: str | None
    probabilities: dict[str, float] | None
    error: str | None = None
    ood_score: float | None = None
    ood: bool | None = None


@dataclass
class Evaluation:
    model_id: str
    method: str
    classes: list[str]
    data: Labelled
    threshold: float
    threshold_source: str  # given, model (stored by --threshold-from), chosen or default
    metrics: dict[str, Any]
    per_class: dict[str, dict[str, int]]
    predictions: list[Prediction] = field(repr=False)
    roc: dict[str, list[float]] = field(repr=False)
    chosen: dict[str, Any] | None = None
    ood_threshold: float | None = None  # None: a model without out-of-distribution statistics
    unflagged: dict[str, Any] | None = None  # the metrics over the images not flagged
    ood_fit: dict[str, Any] | None = None  # how the model's detector was fitted (its metadata)

    @property
    def flagged(self) -> float | None:
        """The share of the readable images flagged as unlike the training X-rays."""
        scored = [p.ood for p in self.predictions if p.ood is not None]
        return float(np.mean(scored)) if scored else None

    @property
    def flagged_ci(self) -> list[float] | None:
        """The Wilson 95% interval of :attr:`flagged`."""
        scored = [p.ood for p in self.predictions if p.ood is not None]
        return metrics.rounded_out(metrics.wilson_interval(sum(scored), len(scored)))

    @property
    def unreadable(self) -> list[Prediction]:
        return [p for p in self.predictions if p.error is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "method": self.method,
            "classes": self.classes,
            "data": self.data.source,
            "data_kind": self.data.kind,
            "split": self.data.split,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "threshold_chosen": self.chosen,
            **{k: v for k, v in self.metrics.items() if k != "confusion"},
            "confusion": self.metrics["confusion"],
            "per_class": self.per_class,
            "ood_threshold": self.ood_threshold,
            "ood_flagged": self.flagged,
            "ood_flagged_ci": self.flagged_ci,
            "ood_fit": self.ood_fit,
            "unflagged": self.unflagged,
            "unreadable": [[p.path, p.error] for p in self.unreadable],
        }


# --------------------------------------------------------------------------------- data
def _class_index(data_classes: Iterable[str], model_classes: list[str], source: str) -> list[int]:
    """Each data class's index among the model's classes (names compared case-insensitively)."""
    lookup = {c.lower(): i for i, c in enumerate(model_classes)}
    found = []
    for name in data_classes:
        if name.lower() not in lookup:
            raise EvaluateError(
                f"class {name!r} of {source} is not one of the model's classes "
                f"({', '.join(model_classes)})"
            )
        found.append(lookup[name.lower()])
    return found


def read_labelled(data: str, split: str | None, model: Classifier) -> Labelled:
    """The labelled inputs of ``data``: a prepared dataset's ``split`` (default test), a
    ``train/ val/ test/`` tree's split (default test), a class-folder tree or a CSV (all
    their rows unless they name splits)."""
    from threengan_cli import sources

    given = Path(data).expanduser()
    dataset = paths.resolve_dataset(data)
    if (dataset / "manifest.json").is_file():
        return _prepared(dataset, split or "test", model)
    if not given.exists():
        raise EvaluateError(
            f"{data} is neither a folder, a CSV nor a prepared dataset "
            f"(looked in {paths.datasets_dir()})"
        )
    if given.is_file() and given.suffix.lower() == ".npz":
        raise EvaluateError(
            f"{data}: prepare a .npz first (threengan prepare {data} --name NAME), "
            "then evaluate NAME --split test"
        )
    try:
        src = sources.scan(given)
    except sources.DatasetError as exc:
        raise EvaluateError(str(exc)) from None
    splits = {item.split for item in src.items}
    if src.kind == "class-folders" or (src.kind == "csv" and splits == {"train"}):
        if split is not None:
            raise EvaluateError(f"{data} has no splits; --split applies to split data only")
        chosen, items = None, src.items
    else:
        chosen = split or "test"
        items = [item for item in src.items if item.split == chosen]
    if not items:
        raise EvaluateError(f"{data} has no {chosen or ''} images".replace("  ", " "))
    index = _class_index(src.classes, model.classes, data)
    bad = [item.read for item in items if Path(str(item.read)).is_dir()]
    if bad:
        raise EvaluateError(f"{data}: {bad[0]} is a folder; list image files one per row")
    return Labelled(
        source=str(given),
        kind=src.kind,
        split=chosen,
        labels=np.array([index[item.label] for item in items], dtype=np.int64),
        names=[str(item.read) for item in items],
    )


def _prepared(dataset: Path, split: str, model: Classifier) -> Labelled:
    from threengan_cli import datasets, sources

    try:
        prepared = datasets.load_prepared(dataset)
        images, labels = prepared.subset(split)
    except (sources.DatasetError, ValueError) as exc:
        raise EvaluateError(str(exc)) from None
    if prepared.image_size != model.image_size:
        raise EvaluateError(
            f"{dataset.name} holds {prepared.image_size}px images and {model.model_id} takes "
            f"{model.image_size}px: prepare the source again with --image-size "
            f"{model.image_size}, or evaluate its folder"
        )
    fit = prepared.manifest.get("settings", {}).get("fit", "squash")
    if fit != model.fit:
        raise EvaluateError(
            f"{dataset.name} was prepared with --fit {fit} and {model.model_id} expects "
            f"{model.fit}: prepare it again with --fit {model.fit}"
        )
    if not len(labels):
        raise EvaluateError(f"{dataset.name} has no {split} images")
    index = np.array(_class_index(prepared.classes, model.classes, dataset.name))
    recorded = [row["path"] for row in prepared.manifest.get("images", [])]
    rows = np.flatnonzero(prepared.split == sources.SPLIT_CODES[split])
    names = [recorded[i] for i in rows] if len(recorded) == len(prepared.labels) else []
    return Labelled(
        source=str(dataset),
        kind="prepared",
        split=split,
        labels=index[labels],
        names=names or [f"{split}[{i}]" for i in range(len(labels))],
        images=images,
    )


# ------------------------------------------------------------------------------ scoring
def probabilities(
    data: Labelled, model: Classifier, batch_size: int = _BATCH, workers: int = 0
) -> tuple[np.ndarray, list[str | None]]:
    """float32 probabilities (N, K) and per input an error or None (its row then holds NaN)."""
    probs, _, errors = outputs(data, model, batch_size, workers)
    return probs, errors


def outputs(
    data: Labelled, model: Classifier, batch_size: int = _BATCH, workers: int = 0
) -> tuple[np.ndarray, np.ndarray | None, list[str | None]]:
    """float32 probabilities (N, K), out-of-distribution scores (N,) (``None`` for a model
    without statistics) and per input an error or None (its row then holds NaN)."""
    k = len(model.classes)
    if data.images is not None:
        parts = [
            model.outputs_of(data.images[i : i + batch_size])
            for i in range(0, len(data.images), batch_size)
        ]
        probs = np.concatenate([p for p, _ in parts]).astype(np.float32)
        scores = None if parts[0][1] is None else np.concatenate([s for _, s in parts])
        return probs, scores, [None] * len(probs)
    probs = np.full((len(data.names), k), np.nan, dtype=np.float32)
    scores = np.full(len(data.names), np.nan, dtype=np.float32)
    errors: list[str | None] = []
    rows = classify.classify(data.names, model, batch_size=batch_size, workers=workers)
    for i, row in enumerate(rows):
        errors.append(row.error)
        if row.ok and row.probabilities is not None:
            probs[i] = [row.probabilities[c] for c in model.classes]
            scores[i] = np.nan if row.ood_score is None else row.ood_score
    return probs, (None if getattr(model, "stats", None) is None else scores), errors


def roc_curve(is_positive: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """False and true positive rates at every distinct score as threshold (``>=``), from
    (0, 0) to (1, 1)."""
    cut, tp, fp = _counts_at_thresholds(is_positive, scores)
    pos, neg = max(int(is_positive.sum()), 1), max(int((~is_positive).sum()), 1)
    return {
        "threshold": [float(t) for t in cut[::-1]],
        "fpr": [0.0, *(fp[::-1] / neg).tolist(), 1.0],
        "tpr": [0.0, *(tp[::-1] / pos).tolist(), 1.0],
    }


def _counts_at_thresholds(
    is_positive: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct float32 scores (ascending) and, for each as threshold, how many positives
    and negatives score at least that much."""
    scores = np.asarray(scores, dtype=np.float32)
    cut = np.unique(scores)
    pos = np.sort(scores[is_positive])
    neg = np.sort(scores[~is_positive])
    tp = len(pos) - np.searchsorted(pos, cut, side="left")
    fp = len(neg) - np.searchsorted(neg, cut, side="left")
    return cut, tp.astype(np.float64), fp.astype(np.float64)


def choose_threshold(
    labels: np.ndarray, probs: np.ndarray, rule: Rule = "youden", positive: int = 1
) -> dict[str, Any]:
    """The threshold that maximises ``rule`` on these labels, among the scores themselves.

    For two classes Youden's J (sensitivity + specificity - 1) is 2 x balanced accuracy - 1,
    so both rules choose the same threshold; each reports its own value. Candidates are the
    distinct float32 scores strictly between 0 and 1 (a score as threshold reproduces
    exactly the split it was scored with, since :func:`metrics.predict` compares float32
    with ``>=``); among equally good ones the one nearest 0.5, the default, wins.
    """
    if probs.shape[1] != 2:
        raise EvaluateError("a threshold applies to two-class models only")
    labels = np.asarray(labels)
    is_positive = labels == positive
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    if not n_pos or not n_neg:
        raise EvaluateError("choosing a threshold needs images of both classes")
    cut, tp, fp = _counts_at_thresholds(is_positive, probs[:, positive])
    inside = (cut > 0) & (cut < 1)
    if not inside.any():
        raise EvaluateError("every score is 0 or 1: no threshold between them to choose")
    cut, tp, fp = cut[inside], tp[inside], fp[inside]
    sensitivity, specificity = tp / n_pos, 1 - fp / n_neg
    j = sensitivity + specificity - 1
    best = np.flatnonzero(j >= j.max() - 1e-12)
    pick = best[np.argmin(np.abs(cut[best].astype(np.float64) - 0.5))]
    value = classify.exact(float(cut[pick]))
    score = float(j[pick]) if rule == "youden" else float((sensitivity + specificity)[pick] / 2)
    return {
        "value": value,
        "rule": rule,
        "rule_value": round(score, 6),
        "sensitivity": round(float(sensitivity[pick]), 6),
        "specificity": round(float(specificity[pick]), 6),
        "images": int(len(labels)),
    }


def evaluate(
    data: Labelled,
    model: Classifier,
    threshold: float,
    threshold_source: str,
    batch_size: int = _BATCH,
    workers: int = 0,
    chosen: dict[str, Any] | None = None,
    ood_threshold: float | None = None,
) -> Evaluation:
    """Score ``model`` on ``data`` with ``threshold`` (see the module docstring); with
    ``ood_threshold`` (a model with statistics), also over the images it does not flag."""
    probs, scores, errors = outputs(data, model, batch_size, workers)
    ok = np.array([e is None for e in errors], dtype=bool)
    classes = list(model.classes)
    if not ok.any():
        raise EvaluateError(f"none of the {len(errors)} images could be read")
    labels, good = data.labels[ok], probs[ok]
    scored = metrics.classification_metrics(labels, good, threshold=threshold)
    scored.update(metrics.confidence_intervals(labels, good, threshold=threshold))
    predicted = metrics.predict(good, threshold)
    per_class = {
        c: {
            "images": int((labels == k).sum()),
            "predicted": int((predicted == k).sum()),
            "correct": int(((labels == k) & (predicted == k)).sum()),
        }
        for k, c in enumerate(classes)
    }
    roc = roc_curve(labels == 1, good[:, 1]) if len(classes) == 2 else {}
    if scores is None:
        ood_threshold = None
    flags = scores > np.float32(ood_threshold) if ood_threshold is not None else None
    unflagged = None
    if flags is not None:
        kept = ~flags[ok]
        unflagged = {"n": 0}
        if kept.any():
            unflagged = metrics.classification_metrics(labels[kept], good[kept], threshold)
            unflagged.update(metrics.confidence_intervals(labels[kept], good[kept], threshold))
    predictions = []
    decided = iter(predicted.tolist())
    for i, (name, truth, p, error) in enumerate(
        zip(data.names, data.labels, probs, errors, strict=True)
    ):
        if error is not None:
            predictions.append(Prediction(name, classes[truth], None, None, error))
            continue
        values = {c: classify.exact(float(v)) for c, v in zip(classes, p, strict=True)}
        label = classes[next(decided)]
        if flags is None:
            predictions.append(Prediction(name, classes[truth], label, values))
            continue
        score = classify.exact(float(scores[i]))
        predictions.append(
            Prediction(name, classes[truth], label, values, None, score, bool(flags[i]))
        )
    return Evaluation(
        model_id=model.model_id,
        method=model.method,
        classes=classes,
        data=data,
        threshold=threshold,
        threshold_source=threshold_source,
        metrics=scored,
        per_class=per_class,
        predictions=predictions,
        roc=roc,
        chosen=chosen,
        ood_threshold=ood_threshold,
        unflagged=unflagged,
        ood_fit=model.stats.info.get("ood") if flags is not None else None,
    )


# -------------------------------------------------------------------------------- plots
def write_plots(result: Evaluation, folder: Path) -> list[Path]:
    """roc.png (two classes) and confusion.png in ``folder``; needs matplotlib (the ``plot``
    extra: ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from threengan_cli import fileio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    title = f"{result.model_id} on {Path(result.data.source).name}"
    title += f" ({result.data.split})" if result.data.split else ""
    if result.roc:
        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
        auc = result.metrics.get("auc")
        shown = f"AUC {auc:.4f}" if auc is not None else "AUC undefined"
        ax.plot(result.roc["fpr"], result.roc["tpr"], lw=1.5, label=shown)
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
        sens, spec = result.metrics.get("sensitivity"), result.metrics.get("specificity")
        if sens is not None and spec is not None:
            ax.plot([1 - spec], [sens], "o", label=f"threshold {result.threshold:g}")
        ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate")
        ax.set_title(_wrapped(title), fontsize=8)
        ax.legend(loc="lower right", fontsize=8)
        made.append(_save(fig, folder / "roc.png", fileio))
    made.append(_confusion(result, title, folder, plt, fileio))
    made.append(_reliability(result, title, folder, plt, fileio))
    if result.ood_threshold is not None:
        made.append(_ood_histogram(result, title, folder, plt, fileio))
    return made


def _confusion(result: Evaluation, title: str, folder: Path, plt, fileio) -> Path:
    """confusion.png: each cell's count and its share of the true class (the row), coloured
    by that share so that a small class's errors show as clearly as a large one's."""
    cm = np.array(result.metrics["confusion"])
    rows = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=120)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(result.classes))
    ax.set_xticks(ticks, result.classes)
    ax.set_yticks(ticks, result.classes)
    ax.set(xlabel="predicted", ylabel="true")
    for (i, j), n in np.ndenumerate(cm):
        colour = "black" if shares[i, j] < 0.5 else "w"
        ax.text(j, i, f"{n}\n{shares[i, j]:.1%}", ha="center", va="center", color=colour)
    ax.set_title(_wrapped(title + " (share of the true class)"), fontsize=8)
    return _save(fig, folder / "confusion.png", fileio)


def _wrapped(title: str, width: int = 60) -> str:
    """A plot title on as many lines as it needs: a run name or path is never cut short."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width, break_long_words=True, break_on_hyphens=False))


def _reliability(result: Evaluation, title: str, folder: Path, plt, fileio) -> Path:
    """reliability.png: accuracy against confidence in the 15 bins of the ECE."""
    readable = [p for p in result.predictions if p.probabilities is not None]
    probs = np.array([[p.probabilities[c] for c in result.classes] for p in readable])
    truth = np.array([result.classes.index(p.truth) for p in readable])
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == truth
    bins = metrics.ECE_BINS
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    centres, accuracy, counts = [], [], []
    for b in range(bins):
        inside = which == b
        if inside.any():
            centres.append(confidence[inside].mean())
            accuracy.append(correct[inside].mean())
            counts.append(int(inside.sum()))
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1, label="calibrated")
    ax.plot(centres, accuracy, "o-", lw=1.5, label=f"ECE {result.metrics['ece']:.4f}")
    for x, y, n in zip(centres, accuracy, counts, strict=True):
        ax.annotate(str(n), (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.set(xlabel="confidence (mean of the bin)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(_wrapped(title), fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, folder / "reliability.png", fileio)


def _ood_histogram(result: Evaluation, title: str, folder: Path, plt, fileio) -> Path:
    """ood_scores.png: the out-of-distribution scores and the threshold that flags them."""
    scores = np.array([p.ood_score for p in result.predictions if p.ood_score is not None])
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    edges = np.linspace(0, max(float(np.percentile(scores, 99)), result.ood_threshold * 2), 41)
    ax.hist(np.clip(scores, 0, edges[-1]), bins=edges, color="tab:blue", alpha=0.8)
    ax.axvline(result.ood_threshold, c="tab:red", lw=1.5)
    flagged = result.flagged or 0.0
    ax.set(xlabel="out-of-distribution score (last bin: that and above)", ylabel="images")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of images are whole
    caption = f"flagged {flagged:.1%} (threshold {result.ood_threshold:g})"
    ax.set_title(_wrapped(title) + "\n" + caption, fontsize=8)
    return _save(fig, folder / "ood_scores.png", fileio)


def _save(fig, path: Path, fileio) -> Path:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    fileio.write_bytes(path, buffer.getvalue())
    return path
