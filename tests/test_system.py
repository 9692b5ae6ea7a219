"""What `info` says about bf16 on the CPU (its support from the CPU's features; its speed
only as measured here, with --measure), and train's warning."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.core import system
from threengan_cli.train import accel, events, training

runner = CliRunner()


@pytest.mark.parametrize(
    ("flags", "support"),
    [
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "native (AMX)"),
        ({"avx2", "avx512f", "avx512_bf16"}, "native (AVX512-BF16, no AMX)"),
        ({"avx2", "fma"}, "emulated"),
        (set(), "emulated"),
    ],
)
def test_bf16_support_follows_the_cpu_features(flags, support):
    assert system.cpu_bf16_support(flags).startswith(support)


def test_info_states_no_bf16_speed_it_did_not_measure(monkeypatch):
    monkeypatch.setattr(system, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    shown = runner.invoke(app, ["info"]).stdout
    assert "native (AVX512-BF16, no AMX); speed unmeasured" in shown
    assert "slower" not in shown and "faster" not in shown and " ms" not in shown


def test_info_measure_times_both_precisions_here_and_says_which_is_faster(monkeypatch):
    from threengan_cli.train import accel

    calls = []

    def measured(budget_s: float = 6.0, width: int = 64, batch: int = 10):
        calls.append((width, batch))
        return {"fp32_ms": 200.0, "bf16_ms": 250.0, "bf16_speedup": 0.8, "steps": 5, "native": True}

    monkeypatch.setattr(accel, "measure_cpu_bf16", measured)
    done = runner.invoke(app, ["info", "--measure", "--json"])
    facts = __import__("json").loads(done.stdout)
    assert calls == [(64, 10)]  # the step training runs: width 64, batch 10
    assert "measured now: 3ngan step fp32 200 ms, bf16 250 ms" in facts["bf16 on cpu"]
    assert "bf16 1.25x slower" in facts["bf16 on cpu"]
    assert facts["bf16 on cpu, measured"]["bf16_speedup"] == 0.8


def test_the_bf16_measurement_times_real_steps(monkeypatch):
    from threengan_cli.train import accel

    monkeypatch.setattr(system, "cpu_flags", lambda: {"avx512_bf16"})  # so bf16 gets a warm-up
    found = accel.measure_cpu_bf16(budget_s=0.0, width=2, batch=2)
    assert found["steps"] == 1 and found["fp32_ms"] > 0 and found["bf16_ms"] > 0
    assert found["bf16_speedup"] == pytest.approx(found["fp32_ms"] / found["bf16_ms"], rel=0.01)


def _train_bf16(monkeypatch, dataset, flags):
    monkeypatch.setattr(system, "cpu_flags", lambda: flags)

    def stub(*args, **kwargs):  # what matters happens before training starts
        raise events.TrainingError("stopped by the test")

    monkeypatch.setattr(training, "train", stub)
    return runner.invoke(
        app, ["train", str(dataset), "--precision", "bf16", "--device", "cpu", "--epochs", "1"]
    )


def test_train_bf16_warns_that_it_is_not_known_faster_and_how_to_measure(monkeypatch, dataset):
    for flags in ({"avx512_bf16"}, {"avx512_bf16", "amx_bf16"}):
        native = _train_bf16(monkeypatch, dataset, flags)
        assert "not known to be faster than fp32 here" in native.stderr
        assert "threengan info --measure" in native.stderr
    fp32 = runner.invoke(app, ["train", str(dataset), "--device", "cpu", "--epochs", "1"])
    assert "bf16" not in fp32.stderr


def test_train_refuses_emulated_bf16_on_the_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(system, "cpu_flags", lambda: {"avx2"})
    with pytest.raises(events.TrainingError, match="no native bf16"):
        accel.autocast_dtype("bf16", torch.device("cpu"))


def test_bf16_is_unmeasured_only_on_a_cpu_that_runs_it_natively(monkeypatch):
    monkeypatch.setattr(system, "cpu_flags", lambda: {"avx512_bf16"})
    assert system.bf16_unmeasured("bf16", "cpu") and system.bf16_unmeasured("bf16", "auto")
    assert not system.bf16_unmeasured("fp32", "cpu")
    monkeypatch.setattr(system, "cpu_flags", lambda: {"avx2"})
    assert not system.bf16_unmeasured("bf16", "cpu")  # emulated: training refuses it instead
