"""The site study's tables across methods: docs/benchmarks.md, "Unlabelled X-rays from the site
itself". Reads the ``results.json`` of one or more ``site_study.py`` outputs (one per method)
and prints, as Markdown, each (method, variant)'s means and the paired differences between
them, paired by seed x pool half, with 95% t-intervals.

    python benchmarks/site_tables.py site-w32/3ngan site-w32/vanilla

Within a method it compares each pool variant with ``none`` and with ``pool``; across methods
the same variant of each (``3ngan - vanilla``); and per variant each way of scoring against
the final model at threshold 0.5 on the same runs. Pure arithmetic over the records: nothing
is trained or scored here, and nothing is chosen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from threengan_cli.bench import site
from threengan_cli.bench.report import mean_std

VIEWS = {  # the record key of each way of scoring, and its column title
    "final": "final model, 0.5",
    "final_val_threshold": "at the source-val threshold",
    "final_site_prior": "reweighted to the site's shares",
    "best_on_val": "best on val, 0.5",
    "final_adapted_bn": "BatchNorm of the held-out X-rays, 0.5",
}


def _cell(stat: dict[str, Any], scale: float, digits: int) -> str:
    """:func:`site.interval_text`, differences with a minus sign, not a hyphen."""
    text = site.interval_text(stat, scale, digits)
    return text.replace("-", "−") if stat.get("signed") else text


def tables(studies: dict[str, list[dict]]) -> str:
    """``studies``: method -> its records. The Markdown tables."""
    groups = {
        (method, variant): [r for r in records if r["variant"] == variant]
        for method, records in studies.items()
        for variant in dict.fromkeys(r["variant"] for r in records)
    }
    lines = [
        "| variant (final model) | runs | accuracy % at 0.5 | AUC | sensitivity | specificity "
        "| at the source-val threshold | reweighted to the site's shares "
        "| BatchNorm of the held-out X-rays | flagged |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (method, variant), rs in groups.items():

        def mean(view: str, metric: str, rs=rs) -> dict[str, Any]:
            return mean_std(site.by_run(rs, view, metric).values())

        lines.append(
            f"| {method} {variant} | {len(rs)} | {_cell(mean('final', 'accuracy'), 100, 2)} "
            f"| {_cell(mean('final', 'auc'), 1, 3).split(' [')[0]} "
            f"| {_cell(mean('final', 'sensitivity'), 1, 3).split(' [')[0]} "
            f"| {_cell(mean('final', 'specificity'), 1, 3).split(' [')[0]} "
            f"| {_cell(mean('final_val_threshold', 'accuracy'), 100, 2).split(' [')[0]} "
            f"| {_cell(mean('final_site_prior', 'accuracy'), 100, 2).split(' [')[0]} "
            f"| {_cell(mean('final_adapted_bn', 'accuracy'), 100, 2).split(' [')[0]} "
            f"| {_cell(mean('final', 'ood_flagged'), 100, 1).split(' [')[0]}% |"
        )
    pairs: list[tuple[str, tuple, tuple]] = []
    for method in studies:
        variants = [v for m, v in groups if m == method]
        for base in ("none", "pool"):
            for v in variants:
                if base in variants and v not in (base, "none"):
                    pairs.append((f"{method}: {v} − {base}", (method, v), (method, base)))
    methods = list(studies)
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            for v in [v for m, v in groups if m == a]:
                if (b, v) in groups:
                    pairs.append((f"{a} − {b}, {v}", (a, v), (b, v)))
    head = " | ".join(f"{title}: accuracy points" for title in VIEWS.values())
    lines += [
        "",
        f"| paired by seed x half | pairs | {head} | AUC (final model) |",
        "| --- | ---: |" + " ---: |" * (len(VIEWS) + 1),
    ]
    for title, left, right in pairs:
        cells = [
            site.paired(
                site.by_run(groups[left], view, "accuracy"),
                site.by_run(groups[right], view, "accuracy"),
            )
            for view in VIEWS
        ]
        auc = site.paired(
            site.by_run(groups[left], "final", "auc"), site.by_run(groups[right], "final", "auc")
        )
        lines.append(
            f"| {title} | {cells[0]['pairs']} | "
            + " | ".join(_cell(c, 100, 2) for c in cells)
            + f" | {_cell(auc, 1, 4)} |"
        )
    lines += [
        "",
        "| each way of scoring − the final model at 0.5, same runs | pairs | "
        + " | ".join(VIEWS[v] for v in list(VIEWS)[1:])
        + " |",
        "| --- | ---: |" + " ---: |" * (len(VIEWS) - 1),
    ]
    for (method, variant), rs in groups.items():
        final = site.by_run(rs, "final", "accuracy")
        cells = [site.paired(site.by_run(rs, view, "accuracy"), final) for view in list(VIEWS)[1:]]
        lines.append(
            f"| {method} {variant} | {cells[0]['pairs']} | "
            + " | ".join(_cell(c, 100, 2) for c in cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", type=Path, help="site_study.py --out folders")
    args = parser.parse_args(argv)
    studies = {}
    for folder in args.studies:
        records = json.loads((folder / "results.json").read_text())["records"]
        first = records[0]
        run = folder / "runs" / f"{first['variant']}-s{first['seed']}-pool{first['pool_half']}"
        method = json.loads((run / "settings.json").read_text())["method"]
        studies[method] = records
    print(tables(studies))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
