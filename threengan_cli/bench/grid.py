"""The benchmark's grid: profiles, methods and their variants, recipes, and the fixed order of
runs that shards slice. Repeat r uses seed ``seed + r``, so the labelled subset and the
initialisation differ between repeats and are shared between methods (paired comparisons)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from threengan_cli.bench.report import cell_of
from threengan_cli.core import config
from threengan_cli.core.errors import UsageError
from threengan_cli.core.settings import Precision, Recipe, TrainSettings
from threengan_cli.model.methods import METHODS

# Benchmark method name -> (training method, TrainSettings overrides). The ablations are
# 3N-GAN with one ingredient removed or swapped; adding a variant touches only this table.
# The ladder of the `study` profile adds one component at a time to the paper's recipe:
# precise BN, + EMA, + augmentation (which is the robust recipe, `3ngan+robust`), + the
# unlabelled rest of train (`3ngan-unl+robust`). A variant that names its recipe is trained
# with that recipe only, whatever the benchmark's recipes.
_PBN = {"recipe": "paper", "precise_bn": True}
_PBN_EMA = {**_PBN, "ema": 0.999}
_PBN_EMA_AUG = {**_PBN_EMA, "augment": "translation,cutout,color"}
# The `ssl` profile's rungs, all under the robust recipe: the unlabelled pool with one
# pseudo-label option at a time (the pool's pseudo-labels under the labelled batch's
# BatchNorm statistics, distribution alignment, FreeMatch thresholds, a mean teacher, mu = 7,
# a ramp-up over 10 epochs), and without a pool the generated images' term
# with a larger weight, a lower bar or a teacher (pseudolabels.py says what each does).
_POOL = {"recipe": "robust", "unlabelled": "rest"}
_GEN = {"recipe": "robust"}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "3ngan-nokl": ("3ngan", {"kl": "none"}),
    "3ngan-nogc": ("3ngan", {"use_generator_classifier_loss": False}),
    "3ngan-pairkl": ("3ngan", {"kl": "per-pair"}),
    "3ngan-pbn": ("3ngan", _PBN),
    "3ngan-pbn-ema": ("3ngan", _PBN_EMA),
    "3ngan-pbn-ema-aug": ("3ngan", _PBN_EMA_AUG),  # the robust recipe, named as a rung
    "3ngan-unl": ("3ngan", _POOL),
    "vanilla-unl": ("vanilla", _POOL),
    "3ngan-unl-da": ("3ngan", {**_POOL, "unlabelled_align": True}),
    "3ngan-unl-fm": ("3ngan", {**_POOL, "unlabelled_threshold": "adaptive"}),
    "3ngan-unl-mt": ("3ngan", {**_POOL, "unlabelled_teacher": True}),
    "3ngan-unl-mu7": ("3ngan", {**_POOL, "unlabelled_ratio": 7}),
    "3ngan-unl-ramp": ("3ngan", {**_POOL, "unlabelled_rampup": 10}),
    "3ngan-unl-bn": ("3ngan", {**_POOL, "unlabelled_norm": "labelled"}),
    "3ngan-lam-0p1": ("3ngan", {**_GEN, "lam": 0.1}),
    "3ngan-lam-1": ("3ngan", {**_GEN, "lam": 1.0}),
    "3ngan-tau-0p7": ("3ngan", {**_GEN, "tau": 0.7}),
    "3ngan-gmt": ("3ngan", {**_GEN, "generated_teacher": True}),
}
ABLATIONS = ("3ngan-nokl", "3ngan-nogc", "3ngan-pairkl")
# What a variant is compared with, on the same seeds (cells of the same recipe): the cell it
# adds one thing to, and for the pool with and without 3N-GAN's game, its vanilla twin.
POOL_RUNGS = (
    "3ngan-unl-bn",
    "3ngan-unl-da",
    "3ngan-unl-fm",
    "3ngan-unl-mt",
    "3ngan-unl-mu7",
    "3ngan-unl-ramp",
)
GENERATED_RUNGS = ("3ngan-lam-0p1", "3ngan-lam-1", "3ngan-tau-0p7", "3ngan-gmt")
BASELINES: dict[str, tuple[str, ...]] = {
    "3ngan-unl": ("3ngan", "vanilla-unl"),
    "vanilla-unl": ("vanilla",),
    **dict.fromkeys(POOL_RUNGS, ("3ngan-unl",)),
    **dict.fromkeys(GENERATED_RUNGS, ("3ngan",)),
}


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
# The classifier's forward pass per image, in the units of Method.step_ms (bench_classify.py:
# 577 img/s on the same 2 cores, 1.7 ms).
EVAL_MS_PER_IMAGE = 1.7

Profile = Literal["smoke", "quick", "paper", "study", "ssl"]

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
    # epochs for 2 CPU cores (one seed's runs, timed: docs/benchmarks.md); `--width 64
    # --epochs 100` is the paper's scale (221 s on an H100).
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
    # Do unlabelled X-rays pay, and can generated ones? Under the robust recipe, N = 200:
    # vanilla and 3ngan with and without the unlabelled rest of train, each pseudo-label
    # option on the pool alone, and the generated images' term made heavier, laxer or
    # teacher-labelled. The val columns are what to choose on; test is reported, never used.
    # The study profile's CPU reductions (width 32, 30 epochs); `--width 64 --epochs 100` is
    # the paper's scale.
    "ssl": {
        "methods": (
            "vanilla",
            "3ngan",
            "vanilla-unl",
            "3ngan-unl",
            *POOL_RUNGS,
            *GENERATED_RUNGS,
        ),
        "sizes": (200,),
        "repeats": 5,
        "epochs": 30,
        "batch_size": 10,
        "width": 32,
        "latent": 100,
        "recipes": ("robust",),
    },
}


# ------------------------------------------------------------------------------ settings
class BenchmarkSettings(BaseModel):
    """The grid and the per-run training settings shared by every run of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: Profile = Field(
        "quick",
        description="smoke (seconds; tests), quick (a reduced grid: about 15-20 minutes on a "
        "2-core CPU, see docs/benchmark-protocol.md) or paper (the full protocol).",
    )
    methods: tuple[str, ...]
    sizes: tuple[int, ...] = Field(
        description="Comma-separated training sizes N. \\[default: the profile's]"
    )
    repeats: int = Field(
        ge=1, le=1000,
        description="Repeats per cell; repeat r uses seed + r. \\[default: the profile's]",
    )
    epochs: int = Field(ge=1, le=100_000, description="Epochs per run. \\[default: the profile's]")
    batch_size: int = Field(
        ge=1, le=4096, description="Mini-batch size. \\[default: the profile's]"
    )
    width: int = Field(
        ge=1, le=1024, description="Network width ngf = ndf. \\[default: the profile's]"
    )
    latent: int = Field(ge=1, le=4096)
    seed: int = Field(0, ge=0, description="Base seed.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    precision: Precision = Field("fp32", description="fp32 or bf16.")
    ablate: bool = Field(
        False,
        description="Add 3N-GAN ablations: 3ngan-nokl (no KL term), 3ngan-nogc (G not trained "
        "against C), 3ngan-pairkl (per-pair KL).",
    )
    recipes: tuple[Recipe, ...] = Field(
        ("paper",),
        description="Comma list of recipes, each a cell of its own: paper, robust. "
        "\\[default: the profile's; study: paper,robust; others: paper]",
    )

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
        raise config.SettingsError(
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
        raise config.SettingsError(
            config.explain(exc, "benchmark", BenchmarkSettings)
        ) from None
    grid(cfg)  # the per-run TrainSettings validate device, precision and ranges
    return cfg


def comma_list(text: str | None, flag: str, cast: Callable[[str], Any] = str) -> tuple | None:
    """What ``--methods``, ``--sizes`` and ``--recipe`` take: a comma-separated list, as a
    tuple of ``cast`` values; ``None`` where the flag is not given, a :class:`UsageError`
    where a value is not a ``cast``."""
    if text is None:
        return None
    try:
        return tuple(cast(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{flag} takes a comma-separated list (got {text!r})") from None


def resolve_config(path: Path | None, profile: str | None = None, **flags: Any):
    """The grid a ``benchmark`` command asks for: the profile's values, then the settings
    file's [benchmark] table, then the flags that are not None. The profile is the one
    given, else the file's, else the default. Raises SettingsError with a one-line message."""
    values = dict(config.read_config(path).get("benchmark", {}))
    values.update({k: v for k, v in flags.items() if v is not None})
    in_file = values.pop("profile", None)
    chosen = profile or in_file or BenchmarkSettings.model_fields["profile"].default
    for key in ("methods", "sizes"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    try:
        return resolve_settings(chosen, **values)
    except ValueError as exc:  # a grid that trains nothing (grid)
        if isinstance(exc, config.SettingsError):
            raise
        raise config.SettingsError(str(exc)) from None


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
            step_ms *= 1 + (UNLABELLED_COST - 1) * self.settings.unlabelled_ratio
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
        for other in BASELINES.get(method, ()):
            lower = other + (f"+{recipe}" if recipe else "")
            if lower in present and (cell, lower) not in pairs:
                pairs.append((cell, lower))
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
                settings = config.resolve(
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
