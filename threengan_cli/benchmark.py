"""The benchmark: methods x training sizes x repeats, each run through ``training.train``.

Every run of the grid is an ordinary training run (the same engine as ``threengan train``)
in its own folder ``<out>/runs/<method>-n<size>-r<repeat>/``; repeat r uses seed
``seed + r``, so the labelled subset and the initialisation differ between repeats and are
shared between methods (paired comparisons). Runs are trained with ``test_every_epoch``:
each epoch's test metrics go to ``metrics.jsonl`` under ``test_optimistic`` and feed only
the clearly labelled "best epoch on test" column. The headline numbers are those of the
final-epoch model (``summary.json``'s ``test``): nothing is chosen on test.

Robust by construction: a run folder with ``summary.json`` is finished and skipped; one with
``last.safetensors`` is resumed; one with neither starts afresh. A folder written with other
settings than asked is refused rather than mixed in. ``shard=(i, n)`` trains the runs whose
index in the fixed grid order is ``i - 1`` modulo ``n``; :func:`merge` joins shard folders
and reports them with the same code as an unsharded benchmark.

The engine prints nothing: it reports through events passed to ``on_event``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from threengan_cli import fileio, runs, system
from threengan_cli import settings as settings_mod
from threengan_cli.settings import Precision, TrainSettings

RESULTS_FORMAT_VERSION = 1
METRICS = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "f1")

# The paper's Table 1 (accuracy %, 624-image test set), DESIGN section 1.
PAPER_TABLE1: dict[str, dict[int, float]] = {
    "vanilla": {200: 85.04, 500: 87.82, 750: 89.17, 1000: 90.80, 2000: 91.67},
    "sgan": {200: 89.06, 500: 92.12, 750: 91.85, 1000: 94.12, 2000: 94.85},
    "ecgan": {200: 90.30, 500: 92.44, 750: 93.10, 1000: 94.95, 2000: 95.35},
    "3ngan": {200: 91.52, 500: 93.49, 750: 94.16, 1000: 94.88, 2000: 96.03},
}

# Benchmark method name -> (training method, TrainSettings overrides). The ablations are
# 3N-GAN with one ingredient removed or swapped; adding a variant touches only this table.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vanilla": ("vanilla", {}),
    "sgan": ("sgan", {}),
    "ecgan": ("ecgan", {}),
    "3ngan": ("3ngan", {}),
    "3ngan-nokl": ("3ngan", {"kl": "none"}),
    "3ngan-nogc": ("3ngan", {"use_generator_classifier_loss": False}),
    "3ngan-pairkl": ("3ngan", {"kl": "per-pair"}),
}
ABLATIONS = ("3ngan-nokl", "3ngan-nogc", "3ngan-pairkl")

# Measured ms per step at batch 10, width 64, 64 px on the project's 2-core CPU
# (benchmarks/bench_step.py, 2026-11-25; later runs in docs/benchmarks.md keep these ratios
# within 10%). Only their ratios are used: to weigh runs for the ETA.
STEP_MS = {"vanilla": 74.9, "sgan": 285.2, "ecgan": 387.2, "3ngan": 476.3}
# The classifier's forward pass per image in the same units (benchmarks/bench_classify.py:
# 577 img/s on the same 2 cores, 1.7 ms).
EVAL_MS_PER_IMAGE = 1.7

Profile = Literal["smoke", "quick", "paper"]

PROFILES: dict[str, dict[str, Any]] = {
    # Seconds on a tiny dataset; what the tests run. Not a measurement of anything.
    "smoke": {
        "methods": ("vanilla", "3ngan"),
        "sizes": (8, 16),
        "repeats": 1,
        "epochs": 1,
        "batch_size": 4,
        "width": 4,
        "latent": 8,
    },
    # A reduced grid that fits 30 minutes on the project's 2-core CPU (Kermany, 64 px).
    # Reduced against the paper: width 64 -> 32, sizes 5 -> 2 (200, 1000), repeats 5 -> 2,
    # epochs 100 -> 8. Kept: all four methods, batch 10, latent 100, the full val/test splits.
    # Measured here (a 10-epoch trial): one repeat of the 8 (method, size) runs took
    # 830 s of which 3ngan n1000 ~250 s; small convolutions at width 32 run at ~50 GFLOP/s
    # (3ngan 9.74 GFLOP/step, ~200 ms). 8 epochs x 2 repeats, measured: 18 min 8 s
    # (docs/benchmarks.md).
    "quick": {
        "methods": ("vanilla", "sgan", "ecgan", "3ngan"),
        "sizes": (200, 1000),
        "repeats": 2,
        "epochs": 8,
        "batch_size": 10,
        "width": 32,
        "latent": 100,
    },
    # The paper's protocol (DESIGN section 5). 445 steps per epoch and repeat over the five
    # sizes x 100 epochs x 5 repeats x 1.22 s (one step of each method, width 64) = 76 h of
    # training, plus ~8 h of per-epoch evaluation: about 3.5 days on 2 CPU cores. Use a GPU,
    # or --shard it across machines.
    "paper": {
        "methods": ("vanilla", "sgan", "ecgan", "3ngan"),
        "sizes": (200, 500, 750, 1000, 2000),
        "repeats": 5,
        "epochs": 100,
        "batch_size": 10,
        "width": 64,
        "latent": 100,
    },
}

# A run of the grid writes its checkpoints at most this often (and at its end): a killed
# benchmark loses at most the run in progress, and on a GPU, where an epoch of 200 images
# takes milliseconds, the grid is not spent writing optimizer state.
CHECKPOINT_EVERY_S = 60.0

_RUN_NAME = re.compile(r"^(?P<method>[a-z0-9-]+)-n(?P<size>\d+)-r(?P<repeat>\d+)$")
# Fields that may differ between a run folder and the command that resumes it: the same
# run continued on another device, or with(out) CUDA graphs, is the same experiment.
_IGNORED_FIELDS = frozenset({"device", "cuda_graphs"})


class BenchmarkError(Exception):
    """A benchmark that cannot start or be merged; the message is one line for the user."""


# ------------------------------------------------------------------------------ settings
class BenchmarkSettings(BaseModel):
    """The grid and the per-run training settings shared by every run of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: Profile = "quick"
    methods: tuple[str, ...]
    sizes: tuple[int, ...]
    repeats: int = Field(ge=1, le=1000)
    epochs: int = Field(ge=1, le=100_000)
    batch_size: int = Field(ge=1, le=4096)
    width: int = Field(ge=1, le=1024)
    latent: int = Field(ge=1, le=4096)
    seed: int = Field(0, ge=0)
    device: str = "auto"
    precision: Precision = "fp32"
    ablate: bool = False

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one method")
        unknown = [m for m in value if m not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r} (known: {', '.join(VARIANTS)})")
        if len(set(value)) != len(value):
            raise ValueError("lists a method twice")
        return value

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("needs at least one size")
        if any(s < 2 for s in value):
            raise ValueError("every size must be at least 2 (one image per class)")
        if len(set(value)) != len(value):
            raise ValueError("lists a size twice")
        return value


