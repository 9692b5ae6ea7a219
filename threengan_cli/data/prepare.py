"""Prepare a dataset once: decode a source, check its integrity, write one folder.

``prepare`` reads a source (a folder of class folders, a folder of train/val/test folders
of class folders, a MedMNIST ``.npz`` or a ``path,label[,split]`` CSV), decodes every image
with :func:`threengan_cli.data.images.load_image` on all cores, checks the data's integrity and
writes one folder:

- ``data.safetensors``: ``images`` uint8 (N, H, W), ``labels`` int64 (N,), ``split`` uint8
  (N,) with 0 = train, 1 = val, 2 = test; rows sorted by split, then source path.
- ``manifest.json``: format version, source, settings, class names, counts, the report's
  facts, the sha256 of ``data.safetensors``, and for every row its source path, sha256,
  label, split and patient id.
- ``settings.json``: the resolved prepare settings.

Integrity rules, in this order:

1. Exact duplicates (same sha256 of the file bytes; of the pixel array for ``.npz``)
   inside test/ are reported and kept: the 624-image Kermany test set is what published
   numbers use.
2. A train/val image whose bytes also occur in test is removed from train/val (leakage).
3. Exact duplicates inside train + val are dropped, keeping the first in sorted path order.
4. Validation: a source val split with at least ``min_val`` images is kept (train images
   of its patients move to val, so no patient is on both sides). A smaller one (Kermany
   ships 16 images) joins train, and ``val_fraction`` of train is carved out instead,
   stratified by class, grouped by patient, drawn by ``seed``.

Patient ids come from file names. Kermany: ``person<id>_...`` (pneumonia) and
``IM-<id>-...`` / ``NORMAL2-IM-<id>-...`` (normal). Whether ``NORMAL2-IM-0115`` and
``IM-0115`` are one patient cannot be read from the data (328 numbers occur in both
series), so they are treated as one: a coarser group can only cost a little randomness
in the split, while a wrong split would leak a patient between train and val. A file
without a readable id is its own group. ``patient_pattern`` (a regex whose first group is
the id, searched in the file name) replaces these rules.

The engine never prints; progress goes through the ``on_progress(done, total)`` callback.
Nothing here imports torch, so preparing stays quick to start.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from threengan_cli import __version__
from threengan_cli.core import fileio
from threengan_cli.core.config import dump
from threengan_cli.core.settings import PrepareSettings
from threengan_cli.data import images
from threengan_cli.data.datasets import FORMAT_VERSION, PrepareReport, load_prepared, read_manifest
from threengan_cli.data.sources import (
    HARMLESS_SKIPS,
    SPLIT_CODES,
    SPLITS,
    DatasetError,
    Item,
    Source,
    carve_val,
    patient_group,
    patient_id,
    scan,
    source_fingerprint,
)
from threengan_cli.data.workers import decode_files


def _decode_npz(src: Source, size: int, fit: str, on_progress) -> list[np.ndarray]:
    total = len(src.items)
    decoded = []
    for done, item in enumerate(src.items, start=1):
        raw = np.ascontiguousarray(src.arrays[item.split][item.read])
        item.sha256 = hashlib.sha256(raw.tobytes()).hexdigest()
        decoded.append(images.from_array(raw, size, fit))
        if on_progress:
            on_progress(done, total)
    return decoded


# ------------------------------------------------------------------------------ prepare
_NO_EFFECT = ("workers",)  # settings that cannot change what prepare writes


_REPORTED_PAIRS = (
    "skipped",
    "duplicates_dropped",
    "test_duplicates",
    "leakage_removed",
    "label_conflicts",
)
# What the manifest keeps of the report, so that an "up to date" run reports the same facts
_REPORTED = (
    *_REPORTED_PAIRS,
    "val_carved",
    "val_note",
    "source_val_images",
    "val_patient_moves",
    "patients",
    "patients_shared_train_test",
)


def _up_to_date(out: Path, source: Path, settings: PrepareSettings) -> PrepareReport | None:
    """The report of ``out`` when it was prepared from this very source (same files, sizes
    and times: :func:`source_fingerprint`) with the same settings: the facts of the run that
    wrote it, marked ``up_to_date``; else ``None`` (and the caller refuses to replace it
    without --force, naming what differs)."""
    try:
        manifest = read_manifest(out)
    except DatasetError:
        return None
    then = {k: v for k, v in manifest.get("settings", {}).items() if k not in _NO_EFFECT}
    now = {k: v for k, v in settings.model_dump(mode="json").items() if k not in _NO_EFFECT}
    differs = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
    if manifest.get("source") != str(source):
        why = f"from another source ({manifest.get('source')})"
    elif differs:
        why = f"with other settings ({differs[0]} = {then.get(differs[0])!r} there)"
    elif "source_fingerprint" not in manifest:
        why = "by an earlier threengan, which did not record its source's files"
    elif manifest.get("source_fingerprint") != source_fingerprint(source, scan(source)):
        why = "and its source changed since (files added, removed or modified)"
    else:
        report = manifest.get("report", {})
        facts = {k: report[k] for k in _REPORTED if k in report}
        for key in _REPORTED_PAIRS:
            facts[key] = [tuple(pair) for pair in facts.get(key, [])]
        return PrepareReport(
            path=out,
            source=str(source),
            source_kind=str(manifest.get("source_kind", "")),
            classes=list(manifest.get("classes", [])),
            counts=manifest.get("counts", {}),
            image_size=int(manifest.get("image_size", settings.image_size)),
            data_sha256=str(manifest.get("data_sha256", "")),
            up_to_date=True,
            **facts,
        )
    raise DatasetError(f"{out} was prepared {why}; use --force to replace it")


def _data_intact(out: Path, report: PrepareReport) -> bool:
    """Whether ``data.safetensors`` is the file prepare wrote: its sha256 where the manifest
    records one (a second's work for Kermany's 24 MB), else whether it loads and matches the
    manifest (datasets of an earlier threengan)."""
    data = out / "data.safetensors"
    if report.data_sha256:
        try:
            return fileio.sha256_of(data) == report.data_sha256
        except OSError:
            return False
    try:
        load_prepared(out)
    except DatasetError:
        return False
    return True


def _check_out(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise DatasetError(f"{out} already exists; use --force to replace it")
    if not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists()):
        raise DatasetError(
            f"{out} exists and is not a prepared dataset; refusing to replace it even with --force"
        )


def prepare(
    source: Path,
    out: Path,
    settings: PrepareSettings,
    force: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> PrepareReport:
    """Read ``source``, check it, and write a prepared dataset folder at ``out``: scan,
    decode, check, resolve label conflicts, keep test whole and drop leakage and duplicates
    from train/val, choose the val split, write."""
    started = time.perf_counter()
    source, out = Path(source).expanduser().resolve(), Path(out).expanduser()
    repair = False
    if out.exists() and not force:
        current = _up_to_date(out, source, settings)
        if current is not None and _data_intact(out, current):
            current.seconds = round(time.perf_counter() - started, 3)
            return current
        # Its own dataset of this source and settings, with its data file damaged (cut
        # short, changed): written again in place, and the report says so.
        repair = force = current is not None
    _check_out(out, force)
    _writable_parent(out)
    src = scan(source)
    src.fingerprint = source_fingerprint(source, src)
    _name_classes(src, settings.class_names)
    kept_items, skipped = _decode_items(src, settings, on_progress)
    present = _check_readable(source, src, kept_items, skipped, settings)
    kept_items, conflicts = _drop_label_conflicts(source, src, kept_items, present)
    test, test_duplicates, leakage, dropped, trainval = _integrity(kept_items)
    train, val, split = _val_split(trainval, settings, len(src.classes))

    final = (
        sorted(train, key=lambda i: i.path)
        + sorted(val, key=lambda i: i.path)
        + sorted(test, key=lambda i: i.path)
    )
    counts = {s: dict.fromkeys(src.classes, 0) for s in SPLITS}
    for item in final:
        counts[item.split][src.classes[item.label]] += 1
    patients = {
        s: len({i.patient for i in final if i.split == s and i.patient is not None}) for s in SPLITS
    }
    train_patients = {i.patient for i in final if i.split == "train" and i.patient}
    test_patients = {i.patient for i in final if i.split == "test" and i.patient}

    report = PrepareReport(
        path=out,
        source=str(source),
        source_kind=src.kind,
        classes=list(src.classes),
        counts=counts,
        image_size=settings.image_size,
        skipped=skipped,
        duplicates_dropped=dropped,
        test_duplicates=test_duplicates,
        leakage_removed=leakage,
        label_conflicts=conflicts,
        patients=patients,
        patients_shared_train_test=len(train_patients & test_patients),
        **split,
    )
    report.repaired = repair
    _write(out, final, src, settings, report, force)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _name_classes(src: Source, names: list[str] | None) -> None:
    """``--class-names``: the source's classes renamed, in their order (npz: label 0 first)."""
    if names is None:
        return
    if len(names) != len(src.classes):
        raise DatasetError(
            f"--class-names gives {len(names)} names, but the source has {len(src.classes)} "
            f"classes ({', '.join(src.classes)}, in that order)"
        )
    src.classes = list(names)


