"""fileio: atomic files and folders get the umask's modes, and temporaries left by a killed
writer are removed by the next write, never those of a writer still running."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from threengan_cli import fileio


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_file_and_folder_follow_the_umask_not_mkstemps_private_modes(tmp_path):
    for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o077, 0o600, 0o700)):
        old = os.umask(mask)
        try:
            fileio.write_text(tmp_path / f"f{mask}.txt", "x")
            with fileio.atomic_dir(tmp_path / f"d{mask}") as tmp:
                (tmp / "inside").write_text("y")
        finally:
            os.umask(old)
        assert mode(tmp_path / f"f{mask}.txt") == file_mode
        assert mode(tmp_path / f"d{mask}") == dir_mode


def test_umask_is_read_without_changing_it(umask_022):
    assert fileio.umask() == 0o022
    assert os.umask(0o022) == 0o022


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_write_removes_temporaries_of_a_dead_writer_only(tmp_path, umask_022):
    tag = fileio._host_tag()
    dead, alive = dead_pid(), os.getppid()
    stale_file = tmp_path / f".out.csv.{dead}-{tag}.abcd1234.tmp"
    stale_dir = tmp_path / f".ds.{dead}-{tag}.abcd1234.partial"
    busy = tmp_path / f".out.csv.{alive}-{tag}.abcd1234.tmp"
    other_host = tmp_path / f".out.csv.{dead}-00000000.abcd1234.tmp"
    for path in (stale_file, busy, other_host):
        path.write_text("half")
    stale_dir.mkdir()
    (stale_dir / "data").write_text("half")

    fileio.write_text(tmp_path / "out.csv", "whole")
    assert not stale_file.exists()
    assert busy.exists()  # its writer still runs
    assert other_host.exists()  # another machine's, and young
    assert not stale_dir.exists()  # any name: its pid says it is ours and dead
    legacy = tmp_path / ".notes.txt.abcd1234.tmp"  # no pid: another program's, perhaps
    legacy.write_text("x")
    os.utime(legacy, (0, 0))
    fileio.write_text(tmp_path / "out.csv", "again")
    assert legacy.exists()
    fileio.write_text(tmp_path / "notes.txt", "mine")
    assert not legacy.exists()  # the target's own name, and a day old


def test_a_folder_moved_aside_by_a_killed_replace_comes_back(tmp_path):
    old = tmp_path / f".ds.old-{dead_pid()}"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    fileio.clean_stale(tmp_path)
    assert (tmp_path / "ds" / "manifest.json").read_text() == "{}"


def test_atomic_dir_refuses_a_folder_that_another_writer_put_in_place(tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(FileExistsError), fileio.atomic_dir(target) as tmp:
        (tmp / "mine").write_text("1")
        target.mkdir()
        (target / "theirs").write_text("2")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert not list(tmp_path.glob(".*partial"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.csv"
    target.write_text("old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        fileio.write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_a_prepared_dataset_follows_the_umask_too(tmp_path, umask_022):
    from image_factory import class_tree

    from threengan_cli.datasets import prepare
    from threengan_cli.settings import PrepareSettings

    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    out = tmp_path / "ds"
    prepare(src, out, PrepareSettings(image_size=16, workers=1))
    assert mode(out) == 0o755
    assert {p.name: mode(p) for p in out.iterdir()} == {
        "data.safetensors": 0o644,
        "manifest.json": 0o644,
        "settings.json": 0o644,
    }
