"""fileio: atomic files and folders get the umask's modes, and temporaries left by a killed
writer are removed by the next write, never those of a writer still running; an OS error
while writing is one line that says what to do, and a signal's exit code is 128 + its number
(core/errors)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from threengan_cli.core import fileio


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


def temporary(folder: Path, name: str, pid: int, kind: str, host: str | None = None) -> Path:
    """The name fileio gives a temporary of ``name`` written by ``pid`` on ``host``."""
    return folder / f".{name}.{fileio.MARK}-{pid}-{host or fileio._host_tag()}.abcd1234.{kind}"


def marked_dir(path: Path) -> Path:
    """A folder as fileio leaves it while building one: holding its mark."""
    path.mkdir()
    (path / fileio.FOLDER_MARK).touch()
    (path / "data").write_text("half")
    return path


def test_the_next_write_removes_temporaries_of_a_dead_writer_only(tmp_path, umask_022):
    dead, alive = dead_pid(), os.getppid()
    stale_file = temporary(tmp_path, "out.csv", dead, "tmp")
    stale_dir = marked_dir(temporary(tmp_path, "ds", dead, "partial"))
    busy = temporary(tmp_path, "out.csv", alive, "tmp")
    other_host = temporary(tmp_path, "out.csv", dead, "tmp", host="00000000")
    for path in (stale_file, busy, other_host):
        path.write_text("half")

    fileio.write_text(tmp_path / "out.csv", "whole")
    assert not stale_file.exists()
    assert busy.exists()  # its writer still runs
    assert other_host.exists()  # another machine's, and young
    assert not stale_dir.exists()  # any name: its pid says it is ours and dead
    os.utime(other_host, (0, 0))
    fileio.write_text(tmp_path / "out.csv", "again")
    assert not other_host.exists()  # a day old


def test_cleanup_never_touches_a_users_dot_old_files_and_folders(tmp_path):
    """A user's ``.NAME.old-NUMBER`` files and folders, and other programs' temporaries,
    stay as they are, whatever their age."""
    thesis = tmp_path / f".thesis.old-{dead_pid()}"
    thesis.mkdir()
    (thesis / "ch1.tex").write_text("precious")
    vimrc = tmp_path / ".vimrc.old-1998"
    vimrc.write_text("set nu")
    others = [tmp_path / ".notes.txt.abcd1234.tmp", tmp_path / f".out.csv.{dead_pid()}.tmp"]
    for path in others:
        path.write_text("theirs")
        os.utime(path, (0, 0))

    fileio.write_text(tmp_path / "results.csv", "rows")
    fileio.write_text(tmp_path / "notes.txt", "mine")
    with fileio.atomic_dir(tmp_path / "thesis", force=True) as tmp:
        (tmp / "new").write_text("1")

    assert (thesis / "ch1.tex").read_text() == "precious"
    assert vimrc.read_text() == "set nu" and not (tmp_path / "vimrc").exists()
    assert all(path.read_text() == "theirs" for path in others)
    assert [p.name for p in (tmp_path / "thesis").iterdir()] == ["new"]


def test_a_folder_named_like_a_temporary_but_not_made_by_fileio_stays(tmp_path):
    lookalike = temporary(tmp_path, "ds", dead_pid(), "partial")
    lookalike.mkdir()
    (lookalike / "data").write_text("not fileio's")
    wrong_kind = temporary(tmp_path, "x", dead_pid(), "old")
    wrong_kind.write_text("a file where fileio makes folders")
    assert fileio.clean_stale(tmp_path) == []
    assert (lookalike / "data").read_text() == "not fileio's" and wrong_kind.is_file()


def test_an_empty_unmarked_temporary_folder_of_a_dead_writer_is_removed(tmp_path):
    empty = temporary(tmp_path, "ds", dead_pid(), "partial")  # killed before marking it
    empty.mkdir()
    assert fileio.clean_stale(tmp_path) == [empty]


def test_a_folder_moved_aside_by_a_killed_replace_comes_back(tmp_path):
    old = marked_dir(temporary(tmp_path, "ds", dead_pid(), "old"))
    (old / "moved").mkdir()
    (old / "moved" / "manifest.json").write_text("{}")
    fileio.clean_stale(tmp_path)
    assert (tmp_path / "ds" / "manifest.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_a_forced_replace_leaves_only_the_new_folder(tmp_path):
    target = tmp_path / "ds"
    for content in ("first", "second"):
        with fileio.atomic_dir(target, force=True) as tmp:
            (tmp / "data").write_text(content)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    assert [p.name for p in target.iterdir()] == ["data"]  # the mark does not travel
    assert (target / "data").read_text() == "second"


def test_a_copy_cut_short_by_a_kill_is_removed_by_the_next_cleanup(tmp_path):
    source = tmp_path / "x.png"
    source.write_bytes(b"image")
    folder = tmp_path / "sorted"
    folder.mkdir()
    script = (
        "import os, shutil, signal\n"
        "from threengan_cli.core import fileio\n"
        "shutil.copyfile = lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM)  # mid-copy\n"
        f"fileio.copy_file({str(source)!r}, {str(folder / 'x.png')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script])
    assert done.returncode == -signal.SIGTERM
    left = list(folder.iterdir())
    assert len(left) == 1 and fileio.is_temporary(left[0].name)
    fileio.clean_stale(folder)
    assert list(folder.iterdir()) == []


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

    from threengan_cli.core.settings import PrepareSettings
    from threengan_cli.data.prepare import prepare

    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    out = tmp_path / "ds"
    prepare(src, out, PrepareSettings(image_size=16, workers=1))
    assert mode(out) == 0o755
    assert {p.name: mode(p) for p in out.iterdir()} == {
        "data.safetensors": 0o644,
        "manifest.json": 0o644,
        "settings.json": 0o644,
    }


# ------------------------------------------------------------- what is not a regular file
def test_a_fifo_is_written_in_place_not_replaced(tmp_path):
    fifo = tmp_path / "results.pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        fileio.write_text(fifo, "rows\n")
        assert reader.communicate(timeout=30)[0] == b"rows\n"
    finally:
        reader.kill()  # a replaced FIFO never gets a writer: its reader would wait forever
        reader.wait()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["results.pipe"]


def test_a_device_is_written_in_place_not_replaced(tmp_path):
    if os.geteuid() == 0:  # root could replace the real /dev/null: use a copy of it
        device = tmp_path / "null"
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    else:
        device = Path(os.devnull)
    fileio.write_text(device, "rows\n")
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    assert not [p for p in device.parent.iterdir() if fileio.is_temporary(p.name)]


def test_a_link_into_proc_such_as_dev_stdout_is_written_through(tmp_path):
    """``/dev/stdout`` is a link to ``/proc/self/fd/1``, which names whatever stdout is,
    a regular file included: replacing that would lose what the shell appends to it."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    out = tmp_path / "shell-redirect.csv"
    out.write_text("earlier\n")
    with open(out, "a") as fh:
        link = tmp_path / "stdout"
        link.symlink_to(f"/proc/self/fd/{fh.fileno()}")
        fileio.write_text(link, "rows\n")
        assert link.is_symlink()
    assert out.read_text() == "earlier\nrows\n"