def _decode_items(src: Source, settings: PrepareSettings, on_progress):
    """Decode (and hash) every image; the items that decoded, each carrying its pixels in
    ``read``, and the skipped files with their reasons."""
    skipped = list(src.skipped)
    size, fit = settings.image_size, settings.fit
    workers = settings.workers or os.cpu_count() or 1
    if src.kind == "npz":
        decoded = _decode_npz(src, size, fit, on_progress)
        kept_items, pixels = src.items, decoded
    else:
        results = decode_files([str(i.read) for i in src.items], size, fit, workers, on_progress)
        kept_items, pixels = [], []
        for item, (arr, digest, reason) in zip(src.items, results, strict=True):
            if arr is None:
                skipped.append((item.path, reason))
                continue
            item.sha256 = digest
            kept_items.append(item)
            pixels.append(arr)
    for item, arr in zip(kept_items, pixels, strict=True):
        item.read = arr  # type: ignore[assignment]  # the decoded pixels travel with the item
        if src.kind != "npz":
            item.patient = patient_id(item.path, settings.patient_pattern)
    return kept_items, skipped


def _check_readable(source: Path, src: Source, kept_items, skipped, settings) -> list[int]:
    """Refuse a source with nothing readable, unreadable files under --strict, or a class
    without readable images; the classes present."""
    unreadable = [s for s in skipped if s[1] not in HARMLESS_SKIPS]
    if not kept_items:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DatasetError(
            f"nothing readable in {source}: {len(skipped)} files skipped{first}"
            if skipped
            else f"no images found in {source}"
        )
    if settings.strict and unreadable:
        raise DatasetError(
            f"{len(unreadable)} image files could not be read and --strict is set "
            f"(first: {unreadable[0][0]}: {unreadable[0][1]}); nothing was written"
        )
    present = sorted({item.label for item in kept_items})
    if len(present) < 2:
        only = src.classes[present[0]]
        raise DatasetError(
            f"only one class ({only}) has readable images in {source}; at least two are needed"
        )
    empty = [src.classes[c] for c in range(len(src.classes)) if c not in present]
    if empty:
        raise DatasetError(f"class {empty[0]} has no readable images in {source}")
    return present


