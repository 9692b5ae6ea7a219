"""The run-folder contract: states, JSON files read with the file and line named on damage,
and one writer per run (a lock with pid and host; a dead holder's lock is taken over)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from threengan_cli.bench import benchmark, grid
from threengan_cli.bench.merge import merge
from threengan_cli.cli.app import app
from threengan_cli.core.settings import TrainSettings
from threengan_cli.train import events, runlock, runs, training

runner = CliRunner()
TINY = ["--width", "4", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "-q"]


def _settings(**kw):
    base = {"width": 4, "latent": 8, "batch_size": 4, "epochs": 1, "device": "cpu", "seed": 3}
    return TrainSettings(**{**base, **kw})


# ---------------------------------------------------------------------------- reading
def test_a_damaged_json_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / runs.METRICS
    path.write_text('{"epoch": 1}\n\n{"epoch": 2\n')
    with pytest.raises(runs.RunError, match=rf"{runs.METRICS} line 3 is not valid JSON"):
        runs.read_metrics(path)
    path.write_text('{"epoch": 1}\n[1]\n')
    with pytest.raises(runs.RunError, match="line 2 is not a JSON object"):
        runs.read_metrics(path)
    path.write_text('{"epoch": true}\n')
    with pytest.raises(runs.RunError, match="no integer epoch"):
        runs.read_metrics(path)
    settings = tmp_path / runs.SETTINGS
    settings.write_text('{\n  "epochs": 3,\n  oops\n}')
    with pytest.raises(runs.RunError, match=rf"{runs.SETTINGS} line 3 is not valid JSON"):
        runs.read_json(settings)
    settings.write_bytes(b"\xff\xfe")
    with pytest.raises(runs.RunError, match="cannot be read"):
        runs.read_json(settings)


def test_a_last_line_cut_short_by_a_kill_is_dropped_and_a_bad_middle_line_is_not(tmp_path):
    path = tmp_path / runs.METRICS
    path.write_bytes(b'{"epoch": 1}\n{"epoch": 2, "val": {"accu')  # killed mid-append
    assert [r["epoch"] for r in runs.read_metrics(path)] == [1]
    path.write_bytes(b'{"epoch": 1}\n{"epoch": 2, "val"\xc3')  # cut inside a UTF-8 character
    assert [r["epoch"] for r in runs.read_metrics(path)] == [1]
    path.write_bytes(b'{"epoch": 1}\n{"epoch": 2}')  # whole, only its newline missing
    assert [r["epoch"] for r in runs.read_metrics(path)] == [1, 2]
    path.write_bytes(b'{"epoch": 1}\n{"epo\n{"epoch": 3}\n')  # written whole: damage
    with pytest.raises(runs.RunError, match="line 2 is not valid JSON"):
        runs.read_metrics(path)
    path.write_bytes(b'{"epoch": 1}\n{"epoch": 2}\nnot json\n')  # its newline was written
    with pytest.raises(runs.RunError, match="line 3 is not valid JSON"):
        runs.read_metrics(path)


def test_a_run_killed_mid_append_resumes(dataset, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(events.Interrupted):
        training.train(dataset, _settings(epochs=2), run, on_event=_stop_after_epoch(1))
    with open(run / runs.METRICS, "a") as fh:
        fh.write('{"epoch": 2, "train": {"loss')  # what a kill in the middle of a line leaves
    result = runner.invoke(app, ["train", "--resume", str(run), "-q"])
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in runs.read_metrics(run / runs.METRICS)] == [1, 2]
    assert (run / runs.METRICS).read_bytes().endswith(b"}\n")


def _stop_after_epoch(epoch: int):
    """An event handler that asks the run to stop (as Ctrl+C does) once ``epoch`` is done."""

    def on_event(event):
        if isinstance(event, events.EpochDone) and event.epoch + 1 == epoch:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)

    return on_event


def test_a_summary_is_checked_before_it_is_used(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert runs.read_summary(run) is None
    good = {"epochs": 1, "elapsed_s": 2.5, "val": {"accuracy": 0.5}, "test": {"accuracy": 1}}
    for damage, why in [
        ({"epochs": 1}, "no elapsed_s"),
        ([1, 2], "not a JSON object"),
        ({**good, "epochs": "1"}, "no epoch count"),
        ({**good, "val": [0.5]}, "val is not an object"),
        ({**good, "test": {"accuracy": "high"}}, "test.accuracy is not a number"),
        ({**good, "best_epoch_on_val": 1.5}, "best_epoch_on_val"),
    ]:
        (run / runs.SUMMARY).write_text(json.dumps(damage))
        with pytest.raises(runs.RunError, match=f"{runs.SUMMARY} is damaged .{why}"):
            runs.read_summary(run)
    (run / runs.SUMMARY).write_text(json.dumps(good))
    assert runs.read_summary(run) == good


def test_states_of_a_run_folder(tmp_path):
    run = tmp_path / "run"
    assert runs.state(run) == "absent"
    run.mkdir()
    assert runs.state(run) == "empty"
    (run / runs.SAMPLES).mkdir()
    (run / ".settings.json.1-00000000.abcd1234.tmp").write_text("{")
    assert runs.state(run) == "unstarted"  # killed while writing its first settings.json
    (run / runs.SETTINGS).write_text("{}")
    assert runs.state(run) == "unstarted"  # ... or before run.json
    assert not runs.holds_run(run)
    (run / runs.RUN).write_text("{}")
    assert runs.state(run) == "started" and runs.holds_run(run)
    (run / runs.LAST).write_text("")
    assert runs.state(run) == "resumable"
    (run / runs.SUMMARY).write_text("{}")
    assert runs.state(run) == "finished"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert runs.state(other) == "other" and runs.holds_run(other)


# ------------------------------------------------------------------------------- lock
_HOLDER = """
import sys, time
from threengan_cli.train import runlock
with runlock.lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def held(tmp_path):
    """A run folder locked by another process."""
    folder = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "held"
    yield folder, child
    child.kill()
    child.wait()


