"""The training loop end to end on a tiny prepared dataset made from an on-the-fly .npz."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from threengan_cli.core.settings import TrainSettings
from threengan_cli.model import checkpoints
from threengan_cli.train import accel, events, training


def _settings(**kw):
    base = {"width": 4, "latent": 8, "batch_size": 4, "epochs": 2, "device": "cpu", "seed": 3}
    base["recipe"] = "paper"  # the loop mechanics; the robust options have tests of their own
    return TrainSettings(**{**base, **kw})


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["vanilla", "sgan", "ecgan", "3ngan"])
def test_a_finished_run_folder_holds_settings_metrics_checkpoints_and_samples(
    dataset, tmp_path, method
):
    run = tmp_path / "run"
    summary = training.train(dataset, _settings(method=method), run)
    names = {p.name for p in run.iterdir()}
    assert {
        "settings.json",
        "run.json",
        "metrics.jsonl",
        "last.safetensors",
        "best.safetensors",
        "summary.json",
        "samples",
    } <= names
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert {
        "accuracy",
        "balanced_accuracy",
        "auc",
        "sensitivity",
        "specificity",
        "f1",
        "loss",
    } <= set(records[0]["val"])
    assert summary["test"]["n"] == 8
    samples = sorted(p.name for p in (run / "samples").iterdir())
    assert samples == ([] if method == "vanilla" else ["epoch_0001.png", "epoch_0002.png"])


@pytest.mark.slow
def test_two_identical_cpu_runs_give_identical_metrics(dataset, tmp_path):
    training.train(dataset, _settings(), tmp_path / "a")
    training.train(dataset, _settings(), tmp_path / "b")
    assert _metrics(tmp_path / "a") == [
        {**r, "seconds": a["seconds"], "images_per_s": a["images_per_s"]}
        for r, a in zip(_metrics(tmp_path / "b"), _metrics(tmp_path / "a"), strict=True)
    ]


@pytest.mark.slow
def test_an_interrupted_run_resumes_exactly_like_an_uninterrupted_one(dataset, tmp_path):
    full = tmp_path / "full"
    training.train(dataset, _settings(epochs=3), full)

    stopped = tmp_path / "stopped"
    calls = {"n": 0}

    def stop_mid_epoch(event):
        if isinstance(event, events.StepDone):
            calls["n"] += 1
            if calls["n"] == 9:  # epoch 2 (6 steps per epoch), third step
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.train(dataset, _settings(epochs=3), stopped, on_event=stop_mid_epoch)
    # The last checkpoint is from the end of epoch 1; resume replays epoch 2 identically.
    training.train(dataset, _settings(epochs=3), stopped, resume=True)

    def strip(records):
        return [
            {k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in records
        ]

    assert strip(_metrics(stopped)) == strip(_metrics(full))
    a = checkpoints.load(full / "last.safetensors").group("net")
    b = checkpoints.load(stopped / "last.safetensors").group("net")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_stop_request_saves_a_mid_epoch_checkpoint_that_resumes(dataset, tmp_path):
    run = tmp_path / "run"

    def request_stop(event):
        if isinstance(event, events.StepDone) and event.epoch == 0 and event.step == 2:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(events.Interrupted) as info:
        training.train(dataset, _settings(), run, on_event=request_stop)
    assert info.value.step == 2
    summary = training.train(dataset, _settings(), run, resume=True)
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]
    assert summary["epochs"] == 2


@pytest.mark.slow
def test_a_finished_run_is_extended_by_a_larger_epoch_count(dataset, tmp_path):
    run = tmp_path / "run"
    training.train(dataset, _settings(epochs=1), run)
    with pytest.raises(events.TrainingError, match="already has 1 epochs"):
        training.train(dataset, _settings(epochs=1), run, resume=True)
    summary = training.train(dataset, _settings(epochs=2), run, resume=True)
    assert summary["extended"] is True
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    run = tmp_path / "run"
    training.train(dataset, _settings(epochs=1), run)
    good = (run / "last.safetensors").read_bytes()
    with pytest.raises(events.NonFiniteLoss, match=r"loss_\w became nan at epoch 2 step \d+"):
        training.train(dataset, _settings(epochs=2, lr=1.0, alpha=1e38, lam=1e38), run, resume=True)
    assert (run / "last.safetensors").read_bytes() == good


def test_fp16_is_refused_with_a_clear_message():
    with pytest.raises(events.TrainingError, match="fp16"):
        accel.autocast_dtype("fp16", torch.device("cpu"))


def test_bf16_is_refused_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(training.system, "cpu_bf16", lambda: False)
    with pytest.raises(events.TrainingError, match="no native bf16"):
        accel.autocast_dtype("bf16", torch.device("cpu"))
    monkeypatch.setattr(training.system, "cpu_bf16", lambda: True)
    assert accel.autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


@pytest.mark.slow
def test_resuming_a_run_killed_before_its_first_checkpoint_starts_it_over(dataset, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    training.train(dataset, _settings(epochs=1), full)
    killed.mkdir()
    (killed / "metrics.jsonl").write_text("")  # what a SIGKILL in epoch 1 leaves behind
    training.train(dataset, _settings(epochs=1), killed, resume=True)
    assert [r["val"] for r in _metrics(killed)] == [r["val"] for r in _metrics(full)]


def test_a_run_stopped_before_its_summary_resumes_into_the_final_evaluation(
    dataset, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    real_finish = training.finish

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        training.train(dataset, _settings(epochs=1), run)
    assert not (run / "summary.json").exists()
    monkeypatch.setattr(training, "finish", real_finish)
    summary = training.train(dataset, _settings(epochs=1), run, resume=True)
    assert summary["extended"] is False
    assert [r["epoch"] for r in _metrics(run)] == [1]
    assert (run / "summary.json").exists()


@pytest.mark.slow
def test_with_a_checkpoint_interval_only_the_end_is_written_and_best_matches_val(
    dataset, tmp_path, monkeypatch
):
    writes = []
    real_save = checkpoints.save
    monkeypatch.setattr(
        checkpoints,
        "save",
        lambda path, *a, **k: (writes.append(path.name), real_save(path, *a, **k)),
    )
    run = tmp_path / "run"
    summary = training.train(dataset, _settings(epochs=3), run, checkpoint_every_s=3600)
    # one best (the best epoch's weights, kept in memory until then) and last after the last
    # epoch; then, after the final evaluation, best again with the statistics of its weights
    # and last marked finished, with its own
    assert writes == ["best.safetensors", "last.safetensors"] * 2
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_0003.png"]
    best = checkpoints.load(run / "best.safetensors")
    assert best.meta["position"]["epoch"] == summary["best_epoch_on_val"]
    vals = [r["val"]["accuracy"] for r in _metrics(run)]
    assert best.meta["best_val_accuracy"] == max(vals)
    assert summary["best_epoch_on_val"] == vals.index(max(vals)) + 1


@pytest.mark.slow
def test_a_stop_request_writes_the_pending_best_checkpoint_too(dataset, tmp_path):
    run = tmp_path / "run"

    def request_stop(event):
        if isinstance(event, events.StepDone) and event.epoch == 1 and event.step == 2:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(events.Interrupted):
        training.train(dataset, _settings(), run, on_event=request_stop, checkpoint_every_s=3600)
    assert (run / "best.safetensors").is_file() and (run / "last.safetensors").is_file()
    summary = training.train(dataset, _settings(), run, resume=True, checkpoint_every_s=3600)
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]
    assert summary["epochs"] == 2


class _Clock:
    """A stand-in for ``time.perf_counter`` that a test moves on: 45 s per epoch here."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.slow
