"""What `info` says about bf16 on the CPU, and train's warning where bf16 is slower."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from threengan_cli import system, training
from threengan_cli.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("flags", "verdict"),
    [
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "unproven"),
        ({"avx2", "avx512f", "avx512_bf16"}, "slower"),
        ({"avx2", "fma"}, "emulated"),
        (set(), "emulated"),
    ],
)
def test_bf16_verdict_follows_the_cpu_features(flags, verdict):
    assert system.cpu_bf16_verdict(flags)[0] == verdict


def test_info_says_whether_bf16_pays(monkeypatch):
    monkeypatch.setattr(system, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    shown = runner.invoke(app, ["info"]).stdout
    assert "slower" in shown and "without AMX" in shown


def _train_bf16(monkeypatch, dataset, flags):
    monkeypatch.setattr(system, "cpu_flags", lambda: flags)

    def stub(*args, **kwargs):  # what matters happens before training starts
        raise training.TrainingError("stopped by the test")

    monkeypatch.setattr(training, "train", stub)
    return runner.invoke(
        app, ["train", str(dataset), "--precision", "bf16", "--device", "cpu", "--epochs", "1"]
    )


def test_train_bf16_warns_where_it_was_not_measured_faster_than_fp32(monkeypatch, dataset):
    slower = _train_bf16(monkeypatch, dataset, {"avx512_bf16"})
    assert "likely slower than fp32" in slower.stderr and "without AMX" in slower.stderr
    amx = _train_bf16(monkeypatch, dataset, {"avx512_bf16", "amx_bf16"})
    assert "likely slower than fp32" in amx.stderr and "AMX" in amx.stderr
    fp32 = runner.invoke(app, ["train", str(dataset), "--device", "cpu", "--epochs", "1"])
    assert "bf16" not in fp32.stderr


def test_train_refuses_emulated_bf16_on_the_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(system, "cpu_flags", lambda: {"avx2"})
    with pytest.raises(training.TrainingError, match="no native bf16"):
        training.autocast_dtype("bf16", torch.device("cpu"))