def test_a_symlink_to_a_regular_file_is_kept_and_its_target_replaced(tmp_path):
    real = tmp_path / "data" / "results.csv"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "results.csv"
    link.symlink_to(real)
    fileio.write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


def test_a_forced_folder_replace_never_moves_a_file_or_device_aside(tmp_path):
    target = tmp_path / "ds"
    target.write_text("a file, not a dataset")
    with pytest.raises(FileExistsError, match="not a folder"):
        with fileio.atomic_dir(target, force=True):
            pass
    assert target.read_text() == "a file, not a dataset"
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_an_os_error_is_one_line_that_says_what_to_do():
    import errno

    from threengan_cli.core.errors import os_message

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/r/last.safetensors")
    assert os_message(full, "writing the run /runs/r", resume="/runs/r") == (
        "writing the run /runs/r failed: No space left on device (/runs/r/last.safetensors); "
        "free some space, then continue with: threengan train --resume /runs/r"
    )
    denied = OSError(errno.EACCES, "Permission denied")
    assert os_message(denied, "writing out").endswith(
        "choose a writable place (--out, or THREENGAN_HOME for the data dir)"
    )
    assert os_message(OSError("odd"), "x") == "x failed: odd"


def test_a_command_stopped_by_a_signal_exits_with_128_plus_its_number():
    from threengan_cli.core.errors import EXIT_INTERRUPT, EXIT_TERMINATED, interrupt_code

    assert interrupt_code(signal.SIGTERM) == EXIT_TERMINATED == 143
    assert interrupt_code(signal.SIGINT) == interrupt_code(None) == EXIT_INTERRUPT == 130
