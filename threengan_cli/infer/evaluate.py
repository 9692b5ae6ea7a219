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
from typing import TYPE_CHECKING, Any

import numpy as np

from threengan_cli import metrics
from threengan_cli.core import paths
from threengan_cli.core.errors import EXIT_USAGE, Failure
from threengan_cli.infer import classify
from threengan_cli.infer.engine import exact

if TYPE_CHECKING:
    from threengan_cli.core.use_settings import EvaluateSettings, ThresholdRule
    from threengan_cli.infer.classify import Classifier

_BATCH = 64


class EvaluateError(Failure):
    """Data or a request that cannot be evaluated; one line for the user."""


class UnknownClass(EvaluateError):
    """Labelled data of a class the model does not know: the user's data or model is wrong."""

    exit_code = EXIT_USAGE


class BadOption(EvaluateError):
    """An option that does not fit the data asked for (exit 2)."""

    exit_code = EXIT_USAGE


def score(data: str, model: Classifier, cfg: EvaluateSettings) -> Evaluation:
    """DATA (its ``cfg.split``) scored at the threshold to use: the one given, else under
    ``threshold_from`` the one chosen on the prepared dataset's val split (``.chosen``, for
    the caller to store in the model), else the model's own."""
    data_set = read_labelled(data, cfg.split, model)
    chosen = None
    if cfg.threshold_from is not None:
        if data_set.kind != "prepared":
            raise BadOption(
                "--threshold-from val needs a prepared dataset as DATA (its val split "
                "chooses the threshold)"
            )
        chosen = threshold_on_val(data, model, cfg.threshold_rule, cfg.batch_size, cfg.workers)
        used, source = chosen["value"], "chosen"
    else:
        used, source, _ = model.decision_threshold(cfg.threshold)
    ood_value = model.ood_threshold(cfg.ood_threshold)[0]
    return evaluate(data_set, model, used, source, cfg.batch_size, cfg.workers, chosen, ood_value)


def store_threshold(model: Classifier, chosen: dict[str, Any]) -> None:
    """The threshold ``--threshold-from`` chose, stored in the model file's metadata, which
    classify and evaluate then use; one that cannot be written is a :class:`Failure`."""
    from threengan_cli.model.modelfile import CheckpointError, update_meta

    try:
        update_meta(model.path, {"threshold": chosen})
    except (OSError, CheckpointError) as exc:
        raise Failure(f"cannot store the threshold in {model.path}: {exc}") from None


def threshold_on_val(
    data: str, model: Classifier, rule: ThresholdRule, batch_size: int, workers: int
) -> dict[str, Any]:
    """The threshold ``rule`` picks on the val split of the prepared dataset ``data``
    (``--threshold-from val``), with how it was chosen."""
    val = read_labelled(data, "val", model)
    probs, _ = probabilities(val, model, batch_size, workers)
    chosen = choose_threshold(val.labels, probs, rule)
    chosen.update(split="val", dataset=val.source)
    return chosen


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
    which_model: str | None = None  # which model of its run ("final, epoch 30"), if a run's
    ood_fit: dict[str, Any] | None = None  # how the model's detector was fitted (its metadata)
    # the model's temperature and how it was fitted: {"value", "split": val, cross-fit or None}
    temperature: dict[str, Any] | None = None

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
            "which_model": self.which_model,
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
            "temperature": self.temperature,
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
            raise UnknownClass(
                f"class {name!r} of {source} is not one of the model's classes "
                f"({', '.join(model_classes)})"
            )
        found.append(lookup[name.lower()])
    return found


def read_labelled(data: str, split: str | None, model: Classifier) -> Labelled:
    """The labelled inputs of ``data``: a prepared dataset's ``split`` (default test), a
    ``train/ val/ test/`` tree's split (default test), a class-folder tree or a CSV (all
    their rows unless they name splits)."""
    from threengan_cli.data import sources

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
        src = sources.scan(given, need_train=False)
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
    from threengan_cli.data import datasets, sources

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
    labels: np.ndarray, probs: np.ndarray, rule: ThresholdRule = "youden", positive: int = 1
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
    value = exact(float(cut[pick]))
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
        values = {c: exact(float(v)) for c, v in zip(classes, p, strict=True)}
        label = classes[next(decided)]
        if flags is None:
            predictions.append(Prediction(name, classes[truth], label, values))
            continue
        score = exact(float(scores[i]))
        predictions.append(
            Prediction(name, classes[truth], label, values, None, score, bool(flags[i]))
        )
    return Evaluation(
        model_id=model.model_id,
        which_model=getattr(model, "which", None),
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
        temperature=_temperature_of(getattr(model, "stats", None)),
    )


def _temperature_of(stats: Any) -> dict[str, Any] | None:
    """The temperature a model's probabilities were divided by, and where it was fitted (its
    metadata: ``split`` val, cross-fit, or None for uncalibrated); None without statistics."""
    if stats is None:
        return None
    how = stats.info.get("temperature")
    return {"value": float(stats.temperature), **(how if isinstance(how, dict) else {})}
