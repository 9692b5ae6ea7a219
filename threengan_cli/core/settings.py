"""Validated settings: one frozen pydantic model per command section.

A TOML file may hold a table per section (``[prepare]``, ``[train]``, ...); flags given on
the command line override the file; the result is validated once and passed down. A bad
value becomes a :class:`SettingsError` whose message is one line naming the field and what
it allows, which the CLI prints and exits 2 on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from threengan_cli.core.errors import UsageError
from threengan_cli.core.names import METHOD_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli before it joined the standard library
    import tomli as tomllib

Fit = Literal["squash", "crop", "pad"]
Recipe = Literal["paper", "robust"]
# fp16 is not offered: training would need a loss scaler (see accel.autocast_dtype).
Precision = Literal["fp32", "bf16"]
KLMode = Literal["batch-mean", "per-pair", "none"]
Threshold = Literal["fixed", "adaptive", "relative"]
Norm = Literal["own", "labelled"]
PreciseBNImages = Literal["labelled", "unlabelled"]
MAX_CONFIG_BYTES = 1024 * 1024  # a settings file is a few hundred bytes


class SettingsError(UsageError, ValueError):
    """A setting that cannot be used; the message is one line meant for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrepareSettings(_Section):
    image_size: int = Field(64, ge=8, le=1024, description="side of the square images, px")
    fit: Fit = Field("squash", description="how a non-square image becomes square")
    val_fraction: float = Field(0.1, ge=0.0, le=0.5, description="share of train carved as val")
    min_val: int = Field(
        100, ge=0, description="a source val split smaller than this is replaced by a carved one"
    )
    seed: int = Field(0, ge=0)
    workers: int = Field(0, ge=0, le=512, description="decoding processes; 0 = all cores")
    patient_pattern: str | None = Field(None, description="regex with one group: patient id")
    strict: bool = False
    class_names: list[str] | None = Field(
        None, description="names for the source's classes, in its order (npz: label 0, 1, ...)"
    )

    @field_validator("image_size")
    @classmethod
    def _trainable(cls, value: int) -> int:
        if value & (value - 1):  # networks.py builds stride-2 stages from 4 px up
            raise ValueError("must be a power of two (8, 16, 32, 64, ...): the sizes train builds")
        return value

    @field_validator("class_names", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """``NORMAL,PNEUMONIA`` (a flag) or a list (a settings file)."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",")]
        return value

    @field_validator("class_names")
    @classmethod
    def _usable_names(cls, value: list[str] | None) -> list[str] | None:
        """Class names become folder names (``classify --sort-into``, ``generate --label``)
        and CSV columns: plain, distinct names only."""
        if value is None:
            return None
        import re

        if len(value) < 2:
            raise ValueError("needs one name per class, at least two, comma-separated")
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}", name):
                raise ValueError(
                    f"{name!r} is not a usable class name: letters, digits, space, '.', '_' "
                    "or '-', starting with a letter or digit (at most 100)"
                )
        if len({n.casefold() for n in value}) != len(value):
            raise ValueError("names must differ (ignoring case: they become folder names)")
        return value

    @field_validator("patient_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            import re

            try:
                compiled = re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from exc
            if compiled.groups < 1:
                raise ValueError("needs one capturing group that matches the patient id")
        return value


# What a recipe sets, unless a flag or the config file sets it too. ``paper`` is the paper's
# protocol exactly (docs/method.md); ``robust`` adds what the study in docs/benchmarks.md
# measured to make the final model stable and better: BatchNorm statistics recomputed for the
# weights used (precise BN), an exponential moving average of the weights, and augmentation
# alike of real and generated images. The unlabelled rest of the train split is an option
# (``unlabelled = "rest"``), not part of it: in the study it cost 1.6 points of test accuracy
# (95% CI 0.5 to 2.7) and 1.8 of val accuracy at N = 200.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "precise_bn": False,
        "ema": 0.0,
        "augment": "none",
        "unlabelled": None,
    },
    "robust": {
        "precise_bn": True,
        "ema": 0.999,
        "augment": "translation,cutout,color",
        "unlabelled": None,
    },
}
DEFAULT_RECIPE: Recipe = "robust"
AUGMENTS = ("translation", "cutout", "color", "flip")


def with_stored_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """Train settings read back from a run or checkpoint, with their recipe: those written
    before recipes existed were trained with the paper's protocol, whatever today's default
    recipe is."""
    return {"recipe": "paper", **values}


class TrainSettings(_Section):
    # inf passes ``ge=0`` (a weight of inf turns the first loss into nan), nan passes nothing
    # that compares, so neither is a number a training setting can take.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: str = "3ngan"
    recipe: Recipe = Field(
        DEFAULT_RECIPE, description="paper: the paper's protocol exactly; robust: stabler model"
    )
    size: int | None = Field(None, ge=2, description="labelled images, half per class")
    epochs: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(10, ge=1, le=4096)
    tau: float = Field(0.9, ge=0.0, le=1.0, description="pseudo-label confidence threshold")
    alpha: float = Field(0.3, ge=0.0, description="weight of the KL term")
    lam: float = Field(0.01, ge=0.0, description="weight of the pseudo-label loss")
    kl: KLMode = Field("batch-mean", description="how the KL term compares predictions")
    lr: float = Field(2e-4, gt=0.0, le=1.0)
    beta1: float = Field(0.5, ge=0.0, lt=1.0)
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    width: int = Field(64, ge=1, le=1024, description="ngf = ndf")
    latent: int = Field(100, ge=1, le=4096)
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    precision: Precision = "fp32"
    use_generator_classifier_loss: bool = Field(
        True, description="3ngan: train G against C as well as D (off = ablation)"
    )
    cuda_graphs: bool = Field(
        True, description="on CUDA, replay each training step from a captured CUDA graph"
    )
    precise_bn: bool = Field(
        False, description="recompute BatchNorm statistics of the weights used, before use"
    )
    ema: float = Field(
        0.0, ge=0.0, lt=1.0, description="decay of the weights' moving average; 0 = off"
    )
    augment: str = Field(
        "none", description="comma list of translation, cutout, color, flip; or none"
    )
    unlabelled: str | None = Field(
        None, description="rest (train images outside the N), a prepared dataset, or a folder"
    )
    unlabelled_tau: float = Field(
        0.95, ge=0.0, le=1.0, description="confidence for a pseudo-label of an unlabelled image"
    )
    unlabelled_weight: float = Field(1.0, ge=0.0, description="weight of that pseudo-label term")
    unlabelled_ratio: int = Field(
        1, ge=1, le=16, description="unlabelled images per labelled one in a step (FixMatch's mu)"
    )
    unlabelled_align: bool = Field(
        False, description="align the pool's pseudo-label probabilities to the labels' shares"
    )
    unlabelled_threshold: Threshold = Field(
        "fixed",
        description="fixed: unlabelled_tau; adaptive: FreeMatch's per-class bars; relative: "
        "AdaMatch's, unlabelled_tau times the labelled batch's mean confidence",
    )
    unlabelled_teacher: bool = Field(
        False, description="the pool's pseudo-labels from the averaged weights (needs ema)"
    )
    unlabelled_norm: Norm = Field(
        "own",
        description="BatchNorm statistics of the pool's un-augmented view: its own batch's, or "
        "the labelled batch's",
    )
    unlabelled_rampup: int = Field(
        0, ge=0, le=100_000, description="epochs over which the pool's weight ramps up; 0 = none"
    )
    unlabelled_interpolation: bool = Field(
        False,
        description="AdaMatch's random logit interpolation: the labelled batch's logits drawn "
        "between its own BatchNorm statistics and those of the labelled batch and pool together",
    )
    precise_bn_images: PreciseBNImages = Field(
        "labelled",
        description="images precise BN fits the classifier's statistics on: labelled, or "
        "unlabelled (the pool: the site's own statistics in the saved model)",
    )
    init: str | None = Field(
        None, description="start from this model's networks: default, a run, or a checkpoint file"
    )
    generated_teacher: bool = Field(
        False, description="generated images' pseudo-labels from the averaged weights (needs ema)"
    )
    calibration_folds: int = Field(
        0,
        ge=0,
        le=10,
        description="without a val split: fit the temperature on the out-of-fold logits of "
        "this many fold models (2 to 10; 0 = off)",
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, values: Any) -> Any:
        """The recipe fills the fields it governs that were not given explicitly."""
        if not isinstance(values, dict):
            return values
        recipe = values.get("recipe", DEFAULT_RECIPE)
        preset = RECIPES.get(recipe, {})
        return {**preset, **values}

    @classmethod
    def from_stored(cls, values: dict[str, Any]) -> TrainSettings:
        """Settings read back from a run or checkpoint (see :func:`with_stored_recipe`)."""
        return cls.model_validate(with_stored_recipe(values), context={"stored": True})

    @property
    def augments(self) -> tuple[str, ...]:
        return () if self.augment == "none" else tuple(self.augment.split(","))

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str, info: ValidationInfo) -> str:
        # Settings read back from a saved model are only described by the method's name:
        # loading one needs no registry (and the NumPy engine no torch, which it imports).
        if (info.context or {}).get("stored"):
            return value
        if value not in METHOD_NAMES:
            raise ValueError(f"must be one of {', '.join(map(repr, METHOD_NAMES))}")
        return value

    @field_validator("init")
    @classmethod
    def _init_named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("names no model (default, a run, or a checkpoint file)")
        return value

    @field_validator("unlabelled")
    @classmethod
    def _no_pool(cls, value: str | None) -> str | None:
        """``none`` turns the pool off, also where a recipe would set one."""
        return None if value is not None and value.lower() == "none" else value

    @field_validator("calibration_folds")
    @classmethod
    def _folds(cls, value: int) -> int:
        if value == 1:
            raise ValueError("must be 0 (off) or 2 to 10 folds")
        return value

    @field_validator("unlabelled_teacher", "generated_teacher")
    @classmethod
    def _teacher_needs_averages(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("ema"):
            raise ValueError("needs ema > 0: the teacher is the moving average of the weights")
        return value

    @model_validator(mode="after")
    def _pool_statistics_need_a_pool(self, info: ValidationInfo) -> TrainSettings:
        # A config file is checked alone first (resolve): the pool may come from a flag.
        if (info.context or {}).get("file_alone"):
            return self
        if self.precise_bn_images == "unlabelled" and not (self.precise_bn and self.unlabelled):
            raise ValueError("precise_bn_images = 'unlabelled' needs precise_bn and a pool")
        if self.unlabelled_interpolation and (
            self.unlabelled_teacher or self.unlabelled_norm == "labelled"
        ):
            raise ValueError(
                "unlabelled_interpolation takes the pool's pseudo-labels from C's joint batch: "
                "it does not combine with unlabelled_teacher or unlabelled_norm = 'labelled'"
            )
        return self

    @field_validator("augment")
    @classmethod
    def _augment_policy(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if parts in ([], ["none"]):
            return "none"
        unknown = [p for p in parts if p not in AUGMENTS]
        if unknown:
            raise ValueError(f"unknown augmentation {unknown[0]!r} (known: {', '.join(AUGMENTS)})")
        return ",".join(parts)

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value


class ClassifySettings(_Section):
    batch_size: int = Field(64, ge=1, le=65536)
    workers: int = Field(0, ge=0, le=512, description="decoding processes; 0 = all cores")
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    device: str = "auto"
    engine: Literal["numpy", "torch"] = Field(
        "numpy", description="on the CPU: numpy (starts in under a second) or torch"
    )
    recursive: bool = False
    format: Literal["table", "csv", "json", "jsonl"] | None = Field(
        None, description="output format; none: from the output's suffix, else by terminal"
    )
    ood_threshold: float | None = Field(
        None, gt=0.0, lt=1e6, description="flag an image above this out-of-distribution "
        "score; none: the model's own (flags 5% of its val split)"
    )
    fail_on_ood: bool = Field(False, description="exit 4 when an image is flagged")
    allow_empty: bool = Field(False, description="no image to classify is a success, no rows")
    max_ood_share: float | None = Field(
        None, ge=0.0, le=1.0, description="exit 4 when more than this share of the "
        "classified images is flagged; none: no such gate"
    )


class GenerateSettings(_Section):
    count: int = Field(64, ge=1, le=1_000_000)
    seed: int = Field(0, ge=0)
    tau: float = Field(0.9, ge=0.0, le=1.0)
    device: str = "auto"


SECTIONS: dict[str, type[_Section]] = {
    "prepare": PrepareSettings,
    "train": TrainSettings,
    "classify": ClassifySettings,
    "generate": GenerateSettings,
}
# A config file may also hold a [benchmark] table. Its model, grid.BenchmarkSettings, lives
# beside the profiles that fill its required fields (grid.resolve_settings builds it).
SECTION_NAMES = (*SECTIONS, "benchmark")


def _range(model: type[BaseModel], name: str) -> str | None:
    """The allowed range of a numeric field, as ``a <= x <= b`` style text."""
    info = model.model_fields.get(name)
    if info is None:
        return None
    lo = hi = None
    for meta in info.metadata:
        for attr, side in (("ge", "lo"), ("gt", "lo"), ("le", "hi"), ("lt", "hi")):
            value = getattr(meta, attr, None)
            if value is not None:
                text = f"{value} {'<=' if attr in ('ge', 'le') else '<'}"
                if side == "lo":
                    lo = text
                else:
                    hi = text.split()[1] + " " + str(value)
    if lo is None and hi is None:
        return None
    return f"{lo + ' ' if lo else ''}{name}{' ' + hi if hi else ''}"


def explain(exc: ValidationError, section: str, model: type[BaseModel] | None = None) -> str:
    """Turn pydantic's report into one line: field, what is allowed, what was given.

    ``model`` is the section's model, where it is not one of :data:`SECTIONS` (the
    benchmark's); it supplies the allowed range of a number."""
    err = exc.errors()[0]
    name = ".".join(str(part) for part in err["loc"]) or section  # methods.1: the second method
    given = err.get("input")
    got = "" if isinstance(given, dict) else f" (got {given!r})"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{section}.{name}: unknown setting"
    if kind in {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}:
        field = str(err["loc"][0])
        allowed = f"must satisfy {_range(model or SECTIONS[section], field)}"
    elif kind == "literal_error":
        allowed = f"must be one of {err['ctx']['expected']}"
    else:
        allowed = err["msg"].removeprefix("Value error, ")
        allowed = allowed[0].lower() + allowed[1:]
    where = section if not err["loc"] else f"{section}.{name}"  # a check of several fields
    return f"{where}: {allowed}{got}"


def read_config(path: Path | None) -> dict[str, Any]:
    """Read a TOML settings file; a missing or malformed file is a SettingsError."""
    if path is None:
        return {}
    path = Path(path)
    if path.exists() and not path.is_file():
        raise SettingsError(f"config file {path} is not a regular file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except OSError as exc:
        raise SettingsError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise SettingsError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SettingsError(f"config file {path} line {line} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} cannot be read: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise SettingsError(
            f"config file {path} nests arrays or tables too deeply to be a settings file"
        ) from None
    unknown = sorted(set(data) - set(SECTION_NAMES))
    if unknown:
        raise SettingsError(
            f"config file {path}: unknown section [{unknown[0]}] "
            f"(known: {', '.join(SECTION_NAMES)})"
        )
    return data


def resolve(section: str, config: Path | None = None, **flags: Any):
    """Build the settings of one section: defaults, then the file, then the flags.

    Flags whose value is ``None`` were not given and leave the file's value in place.
    """
    model = SECTIONS[section]
    from_file = read_config(config).get(section, {})
    if not isinstance(from_file, dict):
        raise SettingsError(f"config file {config}: [{section}] must be a table of settings")
    # A file's values are taken as written, strictly: `epochs = true` or `tau = "0.9"` is an
    # error there, not 1 or 0.9 (flags arrive typed by the command line already).
    try:
        model.model_validate(from_file, strict=True, context={"file_alone": True})
    except ValidationError as exc:
        raise SettingsError(f"config file {config}: {explain(exc, section)}") from None
    values = {**from_file, **{k: v for k, v in flags.items() if v is not None}}
    try:
        return model(**values)
    except ValidationError as exc:
        raise SettingsError(explain(exc, section)) from None


def dump(settings: BaseModel) -> str:
    """Settings as pretty JSON, written next to every output."""
    return json.dumps(settings.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