def _drop_label_conflicts(source: Path, src: Source, kept_items, present: list[int]):
    """One image (same bytes) under two labels: which label is right cannot be told, so no
    copy of it is trained on; test keeps its copies (the standard test set stays whole), and
    every copy is reported. A class left without train images is refused."""
    labels_of: dict[str, set[int]] = defaultdict(set)
    for item in kept_items:
        labels_of[item.sha256].add(item.label)
    conflicts = []
    for item in sorted(kept_items, key=lambda i: i.path):
        if len(labels_of[item.sha256]) > 1:
            others = sorted(src.classes[c] for c in labels_of[item.sha256] - {item.label})
            kept = "kept in test" if item.split == "test" else "removed"
            conflicts.append(
                (item.path, f"labelled {src.classes[item.label]}, also {', '.join(others)}; {kept}")
            )
    kept_items = [i for i in kept_items if i.split == "test" or len(labels_of[i.sha256]) == 1]
    learnt = {item.label for item in kept_items if item.split != "test"}
    unlearnt = [src.classes[c] for c in present if c not in learnt]
    if unlearnt:
        why = f" ({len(conflicts)} label conflicts removed)" if conflicts else ""
        raise DatasetError(
            f"class {unlearnt[0]} has no train images in {source}{why}; "
            "a class needs train images to be learnt"
        )
    return kept_items, conflicts


def _integrity(kept_items):
    """Test duplicates kept (and listed), train/val images also in test removed (leakage),
    train/val duplicates dropped: (test, test_duplicates, leakage, dropped, trainval)."""
    kept_items.sort(key=lambda i: (SPLIT_CODES[i.split], i.path))
    test = [i for i in kept_items if i.split == "test"]
    test_first: dict[str, str] = {}
    test_duplicates = []
    for item in test:
        if item.sha256 in test_first:
            test_duplicates.append((item.path, test_first[item.sha256]))
        else:
            test_first[item.sha256] = item.path
    seen: dict[str, str] = {}
    leakage, dropped, trainval = [], [], []
    for item in sorted((i for i in kept_items if i.split != "test"), key=lambda i: i.path):
        if item.sha256 in test_first:
            leakage.append((item.path, test_first[item.sha256]))
        elif item.sha256 in seen:
            dropped.append((item.path, seen[item.sha256]))
        else:
            seen[item.sha256] = item.path
            trainval.append(item)
    return test, test_duplicates, leakage, dropped, trainval


