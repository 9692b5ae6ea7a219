"""threengan split: labelled, unlabelled and held-out images never share a patient, the quotas
are met per class, and a split without a held-out set (or a bad request) is refused with one
line and exit 2."""

from __future__ import annotations

import csv
import json

import pytest
from model_factory import write_image
from typer.testing import CliRunner

from threengan_cli.cli.app import app

runner = CliRunner()


def _split(*args):
    return runner.invoke(app, ["split", *map(str, args)])


def _nih_source(root, patients=12):
    """NIH names: PPPPPPPP_FFF.png; every fourth patient has a follow-up image."""
    for i in range(patients):
        for label in ("NORMAL", "PNEUMONIA"):
            patient = f"{i + (0 if label == 'NORMAL' else 100):08d}"
            write_image(root / label / f"{patient}_000.png", (8, 8), seed=i)
            if i % 4 == 0:
                write_image(root / label / f"{patient}_001.png", (8, 8), seed=i + 50)
    return root


def _one_line_error(result, code, words):
    assert result.exit_code == code, result.output
    assert words in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_split_keeps_each_patient_in_one_group_and_meets_the_quotas(tmp_path):
    source, out = _nih_source(tmp_path / "src"), tmp_path / "out"
    done = _split(source, out, "--labelled", 3, "--unlabelled", 4)
    assert done.exit_code == 0, done.output
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
    _one_line_error(_split(source, out), 2, "exists already")


def test_kermany_names_are_grouped_by_their_patient(tmp_path):
    source = tmp_path / "src"
    for p in range(8):
        write_image(source / "NORMAL" / f"IM-{p:04d}-0001.jpeg", (8, 8), seed=p)
        write_image(source / "NORMAL" / f"NORMAL2-IM-{p + 100:04d}-0001.jpeg", (8, 8), seed=p)
        write_image(source / "PNEUMONIA" / f"person{p}_bacteria_{2 * p}.jpeg", (8, 8), seed=p)
        write_image(source / "PNEUMONIA" / f"person{p}_virus_{2 * p + 1}.jpeg", (8, 8), seed=p)
    out = tmp_path / "out"
    done = _split(source, out, "--labelled", 4, "--unlabelled", 4, "--json")
    assert done.exit_code == 0, done.output
    rows = list(csv.DictReader((out / "split.csv").open()))
    by_patient = {}
    for row in rows:
        by_patient.setdefault(row["patient"], set()).add(row["group"])
    assert all(len(groups) == 1 for groups in by_patient.values())
    assert len(by_patient) == 8 + 8 + 8  # person<p> holds both of its images
    assert json.loads(done.stdout)["heldout"] == {"NORMAL": 8, "PNEUMONIA": 8}


@pytest.mark.parametrize(
    ("counts", "words"),
    [
        (["--labelled", 100, "--unlabelled", 0], "leaves no held-out NORMAL images (15 in all)"),
        (["--labelled", 6, "--unlabelled", 9], "leaves no held-out"),
        (["--labelled", -5], "--labelled takes a number of images per class, 1 or more"),
        (["--labelled", 0], "--labelled takes a number of images per class, 1 or more"),
        (["--unlabelled", -1], "--unlabelled takes a number of images per class, 0 or more"),
    ],
)
def test_a_split_without_a_held_out_set_or_with_negative_counts_is_refused(tmp_path, counts, words):
    source, out = _nih_source(tmp_path / "src"), tmp_path / "out"
    _one_line_error(_split(source, out, *counts), 2, words)
    assert not out.exists()


def test_bad_sources_and_patterns_are_one_line_errors(tmp_path):
    source, out = _nih_source(tmp_path / "src"), tmp_path / "out"
    _one_line_error(_split(tmp_path / "missing", out), 2, "does not exist")
    (tmp_path / "file.png").write_bytes(b"x")
    _one_line_error(_split(tmp_path / "file.png", out), 2, "is not a folder")
    _one_line_error(_split(source, out, "--patient-pattern", "(\\d+"), 2, "is not a valid regex")
    _one_line_error(_split(source, out, "--patient-pattern", "\\d+"), 2, "needs a group")
    _one_line_error(_split(source, out, "--patient-pattern", "(x)"), 1, "no patient id in its name")
    assert not out.exists()


@pytest.mark.parametrize(
    "stop, code, words",
    [
        (KeyboardInterrupt(), 130, "interrupted; {out} was not written"),
        (OSError(28, "No space left on device"), 1, "writing {out} failed: No space left"),
    ],
)
def test_a_split_stopped_while_writing_says_so_in_one_line(
    tmp_path, monkeypatch, stop, code, words
):
    """Ctrl+C and a full disk end the command as every command ends on them (exit 130 with
    what was not written, exit 1 with the OS error), never with a traceback."""
    from threengan_cli.data import split as engine

    def write(out, made):
        raise stop

    monkeypatch.setattr(engine, "write", write)
    source, out = _nih_source(tmp_path / "src"), tmp_path / "out"
    done = _split(source, out, "--labelled", 3, "--unlabelled", 4)
    assert done.exit_code == code and words.format(out=out) in done.stderr
    assert "Traceback" not in done.output and len(done.stderr.strip().splitlines()) == 1
