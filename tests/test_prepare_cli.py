"""`threengan prepare` and `threengan datasets` through the CLI: exit codes and output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fresh_process import run_without_torch
from image_factory import class_tree
from typer.testing import CliRunner

from threengan_cli.cli.app import app

runner = CliRunner()
KERMANY = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany-chest-xray"


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_prepare_prints_a_table_and_lands_under_the_home(tmp_path, threengan_home):
    src = class_tree(tmp_path / "xrays", {"NORMAL": 3, "PNEUMONIA": 3})
    result = run("prepare", src, "--image-size", "16", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "NORMAL" in result.stdout and "PNEUMONIA" in result.stdout
    assert (threengan_home / "datasets" / "xrays" / "manifest.json").is_file()
    listed = run("datasets", "--json")
    assert listed.exit_code == 0
    assert [d["name"] for d in json.loads(listed.stdout)] == ["xrays"]
    assert "xrays" in run("datasets").stdout


def test_prepare_json_report_is_machine_readable(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 3, "b": 3})
    result = run(
        "prepare", src, "--out", tmp_path / "ds", "--json", "--image-size", "16", "--workers", "1"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"]["train"] == {"a": 3, "b": 3} and report["image_size"] == 16


def test_skipped_files_warn_and_exit_0_but_1_under_strict(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 3, "b": 3})
    (src / "a" / "bad.png").write_text("not a png")
    result = run("prepare", src, "--out", tmp_path / "ds", "--workers", "1")
    assert result.exit_code == 0
    assert "skipped a/bad.png: not an image" in result.stderr
    strict = run("prepare", src, "--out", tmp_path / "ds2", "--strict", "--workers", "1")
    assert strict.exit_code == 1 and "--strict" in strict.stderr
    assert not (tmp_path / "ds2").exists()


def test_many_skipped_files_are_summarised(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    for i in range(25):
        (src / "a" / f"junk{i:02d}.txt").write_text("x")
    result = run("prepare", src, "--out", tmp_path / "ds", "--workers", "1")
    assert result.exit_code == 0
    assert "and 5 more skipped files" in result.stderr
    assert "25 files skipped" in result.stderr


def test_image_size_train_cannot_build_is_a_usage_error(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    result = run("prepare", src, "--out", tmp_path / "ds", "--image-size", "28")
    assert result.exit_code == 2
    assert "power of two" in result.stderr and not (tmp_path / "ds").exists()


def test_quiet_prepare_prints_nothing_but_errors(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    (src / "a" / "junk.txt").write_text("x")
    result = run("prepare", src, "--out", tmp_path / "ds", "--workers", "1", "--quiet")
    assert result.exit_code == 0
    assert result.stderr == "" and result.stdout == ""


def test_system_files_are_skipped_silently(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    for name in (".DS_Store", "Thumbs.db", "._a0.png"):
        (src / "a" / name).write_bytes(b"\0junk")
    (src / "Thumbs.db").write_bytes(b"\0junk")
    result = run("prepare", src, "--out", tmp_path / "ds", "--workers", "1", "--json")
    assert result.exit_code == 0, result.output
    assert "Thumbs.db" not in result.stderr and "DS_Store" not in result.stderr
    assert json.loads(result.stdout)["skipped"] == []


def test_missing_source_is_a_usage_error(tmp_path):
    result = run("prepare", tmp_path / "nope")
    assert result.exit_code == 2


def test_bad_setting_is_a_usage_error(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    result = run("prepare", src, "--fit", "stretch")
    assert result.exit_code == 2 and "prepare.fit" in result.stderr


def test_config_file_applies_and_flags_override_it(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    (tmp_path / "c.toml").write_text("[prepare]\nimage_size = 8\nworkers = 1\n")
    result = run(
        "prepare", src, "--out", tmp_path / "ds", "--config", tmp_path / "c.toml", "--json"
    )
    assert json.loads(result.stdout)["image_size"] == 8
    result = run(
        "prepare",
        src,
        "--out",
        tmp_path / "ds",
        "--config",
        tmp_path / "c.toml",
        "--image-size",
        "16",
        "--json",
        "--force",
    )
    assert json.loads(result.stdout)["image_size"] == 16


def test_bad_source_and_refusal_exit_1_with_one_line(tmp_path):
    src = class_tree(tmp_path / "src", {"only": 2})
    result = run("prepare", src, "--out", tmp_path / "ds", "--workers", "1")
    assert result.exit_code == 1 and "only one class" in result.stderr
    assert "Traceback" not in result.output
    src = class_tree(tmp_path / "src", {"other": 2}, seed=500)  # not the same pixels
    assert run("prepare", src, "--out", tmp_path / "ds", "--workers", "1").exit_code == 0
    again = run("prepare", src, "--out", tmp_path / "ds", "--workers", "1")
    assert again.exit_code == 0 and "up to date" in again.stderr  # CI may run it twice
    other = run("prepare", src, "--out", tmp_path / "ds", "--workers", "1", "--image-size", "8")
    assert other.exit_code == 1 and "--force" in other.stderr
    forced = run("prepare", src, "--out", tmp_path / "ds", "--workers", "1", "--force")
    assert forced.exit_code == 0


def test_invalid_default_name_asks_for_one(tmp_path):
    src = class_tree(tmp_path / "-odd name", {"a": 2, "b": 2})
    result = run("prepare", src, "--workers", "1")
    assert result.exit_code == 2 and "--name" in result.stderr


def test_prepare_does_not_import_torch(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    done = run_without_torch("prepare", str(src), "--out", str(tmp_path / "ds"), "--quiet")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ds" / "manifest.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not KERMANY.is_dir(), reason="shared Kermany data not present")
def test_real_kermany_download_prepares_with_its_known_properties(tmp_path):
    result = run("prepare", KERMANY, "--out", tmp_path / "kermany", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["skipped"] == []  # its three .DS_Store files pass silently
    assert len(report["duplicates_dropped"]) == 26
    assert len(report["test_duplicates"]) == 6 and report["leakage_removed"] == []
    assert report["counts"]["test"] == {"NORMAL": 234, "PNEUMONIA": 390}
    assert report["val_carved"] and report["source_val_images"] == 16
    from threengan_cli.data.datasets import load_prepared

    ds = load_prepared(tmp_path / "kermany")
    by_split = {
        s: {m["patient"] for m in ds.manifest["images"] if m["split"] == s}
        for s in ("train", "val")
    }
    assert by_split["val"] and not by_split["train"] & by_split["val"]
    assert ds.images.shape == (5830, 64, 64)


def test_a_class_named_like_a_column_leaves_the_table_s_alignment_as_it_is(capsys):
    from types import SimpleNamespace

    from threengan_cli.cli import views

    report = SimpleNamespace(
        total=10,
        classes=["split", "b"],
        counts={"train": {"split": 3, "b": 4}, "test": {"split": 1, "b": 2}},
        patients={"train": 2},
    )
    views.prepare_table("ds", report, 64)
    rows = [line for line in capsys.readouterr().out.splitlines() if "test" in line]
    assert rows and rows[0].startswith("│ test  │")  # the split names stay left-aligned