def resolve_settings(profile: str = "quick", **flags: Any) -> BenchmarkSettings:
    """The profile's values, overridden by the flags that are not None; ``ablate`` appends
    the 3N-GAN ablations to the methods. Raises SettingsError with a one-line message."""
    if profile not in PROFILES:
        raise settings_mod.SettingsError(
            f"benchmark.profile: must be one of {', '.join(PROFILES)} (got {profile!r})"
        )
    values: dict[str, Any] = {**PROFILES[profile], "profile": profile}
    values.update({k: v for k, v in flags.items() if v is not None})
    if values.get("ablate"):
        values["methods"] = tuple(values["methods"]) + tuple(
            m for m in ABLATIONS if m not in values["methods"]
        )
    try:
        cfg = BenchmarkSettings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "benchmark"
        msg = err["msg"].removeprefix("Value error, ")
        raise settings_mod.SettingsError(f"benchmark.{name}: {msg}") from None
    grid(cfg)  # the per-run TrainSettings validate device, precision and ranges
    return cfg


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 1 <= I <= N; anything else is a ValueError."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--shard must look like I/N, e.g. 2/8 (got {text!r})")
    i, n = int(match[1]), int(match[2])
    if not 1 <= i <= n:
        raise ValueError(f"--shard I/N needs 1 <= I <= N (got {text!r})")
    return i, n


# ---------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class RunSpec:
    index: int  # position in the fixed grid order (shards slice by it)
    name: str
    method: str  # benchmark method name (a VARIANTS key)
    size: int
    repeat: int
    settings: TrainSettings

    def work(self, eval_images: int = 0) -> float:
        """Relative cost, for the ETA: per epoch, steps x the method's measured step time,
        plus the classifier over the ``eval_images`` evaluated after each epoch (val and
        test): at width 32 and N = 200 that evaluation costs more than the training."""
        steps = math.ceil(self.size / self.settings.batch_size)
        per_epoch = steps * STEP_MS[self.settings.method] + eval_images * EVAL_MS_PER_IMAGE
        return per_epoch * self.settings.epochs


