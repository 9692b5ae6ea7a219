"""accuracy_vs_size.png: the benchmark's accuracy against training size, beside the paper's."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(
    results: dict[str, Any], path: Path, paper: dict[str, dict[int, float]]
) -> tuple[Path | None, str | None]:
    """accuracy_vs_size.png: one line per method with a ±std band, the ``paper``'s dashed.
    Returns (path, None), or (None, why) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed (pip install 'threengan[plot]')"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in results["results"]))
    for i, method in enumerate(methods):
        rows = [r for r in results["results"] if r["method"] == method and r["accuracy"]["n"]]
        if not rows:
            continue
        color = f"C{i}"
        xs = [r["size"] for r in rows]
        ys = [100 * r["accuracy"]["mean"] for r in rows]
        sd = [100 * (r["accuracy"]["std"] or 0.0) for r in rows]
        ax.plot(xs, ys, "o-", color=color, label=f"{method} (ours, final epoch)")
        ax.fill_between(
            xs,
            [y - s for y, s in zip(ys, sd, strict=True)],
            [y + s for y, s in zip(ys, sd, strict=True)],
            color=color,
            alpha=0.2,
        )
        if method in paper:
            px = sorted(paper[method])
            ax.plot(
                px,
                [paper[method][x] for x in px],
                "--",
                color=color,
                alpha=0.6,
                label=f"{method} (paper)",
            )
    ax.set_xlabel("labelled training images N")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy against N (mean ± std over repeats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path, None