def test_a_second_writer_is_refused_naming_the_holder(held):
    folder, child = held
    with pytest.raises(runlock.RunLocked, match=rf"pid {child.pid} on {socket.gethostname()}"):
        with runlock.lock(folder):
            pass


def test_the_lock_of_a_killed_holder_is_taken_over(held):
    folder, child = held
    child.kill()
    child.wait()
    assert (folder / runs.LOCK).exists()  # SIGKILL left the file behind
    with runlock.lock(folder):
        holder = json.loads((folder / runs.LOCK).read_text())
        assert holder["pid"] == os.getpid()
    assert not (folder / runs.LOCK).exists()


def test_a_lock_file_naming_a_dead_pid_is_stale(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    record = {"pid": gone.pid, "host": socket.gethostname(), "since": "earlier"}
    (folder / runs.LOCK).write_text(json.dumps(record))
    assert not runlock._alive(record)
    with runlock.lock(folder):
        pass


def test_a_lock_that_is_a_symbolic_link_is_never_written_through(dataset, tmp_path):
    run = tmp_path / "run"
    training.train(dataset, _settings(epochs=1), run)
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's own words\n")
    (run / runs.LOCK).symlink_to(precious)
    with pytest.raises(runs.RunError, match="is a symbolic link"):
        with runlock.lock(run):
            pass
    result = runner.invoke(app, ["train", "--resume", str(run), "--epochs", "2"])
    assert result.exit_code == 1 and "is a symbolic link" in result.output
    assert result.output.count("\n") == 1
    assert precious.read_text() == "the user's own words\n"
    assert (run / runs.LOCK).is_symlink()  # left as it was: the user removes it
    assert runlock.locked_by(run) is None  # and it makes no one a holder


def test_a_run_file_that_is_a_symbolic_link_is_never_appended_through(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("mine\n")
    (tmp_path / runs.METRICS).symlink_to(precious)
    with pytest.raises(runs.RunError, match="symbolic link"):
        runs.append_line(tmp_path / runs.METRICS, "{}")
    assert precious.read_text() == "mine\n"


def test_a_lock_naming_another_host_that_no_one_holds_is_not_running(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    record = {"pid": 1, "host": "another-node", "since": "yesterday"}
    (folder / runs.LOCK).write_text(json.dumps(record))
    assert runlock.locked_by(folder) is None
    with runlock.lock(folder):  # and it is taken over
        holder = runlock._holder(folder / runs.LOCK)
        assert holder["pid"] == os.getpid()


def test_a_held_lock_names_its_holder(held):
    folder, child = held
    assert runlock.locked_by(folder)["pid"] == child.pid


def test_a_folder_the_lock_made_goes_again_when_nothing_was_written(tmp_path):
    folder = tmp_path / "runs" / "new"
    with runlock.lock(folder):
        assert folder.is_dir()
    assert not folder.exists() and (tmp_path / "runs").is_dir()
    kept = tmp_path / "kept"
    with runlock.lock(kept):
        (kept / "settings.json").write_text("{}")
    assert (kept / "settings.json").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    with runlock.lock(mine):
        pass
    assert mine.is_dir()  # not made by the lock: left alone


def test_the_lock_is_re_entrant_within_one_process(tmp_path):
    with runlock.lock(tmp_path / "r"), runlock.lock(tmp_path / "r"):
        assert (tmp_path / "r" / runs.LOCK).exists()
    assert not (tmp_path / "r" / runs.LOCK).exists()


def test_training_and_resuming_a_run_someone_else_writes_are_refused(held, dataset):
    folder, _ = held
    with pytest.raises(runlock.RunLocked):
        training.train(dataset, _settings(), folder)
    result = runner.invoke(app, ["train", str(dataset), "--out", str(folder), *TINY])
    assert result.exit_code == 1 and "is in use" in result.output
    (folder / runs.SETTINGS).write_text("{}")
    (folder / runs.RUN).write_text("{}")
    result = runner.invoke(app, ["train", "--resume", str(folder), "-q"])
    assert result.exit_code == 1 and "is in use" in result.output
    assert not (folder / runs.METRICS).exists()


def test_a_benchmark_run_that_another_process_writes_is_refused(held, dataset, tmp_path):
    folder, _ = held
    out = folder.parent  # the held folder is <out>/run: lock <out>/runs/<name> instead
    cfg = grid.resolve_settings("smoke", device="cpu", methods=("vanilla",), sizes=(8,))
    name = grid.grid(cfg)[0].name
    target = tmp_path / "bench"
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(target / "runs" / name)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunLocked):
            benchmark.run(dataset, cfg, target)
    finally:
        child.kill()
        child.wait()
    assert out.exists()


def test_a_second_benchmark_on_one_folder_is_refused(dataset, tmp_path):
    target = tmp_path / "bench"
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "held"
        args = ["benchmark", str(dataset), "--profile", "smoke", "--out", str(target), "-q"]
        result = runner.invoke(app, [*args, "--device", "cpu"])
        assert result.exit_code == 1 and "is in use" in result.output
        result = runner.invoke(app, ["benchmark", "merge", str(tmp_path), "--out", str(target)])
        assert result.exit_code == 1 and "is in use" in result.output
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------- starting and resuming
def test_a_run_killed_while_writing_its_first_settings_restarts_in_place(dataset, tmp_path):
    run = tmp_path / "run"
    (run / runs.SAMPLES).mkdir(parents=True)
    (run / ".settings.json.999999-00000000.abcd1234.tmp").write_text('{"epo')
    (run / runs.LOCK).write_text('{"pid": 999999, "host": "gone"}')  # a dead holder's
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 2 and f"--out {run}" in result.output
    result = runner.invoke(app, ["train", str(dataset), "--out", str(run), *TINY])
    assert result.exit_code == 0, result.output
    assert runs.state(run) == "finished"


def test_a_folder_with_other_files_is_never_taken_for_a_new_run(dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    for force in ([], ["--force"]):
        result = runner.invoke(app, ["train", str(dataset), "--out", str(run), *TINY, *force])
        assert result.exit_code == 2 and "holds files that are not a run's" in result.output
    assert (run / "notes.txt").read_text() == "keep me"


def test_resume_names_a_damaged_metrics_line_or_settings_file(dataset, tmp_path):
    run = tmp_path / "run"
    training.train(dataset, _settings(epochs=1), run)
    with open(run / runs.METRICS, "a") as fh:
        fh.write("{not json\n")
    original = (run / runs.SETTINGS).read_text()
    result = runner.invoke(app, ["train", "--resume", str(run), "--epochs", "2", "-q"])
    assert result.exit_code == 1
    assert f"{runs.METRICS} line 2 is not valid JSON" in result.output
    assert "Traceback" not in result.output
    (run / runs.SETTINGS).write_text("{oops")
    result = runner.invoke(app, ["train", "--resume", str(run), "-q"])
    assert result.exit_code == 1 and f"{runs.SETTINGS} line 1" in result.output
    (run / runs.SETTINGS).write_text(original)


def test_benchmark_and_merge_name_a_damaged_file_and_line(dataset, tmp_path):
    cfg = grid.resolve_settings("smoke", device="cpu", methods=("vanilla",), sizes=(8,))
    out = tmp_path / "bench"
    benchmark.run(dataset, cfg, out)
    run_dir = next((out / "runs").iterdir())
    with open(run_dir / runs.METRICS, "a") as fh:
        fh.write("garbage\n")
    with pytest.raises(benchmark.BenchmarkError, match=rf"{runs.METRICS} line \d+ is not"):
        benchmark.run(dataset, cfg, out)
    result = runner.invoke(app, ["benchmark", "merge", str(out), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "is not valid JSON" in result.output
    (out / "benchmark.json").write_text('{"settings": {"profile": 3}}')
    with pytest.raises(benchmark.BenchmarkError, match="benchmark.json holds no valid"):
        merge([out], tmp_path / "m")
    (run_dir / runs.SETTINGS).write_text("{\n,")
    with pytest.raises(benchmark.BenchmarkError, match=rf"{runs.SETTINGS} line 2"):
        benchmark.run(dataset, cfg, out)


def test_run_folder_names_have_one_owner():
    """The modules that read or write run folders use runs' names, never spell them (the
    checkpoints' names are model/modelfile's, below the run folder, and runs uses them)."""
    import ast

    names = {runs.RUN, runs.METRICS, runs.SUMMARY, runs.FAILED, runs.BEST, runs.LAST, runs.FINAL}
    names.add(runs.SETTINGS)
    package = Path(runs.__file__).parents[1]
    users = (
        "bench/benchmark", "cli/evaluate", "cli/train", "core/paths",
        "train/runlist", "train/training",
    )
    spelled = [
        (module, node.lineno, node.value)
        for module in users
        for node in ast.walk(ast.parse((package / f"{module}.py").read_text()))
        if isinstance(node, ast.Constant) and node.value in names
    ]
    assert spelled == []


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes_exactly(
    dataset, tmp_path, monkeypatch
):
    import errno

    from threengan_cli.model import checkpoints

    args = [str(dataset), "--width", "4", "--batch-size", "4", "--epochs", "2"]
    args += ["--device", "cpu", "--seed", "5", "-q", "--checkpoint-every", "0"]
    assert runner.invoke(app, ["train", *args, "--out", str(tmp_path / "whole")]).exit_code == 0

    real, writes = checkpoints.fileio.write_bytes, []

    def full_at_second_last(path, data):
        if Path(path).name == runs.LAST:
            writes.append(path)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(checkpoints.fileio, "write_bytes", full_at_second_last)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", *args, "--out", str(run)])
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1
    monkeypatch.setattr(checkpoints.fileio, "write_bytes", real)
    assert runner.invoke(app, ["train", "--resume", str(run), "-q"]).exit_code == 0

    def numbers(folder):
        return [
            {k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
            for r in runs.read_metrics(folder / runs.METRICS)
        ]

    assert numbers(run) == numbers(tmp_path / "whole")


def test_a_run_folder_that_cannot_be_made_is_one_line(dataset, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    result = runner.invoke(app, ["train", str(dataset), "--out", str(blocker / "run"), *TINY])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("error: creating") and result.output.count("\n") == 1


def test_a_run_written_before_a_setting_existed_is_the_same_run_at_its_default(tmp_path):
    """settings.json of a run made before calibration_folds (or another later setting)
    existed lacks it; the same command must find it the same run, not another."""
    import json

    from threengan_cli.core.settings import TrainSettings

    asked = TrainSettings(size=20, epochs=2).model_dump(mode="json")
    saved = {k: v for k, v in asked.items() if k not in ("calibration_folds", "generated_teacher")}
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / runs.SETTINGS).write_text(json.dumps(saved))
    (folder / runs.RUN).write_text(json.dumps({"dataset": str(tmp_path / "data")}))
    assert runs.difference(folder, asked, tmp_path / "data") is None
    other = {**asked, "calibration_folds": 5}
    assert runs.difference(folder, other, tmp_path / "data").key == "calibration_folds"


def test_a_train_command_s_plan_is_a_new_run_or_the_run_resume_names(dataset, tmp_path):
    from threengan_cli.core.errors import UsageError
    from threengan_cli.train import plan

    locked = []
    flags = {"epochs": None, "size": 8, "width": 4}
    with pytest.raises(UsageError, match="--force starts a run over"):
        plan.open_run(None, "r", flags, None, (None, None), True, locked.append)
    with pytest.raises(UsageError, match="give a prepared DATASET"):
        plan.open_run(None, None, flags, None, (None, None), False, locked.append)
    assert not locked  # refused before any folder is looked at
    out = tmp_path / "run"
    cfg, data, run_dir, again = plan.open_run(
        str(dataset), None, flags, None, (None, out), False, locked.append
    )
    assert (cfg.size, cfg.width, data, run_dir, again, locked) == (8, 4, dataset, out, False, [out])
    with pytest.raises(UsageError, match="only --epochs may be given"):
        plan.open_run(None, str(out), flags, None, (None, None), False, locked.append)


def test_the_run_of_a_model_is_found_from_the_options_that_name_it(tmp_path):
    from model_factory import make_checkpoint, make_run

    run_dir = make_run(tmp_path / "r")
    assert runs.run_of_model(None, str(run_dir), None) == run_dir
    assert runs.run_of_model(run_dir / "best.safetensors", None, None) == run_dir
    assert runs.run_of_model(make_checkpoint(tmp_path / "m.safetensors"), None, None) is None
    assert runs.run_of_model(tmp_path / "missing.safetensors", None, None) is None
