"""Inputs that are not plain image files (a FIFO, /dev/zero, a huge file) are refused before
they are read, and decoding workers never outlive their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from image_factory import class_tree, save
from model_factory import write_image

from threengan_cli.core.settings import PrepareSettings
from threengan_cli.data import images
from threengan_cli.data.images import ImageReadError, load_image
from threengan_cli.data.prepare import prepare
from threengan_cli.infer.classify import classify

DEV_ZERO = Path("/dev/zero")
needs_dev_zero = pytest.mark.skipif(not DEV_ZERO.exists(), reason="no /dev/zero here")


def make_fifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    try:
        os.mkfifo(path)
    except OSError as exc:
        pytest.skip(f"cannot make a FIFO here ({exc})")
    return path


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = make_fifo(tmp_path / "scan.png")
    with pytest.raises(ImageReadError, match=r"not a regular file \(a FIFO\)"):
        load_image(fifo, 8)
    assert not images.is_image_file(make_fifo(tmp_path / "noext"))


@needs_dev_zero
def test_a_device_is_refused_before_reading(tmp_path):
    with pytest.raises(ImageReadError, match=r"not a regular file \(a character device\)"):
        load_image(DEV_ZERO, 8)


def test_a_file_over_the_byte_limit_is_refused(tmp_path):
    path = save(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="file too large"):
        images.read_bytes(path, limit=10)
    assert images.read_bytes(path) == path.read_bytes()
    assert images.MAX_FILE_BYTES == 256 * 1024 * 1024


@needs_dev_zero
def test_classify_gives_error_rows_for_a_device_and_a_fifo(tmp_path, model):
    fifo = make_fifo(tmp_path / "pipe.png")
    good = write_image(tmp_path / "good.png")
    rows = list(classify([str(DEV_ZERO), str(fifo), str(good)], model, workers=2))
    assert "character device" in rows[0].error and "FIFO" in rows[1].error
    assert rows[2].ok


@needs_dev_zero
def test_prepare_skips_csv_rows_that_point_at_a_device_or_a_fifo_with_a_reason(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 3, "b": 3})
    fifo = make_fifo(tmp_path / "pipe.png")
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(src.rglob("*.png"))]
    rows += [f"{DEV_ZERO},a", f"{fifo},b"]
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    report = prepare(csv_path, tmp_path / "ds", PrepareSettings(image_size=16, workers=1))
    skipped = dict(report.skipped)
    assert "character device" in skipped[str(DEV_ZERO)]
    assert "FIFO" in skipped[fifo.name]
    assert report.total == 6


def test_a_fifo_as_prepare_source_or_config_is_refused(tmp_path):
    from threengan_cli.core.config import SettingsError, read_config
    from threengan_cli.data.sources import DatasetError

    fifo = make_fifo(tmp_path / "list.csv")
    with pytest.raises(DatasetError, match="not a regular file"):
        prepare(fifo, tmp_path / "ds", PrepareSettings(image_size=16, workers=1))
    toml = make_fifo(tmp_path / "cfg.toml")
    with pytest.raises(SettingsError, match="not a regular file"):
        read_config(toml)


# ------------------------------------------------------------------------------ workers
_POOL = """
import sys, time
from threengan_cli.{module} import {factory}
pool = {make}
pool.submit(sum, [1]).result()
print(" ".join(str(p) for p in pool._processes), flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("module", "factory", "make"),
    [
        ("infer.classify", "_executor", "_executor(2)"),  # classify's pool
        ("data.workers", "decode_pool", "decode_pool(2)"),  # the one prepare uses too
    ],
)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_decode_workers_die_with_their_parent(module, factory, make, sig):
    code = _POOL.format(module=module, factory=factory, make=make)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2
        parent.send_signal(sig)
        parent.wait()
        deadline = time.monotonic() + 30  # a bound for a loaded machine, not a measurement
        while not all(_gone(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(p) for p in workers)
    finally:
        parent.kill()
        parent.wait()


@needs_dev_zero
def test_a_device_or_fifo_as_checkpoint_is_a_usage_error(tmp_path):
    from typer.testing import CliRunner

    from threengan_cli.cli.app import app

    image = write_image(tmp_path / "x.png")
    for bad in (DEV_ZERO, make_fifo(tmp_path / "m.safetensors")):
        result = CliRunner().invoke(app, ["classify", str(image), "--checkpoint", str(bad)])
        assert result.exit_code == 2 and "not a regular file" in result.output
