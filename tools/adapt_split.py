"""Split a folder of class folders BY PATIENT into what "Adapting to your own X-rays"
(docs/guide.md) needs: a few labelled images per class, a pool of unlabelled ones and a
held-out set, none of them sharing a patient.

    python tools/adapt_split.py SOURCE OUT [--labelled 20] [--unlabelled 35] [--seed 0]

SOURCE holds one folder per class (``NORMAL/``, ``PNEUMONIA/``) of images named
``PPPPPPPP_FFF.png`` (patient id, follow-up number: the NIH ChestX-ray8 names); another naming
is given with ``--patient-pattern`` (a regex whose first group is the patient id). OUT gets

    OUT/dataset/train/<class>/   the labelled images (``--labelled`` per class)
    OUT/dataset/test/<class>/    every other patient's images, held out
    OUT/unlabelled/              ``--unlabelled`` per class, in one folder, labels dropped
    OUT/split.csv                file, patient, class, group of every image

so that ``threengan prepare OUT/dataset`` makes a dataset whose train split is the labelled
images and whose test split is the held-out ones, and ``--unlabelled OUT/unlabelled`` names
the pool. Patients are shuffled by ``--seed``; each goes whole to the first group whose quota
(in images, per class) it still fits, else to the held-out set. The images are copied; OUT is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

NIH_PATIENT = r"^(\d{8})_\d{3}\.\w+$"
GROUPS = ("labelled", "unlabelled", "heldout")


def scan(source: Path, pattern: str) -> dict[str, list[tuple[str, Path]]]:
    """Images by patient: patient id -> [(class, path)]; a name that does not match the
    pattern is an error (its patient would be unknown)."""
    regex = re.compile(pattern)
    patients: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise SystemExit(f"{source}: needs one folder per class (found {classes or 'none'})")
    for label in classes:
        for path in sorted((source / label).iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            found = regex.match(path.name)
            if not found:
                raise SystemExit(f"{path}: no patient id in its name (pattern {pattern})")
            patients[found.group(1)].append((label, path))
    return dict(patients)


def assign(
    patients: dict[str, list[tuple[str, Path]]], quotas: dict[str, int], seed: int
) -> dict[str, str]:
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


def write(out: Path, patients, groups: dict[str, str]) -> dict[tuple[str, str], int]:
    """Copy the images into a temporary folder beside ``out``, then rename it to ``out``."""
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    rows = []
    for patient in sorted(patients):
        group = groups[patient]
        for label, path in patients[patient]:
            if group == "unlabelled":
                target = tmp / "unlabelled" / path.name
            else:
                split = "train" if group == "labelled" else "test"
                target = tmp / "dataset" / split / label / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            counts[group, label] += 1
            rows.append((target.relative_to(tmp).as_posix(), patient, label, group))
    with open(tmp / "split.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "patient", "class", "group"])
        writer.writerows(rows)
    tmp.rename(out)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--labelled", type=int, default=20, help="labelled images per class")
    parser.add_argument("--unlabelled", type=int, default=35, help="unlabelled images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patient-pattern", default=NIH_PATIENT)
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists already: give a new folder")
    patients = scan(args.source, args.patient_pattern)
    quotas = {"labelled": args.labelled, "unlabelled": args.unlabelled}
    counts = write(args.out, patients, assign(patients, quotas, args.seed))
    labels = sorted({label for _, label in counts})
    for group in GROUPS:
        per_class = ", ".join(f"{label} {counts[group, label]}" for label in labels)
        print(f"{group:10s} {per_class}")
    print(f"{len(patients)} patients, seed {args.seed}: wrote {args.out}")


if __name__ == "__main__":
    main()
