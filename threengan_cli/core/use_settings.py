"""Settings of the commands that use a trained model: classify, evaluate and generate.

As in ``core/settings`` (the sections that make datasets and models), each field is an
option: its description is the option's help (``cli/common`` reads it, and the default,
from this source), its constraints what it allows; ``core/config`` resolves a TOML file's
table and the flags into these models. None of them is written into a run or a model, so a
field added here changes no stored identity.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from threengan_cli.core.settings import Section

ThresholdRule = Literal["youden", "balanced-accuracy"]
Engine = Literal["numpy", "torch"]


def _path(value: Any) -> Path:
    """A path in a settings file is a string (validated strictly, a Path field would take
    none); a flag's is a Path already."""
    if isinstance(value, str) and value.strip():
        return Path(value)
    if not isinstance(value, Path):
        raise ValueError("must be a path: a file or folder name")
    return value


def _not_a_folder(path: Path) -> Path:
    """What typer checks of a file option's value, for a settings file's too."""
    if path.is_dir():
        raise ValueError("is a folder: give a file")
    return path


def _not_a_file(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise ValueError("is a file: give a folder")
    return path


FilePath = Annotated[Path, BeforeValidator(_path), AfterValidator(_not_a_folder)]
FolderPath = Annotated[Path, BeforeValidator(_path), AfterValidator(_not_a_file)]


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 1 <= I <= N; anything else is a ValueError."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError("must be I/N with 1 <= I <= N, e.g. 2/8")
    return int(match[1]), int(match[2])


def _file_alone(info: ValidationInfo) -> bool:
    """A config file is checked alone first (``config.resolve``): a check of several fields
    waits for the flags, which may supply the other."""
    return bool((info.context or {}).get("file_alone"))


class ClassifySettings(Section):
    recursive: bool = Field(False, description="Look in sub-folders of folders too.")
    format: Literal["table", "csv", "json", "jsonl"] | None = Field(
        None,
        description="table, csv, json or jsonl \\[default: from --output's suffix; else the "
        "--config file's format; else table on a terminal, csv when piped or when --output "
        "is a device or FIFO].",
    )
    output: FilePath | None = Field(
        None,
        description="Write the results to this file (complete or not at all) instead of stdout.",
    )
    batch_size: int = Field(
        64, ge=1, le=65536, description="Images per forward pass and per decoding job."
    )
    workers: int = Field(0, ge=0, le=512, description="Decoding processes; 0 = all cores.")
    threshold: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Two classes: the second (pneumonia) when its probability is at least this.",
    )
    ood_threshold: float | None = Field(
        None,
        gt=0.0,
        lt=1e6,
        description="Flag an image (ood = true) when its out-of-distribution score is above this "
        "\\[default: the model's own, which flags 5% of its val split].",
    )
    fail_on_ood: bool = Field(
        False, description="Exit 4 when any image is flagged as unlike the model's training X-rays."
    )
    max_ood_share: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Exit 4 only when more than this share (0 to 1) of the classified images is "
        "flagged: about 5% of X-rays like the training ones are, by design. \\[default: none]",
    )
    device: str = Field(
        "auto",
        description="auto or cpu: the CPU (decoding dominates at 64 px); cuda, cuda:N or mps: "
        "torch on that device.",
    )
    engine: Engine = Field(
        "numpy",
        description="On the CPU: numpy starts in under a second (no torch import); torch starts "
        "3-4 s later and classifies long lists about 18% faster.",
    )
    adapt: Literal["none", "bn"] = Field(
        "none",
        description="bn: first recompute the classifier's BatchNorm statistics on these images "
        "(no labels used; transductive; needs 32 or more images; uses the torch engine).",
    )
    sort_into: FolderPath | None = Field(
        None,
        description="Also copy each classified input into DIR/<label>/; a rerun replaces what it "
        "wrote, and folder scans leave DIR out.",
    )
    ood_folder: bool = Field(
        True,
        description="With --sort-into: put flagged images into DIR/ood/ (their labels are not "
        "reliable) rather than under their labels.",
    )
    link: bool = Field(
        False,
        description="With --sort-into: hard-link instead of copying (a symbolic link where the "
        "file system refuses hard links).",
    )
    examples: bool = Field(
        False,
        description="Also classify the 8 example X-rays shipped with threengan (Kermany et al., "
        "CC BY 4.0; `threengan info` shows where).",
    )
    shard: tuple[int, int] | None = Field(
        None,
        description="I/N: classify only the I-th of N contiguous slices of the expanded input "
        "list (a SLURM array task, a Kubernetes job); the shards' outputs concatenated in order "
        "equal one unsharded run.",
    )
    allow_empty: bool = Field(
        False,
        description="Inputs without a single image file (an empty folder, a pattern that matches "
        "nothing, nothing on stdin) are a success: exit 0 and no rows (a CSV gets its header). A "
        "path that does not exist is still an error.",
    )
    heatmaps: FolderPath | None = Field(
        None,
        description="Also write, per classified image, a PNG of it with the classifier's evidence "
        "for its label overlaid into DIR, named in a heatmap column (numpy or onnx engine).",
    )
    report: FilePath | None = Field(
        None,
        description="Also write one self-contained HTML page for the batch: counts, histograms "
        "and a grid of thumbnails, sortable and filterable (works offline).",
    )

    @field_validator("shard", mode="before")
    @classmethod
    def _slice(cls, value: Any) -> Any:
        """``3/10`` (a flag, or a string in a settings file)."""
        return parse_shard(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _link_needs_folders(self, info: ValidationInfo) -> ClassifySettings:
        if self.link and self.sort_into is None and not _file_alone(info):
            raise ValueError("--link goes with --sort-into DIR")
        return self


class EvaluateSettings(Section):
    split: Literal["train", "val", "test"] | None = Field(
        None,
        description="train, val or test, of a prepared dataset or of split data \\[default: test].",
    )
    threshold: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Two classes: call the second (pneumonia) from this probability on "
        "\\[default: the model's stored threshold, else 0.5].",
    )
    threshold_from: Literal["val"] | None = Field(
        None,
        description="val: choose the threshold on the prepared dataset's val split by "
        "--threshold-rule, store it in the checkpoint (classify then uses it), and evaluate "
        "with it.",
    )
    threshold_rule: ThresholdRule = Field(
        "youden",
        description="youden (sensitivity + specificity - 1) or balanced-accuracy; for two "
        "classes both choose the same threshold.",
    )
    batch_size: int = Field(64, ge=1, description="Images per forward pass and per decoding job.")
    workers: int = Field(0, ge=0, description="Decoding processes; 0 = all cores.")
    device: str = Field(
        "auto", description="auto or cpu (NumPy engine, as classify), cuda, cuda:N or mps."
    )
    engine: Engine = Field("numpy", description="On the CPU: numpy or torch, as classify.")
    ood_threshold: float | None = Field(
        None,
        gt=0.0,
        lt=1e6,
        description="Flag images whose out-of-distribution score is above this \\[default: the "
        "model's own, which flags 5% of its val split].",
    )
    plot: FolderPath | None = Field(
        None,
        description="Write roc.png, confusion.png, reliability.png and (for a model with "
        "out-of-distribution statistics) ood_scores.png to this folder (needs the plot extra).",
    )

    @model_validator(mode="after")
    def _one_threshold(self) -> EvaluateSettings:
        if self.threshold is not None and self.threshold_from is not None:
            raise ValueError("give either --threshold or --threshold-from, not both")
        return self


class GenerateSettings(Section):
    count: int = Field(64, ge=1, le=1_000_000, description="Images to make.")
    out: FolderPath | None = Field(
        None,
        description="Folder for gen_00000.png ...; must not exist or be empty "
        "\\[default: ./generated, unless only --grid is given].",
    )
    grid: FilePath | None = Field(
        None, description="Also write a PNG grid of the first (up to 64) images."
    )
    seed: int = Field(0, ge=0, description="Same seed, same images.")
    label: bool = Field(
        False,
        description="Label each image with the classifier: one sub-folder per class, uncertain/ "
        "below --tau, and labels.csv.",
    )
    tau: float = Field(
        0.9, ge=0.0, le=1.0, description="With --label: least top probability to count as labelled."
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")

    @property
    def folder(self) -> Path | None:
        """Where the images go: ``out``, else ./generated unless only a grid is asked for."""
        return self.out if self.out is not None or self.grid is not None else Path("generated")

    @model_validator(mode="after")
    def _labels_need_folders(self, info: ValidationInfo) -> GenerateSettings:
        if self.label and self.folder is None and not _file_alone(info):
            raise ValueError("--label sorts images into folders: give --out DIR as well")
        return self
