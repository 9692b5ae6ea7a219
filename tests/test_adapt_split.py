"""tools/adapt_split.py: labelled, unlabelled and held-out images never share a patient, and
the quotas are met per class."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from model_factory import write_image

TOOL = Path(__file__).resolve().parents[1] / "tools" / "adapt_split.py"


def test_the_split_keeps_each_patient_in_one_group_and_meets_the_quotas(tmp_path):
    source = tmp_path / "src"
    for i in range(12):
        for label in ("NORMAL", "PNEUMONIA"):
            patient = f"{i + (0 if label == 'NORMAL' else 100):08d}"
            write_image(source / label / f"{patient}_000.png", (8, 8), seed=i)
            if i % 4 == 0:  # some patients have a follow-up image
                write_image(source / label / f"{patient}_001.png", (8, 8), seed=i + 50)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(TOOL), str(source), str(out), "--labelled", "3", "--unlabelled", "4"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((out / "split.csv").open()))
    assert len(rows) == 2 * (12 + 3)
    group_of = {}
    for row in rows:
        assert group_of.setdefault(row["patient"], row["group"]) == row["group"]
        assert (out / row["file"]).is_file()
    for label in ("NORMAL", "PNEUMONIA"):
        for group, quota in (("labelled", 3), ("unlabelled", 4)):
            n = sum(r["class"] == label and r["group"] == group for r in rows)
            assert n == quota
    assert sorted(p.name for p in (out / "dataset").iterdir()) == ["test", "train"]
    assert not any(p.is_dir() for p in (out / "unlabelled").iterdir())  # labels dropped
    again = subprocess.run([sys.executable, str(TOOL), str(source), str(out)], capture_output=True)
    assert again.returncode != 0 and b"exists already" in again.stderr
