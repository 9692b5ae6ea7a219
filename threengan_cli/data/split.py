"""Split a folder of class folders BY PATIENT into what adapting a model to a site needs
(``threengan split``; docs/guide.md, "Adapting to your own X-rays"): a few labelled images
per class, a pool of unlabelled ones and a held-out set, no patient in two of them.

SOURCE holds one folder per class (``NORMAL/``, ``PNEUMONIA/``). A file's patient id is read
from its name: NIH ChestX-ray8's ``PPPPPPPP_FFF.png`` (patient, follow-up number) and
Kermany's ``IM-<patient>-<n>``, ``NORMAL2-IM-<patient>-<n>`` and
``person<patient>_<bacteria|virus>_<n>`` (read as ``prepare`` reads them), or another naming
given as a regex whose first group is the patient id, matched at the start of the name. The
output folder gets

    OUT/dataset/train/<class>/   the labelled images (``labelled`` per class)
    OUT/dataset/test/<class>/    every other patient's images, held out
    OUT/unlabelled/              ``unlabelled`` per class, in one folder, labels dropped
    OUT/split.csv                file, patient, class, group of every image

so that ``threengan prepare OUT/dataset`` makes a dataset whose train split is the labelled
images and whose test split the held-out ones, and ``train --unlabelled OUT/unlabelled``
names the pool. Patients are shuffled by ``seed``; each goes whole to the first group whose
quota (in images, per class) it still fits, else to the held-out set. A split that leaves a
class without labelled or held-out images is refused: the held-out set is how a user learns
whether the adapted model works. The images are copied; OUT appears complete or not at all.
"""

from __future__ import annotations

import csv
import random
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from threengan_cli.core import fileio
from threengan_cli.core.errors import EXIT_FAIL, EXIT_USAGE, UsageError
from threengan_cli.data import sources

NIH_PATIENT = re.compile(r"^(\d{8})_\d{3}\.\w+$")
GROUPS = ("labelled", "unlabelled", "heldout")

Patients = dict[str, list[tuple[str, Path]]]  # patient id -> [(class, path)]


class SplitError(UsageError):
    """A split that cannot be made; one line for the user. ``usage``: the request itself is
    wrong (a missing source, a bad count or pattern, an output that exists: exit 2), not the
    data (exit 1)."""

    def __init__(self, message: str, usage: bool = True):
        super().__init__(message)
        self.usage = usage
        self.exit_code = EXIT_USAGE if usage else EXIT_FAIL


@dataclass
class Split:
    classes: list[str]
    patients: Patients
    groups: dict[str, str]  # patient id -> group
    counts: dict[tuple[str, str], int]  # (group, class) -> images

    def per_group(self) -> dict[str, dict[str, int]]:
        """Images per class of each group, every group and class named (0 where none)."""
        return {g: {c: self.counts.get((g, c), 0) for c in self.classes} for g in GROUPS}


def compile_pattern(pattern: str | None) -> re.Pattern | None:
    """The ``--patient-pattern`` regex, checked: it compiles and has a group to read."""
    if pattern is None:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise SplitError(f"--patient-pattern {pattern!r} is not a valid regex ({exc})") from None
    if regex.groups < 1:
        raise SplitError(f"--patient-pattern {pattern!r} needs a group: (...) is the patient id")
    return regex


def patient_of(name: str, regex: re.Pattern | None) -> str | None:
    """The patient id in a file name (see the module docstring), or None."""
    if regex is not None:
        found = regex.match(name)
        return found.group(1) if found and found.group(1) else None
    found = NIH_PATIENT.match(name)
    return found.group(1) if found else sources.patient_id(name)


def scan(source: Path, regex: re.Pattern | None = None) -> tuple[list[str], Patients]:
    """The class names and the images by patient; a name without a patient id is an error
    (its patient would be unknown, and could end up in two groups)."""
    source = Path(source)
    if not source.exists():
        raise SplitError(f"{source} does not exist")
    if not source.is_dir():
        raise SplitError(f"{source} is not a folder: give a folder with one folder per class")
    classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise SplitError(
            f"{source}: needs one folder per class, two or more (found {classes or 'none'})",
            usage=False,
        )
    patients: Patients = defaultdict(list)
    for label in classes:
        for path in sorted((source / label).iterdir()):
            if not path.is_file() or path.name.startswith(".") or sources.is_system_file(path.name):
                continue
            patient = patient_of(path.name, regex)
            if patient is None:
                how = f"pattern {regex.pattern!r}" if regex else "NIH or Kermany names"
                raise SplitError(
                    f"{path}: no patient id in its name ({how}; --patient-pattern takes "
                    "another naming)",
                    usage=False,
                )
            patients[patient].append((label, path))
    return classes, dict(patients)


def assign(patients: Patients, quotas: dict[str, int], seed: int) -> dict[str, str]:
    """Patient id -> group: shuffled by ``seed``, each patient whole into the first group
    (labelled, then unlabelled) with room for all its images, per class; else held out."""
    order = sorted(patients)
    random.Random(seed).shuffle(order)
    filled: dict[tuple[str, str], int] = defaultdict(int)
    groups = {}
    for patient in order:
        need: dict[str, int] = defaultdict(int)
        for label, _ in patients[patient]:
            need[label] += 1
        group = next(
            (
                g
                for g in GROUPS[:2]
                if all(filled[g, label] + n <= quotas[g] for label, n in need.items())
            ),
            "heldout",
        )
        for label, n in need.items():
            filled[group, label] += n
        groups[patient] = group
    return groups


def plan(
    source: Path, labelled: int, unlabelled: int, seed: int = 0, pattern: str | None = None
) -> Split:
    """The split of ``source``, checked before anything is copied (see the module docstring)."""
    for flag, n, least in (("--labelled", labelled, 1), ("--unlabelled", unlabelled, 0)):
        if n < least:
            raise SplitError(
                f"{flag} takes a number of images per class, {least} or more (got {n})"
            )
    classes, patients = scan(source, compile_pattern(pattern))
    groups = assign(patients, {"labelled": labelled, "unlabelled": unlabelled}, seed)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for patient, group in groups.items():
        for label, _ in patients[patient]:
            counts[group, label] += 1
    for group, what in (("labelled", "labelled"), ("heldout", "held-out")):
        empty = [label for label in classes if not counts[group, label]]
        if empty:
            total = sum(label == empty[0] for images in patients.values() for label, _ in images)
            raise SplitError(
                f"--labelled {labelled} --unlabelled {unlabelled} leaves no {what} "
                f"{empty[0]} images ({total} in all): "
                + (
                    "lower the counts, so that some patients are held out to test on"
                    if group == "heldout"
                    else "its patients have more images each than --labelled allows"
                )
            )
    return Split(classes, patients, groups, dict(counts))


def write(out: Path, split: Split) -> None:
    """Copy the images into ``out`` (built under a temporary name, renamed when complete)
    and write split.csv."""
    rows = []
    with fileio.atomic_dir(out) as tmp:
        for patient in sorted(split.patients):
            group = split.groups[patient]
            for label, path in split.patients[patient]:
                if group == "unlabelled":
                    target = tmp / "unlabelled" / path.name
                else:
                    target = tmp / "dataset" / ("train" if group == "labelled" else "test")
                    target = target / label / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                rows.append((target.relative_to(tmp).as_posix(), patient, label, group))
        with open(tmp / "split.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "patient", "class", "group"])
            writer.writerows(rows)
