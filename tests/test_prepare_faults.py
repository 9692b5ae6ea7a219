"""prepare under faults and contradictory data: an unwritable data dir, a full disk, two
prepares of one name at once, npz labels that are no class numbers, a class only in test,
and one image under two labels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from image_factory import class_tree, save
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.core.settings import PrepareSettings
from threengan_cli.data.datasets import load_prepared
from threengan_cli.data.prepare import prepare
from threengan_cli.data.sources import DatasetError

runner = CliRunner()


def settings(**kw) -> PrepareSettings:
    return PrepareSettings(**{"image_size": 16, "workers": 1, **kw})


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int = 1) -> bool:
    return (
        result.exit_code == code
        and "Traceback" not in result.output
        and result.output.strip().startswith("error:")
        and result.output.strip().count("\n") == 0
    )


# ---------------------------------------------------------------------- where it writes
def test_a_data_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("THREENGAN_HOME", str(home))
    result = run("prepare", src, "--name", "x", "-q")
    assert one_line_error(result) and "THREENGAN_HOME" in result.output


def test_a_read_only_data_dir_is_one_line(tmp_path, monkeypatch):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    home = tmp_path / "home"
    (home / "datasets").mkdir(parents=True)
    real_access = os.access

    def access(path, mode):  # root ignores modes, so read-only is simulated
        return False if Path(path) == home / "datasets" else real_access(path, mode)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setenv("THREENGAN_HOME", str(home))
    result = run("prepare", src, "--name", "x", "-q")
    assert one_line_error(result) and "read-only" in result.output


def test_a_full_disk_while_writing_leaves_nothing_and_is_one_line(tmp_path, monkeypatch):
    import safetensors.numpy
    from safetensors import SafetensorError

    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    result = run("prepare", src, "--out", tmp_path / "ds", "--workers", "1", "-q")
    assert one_line_error(result) and "No space left" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_two_prepares_of_one_name_keep_the_first_and_refuse_the_second(tmp_path, monkeypatch):
    import safetensors.numpy

    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    out = tmp_path / "ds"
    real = safetensors.numpy.save_file
    others = []

    def other_finishes_first(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if not others:  # the other prepare renames its folder into place now
            others.append(True)
            prepare(src, out, settings())

    monkeypatch.setattr(safetensors.numpy, "save_file", other_finishes_first)
    with pytest.raises(DatasetError, match="written by another prepare"):
        prepare(src, out, settings())
    assert load_prepared(out).images.shape[0] == 4
    assert not list(tmp_path.glob(".*partial"))


# ---------------------------------------------------------------------------- the data
def _npz(path: Path, labels: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (len(labels), 16, 16), dtype=np.uint8)
    np.savez(path, train_images=images, train_labels=labels)
    return path


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.array([0, 1, -1, 1]), "negative label"),
        (np.array([0.0, 1.5, 0.0, 1.0]), "whole numbers"),
        (np.array([0.0, np.nan, 0.0, 1.0]), "whole numbers"),
        (np.array(["a", "b", "a", "b"]), "whole numbers"),
    ],
)
def test_npz_labels_that_are_not_class_numbers_are_refused(tmp_path, labels, match):
    with pytest.raises(DatasetError, match=match):
        prepare(_npz(tmp_path / "x.npz", labels), tmp_path / "ds", settings())


def test_whole_float_npz_labels_are_class_numbers(tmp_path):
    labels = np.array([0.0, 1.0] * 4)
    report = prepare(_npz(tmp_path / "x.npz", labels), tmp_path / "ds", settings())
    assert report.classes == ["0", "1"]


def test_a_class_only_in_test_is_refused_like_the_csv_path_does(tmp_path):
    src = tmp_path / "src"
    class_tree(src / "train", {"a": 3, "b": 3})
    class_tree(src / "test", {"a": 1, "b": 1, "c": 2}, seed=700)
    with pytest.raises(DatasetError, match="class 'c' is in test/ but not in train/"):
        prepare(src, tmp_path / "ds", settings())
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "x.npz",
        train_images=rng.integers(0, 255, (4, 16, 16), dtype=np.uint8),
        train_labels=np.array([0, 1, 0, 1]),
        test_images=rng.integers(0, 255, (3, 16, 16), dtype=np.uint8),
        test_labels=np.array([0, 1, 2]),
    )
    with pytest.raises(DatasetError, match="class 2 has no train images"):
        prepare(tmp_path / "x.npz", tmp_path / "ds", settings())


def test_one_image_under_two_labels_is_a_label_conflict_not_a_duplicate(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 3, "b": 3})
    save(src / "b" / "same-as-a0.png", seed=0)  # the pixels and bytes of a/img-0-000.png
    save(src / "a" / "copy-of-a0.png", seed=0)  # a plain duplicate: same label
    report = prepare(src, tmp_path / "ds", settings(val_fraction=0.0))
    conflicts = dict(report.label_conflicts)
    assert set(conflicts) == {"a/img-0-000.png", "a/copy-of-a0.png", "b/same-as-a0.png"}
    assert "labelled b, also a; removed" in conflicts["b/same-as-a0.png"]
    assert report.duplicates_dropped == []
    assert report.counts["train"] == {"a": 2, "b": 3}
    manifest = load_prepared(tmp_path / "ds").manifest
    assert len(manifest["report"]["label_conflicts"]) == 3
    result = run("prepare", src, "--out", tmp_path / "ds2", "--workers", "1")
    assert result.exit_code == 0 and "label conflict" in result.stderr
