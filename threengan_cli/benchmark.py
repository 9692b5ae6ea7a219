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
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from threengan_cli import fileio, system
from threengan_cli import settings as settings_mod
from threengan_cli.methods import METHODS
from threengan_cli.report import (  # noqa: F401  (METRICS, PAPER_TABLE1: read as benchmark.*)
    METRICS,
    PAPER_TABLE1,
    cell_of,
    reductions,
    swing,
    write_outputs,
)
from threengan_cli.settings import Precision, Recipe, TrainSettings

# Benchmark method name -> (training method, TrainSettings overrides). The ablations are
# 3N-GAN with one ingredient removed or swapped; adding a variant touches only this table.
# The ladder of the `study` profile adds one component at a time to the paper's recipe:
# precise BN, + EMA, + augmentation (which is the robust recipe, `3ngan+robust`), + the
# unlabelled rest of train (`3ngan-unl+robust`). A variant that names its recipe is trained
# with that recipe only, whatever the benchmark's recipes.
_PBN = {"recipe": "paper", "precise_bn": True}
_PBN_EMA = {**_PBN, "ema": 0.999}
_PBN_EMA_AUG = {**_PBN_EMA, "augment": "translation,cutout,color"}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "3ngan-nokl": ("3ngan", {"kl": "none"}),
    "3ngan-nogc": ("3ngan", {"use_generator_classifier_loss": False}),
    "3ngan-pairkl": ("3ngan", {"kl": "per-pair"}),
    "3ngan-pbn": ("3ngan", _PBN),
    "3ngan-pbn-ema": ("3ngan", _PBN_EMA),
    "3ngan-pbn-ema-aug": ("3ngan", _PBN_EMA_AUG),  # the robust recipe, named as a rung
    "3ngan-unl": ("3ngan", {"recipe": "robust", "unlabelled": "rest"}),
}
ABLATIONS = ("3ngan-nokl", "3ngan-nogc", "3ngan-pairkl")


def variant(name: str) -> tuple[str, dict[str, Any]]:
    """(training method, settings overrides) of a benchmark method name: every registered
    method as it is, and the named variants above."""
    if name in VARIANTS:
        return VARIANTS[name]
    if name in METHODS:
        return name, {}
    known = [*METHODS, *VARIANTS]
    raise ValueError(f"unknown method {name!r} (known: {', '.join(known)})")


LADDER = ("3ngan-pbn", "3ngan-pbn-ema")
# Relative extra cost of a step with an unlabelled batch (D sees twice the real images, C two
# more batches): an estimate, used only to weigh runs for the ETA.
UNLABELLED_COST = 1.7
# The classifier's forward pass per image in the same units (benchmarks/bench_classify.py:
# 577 img/s on the same 2 cores, 1.7 ms).
EVAL_MS_PER_IMAGE = 1.7

Profile = Literal["smoke", "quick", "paper", "study"]

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
        "recipes": ("paper",),
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
        "recipes": ("paper",),
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
        "recipes": ("paper",),
    },
    # Does the robust recipe hold, and what does each of its parts bring? N = 200, 5 seeds,
    # vanilla and 3ngan under both recipes, plus the ladder (precise BN, + EMA on the paper's
    # recipe; + augmentation is the robust recipe; + the unlabelled pool on top of it; the
    # transductive BN-adapted column is reported for every run). Reduced to width 32 and 30
    # epochs to fit about an hour on 2 CPU cores; `--width 64 --epochs 100` is the paper's
    # scale (docs/benchmarks.md has both).
    "study": {
        "methods": ("vanilla", "3ngan", *LADDER, "3ngan-unl"),
        "sizes": (200,),
        "repeats": 5,
        "epochs": 30,
        "batch_size": 10,
        "width": 32,
        "latent": 100,
        "recipes": ("paper", "robust"),
    },
}

# A run of the grid writes its checkpoints at most this often (and at its end): a killed
# benchmark loses at most the run in progress, and on a GPU, where an epoch of 200 images
# takes milliseconds, the grid is not spent writing optimizer state.
CHECKPOINT_EVERY_S = 60.0

