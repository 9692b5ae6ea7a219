"""The site protocol (issue 24): does a pool of the site's own unlabelled X-rays help a model
trained on N labelled images of another hospital, scored on the site's held-out patients?

    python benchmarks/site_study.py --source kermany-source \\
        --site ../shared/data/kermany-chest-xray/test --out site-study \\
        [--size 200] [--width 64] [--epochs 100] [--seeds 11,12,13,14,15] \\
        [--variants none,pool,pool-bn] [--method 3ngan] [--recipe robust] [--device auto] \\
        [--parallel 1]

Labelled source: ``--size`` images of the prepared dataset ``--source``'s train split (its val
split chooses the best checkpoint). Prepare it WITHOUT the site's folder, or ``--unlabelled``
refuses a pool of its own test images: for Kermany, a folder with links to train/ and val/
only (``ln -s .../train src/train; ln -s .../val src/val; threengan prepare src --name
kermany-source``). Site: ``--site``, a folder of class folders, split into halves A and B by a
fixed hash of the patient id (threengan_cli/bench/site.py); for each seed, pool = A and
held-out = B, then the reverse, so every site image is scored once per seed. Another site:
``--site ../shared/data/external-dev/nih-cxr8-darkcovidnet --patient-pattern '^(\\d{8})_'``.

The variants (:data:`VARIANTS`; docs/method.md says what each option does): ``none`` (no
pool), ``pool`` (``--unlabelled`` the other half, as it is), ``pool-bn`` (``unlabelled_norm =
"labelled"``, the ssl study's val winner), ``pool-dbn`` (``precise_bn_images = "unlabelled"``:
the site's BatchNorm statistics) and ``pool-adamatch`` (AdaMatch's alignment, relative bar
and logit interpolation). ``--method vanilla --out OTHER`` gives the same without the game.

Each (variant, seed, half) is a ``threengan train`` run in ``OUT/runs/<variant>-s<seed>-pool<H>``
with its settings in ``OUT/configs/<run>.toml``, then ``threengan evaluate --json`` on the
held-out half: the final model (``last.safetensors``) and the best on val (``--run R --model
best``) at threshold 0.5, and the final model at the threshold ``evaluate --threshold-from val``
chooses on the source's val split (the pool moves the operating point; the site is not looked
at), and the final model with its probabilities reweighted to the site's class shares, estimated
by EM from its probabilities on the pool half's images, their labels unused (label shift: the
source is balanced, the site is not), and the final model with its BatchNorm statistics
recomputed on the held-out X-rays (``classify --adapt bn``, labels unused; transductive). A
run with its ``eval.json`` is skipped, so the script resumes where it stopped (a finished run
gains a way of scoring it lacks); a run stopped midway is resumed by ``train --resume``.
``OUT/report.md`` and ``OUT/results.json``: per variant the mean of each metric, the paired
differences with ``none`` and ``pool`` (paired by seed x half) with their 95% t-intervals, and
each way of scoring against the final model at 0.5 on the same runs.

Nothing is chosen on the held-out half: the variants are fixed here, before any run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from threengan_cli.bench import site
from threengan_cli.metrics import roc_auc

# The variants: train settings added to the run's (a TOML [train] section). "pool" is
# `--unlabelled` as it is; each other pool variant adds one named option to it.
VARIANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "pool": {},
    "pool-bn": {"unlabelled_norm": "labelled"},  # the ssl study's val winner
    "pool-dbn": {"precise_bn_images": "unlabelled"},  # BatchNorm statistics per domain
    "pool-adamatch": {  # Berthelot et al. 2021, with their tau (docs/method.md)
        "unlabelled_align": True,
        "unlabelled_threshold": "relative",
        "unlabelled_tau": 0.9,
        "unlabelled_interpolation": True,
    },
}
METRICS = ("accuracy", "auc", "sensitivity", "specificity", "ood_flagged")


def _toml(values: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    return "[train]\n" + "".join(f"{k} = {value(v)}\n" for k, v in values.items())


def _run(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True)


def _evaluate(cli: list[str], held_out: Path, model: list[str], log: Path) -> dict[str, Any]:
    done = _run([*cli, "evaluate", str(held_out), *model, "--json", "-q"], log)
    if done.returncode != 0:
        raise SystemExit(f"evaluate failed ({done.returncode}); see {log}")
    return json.loads(done.stdout)


def _pick(result: dict[str, Any]) -> dict[str, Any]:
    """The metrics of an ``evaluate --json`` result the table reports."""
    return {k: result.get(k) for k in METRICS}


def _best(run_dir: Path) -> list[str]:
    """The best-on-val checkpoint of a run: ``--run`` alone loads its final model."""
    return ["--run", str(run_dir), "--model", "best"]


def _at_val_threshold(cli, args, run_dir: Path, held_out: Path, log: Path) -> dict[str, Any]:
    """The final model scored on ``held_out`` at the threshold ``evaluate --threshold-from
    val`` chooses on the source's val split (its default rule), as a user would: on a copy
    of the checkpoint, which stores it, deleted after."""
    copy = run_dir / "val-threshold.safetensors"
    shutil.copyfile(run_dir / "last.safetensors", copy)
    try:
        model = ["--checkpoint", str(copy)]
        chosen = _evaluate(
            cli, Path(args.source), [*model, "--split", "val", "--threshold-from", "val"], log
        )
        scored = _evaluate(cli, held_out, model, log)
    finally:
        copy.unlink(missing_ok=True)
    assert scored["threshold_source"] == "model", scored["threshold_source"]
    return {**_pick(scored), "threshold": chosen["threshold"]}


def _classified(
    cli, folder: Path, model: Path, log: Path, adapt: tuple[str, ...] = ()
) -> tuple[list[str], list[dict]]:
    """``classify --format csv`` of ``folder`` (with ``adapt``, e.g. ``("--adapt", "bn")``):
    the class names and its readable rows."""
    done = _run([*cli, "classify", str(folder), "--recursive", "--checkpoint", str(model),
                 "--format", "csv", "-q", *adapt], log)  # fmt: skip
    if done.returncode not in (0, 3):  # 3: some files unreadable, the rest classified
        raise SystemExit(f"classify failed ({done.returncode}); see {log}")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    classes = [c.removeprefix("p_") for c in rows[0] if c.startswith("p_")] if rows else []
    return classes, [r for r in rows if not r["error"]]


def _probs(classes: list[str], rows: list[dict]) -> np.ndarray:
    return np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])


def _scored(classes: list[str], rows: list[dict], p: np.ndarray) -> dict[str, Any]:
    """The table's metrics of probabilities ``p`` of classified ``rows`` (the held-out half's
    folders are named by class; the labels only score), at the most probable class."""
    truth = np.array([classes.index(Path(r["path"]).parent.name) for r in rows])
    guess, positive = p.argmax(axis=1), len(classes) - 1  # PNEUMONIA: the last class
    return {
        "accuracy": float(np.mean(guess == truth)),
        "auc": roc_auc(truth == positive, p[:, positive]),
        "sensitivity": float(np.mean(guess[truth == positive] == positive)),
        "specificity": float(np.mean(guess[truth != positive] != positive)),
        "ood_flagged": float(np.mean([r["ood"] == "true" for r in rows])),
    }


def _at_site_prior(cli, run_dir: Path, pool: Path, held_out: Path, log: Path) -> dict[str, Any]:
    """The final model on ``held_out`` with its probabilities reweighted to the site's class
    shares, estimated by EM (:func:`site.site_prior`) from its probabilities on the pool's
    images, unlabelled (a run without a pool has the same folder beside it at deployment);
    the labelled source is balanced (``--size`` draws N / K per class). The held-out labels
    only score."""
    model = run_dir / "last.safetensors"
    classes, pool_rows = _classified(cli, pool, model, log)
    _, rows = _classified(cli, held_out, model, log)
    source = np.full(len(classes), 1.0 / len(classes))
    prior = site.site_prior(_probs(classes, pool_rows), source)
    p = site.reweighted(_probs(classes, rows), source, prior)
    return {**_scored(classes, rows, p), "site_prior": [round(float(x), 4) for x in prior]}


def _adapted_bn(cli, run_dir: Path, held_out: Path, log: Path) -> dict[str, Any]:
    """The final model on ``held_out`` with its BatchNorm statistics recomputed on those
    X-rays (``classify --adapt bn``: their labels unused; transductive, as a user who
    classifies a site's folder can do), at 0.5."""
    model = run_dir / "last.safetensors"
    classes, rows = _classified(cli, held_out, model, log, ("--adapt", "bn"))
    return _scored(classes, rows, _probs(classes, rows))


def one_run(args, variant: str, seed: int, half: str, split: site.Split, cli) -> dict[str, Any]:
    name = f"{variant}-s{seed}-pool{half}"
    run_dir = args.out / "runs" / name
    done_file = run_dir / "eval.json"
    work = args.out / "site"
    held_out = work / f"heldout-{site.other(half)}"
    if done_file.is_file():
        record = json.loads(done_file.read_text())
        log = args.out / "logs" / f"{name}.log"
        before = dict(record)
        if "final_val_threshold" not in record:  # scored before this view existed
            record["final_val_threshold"] = _at_val_threshold(cli, args, run_dir, held_out, log)
        if "final_site_prior" not in record:
            pool = work / f"pool-{half}"
            record["final_site_prior"] = _at_site_prior(cli, run_dir, pool, held_out, log)
        if "final_adapted_bn" not in record:
            record["final_adapted_bn"] = _adapted_bn(cli, run_dir, held_out, log)
        if record.get("best_model") != "best":  # scored by --run alone: the final model
            record["best_on_val"] = _pick(_evaluate(cli, held_out, _best(run_dir), log))
            record["best_model"] = "best"
        if record != before:  # a finished, fully scored run's file is left as it is
            done_file.write_text(json.dumps(record, indent=2) + "\n")
        return record
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    pool = work / f"pool-{half}"
    extra = VARIANTS[variant]
    config = args.out / "configs" / f"{name}.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(_toml(extra or {}))
    log = args.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if (run_dir / "summary.json").is_file():
        pass  # trained; only the evaluation is missing
    elif (run_dir / "last.safetensors").is_file():
        trained = _run([*cli, "train", "--resume", str(run_dir), "-q"], log)
        if trained.returncode != 0:
            raise SystemExit(f"train --resume {name} failed; see {log}")
    else:
        cmd = [
            *cli, "train", args.source, "--method", args.method, "--recipe", args.recipe,
            "--size", str(args.size), "--epochs", str(args.epochs), "--width", str(args.width),
            "--seed", str(seed), "--device", args.device, "--config", str(config),
            "--out", str(run_dir), "--force", "-q",
        ]  # fmt: skip
        if extra is not None:
            cmd += ["--unlabelled", str(pool)]
        trained = _run(cmd, log)
        if trained.returncode != 0:
            raise SystemExit(f"train {name} failed ({trained.returncode}); see {log}")
    seconds = time.time() - t0
    final = _evaluate(cli, held_out, ["--checkpoint", str(run_dir / "last.safetensors")], log)
    best = _evaluate(cli, held_out, _best(run_dir), log)
    record = {
        "variant": variant,
        "seed": seed,
        "pool_half": half,
        "pool_images": len(split.pool) if extra is not None else 0,
        "held_out_images": len(split.held_out),
        "train_seconds": round(seconds, 1),
        "final": _pick(final),
        "best_on_val": _pick(best),
        "best_model": "best",
        "final_val_threshold": _at_val_threshold(cli, args, run_dir, held_out, log),
        "final_site_prior": _at_site_prior(cli, run_dir, pool, held_out, log),
        "final_adapted_bn": _adapted_bn(cli, run_dir, held_out, log),
    }
    done_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


_fmt = site.interval_text  # the tables' cells: mean [low, high]


def report(summary: dict[str, Any], args, records, split_sizes) -> str:
    lines = [
        "# Site study",
        "",
        f"source `{args.source}`, N = {args.size}, {args.method}, recipe {args.recipe}, "
        f"width {args.width}, {args.epochs} epochs, seeds {args.seeds}; site `{args.site}` "
        f"split by patient: {split_sizes}. {len(records)} runs.",
        "",
    ]
    titles = {
        "final": "final model",
        "best_on_val": "best on val",
        "final_val_threshold": "final model, threshold chosen on the source's val split",
        "final_site_prior": "final model, reweighted to the class shares EM estimates on the pool",
        "final_adapted_bn": "final model, BatchNorm of the held-out X-rays (transductive)",
    }
    for model, title in titles.items():
        lines += [
            f"## {title}",
            "",
            "| variant | runs | accuracy % | AUC | sensitivity | specificity | flagged |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for v, stats in summary["means"][model].items():
            n = stats["accuracy"]["n"]
            if not n:
                continue
            lines.append(
                f"| {v} | {n} | {_fmt(stats['accuracy'], 100, 2)} | {_fmt(stats['auc'], 1, 4)} "
                f"| {_fmt(stats['sensitivity'], 1, 3)} | {_fmt(stats['specificity'], 1, 3)} "
                f"| {_fmt(stats['ood_flagged'], 100, 1)} |"
            )
        lines += [
            "",
            "| paired by seed x half | pairs | accuracy points [95% CI] | AUC [95% CI] |",
            "| --- | ---: | ---: | ---: |",
        ]
        for pair, d in summary["paired"].get(model, {}).items():
            if d["accuracy"]["pairs"]:
                lines.append(
                    f"| {pair} | {d['accuracy']['pairs']} | {_fmt(d['accuracy'], 100, 2)} "
                    f"| {_fmt(d['auc'], 1, 4)} |"
                )
        views = summary.get("views", {}).get(model, {})
        if any(d["pairs"] for d in views.values()):
            head = (
                "| against the final model at 0.5, same runs | pairs | accuracy points [95% CI] |"
            )
            lines += ["", head, "| --- | ---: | ---: |"]
            for v, d in views.items():
                if d["pairs"]:
                    lines.append(f"| {v} | {d['pairs']} | {_fmt(d, 100, 2)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="kermany-source", help="prepared labelled dataset")
    parser.add_argument("--site", default="../shared/data/kermany-chest-xray/test")
    parser.add_argument(
        "--patient-pattern",
        help="regex whose first group is the patient id (default: Kermany's names); NIH: "
        r"'^(\d{8})_'",
    )
    parser.add_argument("--out", type=Path, default=Path("site-study"))
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", default="11,12,13,14,15")
    parser.add_argument("--halves", default="A,B", help="the pool halves to run")
    parser.add_argument("--variants", default="none,pool,pool-bn")
    parser.add_argument("--method", default="3ngan")
    parser.add_argument("--recipe", default="robust")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (a GPU: 4-10)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="tabulate what has finished (scoring a finished run's missing views; no training)",
    )
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    halves = args.halves.split(",")
    cli = [sys.executable, "-m", "threengan_cli"]
    args.out.mkdir(parents=True, exist_ok=True)

    files = site.site_files(args.site, args.patient_pattern)
    splits = {h: site.split(files, h) for h in site.HALVES}
    split_sizes = ", ".join(
        f"pool {h} {len(s.pool)} images (+{len(s.dropped)} byte copies of held-out ones left "
        f"out), held-out {site.other(h)} {len(s.held_out)}"
        for h, s in splits.items()
    )
    for h, s in splits.items():
        site.link_folder(s.pool, args.out / "site" / f"pool-{h}", by_class=False)
        site.link_folder(s.held_out, args.out / "site" / f"heldout-{site.other(h)}", by_class=True)
    (args.out / "site" / "split.json").write_text(
        json.dumps(
            {
                h: {
                    "pool": [f.path for f in s.pool],
                    "dropped": [f.path for f in s.dropped],
                    "held_out": [f.path for f in s.held_out],
                }
                for h, s in splits.items()
            },
            indent=1,
        )
    )
    jobs = [(seed, half, v) for seed in seeds for half in halves for v in variants]
    records: list[dict[str, Any]] = []
    if args.report_only:
        for seed, half, variant in jobs:
            done = args.out / "runs" / f"{variant}-s{seed}-pool{half}" / "eval.json"
            if done.is_file():  # scored already; one_run adds a view it lacks, trains nothing
                records.append(one_run(args, variant, seed, half, splits[half], cli))
        _write(args, records, variants, split_sizes)
        return 0
    lock = threading.Lock()

    def job(seed: int, half: str, variant: str) -> None:
        record = one_run(args, variant, seed, half, splits[half], cli)
        with lock:
            records.append(record)
            print(
                f"{variant} seed {seed} pool {half}: final accuracy "
                f"{record['final']['accuracy']:.4f} ({record['train_seconds']:.0f} s)",
                flush=True,
            )
            _write(args, records, variants, split_sizes)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in [pool.submit(job, *j) for j in jobs]:
            future.result()  # a failed run stops the study with its message
    _write(args, records, variants, split_sizes)
    return 0


def _write(args, records, variants, split_sizes) -> None:
    summary = site.summarise(records, variants, METRICS)
    tmp = args.out / "results.json.tmp"
    tmp.write_text(json.dumps({"records": records, "summary": summary}, indent=1) + "\n")
    os.replace(tmp, args.out / "results.json")
    (args.out / "report.md").write_text(report(summary, args, records, split_sizes) + "\n")


if __name__ == "__main__":
    sys.exit(main())
