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

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from threengan_cli.bench.grid import (
    PROFILES,
    BenchmarkSettings,
    RunSpec,
    cells,
    comparison_pairs,
    grid,
    shard_of,
)
from threengan_cli.bench.report import (
    reductions,
    swing,
    write_outputs,
)
from threengan_cli.core import fileio, paths, system
from threengan_cli.core.errors import Failure, UsageError
from threengan_cli.core.use_settings import parse_shard
from threengan_cli.train import runs

# A run of the grid writes its checkpoints at most this often (and at its end): a killed
# benchmark loses at most the run in progress, and on a GPU, where an epoch of 200 images
# takes milliseconds, the grid is not spent writing optimizer state.

_RUN_NAME = re.compile(
    r"^(?P<method>[a-z0-9-]+)(\+(?P<recipe>[a-z]+))?-n(?P<size>\d+)-r(?P<repeat>\d+)$"
)


class BenchmarkError(Failure):
    """A benchmark that cannot start or be merged; the message is one line for the user."""


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
def read_json(path: Path) -> Any:
    try:
        return runs.read_json(path)
    except runs.RunError as exc:  # names the file and the line
        raise BenchmarkError(str(exc)) from None


def check_run_folder(run_dir: Path, spec: RunSpec, dataset: Path) -> str:
    """State of a run folder, as :func:`runs.state` names it: ``resumable`` (resuming it
    continues the run; also a run stopped after its last epoch but before summary.json, whose
    resume only runs the final evaluation), ``finished`` and ``failed`` are kept; any other
    (``absent``, ``started``...) is trained from the start.

    A folder written with other settings, or on another dataset, is a BenchmarkError.
    """
    if not (run_dir / runs.SETTINGS).is_file():
        return runs.state(run_dir)
    try:
        found = runs.difference(run_dir, spec.settings.model_dump(mode="json"), dataset)
    except runs.RunError as exc:  # names the file and the line
        raise BenchmarkError(str(exc)) from None
    if found is not None and found.what == "dataset":
        raise BenchmarkError(
            f"{run_dir} was trained on {found.there}, not {dataset}; use another --out"
        )
    if found is not None:
        raise BenchmarkError(
            f"{run_dir} was written with other settings ({found.key} = {found.there!r} there, "
            f"{found.asked!r} asked{', and more' if found.more else ''}); "
            "use another --out, or delete that folder to train it again"
        )
    return runs.state(run_dir)


def _check_sizes(dataset_path: Path, specs: list[RunSpec]) -> int:
    """Every size must fit the train split, half per class; say which does not, up front.

    Returns how many images each run evaluates after every epoch (val and test)."""
    import numpy as np

    from threengan_cli.data.datasets import load_prepared

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


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """One run folder as a record: its final-epoch test metrics, every epoch's test metrics,
    the best epoch on test (optimistic), timings, settings and library versions."""
    match = _RUN_NAME.match(run_dir.name)
    if not match:
        raise BenchmarkError(f"{run_dir} is not a benchmark run folder (<method>-n<N>-r<R>)")
    record: dict[str, Any] = {
        "name": run_dir.name,
        "method": match["method"],
        "recipe": match["recipe"] or "paper",
        "size": int(match["size"]),
        "repeat": int(match["repeat"]),
        "folder": str(run_dir),
    }
    settings = read_json(run_dir / runs.SETTINGS) if (run_dir / runs.SETTINGS).is_file() else {}
    run_meta = read_json(run_dir / runs.RUN) if (run_dir / runs.RUN).is_file() else {}
    record.update(seed=settings.get("seed"), settings=settings)
    record["versions"] = run_meta.get("versions")
    record["dataset"] = run_meta.get("dataset")
    if (run_dir / runs.FAILED).is_file() and not (run_dir / runs.SUMMARY).is_file():
        record.update(status="failed", error=read_json(run_dir / runs.FAILED).get("error"))
        return record
    summary = read_json(run_dir / runs.SUMMARY)
    if not isinstance(summary, dict) or not isinstance(summary.get("test"), dict):
        raise BenchmarkError(f"{run_dir / runs.SUMMARY} holds no test metrics")
    epochs = []
    metrics_path = run_dir / runs.METRICS
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
        val=summary.get("val") or {},
        best_epoch_on_test=best,
        best_epoch_on_val=summary.get("best_epoch_on_val"),
        test_adapted_bn=summary.get("test_adapted_bn"),
        swing=swing(epochs),
        elapsed_s=summary.get("elapsed_s"),
        train_images=summary.get("train_images"),
        images_per_s=round(images / train_seconds, 2) if train_seconds > 0 else None,
        epochs=epochs,
    )
    return record


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


