"""evaluate --plot's figures: ROC, confusion matrix with shares, reliability diagram and the
out-of-distribution score histogram (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from threengan_cli import metrics
from threengan_cli.core.errors import Failure
from threengan_cli.infer.evaluate import Evaluation


def require_matplotlib() -> None:
    """A :class:`Failure` (exit 1, not a usage error: the same command works once the extra
    is there) where matplotlib is missing; said before any work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise Failure("--plot needs matplotlib: pip install 'threengan[plot]'") from None


def write_plots(result: Evaluation, folder: Path) -> list[Path]:
    """roc.png (two classes) and confusion.png in ``folder``; needs matplotlib (the ``plot``
    extra: ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from threengan_cli.core import fileio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    which = f" ({result.which_model})" if result.which_model else ""
    title = f"{result.model_id}{which} on {Path(result.data.source).name}"
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
