"""Commands run again, as a CI job runs them: the same command twice gives the same answer and
exit 0 (prepare, train, generate, classify, evaluate); other settings are refused, naming
--resume or --force; every --json output is one JSON document; exit codes of interruptions,
missing extras and empty shards; nothing left behind by a run that could not start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from model_factory import write_image
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.train import runs

runner = CliRunner()
TINY = ["--width", "4", "--batch-size", "4", "--device", "cpu", "--seed", "3"]


def _tiny_npz(path: Path) -> Path:
    """A MedMNIST-like .npz (classes 0 and 1) of 16x16 images; class 1 is brighter."""
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 100, (n, 16, 16), dtype=np.uint8)
        images[labels == 1] += 100
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def _json(result) -> dict:
    """The one JSON document on stdout (json.loads refuses anything before or after it)."""
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------ the CI job
def _ci_job(source: Path, work: Path) -> dict:
    """The README's CI job: prepare, train, classify, evaluate, each with --json or -o."""
    prepared = _json(
        runner.invoke(
            app,
            [
                "prepare",
                str(source),
                "--name",
                "ci",
                "--image-size",
                "16",
                "--min-val",
                "0",
                "--class-names",
                "NORMAL,PNEUMONIA",
                "--json",
                "-q",
            ],
        )
    )
    trained = _json(
        runner.invoke(
            app,
            [
                "train",
                "ci",
                "--name",
                "ci-run",
                "--size",
                "8",
                "--epochs",
                "1",
                *TINY,
                "--json",
                "-q",
            ],
        )
    )
    images = work / "images"
    for i in range(3):
        write_image(images / f"x{i}.png", seed=i)
    out = work / "results.csv"
    classified = runner.invoke(app, ["classify", str(images), "--run", "ci-run", "-o", str(out)])
    assert classified.exit_code == 0, classified.output
    scored = _json(runner.invoke(app, ["evaluate", "ci", "--run", "ci-run", "--json", "-q"]))
    return {"prepare": prepared, "train": trained, "csv": out.read_text(), "evaluate": scored}


def test_the_readme_ci_job_passes_twice_with_the_same_results(tmp_path):
    source = _tiny_npz(tmp_path / "xr.npz")
    first = _ci_job(source, tmp_path)
    again = _ci_job(source, tmp_path)
    assert again["prepare"].pop("up_to_date") and not first["prepare"].pop("up_to_date")
    for report in (first["prepare"], again["prepare"]):
        report.pop("seconds")
    assert again["prepare"] == first["prepare"]
    assert again["train"] == first["train"]
    assert again["csv"] == first["csv"]
    assert again["evaluate"] == first["evaluate"]
    assert first["prepare"]["classes"] == ["NORMAL", "PNEUMONIA"]


# --------------------------------------------------------------------------------- train
@pytest.fixture
def tiny(tmp_path) -> str:
    source = _tiny_npz(tmp_path / "xr.npz")
    args = ["prepare", str(source), "--name", "xr", "--image-size", "16", "--min-val", "0"]
    assert runner.invoke(app, [*args, "-q"]).exit_code == 0
    return "xr"


def _train(*args: str):
    return runner.invoke(app, ["train", *args, *TINY])


