"""Where classify's results go can fail: a reader that stops early (``| head -1``) ends
the command quietly with exit 0; a full disk, under -o or a redirected stdout, is a
one-line error with exit 1 and leaves no partial file."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from model_factory import write_image
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.core import fileio

runner = CliRunner()


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "in"
    for i in range(40):
        write_image(folder / f"{i:03d}.png", size=(16, 16), seed=i)
    return folder


def classify_process(args: list[str], stdout) -> subprocess.Popen:
    command = [sys.executable, "-m", "threengan_cli", "classify", *args, "--workers", "1"]
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True)


def test_a_reader_that_stops_early_ends_classify_quietly_with_exit_0(images, ckpt):
    for fmt in ("csv", "jsonl"):
        args = [str(images), "--checkpoint", str(ckpt), "-f", fmt]
        proc = classify_process(args, subprocess.PIPE)
        proc.stdout.close()  # gone before the first write: as head -1 after its line
        stderr = proc.stderr.read()
        assert proc.wait() == 0, stderr
        assert "Traceback" not in stderr and "Exception ignored" not in stderr
        assert "error" not in stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_a_full_stdout_is_one_line_and_exit_1(images, ckpt):
    with open("/dev/full", "w") as full:
        proc = classify_process([str(images), "--checkpoint", str(ckpt), "-q"], full)
        stderr = proc.stderr.read()
        assert proc.wait() == 1
    assert stderr.startswith("error: writing the results to stdout failed: No space left")
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_a_full_disk_under_output_leaves_no_file_and_is_one_line(
    images, ckpt, tmp_path, monkeypatch
):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    out = tmp_path / "res" / "out.csv"
    result = runner.invoke(
        app, ["classify", str(images), "--checkpoint", str(ckpt), "-o", str(out), "-q"]
    )
    assert result.exit_code == 1
    assert "No space left on device" in result.output and "nothing written" in result.output
    assert list(out.parent.iterdir()) == []


def test_json_to_a_reader_that_stopped_is_quiet(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "threengan_cli", "datasets", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait() == 0 and "Traceback" not in stderr and "Exception ignored" not in stderr