_RUN_NAME = re.compile(
    r"^(?P<method>[a-z0-9-]+)(\+(?P<recipe>[a-z]+))?-n(?P<size>\d+)-r(?P<repeat>\d+)$"
)
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
    recipes: tuple[Recipe, ...] = ("paper",)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one method")
        for name in value:
            variant(name)
        if len(set(value)) != len(value):
            raise ValueError("lists a method twice")
        return value

    @field_validator("recipes")
    @classmethod
    def _recipes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("needs one or more recipes, each once")
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

    @property
    def cell(self) -> str:
        return cell_of({"method": self.method, "recipe": self.settings.recipe})

    def work(self, eval_images: int = 0) -> float:
        """Relative cost, for the ETA: per epoch, steps x the method's measured step time,
        plus the classifier over the ``eval_images`` evaluated after each epoch (val and
        test): at width 32 and N = 200 that evaluation costs more than the training."""
        steps = math.ceil(self.size / self.settings.batch_size)
        step_ms = METHODS[self.settings.method].step_ms
        if self.settings.unlabelled is not None:
            step_ms *= UNLABELLED_COST
        per_epoch = steps * step_ms + eval_images * EVAL_MS_PER_IMAGE
        return per_epoch * self.settings.epochs


def run_name(method: str, size: int, repeat: int, recipe: str = "paper") -> str:
    """``<method>-n<N>-r<R>``, with ``+<recipe>`` after the method unless it is the paper's."""
    cell = cell_of({"method": method, "recipe": recipe})
    return f"{cell}-n{size}-r{repeat}"


def _pairs(cfg: BenchmarkSettings) -> list[tuple[str, str]]:
    """(method, recipe) of every cell, in order: each recipe's methods; a variant that names
    its own recipe once."""
    out: list[tuple[str, str]] = []
    for recipe in cfg.recipes:
        for method in cfg.methods:
            own = variant(method)[1].get("recipe")
            pair = (method, own or recipe)
            if pair not in out:
                out.append(pair)
    return out


def cells(cfg: BenchmarkSettings) -> list[str]:
    return [cell_of({"method": m, "recipe": r}) for m, r in _pairs(cfg)]


def comparison_pairs(cfg: BenchmarkSettings) -> list[tuple[str, str]]:
    """Which cells the report compares, a - b on the same seeds: each method against vanilla
    under the same recipe, each recipe against the paper's for the same method, and each rung
    of the ladder against the one below it (the robust recipe is the ladder's top rung)."""
    present = cells(cfg)
    pairs = []
    for cell in present:
        method, _, recipe = cell.partition("+")
        base = "vanilla" + (f"+{recipe}" if recipe else "")
        if method in METHODS and method != "vanilla" and base in present:
            pairs.append((cell, base))
        if recipe and method in present:
            pairs.append((cell, method))
    rungs = [r for r in ("3ngan", *LADDER, "3ngan+robust", "3ngan-unl+robust") if r in present]
    steps = zip(rungs, rungs[1:], strict=False)
    pairs += [(upper, lower) for lower, upper in steps if (upper, lower) not in pairs]
    return pairs


def grid(cfg: BenchmarkSettings) -> list[RunSpec]:
    """Every run, in a fixed order: repeat, then size, then recipe and method. Repeat-major,
    so a partial benchmark has one repeat of every cell before the second of any."""
    specs = []
    for repeat in range(cfg.repeats):
        for size in cfg.sizes:
            for method, recipe in _pairs(cfg):
                base, overrides = variant(method)
                overrides = {"recipe": recipe, **overrides}
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
                name = run_name(method, size, repeat, recipe)
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
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"{path} cannot be read ({exc})") from None


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
        "recipe": match["recipe"] or "paper",
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
    epochs = []
    metrics_path = run_dir / "metrics.jsonl"
    lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
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
        [s.name for s in mine],
        cells(cfg),
        comparison_pairs(cfg),
        runs,
        reductions(cfg, PROFILES["paper"]),
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
        this = BenchmarkSettings(**manifest["settings"])
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
        Path(out),
        cfg,
        dataset or "",
        [s.name for s in specs],
        cells(cfg),
        comparison_pairs(cfg),
        runs,
        reductions(cfg, PROFILES["paper"]),
        merged_from=[str(d) for d in dirs],
    )