def test_training_a_finished_run_again_with_the_same_settings_is_a_no_op(tiny, threengan_home):
    first = _train(tiny, "--name", "w", "--epochs", "1", "--json", "-q")
    assert first.exit_code == 0, first.output
    run = threengan_home / "runs" / "w"
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    again = _train(tiny, "--name", "w", "--epochs", "1", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == json.loads(first.stdout)
    assert "already finished its 1 epochs" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


@pytest.mark.slow
def test_training_a_run_again_with_other_settings_names_resume_and_force(tiny, threengan_home):
    assert _train(tiny, "--name", "w", "--epochs", "1", "-q").exit_code == 0
    more = _train(tiny, "--name", "w", "--epochs", "2")
    assert more.exit_code == 2 and "--resume" in more.stderr and "--epochs 2" in more.stderr
    other = _train(tiny, "--name", "w", "--epochs", "1", "--lr", "0.001")
    assert other.exit_code == 2
    assert "lr = 0.0002 there, 0.001 asked" in other.stderr and "--force" in other.stderr
    forced = _train(tiny, "--name", "w", "--epochs", "1", "--lr", "0.001", "--force", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["settings"]["lr"] == 0.001
    saved = json.loads((threengan_home / "runs" / "w" / runs.SETTINGS).read_text())
    assert saved["lr"] == 0.001


@pytest.mark.slow
def test_training_an_unfinished_run_again_with_the_same_settings_resumes_it(tiny, threengan_home):
    import threading

    from threengan_cli.core.settings import TrainSettings
    from threengan_cli.train import events, training

    whole = _train(tiny, "--name", "whole", "--epochs", "2", "--json", "-q")
    # the same run stopped after its first epoch (as Ctrl+C, or a cancelled CI job, leaves it)
    stop = threading.Event()
    cfg = TrainSettings(width=4, batch_size=4, device="cpu", seed=3, epochs=2)
    run = threengan_home / "runs" / "cut"

    def after_epoch_1(event):
        if isinstance(event, events.EpochDone):
            stop.set()

    with pytest.raises(events.Interrupted):
        training.train(
            threengan_home / "datasets" / tiny, cfg, run, on_event=after_epoch_1, stop_flag=stop
        )
    again = _train(tiny, "--name", "cut", "--epochs", "2", "--json")
    assert again.exit_code == 0, again.output
    assert "unfinished" in again.stderr and "resuming" in again.stderr
    a, b = json.loads(whole.stdout), json.loads(again.stdout)
    assert a["test"] == b["test"] and a["val"] == b["val"]


@pytest.mark.slow
def test_a_damaged_summary_is_recomputed_by_resume(tiny, threengan_home):
    first = _train(tiny, "--name", "w", "--epochs", "1", "--json", "-q")
    summary = threengan_home / "runs" / "w" / runs.SUMMARY
    summary.write_text('{"epochs": 1}')
    again = runner.invoke(app, ["train", "--resume", "w", "--json"])
    assert again.exit_code == 0, again.output
    assert "summary.json is damaged (no elapsed_s)" in again.stderr
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert (a["test"], a["val"], a["best_epoch_on_val"]) == (
        b["test"],
        b["val"],
        b["best_epoch_on_val"],
    )
    assert json.loads(summary.read_text())["test"] == a["test"]
    runner.invoke(app, ["runs", "--prune-last", "-q"])
    summary.write_text('{"epochs": 1}')
    pruned = runner.invoke(app, ["train", "--resume", "w"])
    assert pruned.exit_code == 1 and "pruned" in pruned.stderr
    assert pruned.stderr.count("\n") == 1


def test_a_missing_unlabelled_dataset_leaves_no_run_folder(tiny, threengan_home):
    done = _train(tiny, "--name", "w", "--epochs", "1", "--unlabelled", "nowhere")
    assert done.exit_code == 2 and "--unlabelled nowhere" in done.stderr  # a usage error
    assert not (threengan_home / "runs" / "w").exists()


@pytest.mark.slow
def test_an_unlabelled_pool_holding_the_test_split_is_refused(tmp_path, threengan_home):
    from image_factory import kermany_like

    source = kermany_like(tmp_path / "xr", train=8, val=1, test=3)
    args = ["prepare", str(source), "--name", "k", "--image-size", "16", "--workers", "1", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    own_test = _train("k", "--name", "t", "--epochs", "1", "--unlabelled", str(source / "test"))
    assert own_test.exit_code == 1, own_test.output
    assert "exact copies of this dataset's test images" in own_test.stderr
    assert "transductive" in own_test.stderr and not (threengan_home / "runs" / "t").exists()
    as_dataset = ["prepare", str(source / "test"), "--name", "kt", "--image-size", "16", "-q"]
    assert runner.invoke(app, [*as_dataset, "--workers", "1"]).exit_code == 0
    prepared = _train("k", "--name", "t", "--epochs", "1", "--unlabelled", "kt")
    assert prepared.exit_code == 1 and "exact copies" in prepared.stderr
    apart = tmp_path / "apart"
    kermany_like(apart, train=2, val=0, test=0)  # other images: fine
    (apart / "train" / "NORMAL" / "extra.png").write_bytes(b"not an image")
    fine = _train("k", "--name", "t", "--epochs", "1", "--unlabelled", str(apart), "--json")
    assert fine.exit_code == 0, fine.output
    assert json.loads(fine.stdout)["unlabelled_images"] == 4


# ---------------------------------------------------------------------------- generate
def test_generate_into_its_own_earlier_output_is_a_no_op(tmp_path, ckpt):
    out = tmp_path / "synth"
    args = ["generate", "--checkpoint", str(ckpt), "--count", "3", "--out", str(out)]
    first = runner.invoke(app, [*args, "--label", "--tau", "0", "--json"])
    assert first.exit_code == 0, first.output
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = runner.invoke(app, [*args, "--label", "--tau", "0", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == json.loads(first.stdout)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    other = runner.invoke(app, [*args, "--seed", "9"])
    assert other.exit_code == 2 and "seed = 0 there, 9 asked" in other.stderr
    assert "--force" in other.stderr
    forced = runner.invoke(app, [*args, "--seed", "9", "--force", "--json"])
    assert forced.exit_code == 0 and json.loads(forced.stdout)["seed"] == 9
    assert not (out / "labels.csv").exists()  # replaced whole: the unlabelled layout


def test_force_never_replaces_a_folder_generate_did_not_make(tmp_path, ckpt):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    args = ["generate", "--checkpoint", str(ckpt), "--count", "2", "--out", str(mine), "--force"]
    done = runner.invoke(app, args)
    assert done.exit_code == 2 and "generate did not make it" in done.stderr
    assert (mine / "notes.txt").read_text() == "keep"


# ---------------------------------------------------------------------------- --json
@pytest.mark.slow
def test_every_json_output_is_one_json_document(tiny, tmp_path, ckpt, threengan_home):
    image = str(write_image(tmp_path / "a.png"))
    assert _train(tiny, "--name", "w", "--epochs", "1", "-q").exit_code == 0
    commands = [
        ["info", "--json"],
        ["datasets", "--json"],
        ["runs", "--json"],
        ["runs", "--prune-last", "--json"],
        ["train", "--resume", "w", "--json"],
        ["evaluate", tiny, "--run", "w", "--json"],
        ["classify", image, "--run", "w", "-f", "json"],
        [
            "generate",
            "--checkpoint",
            str(ckpt),
            "--count",
            "2",
            "--out",
            str(tmp_path / "g"),
            "--json",
        ],
        [
            "generate",
            "--checkpoint",
            str(ckpt),
            "--count",
            "2",
            "--out",
            str(tmp_path / "g"),
            "--json",
        ],
        [
            "benchmark",
            tiny,
            "--profile",
            "smoke",
            "--methods",
            "vanilla",
            "--sizes",
            "4",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "b"),
            "--json",
        ],
    ]
    for args in commands:
        done = runner.invoke(app, args)
        assert done.exit_code == 0, (args, done.output)
        json.loads(done.stdout)  # exactly one document, nothing else on stdout


def test_an_up_to_date_prepare_reports_the_facts_of_the_run_it_stands_for(tmp_path):
    from image_factory import kermany_like

    source = kermany_like(tmp_path / "xr", train=8, val=1, test=3)
    dup = next((source / "train" / "NORMAL").iterdir())
    (source / "train" / "NORMAL" / ("copy-" + dup.name)).write_bytes(dup.read_bytes())
    test_image = next((source / "test" / "PNEUMONIA").iterdir())
    name = test_image.name.replace("person", "person1").replace("_", "_x", 1)
    (source / "train" / "PNEUMONIA" / name).write_bytes(test_image.read_bytes())
    args = [
        "prepare",
        str(source),
        "--out",
        str(tmp_path / "ds"),
        "--image-size",
        "16",
        "--workers",
        "1",
        "--json",
    ]
    first, again = _json(runner.invoke(app, args)), _json(runner.invoke(app, args))
    assert first["duplicates_dropped"] and first["leakage_removed"] and first["val_carved"]
    assert again["up_to_date"] and not first["up_to_date"]
    for report in (first, again):
        for key in ("up_to_date", "seconds"):
            report.pop(key)
    assert again == first


def test_prepare_over_a_damaged_data_file_prepares_it_again(tmp_path):
    source = _tiny_npz(tmp_path / "xr.npz")
    out = tmp_path / "ds"
    args = ["prepare", str(source), "--out", str(out), "--image-size", "16", "--json"]
    first = _json(runner.invoke(app, args))
    data = out / "data.safetensors"
    whole = data.read_bytes()
    data.write_bytes(whole[: len(whole) // 2])  # cut short, as a full disk or a copy can
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "was damaged" in again.stderr and not json.loads(again.stdout)["up_to_date"]
    assert data.read_bytes() == whole and json.loads(again.stdout)["repaired"]
    third = _json(runner.invoke(app, args))
    assert third["up_to_date"] and third["data_sha256"] == first["data_sha256"]


# ------------------------------------------------------------------------- class names
def test_class_names_name_an_npz_s_numbered_classes_and_are_checked(tmp_path):
    source = _tiny_npz(tmp_path / "xr.npz")
    out = tmp_path / "ds"

    def prepare(*extra: str):
        return runner.invoke(
            app, ["prepare", str(source), "--out", str(out), "--image-size", "16", *extra]
        )

    named = prepare("--class-names", "NORMAL,PNEUMONIA", "--json")
    assert _json(named)["classes"] == ["NORMAL", "PNEUMONIA"]
    assert json.loads((out / "manifest.json").read_text())["classes"] == ["NORMAL", "PNEUMONIA"]
    for bad, why in [
        ("NORMAL", "one name per class"),
        ("A,B,C", "gives 3 names, but the source has 2 classes (0, 1"),
        ("../x,y", "not a usable class name"),
        ("Normal,normal", "must differ"),
    ]:
        done = prepare("--class-names", bad, "--force")
        assert done.exit_code in (1, 2) and why in done.stderr, (bad, done.stderr)
    assert json.loads((out / "manifest.json").read_text())["classes"] == ["NORMAL", "PNEUMONIA"]
    renamed = prepare("--class-names", "healthy,sick")
    assert renamed.exit_code == 1 and "other settings (class_names" in renamed.stderr


# ---------------------------------------------------------------------------- exit codes
def test_an_empty_shard_says_so_rather_than_blaming_stdin(tmp_path, ckpt):
    image = str(write_image(tmp_path / "a.png"))
    done = runner.invoke(app, ["classify", image, "--checkpoint", str(ckpt), "--shard", "2/3"])
    assert done.exit_code == 1
    assert "shard 2/3" in done.stderr and "stdin" not in done.stderr
    stdin = runner.invoke(app, ["classify", "-", "--checkpoint", str(ckpt)], input="")
    assert stdin.exit_code == 2 and "no paths were given on stdin" in stdin.stderr


# the console script's entry point, as `threengan ...` runs it (with its signal handling)
_THREENGAN = """
import sys
from threengan_cli.cli.app import main
sys.argv = ["threengan", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_train_stopped_by_sigterm_exits_143_and_stays_resumable(dataset, tmp_path):
    # (Ctrl+C's 130: tests/test_cli.py)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", _THREENGAN, "train", str(dataset), "--out", str(run)]
    child = subprocess.Popen(
        [*command, *TINY, "--epochs", "1000"], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        for line in child.stderr:  # the first epoch line: the loop and its handler are running
            if line.startswith("epoch 1/"):
                break
        child.send_signal(signal.SIGTERM)
        rest = child.stderr.read()
        child.wait(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 143, rest
    assert f"Continue with: threengan train --resume {run}" in rest
    assert (run / runs.LAST).is_file()  # stopped between steps, resumable


def test_a_command_without_its_own_handling_exits_143_on_sigterm(tmp_path, ckpt):
    child = subprocess.Popen(
        [sys.executable, "-c", _THREENGAN, "classify", "-", "--checkpoint", str(ckpt)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # one path, stdin left open: the model is loaded, and classify waits for the next path
        child.stdin.write(str(write_image(tmp_path / "a.png")) + "\n")
        child.stdin.flush()
        for line in child.stderr:
            if line.startswith("model "):
                break
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 143
