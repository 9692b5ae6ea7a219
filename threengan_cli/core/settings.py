"""Validated settings: one frozen pydantic model per command section, the one list of options.
Here the sections that make a dataset and a model (prepare, train), written into what they
make; those of the commands that use a model are in ``core/use_settings``.

Each field is an option: its description is the option's help (``cli/common`` reads it, and
the default, from this source), its constraints what it allows. ``core/config`` reads a TOML
file's tables and resolves flags over them into these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from threengan_cli.core.names import METHOD_NAMES

Fit = Literal["squash", "crop", "pad"]
Recipe = Literal["paper", "robust"]
# fp16 is not offered: training would need a loss scaler (see accel.autocast_dtype).
Precision = Literal["fp32", "bf16"]
KLMode = Literal["batch-mean", "per-pair", "none"]
Threshold = Literal["fixed", "adaptive", "relative"]
Norm = Literal["own", "labelled"]
PreciseBNImages = Literal["labelled", "unlabelled"]


class Section(BaseModel):
    """A command's settings: frozen, and a key it does not know is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PrepareSettings(Section):
    image_size: int = Field(
        64, ge=8, le=1024,
        description="Side of the square images, px: a power of two (8, 16, 32, 64, ...), the "
        "sizes train builds networks for.",
    )
    fit: Fit = Field(
        "squash",
        description="Non-square images: squash (resize, as the paper), crop (centre square) or "
        "pad (black borders).",
    )
    val_fraction: float = Field(
        0.1, ge=0.0, le=0.5,
        description="Share of train carved as a patient-grouped val split when the source has "
        "none, or one smaller than --min-val.",
    )
    min_val: int = Field(
        100, ge=0, description="A source val split with fewer images is replaced by a carved one."
    )
    seed: int = Field(0, ge=0, description="Seed of the val carve.")
    workers: int = Field(0, ge=0, le=512, description="Decoding processes; 0 = all cores.")
    patient_pattern: str | None = Field(
        None,
        description="Regex whose first group is the patient id, searched in file names "
        "\\[default: Kermany's person<id>_ / IM-<id>-].",
    )
    strict: bool = Field(
        False,
        description="Fail (exit 1, nothing written) if any image file cannot be read. Non-image "
        "names such as .DS_Store never count.",
    )
    class_names: list[str] | None = Field(
        None,
        description="Name the classes, comma-separated, in the source's order (a MedMNIST .npz: "
        "label 0 first; folders: sorted names), e.g. NORMAL,PNEUMONIA for an .npz whose classes "
        "are 0 and 1. \\[default: the source's names]",
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


class TrainSettings(Section):
    # inf passes ``ge=0`` (a weight of inf turns the first loss into nan), nan passes nothing
    # that compares, so neither is a number a training setting can take.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: str = "3ngan"
    recipe: Recipe = Field(
        DEFAULT_RECIPE,
        description="paper: the paper's protocol exactly; robust: precise BN, EMA and "
        "augmentation (docs/method.md).",
    )
    size: int | None = Field(
        None, ge=2,
        description="Labelled training images N (N/2 per class, by seed). \\[default: all]",
    )
    epochs: int = Field(100, ge=1, le=100_000, description="Passes over the N images.")
    batch_size: int = Field(10, ge=1, le=4096, description="Mini-batch size.")
    tau: float = Field(0.9, ge=0.0, le=1.0, description="Pseudo-label confidence.")
    alpha: float = Field(0.3, ge=0.0, description="Weight of the KL term.")
    lam: float = Field(0.01, ge=0.0, description="Weight of the pseudo-label loss.")
    kl: KLMode = Field("batch-mean", description="KL term: batch-mean, per-pair or none.")
    lr: float = Field(2e-4, gt=0.0, le=1.0, description="Adam learning rate.")
    beta1: float = Field(0.5, ge=0.0, lt=1.0)
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    width: int = Field(64, ge=1, le=1024, description="Network width ngf = ndf.")
    latent: int = Field(100, ge=1, le=4096)
    seed: int = Field(0, ge=0, description="Seed of subset, init and batches.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    precision: Precision = Field(
        "fp32",
        description="fp32 or bf16. On a CPU bf16 was measured slower than fp32 even where it is "
        "native (a warning) and is refused where emulated; `threengan info` says which.",
    )
    use_generator_classifier_loss: bool = Field(
        True, description="3ngan: train G against C as well as D (off = ablation)"
    )
    cuda_graphs: bool = Field(
        True, description="On CUDA, replay each step from a captured CUDA graph."
    )
    precise_bn: bool = Field(
        False,
        description="Recompute BatchNorm statistics for the weights used. \\[default: by recipe]",
    )
    ema: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Decay of the weights' moving average, 0 = off. \\[default: by recipe]",
    )
    augment: str = Field(
        "none",
        description="translation,cutout,color,flip or none, alike for real and generated images. "
        "\\[default: by recipe]",
    )
    unlabelled: str | None = Field(
        None,
        description="Unlabelled X-rays: rest (train images outside the N), a prepared dataset or "
        "a folder; 'none' for none. \\[default: by recipe]",
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
        None,
        description="Start from a trained model's networks to fine-tune them: default (the "
        "bundled model), a run (name or folder; its final model, as --run) or a checkpoint file. "
        "Its classes, image size and width must be the run's. \\[default: fresh networks]",
    )
    generated_teacher: bool = Field(
        False, description="generated images' pseudo-labels from the averaged weights (needs ema)"
    )
    calibration_folds: int = Field(
        0, ge=0, le=10,
        description="Without a val split: fit the temperature on K fold models' logits on the "
        "labelled images each did not train on (K = 2 to 10).",
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
