"""threengan runs: listing run folders, pruning finished runs' resumable checkpoints, and
re-running `train --resume` on a finished run."""

from __future__ import annotations

import json
import threading

import pytest
from model_factory import write_image
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.core.settings import TrainSettings
from threengan_cli.infer.torch_engine import load_model
from threengan_cli.train import events, finish, runlist, scoring, training

runner = CliRunner()


def _settings(**kw):
    base = {"width": 4, "latent": 8, "batch_size": 4, "epochs": 1, "device": "cpu", "seed": 3}
    return TrainSettings(**{**base, **kw})


@pytest.fixture
def finished(dataset, threengan_home):
    run = threengan_home / "runs" / "done"
    training.train(dataset, _settings(method="3ngan", size=8), run)
    return run


def _stopped(dataset, threengan_home):
    run = threengan_home / "runs" / "half"

    flag = threading.Event()

    def stop(event):
        if isinstance(event, events.EpochDone):
            flag.set()

    with pytest.raises(events.Interrupted):
        cfg = _settings(method="vanilla", epochs=2)
        training.train(dataset, cfg, run, on_event=stop, stop_flag=flag)
    assert (run / "last.safetensors").exists()
    return run


def test_runs_lists_state_epochs_accuracy_and_size(dataset, finished, threengan_home):
    _stopped(dataset, threengan_home)
    done = runner.invoke(app, ["runs", "--json"])
    assert done.exit_code == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert set(rows) == {"done", "half"}
    a, b = rows["done"], rows["half"]
    assert (a["method"], a["size"], a["epochs_done"], a["epochs_planned"]) == ("3ngan", 8, 1, 1)
    assert a["state"] == "finished" and a["resumable"]
    summary = json.loads((finished / "summary.json").read_text())
    assert a["test_accuracy"] == summary["test"]["accuracy"]
    assert a["val_accuracy"] == summary["val"]["accuracy"]
    assert a["bytes"] == sum(p.stat().st_size for p in finished.rglob("*") if p.is_file())
    assert (b["method"], b["epochs_done"], b["epochs_planned"]) == ("vanilla", 1, 2)
    assert b["state"] == "stopped" and b["test_accuracy"] is None
    table = runner.invoke(app, ["runs"]).stdout
    assert "finished" in table and "stopped" in table and "1/1" in table


def test_a_run_whose_writer_lock_is_held_counts_as_running(dataset, threengan_home):
    from threengan_cli.train import runlock

    run = _stopped(dataset, threengan_home)
    with runlock.lock(run):
        assert runlist.list_runs()[0].state == "running"
    assert runlist.list_runs()[0].state == "stopped"


def test_runs_with_nothing_there_says_so(threengan_home):
    done = runner.invoke(app, ["runs"])
    assert done.exit_code == 0 and "no runs yet" in done.stderr
    assert json.loads(runner.invoke(app, ["runs", "--json"]).stdout) == []
    assert runner.invoke(app, ["runs", "nope"]).exit_code == 2


def test_prune_last_keeps_final_weights_and_the_run_still_classifies(dataset, finished, tmp_path):
    before = load_model(finished / "last.safetensors", device="cpu")
    image = str(write_image(tmp_path / "a.png"))
    first = runner.invoke(app, ["classify", image, "--run", "done", "-f", "jsonl"]).stdout
    done = runner.invoke(app, ["runs", "--prune-last", "--json"])
    assert done.exit_code == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["pruned"][0]["name"] == "done" and doc["pruned"][0]["wrote_final"]
    assert not (finished / "last.safetensors").exists()
    final = load_model(finished / "final.safetensors", device="cpu")
    for name, net in before.nets.items():
        for key, value in net.state_dict().items():
            assert final.nets[name].state_dict()[key].equal(value), key
    assert (finished / "final.safetensors").stat().st_size < 0.5 * doc["pruned"][0]["freed_bytes"]
    assert doc["runs"][0]["state"] == "finished" and not doc["runs"][0]["resumable"]
    again = runner.invoke(app, ["classify", image, "--run", "done", "-f", "jsonl"]).stdout
    assert again == first  # --run takes the same final weights, now from final.safetensors
    best = ["classify", image, "--run", "done", "--model", "best", "-f", "json", "-q"]
    assert json.loads(runner.invoke(app, best).stdout)["model"].startswith("done/best.")
    nothing = runner.invoke(app, ["runs", "--prune-last"])
    assert nothing.exit_code == 0 and "nothing to prune" in nothing.stderr