def test_checkpoints_on_a_time_basis_resume_exactly_after_a_kill(dataset, tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(training.time, "perf_counter", clock)
    writes = []
    real_save = checkpoints.save

    def save(path, *args, **kwargs):
        writes.append((path.parent.name, path.name))
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save", save)

    def every_45_s(event):
        if isinstance(event, events.EpochDone):
            clock.now += 45.0

    cfg = _settings(method="vanilla", epochs=5, recipe="robust")  # EMA and precise BN too
    full = tmp_path / "full"
    training.train(dataset, cfg, full, on_event=every_45_s, checkpoint_every_s=60)
    # 60 s apart: after epoch 3, after the last one, and once more when finished
    assert [name for run, name in writes if run == "full" and name == "last.safetensors"] == [
        "last.safetensors"
    ] * 3

    killed = tmp_path / "killed"
    clock.now = 0.0

    def kill_in_epoch_5(event):
        every_45_s(event)
        if isinstance(event, events.StepDone) and event.epoch == 4 and event.step == 2:
            raise KeyboardInterrupt  # a kill: no stop request, nothing saved on the way out

    with pytest.raises(KeyboardInterrupt):
        training.train(dataset, cfg, killed, on_event=kill_in_epoch_5, checkpoint_every_s=60)
    assert checkpoints.load(killed / "last.safetensors").meta["position"]["epoch"] == 3
    assert [r["epoch"] for r in _metrics(killed)] == [1, 2, 3, 4]  # ahead of the checkpoint
    training.train(dataset, cfg, killed, resume=True, checkpoint_every_s=60)

    def strip(records):
        return [
            {k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in records
        ]

    assert strip(_metrics(killed)) == strip(_metrics(full))
    for name in ("last.safetensors", "best.safetensors"):
        a = checkpoints.load(full / name).group("net")
        b = checkpoints.load(killed / name).group("net")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_train_writes_its_checkpoints_on_a_time_basis_by_default(dataset, monkeypatch):
    from typer.testing import CliRunner

    from threengan_cli.cli.app import app

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise events.TrainingError("stopped by the test")

    monkeypatch.setattr(training, "train", record)
    args = ["train", str(dataset), "--device", "cpu", "--epochs", "1", "-q"]
    CliRunner().invoke(app, args)
    assert seen["checkpoint_every_s"] == 60
    CliRunner().invoke(app, [*args, "--checkpoint-every", "0"])
    assert seen["checkpoint_every_s"] is None  # 0: after every epoch


def test_the_eager_step_runner_calls_the_step_as_is():
    seen = []
    runner = accel.StepRunner(lambda idx: seen.append(idx.tolist()) or {"x": idx}, graphs=False)
    assert runner(torch.tensor([1, 2]))["x"].tolist() == [1, 2]
    assert seen == [[1, 2]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("method", ["vanilla", "3ngan"])
def test_a_run_with_cuda_graphs_matches_the_eager_run_on_cuda(dataset, tmp_path, method):
    # vanilla draws no random numbers: replayed graphs must do the same updates as eager
    # steps, up to the order of floating-point reductions. 3ngan draws z inside the graph
    # (graph-safe philox), so its random stream may differ: it must run and stay finite.
    def run(name, graphs):
        cfg = _settings(method=method, device="cuda", cuda_graphs=graphs, epochs=4)
        return training.train(dataset, cfg, tmp_path / name), _metrics(tmp_path / name)

    (eager, eager_m), (graphed, graphed_m) = run("eager", False), run("graphs", True)
    assert [r["epoch"] for r in graphed_m] == [1, 2, 3, 4]
    for a, b in zip(eager_m, graphed_m, strict=True):
        assert set(a["train"]) == set(b["train"])
        assert all(np.isfinite(v) for v in b["train"].values())
        if method == "vanilla":
            assert b["train"]["loss_c"] == pytest.approx(a["train"]["loss_c"], rel=1e-3)
    if method == "vanilla":
        assert graphed["test"]["accuracy"] == eager["test"]["accuracy"]


def test_gpu_turns_are_first_come_first_served_and_passed_on_between_steps():
    import threading
    import time

    turns, order = accel.GpuTurns(), []
    turns.acquire()

    def other():
        turns.acquire()
        order.append("other")
        turns.release()

    thread = threading.Thread(target=other)
    thread.start()
    while turns._next_ticket < 2:  # the other thread is waiting for its turn
        time.sleep(0.001)
    turns.pass_on()  # returns only after the waiting thread has had its turn
    order.append("first")
    turns.pass_on()  # nobody waits: keeps the turn
    turns.release()
    thread.join()
    assert order == ["other", "first"]


def test_gpu_turns_are_lent_for_host_work_and_taken_back():
    import threading

    turns, order = accel.GpuTurns(), []
    turns.acquire()
    with turns.lent():  # another run can take its turn while this one writes files
        thread = threading.Thread(
            target=lambda: (turns.acquire(), order.append("other"), turns.release())
        )
        thread.start()
        thread.join(timeout=5)
        order.append("host work")
    order.append("back")
    turns.release()
    assert order == ["other", "host work", "back"]


@pytest.mark.slow
def test_without_a_val_split_the_best_checkpoint_is_the_final_model(tmp_path):
    from model_factory import write_image

    from threengan_cli.core.settings import PrepareSettings
    from threengan_cli.data.prepare import prepare

    for i in range(6):
        for label in ("a", "b"):
            write_image(
                tmp_path / "src" / label / f"{label}{i}.png",
                (16, 16),
                seed=i + 100 * (label == "b"),
            )
    prepare(
        tmp_path / "src",
        tmp_path / "ds",
        PrepareSettings(image_size=16, val_fraction=0.0, min_val=0),
    )
    run = tmp_path / "run"
    summary = training.train(tmp_path / "ds", _settings(epochs=3), run)
    assert summary["best_epoch_on_val"] == 3
    best = checkpoints.load(run / "best.safetensors")
    last = checkpoints.load(run / "last.safetensors")
    assert best.meta["position"]["epoch"] == 3
    assert all(torch.equal(v, last.group("net")[k]) for k, v in best.group("net").items())


def test_precise_bn_on_the_pool_fits_the_classifiers_statistics_on_the_pool():
    from types import SimpleNamespace

    from threengan_cli.train.runstate import bn_batches

    labelled = torch.zeros(70, 8, 8, dtype=torch.uint8)
    pool = torch.full((130, 8, 8), 255, dtype=torch.uint8)
    data = SimpleNamespace(train_x=labelled, unlabelled=pool)

    def seen(**kw):
        settings = TrainSettings(unlabelled="rest", **kw)
        loop = SimpleNamespace(settings=settings, data=data, n=70, device=torch.device("cpu"))
        batches = list(bn_batches(loop, "C"))
        return sum(len(b) for b in batches), float(torch.cat(batches).mean())

    assert seen() == (70, -1.0)  # the labelled images, in the model's range
    assert seen(precise_bn_images="unlabelled") == (130, 1.0)  # the pool's


def test_the_checkpoint_interval_is_seconds_0_or_more_and_0_means_every_epoch():
    from threengan_cli.core.errors import UsageError

    assert events.checkpoint_interval(60.0) == 60.0
    assert events.checkpoint_interval(0) is None
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(UsageError, match="--checkpoint-every takes seconds"):
            events.checkpoint_interval(bad)