def shard_given(text: str | None) -> tuple[int, int]:
    """``--shard I/N`` as (I, N); (1, 1), the whole grid, without it. Anything else is a
    :class:`UsageError`."""
    if text is None:
        return (1, 1)
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise UsageError(f"--shard {exc} (got {text!r})") from None


def folder_for(dataset: Path, profile: str, out: Path | None) -> Path:
    """The benchmark folder: ``out`` (``--out``), else <data dir>/benchmarks/<dataset>-<profile>."""
    return out or paths.home() / "benchmarks" / f"{dataset.name}-{profile}"


def parallel_default(cfg: BenchmarkSettings) -> int:
    """Runs trained at once: on a GPU the repeats of a cell (a run at batch 10 fills a small
    part of it); on a CPU one, since a run already uses every core."""
    device = system.select_device(cfg.device)
    return min(cfg.repeats, 8) if device.type == "cuda" else 1


# Over 80 lines: most of it is ``train_one``, the closure each thread runs, which shares the
# clock, the lock and the event stream with the loop below it.
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
    from threengan_cli.train import events, training

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
            cell: i for i, cell in enumerate(dict.fromkeys((s.cell, s.size) for s in todo))
        }
        todo.sort(key=lambda s: (cell_rank[(s.cell, s.size)], s.repeat))
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
        emit(RunBegins(spec, position, len(todo), states[spec.name] == "resumable"))
        with lock:
            clock.start_run(spec)

        def forward(event) -> None:
            with lock:
                if isinstance(event, events.StepDone):
                    clock.step(spec, event)
                fraction, eta = clock.fraction, clock.eta_s
            emit(RunProgress(spec, position, len(todo), event, fraction, eta))

        try:
            training.train(
                dataset,
                spec.settings,
                run_dir,
                resume=states[spec.name] == "resumable",
                on_event=forward,
                test_every_epoch=True,
                checkpoint_every_s=events.CHECKPOINT_EVERY_S,
                stop_flag=stop,
            )
        except events.NonFiniteLoss as exc:
            # A diverged run is a result of the method, not a reason to stop the grid; it
            # would diverge again when re-run, so it is recorded and skipped from now on.
            fileio.write_text(
                run_dir / runs.FAILED,
                json.dumps({"error": str(exc), "settings": spec.settings.model_dump()}) + "\n",
            )
        with lock:
            clock.end_run(spec)
            eta = clock.eta_s
        emit(RunEnds(spec, position, len(todo), read_run_record(run_dir), eta))

    with training.stop_requests() as stop:
        if parallel == 1:
            for position, spec in enumerate(todo, start=1):
                if stop.is_set():
                    raise events.Stopped(getattr(stop, "signum", None))
                train_one(position, spec, stop)
        else:
            _in_threads(train_one, list(enumerate(todo, start=1)), parallel, stop)

    records = [read_run_record(out / "runs" / s.name) for s in mine]
    return write_outputs(
        out,
        cfg,
        str(dataset),
        [s.name for s in mine],
        cells(cfg),
        comparison_pairs(cfg),
        records,
        reductions(cfg, PROFILES["paper"]),
        shard=None if shard[1] == 1 else f"{shard[0]}/{shard[1]}",
    )


def _in_threads(train_one, jobs: list, parallel: int, stop: threading.Event) -> None:
    """Run ``train_one(position, spec, stop)`` for every job, ``parallel`` at a time.

    The first error stops the others (they save a resumable checkpoint) and is raised once all
    have ended; Ctrl+C, which the main thread receives, reaches every run through ``stop``.
    """
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    from threengan_cli.train.events import Interrupted

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
        from threengan_cli.train.events import Stopped

        raise Stopped(getattr(stop, "signum", None))