def run_name(method: str, size: int, repeat: int) -> str:
    return f"{method}-n{size}-r{repeat}"


def grid(cfg: BenchmarkSettings) -> list[RunSpec]:
    """Every run, in a fixed order: repeat, then size, then method. Repeat-major, so a
    partial benchmark has one repeat of every cell before the second of any."""
    specs = []
    for repeat in range(cfg.repeats):
        for size in cfg.sizes:
            for method in cfg.methods:
                base, overrides = VARIANTS[method]
                settings = settings_mod.resolve(
                    "train",
                    None,
                    method=base,
                    size=size,
                    epochs=cfg.epochs,
                    batch_size=cfg.batch_size,
                    width=cfg.width,
                    latent=cfg.latent,
                    seed=cfg.seed + repeat,
                    device=cfg.device,
                    precision=cfg.precision,
                    **overrides,
                )
                name = run_name(method, size, repeat)
                specs.append(RunSpec(len(specs), name, method, size, repeat, settings))
    return specs


def shard_of(specs: list[RunSpec], shard: tuple[int, int]) -> list[RunSpec]:
    i, n = shard
    return [s for s in specs if s.index % n == i - 1]


# -------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class GridPlanned:
    out: Path
    total: int  # runs in the whole grid
    slice_runs: int  # runs in this shard
    todo: tuple[str, ...]  # to train (new or resumed)
    finished: tuple[str, ...]  # skipped: already finished (or failed)
    shard: tuple[int, int]


@dataclass(frozen=True)
class RunBegins:
    spec: RunSpec
    position: int  # 1-based among the runs to train now
    count: int
    resumed: bool


@dataclass(frozen=True)
class RunProgress:
    """A training event of the current run, with the grid's progress and ETA."""

    spec: RunSpec
    position: int
    count: int
    event: Any  # a training event: RunStarted, StepDone, EpochDone, RunFinished
    fraction: float  # of this session's training work, 0..1
    eta_s: float | None  # from the speed measured in this session


@dataclass(frozen=True)
class RunEnds:
    spec: RunSpec
    position: int
    count: int
    record: dict[str, Any]
    eta_s: float | None


BenchEvent = GridPlanned | RunBegins | RunProgress | RunEnds


class _Clock:
    """Grid progress in work units (steps x relative step time); ETA from measured speed.

    Keeps one entry per run in progress, so runs trained in parallel threads each count."""

    def __init__(self, specs: list[RunSpec], eval_images: int = 0):
        self.eval_images = eval_images
        self.total = sum(s.work(eval_images) for s in specs) or 1.0
        self.done = 0.0
        self.t0 = time.perf_counter()
        self.work: dict[str, float] = {}  # per run in progress: its whole work
        self.current: dict[str, float] = {}  # ... and the part done this session
        self.baseline: dict[str, float] = {}  # ... and the fraction done before this session

    def start_run(self, spec: RunSpec) -> None:
        self.work[spec.name] = spec.work(self.eval_images)
        self.current[spec.name] = 0.0

    def step(self, spec: RunSpec, event) -> None:
        run_fraction = (event.epoch * event.steps + event.step) / (
            spec.settings.epochs * event.steps
        )
        work = self.work[spec.name]
        if spec.name not in self.baseline:  # resumed: work done before is not this session's
            self.baseline[spec.name] = run_fraction - 1 / (spec.settings.epochs * event.steps)
            self.total -= self.baseline[spec.name] * work
        self.current[spec.name] = (run_fraction - self.baseline[spec.name]) * work

    def end_run(self, spec: RunSpec) -> None:
        work = self.work.pop(spec.name)
        done = self.current.pop(spec.name)
        if self.baseline.pop(spec.name, None) is None:
            self.total -= work  # nothing trained (e.g. a failure before the first step)
        else:
            self.done += done

    @property
    def fraction(self) -> float:
        done = self.done + sum(self.current.values())
        return min(1.0, done / max(self.total, 1e-9))

    @property
    def eta_s(self) -> float | None:
        done = self.done + sum(self.current.values())
        if done <= 0:
            return None
        elapsed = time.perf_counter() - self.t0
        return max(0.0, elapsed / done * (self.total - done))


# ---------------------------------------------------------------------------- run folders
def _read_json(path: Path) -> Any:
    try:
        return runs.read_json(path)
    except runs.RunError as exc:  # names the file and the line
        raise BenchmarkError(str(exc)) from None


