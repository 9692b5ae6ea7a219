"""Scan a source into items: a folder of class folders, a Kaggle-style ``train/ val/ test/``
tree, a ``path,label[,split]`` CSV or a MedMNIST ``.npz``; with the class names, what was
skipped and why, and each file's patient id where its name carries one. Nothing is decoded
here (:mod:`datasets` does that, then checks, de-duplicates, splits and writes)."""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from threengan_cli.core.errors import Failure
from threengan_cli.data import images
from threengan_cli.data.walk import image_files, is_system_file

SPLITS = ("train", "val", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
NOT_AN_IMAGE = "not an image file"
LINKED_FOLDER = "link to a folder (not followed)"
OTHER_FOLDER = "folder outside train/, val/, test/"
# Skip reasons that are not unreadable images, so never trip --strict.
HARMLESS_SKIPS = frozenset({NOT_AN_IMAGE, LINKED_FOLDER, OTHER_FOLDER})
_KERMANY_PATIENT = (
    (re.compile(r"^(?:NORMAL2-)?IM-(\d+)-"), "IM-"),
    (re.compile(r"^person(\d+)_"), "person"),
)


class DatasetError(Failure):
    """A source or prepared dataset that cannot be used as a whole; one line for the user."""


# ------------------------------------------------------------------------------ sources
@dataclass
class Item:
    path: str  # as recorded in the manifest (relative to the source where possible)
    label: int
    split: str
    read: str | int = ""  # absolute file path, or the row index in an npz split
    patient: str | None = None
    sha256: str = ""


@dataclass
class Source:
    kind: str
    classes: list[str]
    items: list[Item]
    skipped: list[tuple[str, str]]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # npz: split -> images
    fingerprint: str = ""  # source_fingerprint, taken before decoding


def _visible_dirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DatasetError(f"cannot list {folder}: {exc.strerror or exc}") from None
    return [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]


def _loose_files(folder: Path, source: Path, why: str) -> list[tuple[str, str]]:
    """Files lying beside the class folders: skipped, with the reason."""
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_system_file(entry.name):
            continue
        if entry.is_file() or (entry.is_symlink() and not entry.is_dir()):
            rel = _rel(Path(entry.path), source)
            out.append((rel, why if images.is_image_file(entry.path) else NOT_AN_IMAGE))
    return out


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _walk_class(folder: Path, label: int, split: str, source: Path, items, skipped) -> None:
    """Every file under one class folder; links to folders are not followed (no loops)."""
    top = str(folder)
    rel_top = _rel(folder, source)

    def rel(path: str) -> str:  # plain strings: this runs once per file (5,860 for Kermany)
        return rel_top + path[len(top) :].replace(os.sep, "/")

    def on_error(where: str, exc: OSError) -> None:
        reason = "permission denied" if isinstance(exc, PermissionError) else "unreadable folder"
        skipped.append((_rel(Path(exc.filename or where), source), reason))

    for full in image_files(
        top,
        follow_links=False,
        on_other=lambda path: skipped.append((rel(path), NOT_AN_IMAGE)),
        on_link=lambda path: skipped.append((rel(path), LINKED_FOLDER)),
        on_error=on_error,
    ):
        items.append(Item(rel(full), label, split, full))


def _scan_folder(source: Path, need_train: bool = True) -> Source:
    top = _visible_dirs(source)
    by_split: dict[str, Path] = {}
    others: list[Path] = []
    for d in top:
        alias = SPLIT_ALIASES.get(d.name.lower())
        if alias and alias not in by_split:
            by_split[alias] = d
        else:
            others.append(d)
    if "train" in by_split:
        kind = "split-folders"
        skipped = _loose_files(source, source, "outside train/, val/, test/")
        skipped += [(_rel(d, source), OTHER_FOLDER) for d in others]
        class_dirs = {split: _visible_dirs(d) for split, d in by_split.items()}
        for d in by_split.values():
            skipped += _loose_files(d, source, "outside a class folder")
    elif by_split and not need_train:  # labelled data to score, e.g. a test/ folder alone
        kind = "split-folders"
        skipped = _loose_files(source, source, "outside train/, val/, test/")
        skipped += [(_rel(d, source), OTHER_FOLDER) for d in others]
        class_dirs = {split: _visible_dirs(d) for split, d in by_split.items()}
    elif by_split:
        raise DatasetError(
            f"{source} has {'/, '.join(sorted(by_split))}/ folders but no train/ folder"
        )
    else:
        kind = "class-folders"
        skipped = _loose_files(source, source, "outside a class folder")
        class_dirs = {"train": top}
    classes = sorted({d.name for dirs in class_dirs.values() for d in dirs})
    in_train = {d.name for d in class_dirs.get("train", [])}
    for split in ("val", "test") if need_train else ():
        unknown = sorted({d.name for d in class_dirs.get(split, [])} - in_train)
        if unknown:  # as the CSV path: a class must be learnt before it can be tested
            raise DatasetError(
                f"{source}: class {unknown[0]!r} is in {split}/ but not in train/ "
                f"(train classes: {', '.join(sorted(in_train)) or 'none'})"
            )
    if not classes:
        raise DatasetError(
            f"{source} holds no class folders: expected one sub-folder per class "
            "(or train/, val/, test/ folders that each hold class folders)"
        )
    index = {name: i for i, name in enumerate(classes)}
    items: list[Item] = []
    for split, dirs in class_dirs.items():
        for d in dirs:
            _walk_class(d, index[d.name], split, source, items, skipped)
    return Source(kind, classes, items, skipped)


def _scan_csv(source: Path, need_train: bool = True) -> Source:
    base = source.parent
    try:
        with open(source, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read CSV {source}: {exc}") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DatasetError(f"CSV {source} is empty")
    header = [cell.strip().lower() for cell in rows[0]]
    if "path" not in header or "label" not in header:
        raise DatasetError(
            f"CSV {source} needs a header row with path,label[,split] (got {','.join(header)})"
        )
    ip, il = header.index("path"), header.index("label")
    isp = header.index("split") if "split" in header else None
    parsed: list[tuple[int, str, str, str]] = []

    def cell(row: list[str], i: int | None) -> str:
        return row[i].strip() if i is not None and i < len(row) else ""

    for n, row in enumerate(rows[1:], start=2):
        path, label, split = cell(row, ip), cell(row, il), cell(row, isp).lower() or "train"
        if not path:
            raise DatasetError(f"CSV {source} line {n}: empty path")
        if not label:
            raise DatasetError(f"CSV {source} line {n}: empty label")
        if split not in SPLIT_ALIASES:
            raise DatasetError(f"CSV {source} line {n}: unknown split {split!r} (train, val, test)")
        parsed.append((n, path, label, SPLIT_ALIASES[split]))
    train_labels = sorted(
        {label for _, _, label, split in parsed if split == "train" or not need_train}
    )
    if not train_labels and need_train:
        raise DatasetError(f"CSV {source} has no train rows")
    for n, _, label, _ in parsed:
        if label not in train_labels:
            raise DatasetError(
                f"CSV {source} line {n}: unknown label {label!r} "
                f"(train labels: {', '.join(train_labels)})"
            )
    index = {name: i for i, name in enumerate(train_labels)}
    items = []
    for _, path, label, split in parsed:
        full = Path(path).expanduser()
        full = full if full.is_absolute() else base / full
        items.append(Item(_rel(full, base), index[label], split, str(full)))
    return Source("csv", train_labels, items, [])


def _scan_npz(source: Path) -> Source:
    try:
        with np.load(source, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except Exception as exc:  # zipfile, ValueError, OSError: all mean "not a usable npz"
        raise DatasetError(f"cannot read {source} as a .npz file: {exc}") from None
    if "train_images" not in arrays or "train_labels" not in arrays:
        raise DatasetError(
            f"{source} has no train_images/train_labels (keys: {', '.join(sorted(arrays))})"
        )
    labels_by_split: dict[str, np.ndarray] = {}
    image_arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        if f"{split}_images" not in arrays:
            continue
        imgs, labels = arrays[f"{split}_images"], arrays.get(f"{split}_labels")
        if labels is None:
            raise DatasetError(f"{source} has {split}_images but no {split}_labels")
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise DatasetError(
                f"{source}: {split}_labels has shape {labels.shape}; "
                "multi-label data is not supported"
            )
        if imgs.ndim not in (3, 4) or len(imgs) != len(labels):
            raise DatasetError(
                f"{source}: {split}_images shape {imgs.shape} does not match {len(labels)} labels"
            )
        if labels.dtype.kind not in "iuf" or (
            labels.dtype.kind == "f" and not np.all(np.isfinite(labels) & (labels % 1 == 0))
        ):
            raise DatasetError(
                f"{source}: {split}_labels must be whole numbers (got {labels.dtype} values)"
            )
        if len(labels) and labels.min() < 0:
            raise DatasetError(
                f"{source}: {split}_labels holds a negative label ({labels.min()}); labels "
                "are class numbers 0, 1, ..."
            )
        labels_by_split[split] = labels.astype(np.int64)
        image_arrays[split] = imgs
    values = sorted({int(v) for labels in labels_by_split.values() for v in labels})
    index = {v: i for i, v in enumerate(values)}
    items = [
        Item(f"{source.name}:{split}/{i}", index[int(v)], split, i)
        for split, labels in labels_by_split.items()
        for i, v in enumerate(labels)
    ]
    return Source("npz", [str(v) for v in values], items, [], image_arrays)


def scan(source: Path, need_train: bool = True) -> Source:
    """The items of ``source``. Data to train on (``need_train``) must have train images,
    and every class of its val and test images among theirs; labelled data that is only
    scored (``evaluate``) needs neither: its classes are all the labels it holds."""
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source} does not exist")
    if source.is_dir():
        return _scan_folder(source, need_train)
    if not source.is_file():  # a FIFO or a device would hang or never end
        raise DatasetError(f"{source} is not a regular file, a folder, a .npz or a .csv")
    suffix = source.suffix.lower()
    if suffix == ".npz":
        return _scan_npz(source)
    if suffix == ".csv":
        return _scan_csv(source, need_train)
    raise DatasetError(f"{source} is not a folder, a .npz or a .csv file")


def patient_id(filename: str, pattern: str | None = None) -> str | None:
    """The patient id read from a file name, or None (see the module docstring)."""
    name = os.path.basename(filename)
    if pattern is not None:
        found = re.search(pattern, name)
        return found.group(1) if found and found.group(1) else None
    for regex, prefix in _KERMANY_PATIENT:
        found = regex.match(name)
        if found:
            return f"{prefix}{found.group(1)}"
    return None


def source_fingerprint(source: Path, src: Source) -> str:
    """What a source is, cheaply: sha256 over each of its files' path, size and
    modification time (the file itself for .npz and the CSV as well), and the skipped ones'
    names. Any file added, removed, replaced or touched changes it; nothing is decoded."""
    files = {str(source)} if source.is_file() else set()
    files |= {item.read for item in src.items if isinstance(item.read, str)}
    digest = hashlib.sha256()
    for name in sorted(files):
        try:
            st = os.stat(name)
            digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{name}\0missing\n".encode())
    for path, reason in sorted(src.skipped):
        digest.update(f"skipped\0{path}\0{reason}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------ patients
def patient_group(item: Item) -> str:
    return item.patient if item.patient is not None else f"file:{item.path}"


def carve_val(train: list[Item], fraction: float, seed: int, n_classes: int) -> set[int]:
    """Indices (into ``train``) of a stratified, patient-grouped, seeded validation carve."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(train):
        groups[patient_group(item)].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for key in sorted(groups):
        labels = Counter(train[i].label for i in groups[key])
        major = min(labels, key=lambda c: (-labels[c], c))
        by_class[major].append(key)
    per_class = Counter(item.label for item in train)
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for c in range(n_classes):
        keys = by_class.get(c, [])
        target = round(fraction * per_class.get(c, 0))
        taken = 0
        for k in rng.permutation(len(keys)):
            if taken >= target:
                break
            members = groups[keys[k]]
            chosen.update(members)
            taken += sum(1 for i in members if train[i].label == c)
    return chosen