def test_prune_leaves_unfinished_runs_alone(dataset, threengan_home):
    run = _stopped(dataset, threengan_home)
    assert runner.invoke(app, ["runs", "--prune-last"]).exit_code == 0
    assert (run / "last.safetensors").exists()


def test_resume_of_a_finished_run_prints_its_summary_and_exits_0(finished):
    done = runner.invoke(app, ["train", "--resume", "done"])
    assert done.exit_code == 0, done.stderr
    assert "already finished its 1 epochs" in done.stderr and "test accuracy" in done.stderr
    same = runner.invoke(app, ["train", "--resume", "done", "--epochs", "1", "--json"])
    assert same.exit_code == 0
    assert json.loads(same.stdout) == json.loads((finished / "summary.json").read_text())


def test_a_pruned_run_cannot_be_extended(finished):
    runner.invoke(app, ["runs", "--prune-last"])
    done = runner.invoke(app, ["train", "--resume", "done", "--epochs", "3"])
    assert done.exit_code == 2 and "pruned" in done.stderr
    assert json.loads((finished / "summary.json").read_text())["epochs"] == 1


def test_benchmark_runs_are_listed_under_their_benchmark(threengan_home):
    run = threengan_home / "benchmarks" / "k-quick" / "runs" / "3ngan-n200-r0"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"method": "3ngan", "train_images": 200}))
    (threengan_home / "benchmarks" / "k-quick" / "runs" / "not-a-run").mkdir()
    [info] = runlist.list_runs()
    assert (info.name, info.method, info.size) == ("k-quick/3ngan-n200-r0", "3ngan", 200)


def test_a_failed_benchmark_run_is_listed_as_failed_not_stopped(threengan_home):
    run = threengan_home / "benchmarks" / "k-quick" / "runs" / "3ngan-n200-r0"
    run.mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"method": "3ngan", "size": 200}))
    (run / "run.json").write_text(json.dumps({"method": "3ngan", "train_images": 200}))
    (run / "failed.json").write_text(json.dumps({"error": "loss_c became nan at epoch 3"}))
    [info] = runlist.list_runs()
    assert info.state == "failed"
    assert info.test_accuracy is None


# ----------------------------------------------------------------------- damaged runs
def _damaged_copies(finished, home):
    """Copies of a finished run, each damaged in one way that once stopped `runs`."""
    import shutil
    import struct

    made = {}

    def copy(name):
        run = home / "runs" / name
        shutil.copytree(finished, run)
        made[name] = run
        return run

    (copy("list-line") / "metrics.jsonl").write_text("[1, 2]\n")
    (copy("text-epoch") / "metrics.jsonl").write_text('{"epoch": "one"}\n')
    (copy("not-utf8") / "metrics.jsonl").write_bytes(b'{"epoch": 1, "note": "\xff"}\n')
    run = copy("val-list")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "val": [0.5]}))
    run = copy("method-list")
    settings = json.loads((run / "settings.json").read_text())
    (run / "settings.json").write_text(json.dumps({**settings, "method": ["3ngan"]}))
    run = copy("huge-header")
    with open(run / "last.safetensors", "r+b") as fh:
        fh.write(struct.pack("<Q", 2**40))
    return made


def test_a_damaged_run_is_listed_as_damaged_and_the_others_still_list(finished, threengan_home):
    damaged = _damaged_copies(finished, threengan_home)
    done = runner.invoke(app, ["runs", "--json"])
    assert done.exit_code == 0, done.output
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["done"]["state"] == "finished" and rows["done"]["error"] is None
    for name in damaged:
        assert rows[name]["state"] == "damaged", name
        assert rows[name]["error"], name
    assert "header" in rows["huge-header"]["error"]
    assert "UTF-8" in rows["not-utf8"]["error"]
    table = runner.invoke(app, ["runs"])
    assert table.exit_code == 0 and "Traceback" not in table.output
    assert "done" in table.stdout and table.stdout.count("damaged") == len(damaged)
    assert "huge-header is damaged" in table.stderr