def _same_dataset(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_run_folder(run_dir: Path, spec: RunSpec, dataset: Path) -> str:
    """State of a run folder: ``new``, ``fresh`` (no checkpoint yet), ``resume``,
    ``finished`` or ``failed``.

    A folder written with other settings, or on another dataset, is a BenchmarkError.
    """
    if not run_dir.exists():
        return "new"
    saved_path = run_dir / "settings.json"
    if saved_path.is_file():
        saved = _read_json(saved_path)
        asked = spec.settings.model_dump(mode="json")
        diff = sorted(
            k
            for k in set(saved) | set(asked)
            if k not in _IGNORED_FIELDS and saved.get(k) != asked.get(k)
        )
        if diff:
            k = diff[0]
            raise BenchmarkError(
                f"{run_dir} was written with other settings ({k} = {saved.get(k)!r} there, "
                f"{asked.get(k)!r} asked{', and more' if len(diff) > 1 else ''}); "
                "use another --out, or delete that folder to train it again"
            )
        meta_path = run_dir / "run.json"
        if meta_path.is_file():
            there = _read_json(meta_path).get("dataset")
            if there and not _same_dataset(there, dataset):
                raise BenchmarkError(
                    f"{run_dir} was trained on {there}, not {dataset}; use another --out"
                )
    if (run_dir / "summary.json").is_file():
        return "finished"
    if (run_dir / "failed.json").is_file():
        return "failed"
    last = run_dir / "last.safetensors"
    if saved_path.is_file() and last.is_file():
        # Also a run stopped after its last epoch but before summary.json: resuming it only
        # runs the final evaluation.
        return "resume"
    return "fresh"


def _check_sizes(dataset_path: Path, specs: list[RunSpec]) -> int:
    """Every size must fit the train split, half per class; say which does not, up front.

    Returns how many images each run evaluates after every epoch (val and test)."""
    import numpy as np

    from threengan_cli.datasets import load_prepared

    data = load_prepared(dataset_path)
    _, labels = data.subset("train")
    counts = np.bincount(labels, minlength=len(data.classes))
    k = len(data.classes)
    for size in sorted({s.size for s in specs}):
        if size // k > counts.min():
            short = data.classes[int(counts.argmin())]
            raise BenchmarkError(
                f"size {size} needs {size // k} train images per class, but {short!r} has "
                f"{int(counts.min())} in {dataset_path}: choose smaller --sizes"
            )
    return sum(len(data.subset(split)[1]) for split in ("val", "test"))


def read_run(run_dir: Path) -> dict[str, Any]:
    """One run folder as a record: its final-epoch test metrics, every epoch's test metrics,
    the best epoch on test (optimistic), timings, settings and library versions."""
    match = _RUN_NAME.match(run_dir.name)
    if not match:
        raise BenchmarkError(f"{run_dir} is not a benchmark run folder (<method>-n<N>-r<R>)")
    record: dict[str, Any] = {
        "name": run_dir.name,
        "method": match["method"],
        "size": int(match["size"]),
        "repeat": int(match["repeat"]),
        "folder": str(run_dir),
    }
    settings = (
        _read_json(run_dir / "settings.json") if (run_dir / "settings.json").is_file() else {}
    )
    run_meta = _read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    record.update(seed=settings.get("seed"), settings=settings)
    record["versions"] = run_meta.get("versions")
    record["dataset"] = run_meta.get("dataset")
    if (run_dir / "failed.json").is_file() and not (run_dir / "summary.json").is_file():
        record.update(status="failed", error=_read_json(run_dir / "failed.json").get("error"))
        return record
    summary = _read_json(run_dir / "summary.json")
    if not isinstance(summary, dict) or not isinstance(summary.get("test"), dict):
        raise BenchmarkError(f"{run_dir / 'summary.json'} holds no test metrics")
    epochs = []
    metrics_path = run_dir / "metrics.jsonl"
    try:
        records = runs.read_metrics(metrics_path)
    except runs.RunError as exc:
        raise BenchmarkError(str(exc)) from None
    for rec in records:
        epochs.append(
            {
                "epoch": rec["epoch"],
                "test_optimistic": rec.get("test_optimistic"),
                "val_accuracy": (rec.get("val") or {}).get("accuracy"),
                "seconds": rec.get("seconds"),
                "images_per_s": rec.get("images_per_s"),
            }
        )
    best = None
    for e in epochs:
        acc = (e["test_optimistic"] or {}).get("accuracy")
        if acc is not None and (best is None or acc > best["accuracy"]):
            best = {"epoch": e["epoch"], "accuracy": acc}
    train_seconds = sum(e["seconds"] or 0.0 for e in epochs)
    images = summary.get("train_images", 0) * len(epochs)
    record.update(
        status="finished",
        test=summary["test"],
        best_epoch_on_test=best,
        best_epoch_on_val=summary.get("best_epoch_on_val"),
        elapsed_s=summary.get("elapsed_s"),
        train_images=summary.get("train_images"),
        images_per_s=round(images / train_seconds, 2) if train_seconds > 0 else None,
        epochs=epochs,
    )
    return record


# --------------------------------------------------------------------------- aggregation
def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1) of the values that are not None; the std
    of a single value is None (one repeat says nothing about spread)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"mean": mean, "std": std, "n": len(xs)}


