"""A prepared dataset (``threengan prepare``'s folder) loaded whole into memory for training,
and the list of those prepared under the data dir. :mod:`prepare` writes them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from threengan_cli.data.sources import (
    HARMLESS_SKIPS,
    SPLIT_CODES,
    SPLITS,
    DatasetError,
)

FORMAT_VERSION = 1


@dataclass
class PrepareReport:
    path: Path
    source: str
    source_kind: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    image_size: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates_dropped: list[tuple[str, str]] = field(default_factory=list)
    test_duplicates: list[tuple[str, str]] = field(default_factory=list)
    leakage_removed: list[tuple[str, str]] = field(default_factory=list)
    label_conflicts: list[tuple[str, str]] = field(default_factory=list)
    val_carved: bool = False
    val_note: str = ""
    source_val_images: int = 0
    val_patient_moves: int = 0
    patients: dict[str, int] = field(default_factory=dict)
    patients_shared_train_test: int = 0
    seconds: float = 0.0
    up_to_date: bool = False  # the same source and settings were prepared already: no work
    data_sha256: str = ""  # of data.safetensors as written, checked by the "up to date" test
    repaired: bool = False  # data.safetensors was damaged and was prepared again

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    @property
    def unreadable(self) -> list[tuple[str, str]]:
        """Skipped files that looked like images but could not be used."""
        return [s for s in self.skipped if s[1] not in HARMLESS_SKIPS]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["total"] = self.total
        for key in (
            "skipped",
            "duplicates_dropped",
            "test_duplicates",
            "leakage_removed",
            "label_conflicts",
        ):
            data[key] = [list(pair) for pair in data[key]]
        return data


@dataclass
class PreparedDataset:
    images: np.ndarray  # uint8 (N, H, W)
    labels: np.ndarray  # int64 (N,)
    split: np.ndarray  # uint8 (N,), 0 train / 1 val / 2 test
    classes: list[str]
    manifest: dict
    path: Path

    def subset(self, split_name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of one split: ``train``, ``val`` or ``test``."""
        if split_name not in SPLIT_CODES:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split_name!r}")
        rows = self.split == SPLIT_CODES[split_name]
        return self.images[rows], self.labels[rows]

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


# ------------------------------------------------------------------------------ loading
def read_manifest(path: Path) -> dict:
    file = path / "manifest.json"
    if not file.is_file():
        raise DatasetError(
            f"{path} is not a prepared dataset (no manifest.json); run `threengan prepare` first"
        )
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{file} is corrupt ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format_version"), int):
        raise DatasetError(f"{file} is corrupt (no format_version)")
    if manifest["format_version"] > FORMAT_VERSION:
        raise DatasetError(
            f"{path} was prepared by a newer threengan (format {manifest['format_version']}, "
            f"this one reads {FORMAT_VERSION}); upgrade threengan or prepare it again"
        )
    return manifest


def load_prepared(path: Path) -> PreparedDataset:
    """Load a prepared dataset folder whole into memory."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path / "data.safetensors"))
        imgs, labels, split = tensors["images"], tensors["labels"], tensors["split"]
    except (OSError, SafetensorError, KeyError, ValueError) as exc:
        raise DatasetError(f"{path / 'data.safetensors'} is missing or corrupt ({exc})") from None
    classes = list(manifest.get("classes") or [])
    n = len(labels)
    if (
        imgs.dtype != np.uint8
        or imgs.ndim != 3
        or len(imgs) != n
        or len(split) != n
        or labels.dtype != np.int64
        or split.dtype != np.uint8
        or len(classes) < 2
        or (n and (labels.min() < 0 or labels.max() >= len(classes) or split.max() > 2))
    ):
        raise DatasetError(f"{path} is corrupt (tensors do not match the manifest)")
    return PreparedDataset(imgs, labels, split, classes, manifest, path)


def balanced_subset(
    labels: np.ndarray,
    n: int,
    seed: int,
    num_classes: int | None = None,
    classes: list[str] | None = None,
) -> np.ndarray:
    """Indices of ``n // K`` images per class (K classes), drawn by ``seed`` without replacement.

    ``n`` must divide by K, so that the subset has the size asked for. ``classes`` names the
    classes in messages. Indices come back sorted.
    """
    labels = np.asarray(labels)
    if classes is not None:
        num_classes = len(classes)
    k = num_classes if num_classes is not None else int(labels.max()) + 1 if len(labels) else 0
    if k < 1 or n < k:
        raise DatasetError(f"a balanced subset of {n} needs at least one image per class ({k})")
    if n % k:
        lower, upper = n - n % k, n - n % k + k
        raise DatasetError(
            f"a balanced subset of {n} does not divide over {k} classes: "
            f"use a size such as {lower} or {upper}"
        )
    per = n // k
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(k):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per:
            name = classes[c] if classes is not None else str(c)
            raise DatasetError(
                f"class {name} has only {len(pool)} training images; "
                f"a balanced subset of {n} needs {per} per class"
            )
        picks.append(rng.choice(pool, per, replace=False))
    return np.sort(np.concatenate(picks))


def list_prepared(root: Path | None = None) -> list[dict]:
    """One dict per prepared dataset under ``root`` (the data dir by default)."""
    from threengan_cli.core import paths

    root = Path(root) if root is not None else paths.datasets_dir()
    if not root.is_dir():
        return []
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entry: dict[str, Any] = {"name": d.name, "path": str(d)}
        try:
            m = read_manifest(d)
        except DatasetError as exc:
            entry["error"] = str(exc)
        else:
            counts = m.get("counts", {})
            entry.update(
                classes=m.get("classes", []),
                image_size=m.get("image_size"),
                images=sum(sum(c.values()) for c in counts.values()),
                splits={s: sum(c.values()) for s, c in counts.items()},
                source=m.get("source"),
                created=m.get("created"),
            )
        found.append(entry)
    return found