def _val_split(trainval, settings: PrepareSettings, n_classes: int):
    """(train, val, the report's val fields): the source's val split when it has at least
    ``min_val`` images (its patients' train images join it), else one carved from train."""
    train = [i for i in trainval if i.split == "train"]
    source_val = [i for i in trainval if i.split == "val"]
    val_carved, moves = False, 0
    if source_val and len(source_val) >= settings.min_val:
        val = source_val
        val_groups = {patient_group(i) for i in val}
        movers = [i for i in train if patient_group(i) in val_groups]
        moves = len(movers)
        for item in movers:
            item.split = "val"
        train = [i for i in train if i.split == "train"]
        val = val + movers
        note = f"kept the source val split ({len(source_val)} images)"
        if moves:
            note += f"; {moves} train images of its patients moved to val"
    elif settings.val_fraction > 0:
        for item in source_val:
            item.split = "train"
        train = sorted(train + source_val, key=lambda i: i.path)
        chosen = carve_val(train, settings.val_fraction, settings.seed, n_classes)
        val = [item for i, item in enumerate(train) if i in chosen]
        train = [item for i, item in enumerate(train) if i not in chosen]
        for item in val:
            item.split = "val"
        val_carved = True
        note = (
            f"carved {len(val)} images ({settings.val_fraction:.0%} of train, stratified, "
            f"patient-grouped, seed {settings.seed})"
        )
        if source_val:
            note += (
                f"; the source val split ({len(source_val)} images, fewer than min_val "
                f"{settings.min_val}) joined train first"
            )
    else:
        val = source_val
        note = (
            f"kept the source val split ({len(val)} images)"
            if val
            else "no val split (val_fraction is 0)"
        )
    split = {
        "val_carved": val_carved,
        "val_note": note,
        "source_val_images": len(source_val),
        "val_patient_moves": moves,
    }
    return train, val, split


def _write(
    out: Path,
    final: list[Item],
    src: Source,
    settings: PrepareSettings,
    report: PrepareReport,
    force: bool,
) -> None:
    from safetensors.numpy import save_file

    tensors = {
        "images": np.stack([i.read for i in final]).astype(np.uint8),  # (N, H, W)
        "labels": np.array([i.label for i in final], dtype=np.int64),
        "split": np.array([SPLIT_CODES[i.split] for i in final], dtype=np.uint8),
    }
    summary = report.to_dict()
    manifest = {
        "format_version": FORMAT_VERSION,
        "threengan_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": report.source,
        "source_kind": src.kind,
        "source_fingerprint": src.fingerprint,
        "settings": settings.model_dump(mode="json"),
        "classes": list(src.classes),
        "image_size": settings.image_size,
        "counts": report.counts,
        "report": {k: summary[k] for k in _REPORTED},
        "images": [
            {
                "path": i.path,
                "sha256": i.sha256,
                "label": i.label,
                "class": src.classes[i.label],
                "split": i.split,
                "patient": i.patient,
            }
            for i in final
        ],
    }
    from safetensors import SafetensorError

    try:
        with fileio.atomic_dir(out, force=force) as tmp:
            save_file(tensors, str(tmp / "data.safetensors"), metadata={"format_version": "1"})
            # safetensors creates its file 0600, whatever the umask says
            os.chmod(tmp / "data.safetensors", 0o666 & ~fileio.umask())
            digest = fileio.sha256_of(tmp / "data.safetensors")
            report.data_sha256 = manifest["data_sha256"] = digest
            # compact: the indenting encoder is pure Python and took 0.5 s on Kermany's rows
            (tmp / "manifest.json").write_text(json.dumps(manifest) + "\n")
            (tmp / "settings.json").write_text(dump(settings))
    except FileExistsError:
        raise DatasetError(
            f"{out} was written by another prepare while this one ran; it is kept as that one "
            "left it (use --force to replace it)"
        ) from None
    except (OSError, SafetensorError) as exc:  # a full disk reaches safetensors first
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DatasetError(f"cannot write {out}: {reason}; nothing was written") from None


def _writable_parent(out: Path) -> None:
    """Fail before decoding anything when the dataset could not be written at all."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"cannot create {out.parent}: {exc.strerror or exc} (choose --out, or set "
            "THREENGAN_HOME to a writable folder)"
        ) from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise DatasetError(
            f"cannot write in {out.parent}: it is read-only (choose --out, or set "
            "THREENGAN_HOME to a writable folder)"
        )