def aggregate(runs: list[dict[str, Any]], methods: Iterable[str], sizes: Iterable[int]) -> list:
    """One row per (method, size), in the given order: mean and std over the finished
    repeats of each final-epoch test metric, of the optimistic best-epoch-on-test accuracy,
    of wall time and img/s; the paper's Table 1 value and our difference in points."""
    rows = []
    for method in methods:
        for size in sizes:
            cell = [r for r in runs if r["method"] == method and r["size"] == size]
            done = [r for r in cell if r.get("status") == "finished"]
            row: dict[str, Any] = {
                "method": method,
                "size": size,
                "runs": len(done),
                "failed": sum(r.get("status") == "failed" for r in cell),
            }
            for m in METRICS:
                row[m] = mean_std(r["test"].get(m) for r in done)
            row["optimistic_best_epoch_accuracy"] = mean_std(
                (r.get("best_epoch_on_test") or {}).get("accuracy") for r in done
            )
            row["wall_s"] = mean_std(r.get("elapsed_s") for r in done)
            row["images_per_s"] = mean_std(r.get("images_per_s") for r in done)
            paper = PAPER_TABLE1.get(method, {}).get(size)
            row["paper_accuracy"] = paper / 100 if paper is not None else None
            ours = row["accuracy"]["mean"]
            row["accuracy_diff_points"] = (
                round(100 * ours - paper, 2) if paper is not None and ours is not None else None
            )
            opt = row["optimistic_best_epoch_accuracy"]["mean"]
            row["optimistic_diff_points"] = (
                round(100 * opt - paper, 2) if paper is not None and opt is not None else None
            )
            rows.append(row)
    return rows


def reductions(cfg: BenchmarkSettings) -> list[str]:
    """What this grid leaves out of, or changes from, the paper's protocol."""
    paper = PROFILES["paper"]
    notes = []
    missing = [m for m in paper["methods"] if m not in cfg.methods]
    if missing:
        notes.append(f"methods without {', '.join(missing)}")
    if tuple(cfg.sizes) != paper["sizes"]:
        notes.append(
            f"sizes {', '.join(map(str, cfg.sizes))} instead of "
            f"{', '.join(map(str, paper['sizes']))}"
        )
    for key, label in (
        ("repeats", "repeats"),
        ("epochs", "epochs"),
        ("batch_size", "batch size"),
        ("width", "width (ngf = ndf)"),
        ("latent", "latent size"),
    ):
        if getattr(cfg, key) != paper[key]:
            notes.append(f"{label} {getattr(cfg, key)} instead of {paper[key]}")
    return notes


# ------------------------------------------------------------------------------- outputs
CSV_COLUMNS = (
    ["method", "size", "runs", "failed"]
    + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    + [
        "optimistic_best_epoch_accuracy_mean",
        "optimistic_best_epoch_accuracy_std",
        "paper_accuracy",
        "accuracy_diff_points",
        "optimistic_diff_points",
        "wall_s_mean",
        "images_per_s_mean",
    ]
)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        flat: dict[str, Any] = {k: row[k] for k in ("method", "size", "runs", "failed")}
        for m in (*METRICS, "optimistic_best_epoch_accuracy"):
            flat[f"{m}_mean"], flat[f"{m}_std"] = row[m]["mean"], row[m]["std"]
        flat["wall_s_mean"] = row["wall_s"]["mean"]
        flat["images_per_s_mean"] = row["images_per_s"]["mean"]
        for k in ("paper_accuracy", "accuracy_diff_points", "optimistic_diff_points"):
            flat[k] = row[k]
        writer.writerow(["" if flat[c] is None else flat[c] for c in CSV_COLUMNS])
    return buf.getvalue()