# ------------------------------------------------------------------------ prune and lock
def test_prune_leaves_a_run_that_another_process_writes_alone(finished):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom threengan_cli.train import runlock\n"
            "with runlock.lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)",
            str(finished),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        done = runner.invoke(app, ["runs", "--prune-last"])
        assert done.exit_code == 1
        assert f"cannot prune done: {finished} is in use" in done.stderr
        assert f"pid {holder.pid}" in done.stderr
        assert (finished / "last.safetensors").exists()
        assert not (finished / "final.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    assert runner.invoke(app, ["runs", "--prune-last"]).exit_code == 0
    assert not (finished / "last.safetensors").exists()


# ------------------------------------------------------------------------------ output
def test_run_names_are_never_cut_short_in_the_table(dataset, threengan_home):
    long_name = "kermany-3ngan-n200-s0-a-name-long-enough-to-be-cut-by-an-80-column-table"
    run = threengan_home / "runs" / long_name
    training.train(dataset, _settings(method="vanilla", size=8), run)
    table = runner.invoke(app, ["runs"])  # stdout is not a terminal here: 80 columns
    assert table.exit_code == 0
    assert long_name in table.stdout and "…" not in table.stdout


def test_runs_train_and_evaluate_report_the_final_model_that_run_loads(
    dataset, threengan_home, monkeypatch
):
    # Accuracies staged by call order, so that the best epoch on val (1) and the final epoch
    # (2) have different test accuracies: of the epochs' val splits (epoch 1, epoch 2; then
    # the BN-adapted test), and at the end of the run from one pass's logits (final test,
    # final val, test of the best-on-val model).
    def staged(real, accuracies):
        calls = []

        def scored(*args, **kwargs):
            out = dict(real(*args, **kwargs))
            calls.append(out)
            if len(calls) in accuracies:
                out["accuracy"] = accuracies[len(calls)]
            return out

        return scored

    monkeypatch.setattr(training, "score_split", staged(scoring.score_split, {1: 0.9, 2: 0.6}))
    at_end = staged(scoring.metrics_of_logits, {1: 0.7, 3: 0.8})
    monkeypatch.setattr(finish, "metrics_of_logits", at_end)
    args = ["train", str(dataset), "--name", "two", "--method", "vanilla", "--recipe", "paper"]
    args += ["--width", "4", "--batch-size", "4", "--epochs", "2", "--device", "cpu"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    summary = json.loads((threengan_home / "runs" / "two" / "summary.json").read_text())
    assert summary["best_epoch_on_val"] == 1
    assert (summary["test"]["accuracy"], summary["test_of_best_on_val"]["accuracy"]) == (0.7, 0.8)
    line = done.stderr.splitlines()[-1]
    assert "test accuracy 0.7000" in line and "of the final model, the one --run loads" in line
    assert "best on val, epoch 1 (--model best): test accuracy 0.8000" in line
    [row] = json.loads(runner.invoke(app, ["runs", "--json"]).stdout)
    assert (row["test_accuracy"], row["best_epoch"], row["test_accuracy_best"]) == (0.7, 1, 0.8)
    assert row["val_accuracy"] == summary["val"]["accuracy"]  # the final model's
    # how its out-of-distribution detector was fitted: the whole train split, 24 images
    assert row["ood_fit"]["fitted_on"] == {"images": 24} and row["ood_fit"]["pixels"]["dims"]
    fitted = {"value": summary["stats"]["temperature"], "split": "val", "images": 8}
    assert row["temperature"] == fitted  # where its temperature was fitted: the val split
    table = runner.invoke(app, ["runs"]).stdout
    assert "0.7000" in table and "0.8000 (1)" in table and "--run loads" in table
    assert "24 img, 12+12 dir" in table  # half as many directions as images at most
    # --run loads the model those figures are of; --model best the other one
    final = runner.invoke(app, ["evaluate", str(dataset), "--run", "two", "--json", "-q"])
    best = runner.invoke(
        app, ["evaluate", str(dataset), "--run", "two", "--model", "best", "--json", "-q"]
    )
    assert final.exit_code == 0 and best.exit_code == 0, final.output + best.output
    final, best = json.loads(final.stdout), json.loads(best.stdout)
    assert final["which_model"] == "final, epoch 2" and final["model"].startswith("two/last.")
    assert best["which_model"] == "best on val, epoch 1" and best["model"].startswith("two/best.")


def test_runs_listed_by_name_are_only_those_and_an_unknown_name_is_a_usage_error(
    threengan_home,
):
    from threengan_cli.core.errors import UsageError

    for name in ("a", "b", "c"):
        (threengan_home / "runs" / name).mkdir(parents=True)
        (threengan_home / "runs" / name / "run.json").write_text("{}\n")
    assert [r.name for r in runlist.list_runs()] == ["a", "b", "c"]
    assert [r.name for r in runlist.list_runs(names=["c", "a"])] == ["a", "c"]
    with pytest.raises(UsageError, match="no run named d "):
        runlist.list_runs(names=["a", "d"])