def percent(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "–"
    std = f" ± {100 * stat['std']:.2f}" if stat["std"] is not None else ""
    return f"{100 * stat['mean']:.2f}{std}"


def points(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def plain(stat: dict[str, Any], digits: int = 1) -> str:
    return "–" if stat["mean"] is None else f"{stat['mean']:.{digits}f}"


def report_markdown(results: dict[str, Any]) -> str:
    """The Markdown report: our accuracy beside the paper's Table 1, then every metric."""
    cfg = results["settings"]
    rows = results["results"]
    reduced = results["reduced"]
    last_seed = cfg["seed"] + cfg["repeats"] - 1
    seeds = (
        f"1 repeat (seed {cfg['seed']})"
        if cfg["repeats"] == 1
        else f"{cfg['repeats']} repeats (seeds {cfg['seed']}..{last_seed})"
    )
    lines = [
        f"# threengan benchmark: {Path(results['dataset']).name}",
        "",
        f"Profile **{cfg['profile']}**: methods {', '.join(cfg['methods'])}; sizes "
        f"{', '.join(map(str, cfg['sizes']))}; {seeds}; {cfg['epochs']} epochs; "
        f"batch {cfg['batch_size']}; width {cfg['width']}; latent {cfg['latent']}; "
        f"precision {cfg['precision']}.",
        "",
        "Reduced from the paper's protocol: "
        + ("; ".join(reduced) + "." if reduced else "nothing (the full protocol)."),
        "",
        f"Runs: {results['counts']['finished']} finished, {results['counts']['failed']} failed "
        f"(non-finite loss), {results['counts']['missing']} missing, of "
        f"{results['counts']['grid']} in the grid."
        + (
            f" Shard {results['shard']}: this report covers its slice only."
            if results.get("shard")
            else ""
        ),
        "",
        "Numbers are of the **final-epoch model** on the test split at threshold 0.5, mean ± "
        "sample std (n - 1) over repeats. Nothing (checkpoint, epoch, threshold) is chosen on "
        "test; the val split is not used for anything reported here. The column **best epoch "
        "on test** is the highest test accuracy over the epochs: it selects on test and is "
        "**optimistic**, shown only because published GAN-SSL numbers are often of that kind.",
        "",
        "## Accuracy (%) beside the paper's Table 1",
        "",
        "| method | N | runs | ours: final epoch | paper | Δ points | best epoch on test "
        "(optimistic) | Δ points |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        paper = f"{100 * r['paper_accuracy']:.2f}" if r["paper_accuracy"] is not None else "–"
        lines.append(
            f"| {r['method']} | {r['size']} | {r['runs']} | {percent(r['accuracy'])} | {paper} | "
            f"{points(r['accuracy_diff_points'])} | "
            f"{percent(r['optimistic_best_epoch_accuracy'])} | "
            f"{points(r['optimistic_diff_points'])} |"
        )
    lines += [
        "",
        "## Every metric (%, final-epoch model)",
        "",
        "| method | N | accuracy | balanced accuracy | AUC | sensitivity | specificity | F1 | "
        "wall s | train img/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cells = " | ".join(percent(r[m]) for m in METRICS)
        lines.append(
            f"| {r['method']} | {r['size']} | {cells} | {plain(r['wall_s'])} | "
            f"{plain(r['images_per_s'])} |"
        )
    compared = [r for r in rows if r["accuracy_diff_points"] is not None]
    below = [r for r in compared if r["accuracy_diff_points"] < 0]
    lines += ["", "## Reading these numbers", ""]
    if compared:
        mean_gap = sum(r["accuracy_diff_points"] for r in compared) / len(compared)
        lines.append(
            f"- Our final-epoch accuracy is below the paper's in {len(below)} of {len(compared)} "
            f"cells that have a paper value (mean difference {mean_gap:+.2f} points)."
            + (
                " The reduced protocol above accounts for part of any gap; the rest is a "
                "finding, not something to tune away on test."
                if reduced
                else " A gap is a finding to report, not a reason to select on test."
            )
        )
    lines += [
        "- Independent runs of this protocol on this data land near 80% accuracy (AUC about "
        "0.90) for the vanilla classifier, and careful published results on this test set "
        "stay at or under about 93% even with all 5,216 training images (DESIGN section 5); "
        "the paper's row is higher than both.",
        "- Sensitivity and specificity are of the second class (pneumonia) against the first.",
    ]
    if results["counts"]["failed"]:
        lines.append(
            "- Failed runs (a loss became non-finite) are excluded from the means above and "
            "counted here; see results.json."
        )
    if results.get("plot"):
        lines += ["", f"![accuracy against N]({Path(results['plot']).name})"]
    else:
        lines += ["", f"No plot: {results.get('plot_note')}"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> tuple[Path | None, str | None]:
    """accuracy_vs_size.png: one line per method with a ±std band, the paper's dashed.
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
        if method in PAPER_TABLE1:
            px = sorted(PAPER_TABLE1[method])
            ax.plot(
                px,
                [PAPER_TABLE1[method][x] for x in px],
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


def write_outputs(
    out: Path,
    cfg: BenchmarkSettings,
    dataset: str,
    specs: list[RunSpec],
    runs: list[dict[str, Any]],
    shard: str | None = None,
    merged_from: list[str] | None = None,
) -> dict[str, Any]:
    """results.json, results.csv, report.md and accuracy_vs_size.png from run records."""
    out = Path(out)
    names = {r["name"] for r in runs}
    results: dict[str, Any] = {
        "format_version": RESULTS_FORMAT_VERSION,
        "kind": "threengan-benchmark",
        "dataset": str(dataset),
        "settings": cfg.model_dump(mode="json"),
        "shard": shard,
        "merged_from": merged_from,
        "reduced": reductions(cfg),
        "paper_table1": {m: {str(k): v for k, v in t.items()} for m, t in PAPER_TABLE1.items()},
        "counts": {
            "grid": len(specs),
            "finished": sum(r["status"] == "finished" for r in runs),
            "failed": sum(r["status"] == "failed" for r in runs),
            "missing": sum(s.name not in names for s in specs),
        },
        "missing": [s.name for s in specs if s.name not in names],
        "results": aggregate(runs, cfg.methods, cfg.sizes),
        "runs": runs,
        "versions": system.library_versions(),
        "machine": system.describe(),
    }
    path, why = plot(results, out / "accuracy_vs_size.png")
    results["plot"] = str(path) if path else None
    results["plot_note"] = why
    fileio.write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    fileio.write_text(out / "results.csv", _csv(results["results"]))
    fileio.write_text(out / "report.md", report_markdown(results))
    return results


# ---------------------------------------------------------------------------------- run
def _manifest(cfg: BenchmarkSettings, dataset: Path, shard: tuple[int, int]) -> str:
    return (
        json.dumps(
            {
                "kind": "threengan-benchmark",
                "settings": cfg.model_dump(mode="json"),
                "dataset": str(dataset),
                "shard": f"{shard[0]}/{shard[1]}",
            },
            indent=2,
        )
        + "\n"
    )


def parallel_default(cfg: BenchmarkSettings) -> int:
    """Runs trained at once: on a GPU the repeats of a cell (a run at batch 10 fills a small
    part of it); on a CPU one, since a run already uses every core."""
    device = system.select_device(cfg.device)
    return min(cfg.repeats, 8) if device.type == "cuda" else 1


def run(
    dataset: Path,
    cfg: BenchmarkSettings,
    out: Path,
    *,
    shard: tuple[int, int] = (1, 1),
    on_event: Callable[[BenchEvent], None] | None = None,
    parallel: int | None = None,
) -> dict[str, Any]:
    """Train the (shard's) runs of the grid not finished yet, then write the outputs.

    ``parallel`` runs train at once in threads (default :func:`parallel_default`), taken cell
    by cell so the repeats of one (method, size) run together. Each is the same run as when
    trained alone: its own seed, data order, random generator and CUDA stream.

    Raises BenchmarkError (bad folder, sizes too large), DatasetError, TrainingError and
    training.Interrupted (Ctrl+C; every finished run is kept, the ones in progress resumable).
    """
    from threengan_cli import training

    lock = threading.Lock()  # events come from several threads; the view sees one at a time

    def emit(event: BenchEvent) -> None:
        if on_event is not None:
            with lock:
                on_event(event)

    dataset, out = Path(dataset), Path(out)
    specs = grid(cfg)
    mine = shard_of(specs, shard)
    eval_images = _check_sizes(dataset, mine)
    states = {s.name: check_run_folder(out / "runs" / s.name, s, dataset) for s in mine}
    todo = [s for s in mine if states[s.name] not in ("finished", "failed")]
    parallel = max(1, parallel or parallel_default(cfg))
    if parallel > 1:  # cell by cell: the repeats of one (method, size) side by side
        cell_rank = {
            cell: i for i, cell in enumerate(dict.fromkeys((s.method, s.size) for s in todo))
        }
        todo.sort(key=lambda s: (cell_rank[(s.method, s.size)], s.repeat))
    fileio.write_text(out / "benchmark.json", _manifest(cfg, dataset, shard))
    emit(
        GridPlanned(
            out,
            len(specs),
            len(mine),
            tuple(s.name for s in todo),
            tuple(s.name for s in mine if s not in todo),
            shard,
        )
    )

    clock = _Clock(todo, eval_images)

    def train_one(position: int, spec: RunSpec, stop: threading.Event) -> None:
        run_dir = out / "runs" / spec.name
        emit(RunBegins(spec, position, len(todo), states[spec.name] == "resume"))
        with lock:
            clock.start_run(spec)

        def forward(event) -> None:
            with lock:
                if isinstance(event, training.StepDone):
                    clock.step(spec, event)
                fraction, eta = clock.fraction, clock.eta_s
            emit(RunProgress(spec, position, len(todo), event, fraction, eta))

        try:
            training.train(
                dataset,
                spec.settings,
                run_dir,
                resume=states[spec.name] == "resume",
                on_event=forward,
                test_every_epoch=True,
                checkpoint_every_s=CHECKPOINT_EVERY_S,
                stop_flag=stop,
            )
        except training.NonFiniteLoss as exc:
            # A diverged run is a result of the method, not a reason to stop the grid; it
            # would diverge again when re-run, so it is recorded and skipped from now on.
            fileio.write_text(
                run_dir / "failed.json",
                json.dumps({"error": str(exc), "settings": spec.settings.model_dump()}) + "\n",
            )
        with lock:
            clock.end_run(spec)
            eta = clock.eta_s
        emit(RunEnds(spec, position, len(todo), read_run(run_dir), eta))

    with training.stop_requests() as stop:
        if parallel == 1:
            for position, spec in enumerate(todo, start=1):
                if stop.is_set():
                    raise KeyboardInterrupt
                train_one(position, spec, stop)
        else:
            _in_threads(train_one, list(enumerate(todo, start=1)), parallel, stop)

    runs = [read_run(out / "runs" / s.name) for s in mine]
    return write_outputs(
        out,
        cfg,
        str(dataset),
        mine,
        runs,
        shard=None if shard[1] == 1 else f"{shard[0]}/{shard[1]}",
    )


def _in_threads(train_one, jobs: list, parallel: int, stop: threading.Event) -> None:
    """Run ``train_one(position, spec, stop)`` for every job, ``parallel`` at a time.

    The first error stops the others (they save a resumable checkpoint) and is raised once all
    have ended; Ctrl+C, which the main thread receives, reaches every run through ``stop``.
    """
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    from threengan_cli.training import Interrupted

    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="run") as pool:
        pending = set()
        queue = list(jobs)
        while queue or pending:
            while queue and len(pending) < parallel and not stop.is_set():
                position, spec = queue.pop(0)
                pending.add(pool.submit(train_one, position, spec, stop))
            if not pending:
                break
            # a timeout, so that the main thread runs its Ctrl+C handler promptly
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    errors.append(future.exception())
                    stop.set()
    if errors:
        # a real failure first; the Interrupted it caused in the other runs after
        errors.sort(key=lambda e: isinstance(e, Interrupted))
        raise errors[0]
    if stop.is_set():
        raise KeyboardInterrupt


def merge(dirs: list[Path], out: Path) -> dict[str, Any]:
    """Join the outputs of shards (or of any benchmark folders with one grid) into one
    report; the same aggregation as an unsharded run. Runs missing from every folder are
    listed as missing, not silently left out."""
    if not dirs:
        raise BenchmarkError("give at least one benchmark folder to merge")
    cfg: BenchmarkSettings | None = None
    dataset = None
    found: dict[str, Path] = {}
    for d in map(Path, dirs):
        manifest_path = d / "benchmark.json"
        if not manifest_path.is_file():
            raise BenchmarkError(f"{d} is not a benchmark folder (no benchmark.json)")
        manifest = _read_json(manifest_path)
        try:
            this = BenchmarkSettings(**manifest["settings"])
        except (KeyError, TypeError, ValidationError) as exc:
            first = str(exc).splitlines()[0]
            raise BenchmarkError(f"{manifest_path} holds no valid settings ({first})") from None
        if cfg is None:
            cfg, dataset = this, manifest.get("dataset")
        else:
            a = this.model_dump(exclude={"device"})
            b = cfg.model_dump(exclude={"device"})
            if a != b:
                k = next(k for k in a if a[k] != b[k])
                raise BenchmarkError(
                    f"{d} is a different benchmark ({k} = {a[k]!r} there, {b[k]!r} in "
                    f"{dirs[0]}); merge only shards of one grid"
                )
        for run_dir in sorted((d / "runs").glob("*")):
            done = (run_dir / "summary.json").is_file() or (run_dir / "failed.json").is_file()
            if run_dir.is_dir() and done and run_dir.name not in found:
                found[run_dir.name] = run_dir
    assert cfg is not None
    specs = grid(cfg)
    runs = [read_run(found[s.name]) for s in specs if s.name in found]
    return write_outputs(
        Path(out), cfg, dataset or "", specs, runs, merged_from=[str(d) for d in dirs]
    )
