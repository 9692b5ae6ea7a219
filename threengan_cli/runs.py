"""The run-folder contract: what a training run's files are called, whether a folder holds a run
and in what state, reading its JSON files, and the lock that allows one writer per run.

A run folder (``threengan train``, or ``<benchmark>/runs/<method>-n<N>-r<R>``) holds:

- ``settings.json``   the resolved train settings (written first)
- ``run.json``        dataset, classes, versions, training subset (written second: a folder
                      with both has started; one without ``run.json`` never finished starting
                      and may be started again in place)
- ``metrics.jsonl``   one JSON line per epoch
- ``last.safetensors`` / ``best.safetensors``  resumable last checkpoint / best on val
- ``summary.json``    test metrics, written once at the end (the run is finished)
- ``failed.json``     a benchmark run whose loss became non-finite
- ``samples/``        sample grids
- ``.lock``           held while a process writes the run: pid, host, start time

The lock is an ``flock`` on ``.lock`` (released by the kernel when its holder dies, however it
dies); the pid and host written into the file name the holder in the refusal message, and
whether a run is being written is asked of the ``flock`` too, never of the file's words alone
(a file naming another host is no proof of a holder). Where ``flock`` is not available the pid
decides: a lock whose pid no longer runs on this host is stale and taken over. ``.lock`` is
opened without following symbolic links: a link there is refused, never written through.
A folder that the lock itself created is removed again when it is left empty (a run that
failed before writing anything leaves nothing behind).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "BEST",
    "FAILED",
    "FINAL",
    "LAST",
    "LOCK",
    "METRICS",
    "RUN",
    "SAMPLES",
    "SETTINGS",
    "SUMMARY",
    "RunError",
    "RunLocked",
    "append_line",
    "clear",
    "holds_run",
    "lock",
    "locked_by",
    "read_json",
    "read_jsonl",
    "read_metrics",
    "read_summary",
    "run_of",
    "settings_differ",
    "state",
    "writes_run",
]

SETTINGS, RUN, METRICS, SUMMARY = "settings.json", "run.json", "metrics.jsonl", "summary.json"
FAILED, SAMPLES, LOCK = "failed.json", "samples", ".lock"
# Checkpoints: resumable last (weights, optimizer and RNG state), best on val, and the final
# epoch's weights alone once ``runs --prune-last`` ran.
BEST, LAST, FINAL = "best.safetensors", "last.safetensors", "final.safetensors"
# What a start that was killed before run.json can leave behind: nothing worth keeping.
_START_DEBRIS = frozenset({SETTINGS, SAMPLES, LOCK, METRICS})
# A run's own files are opened without following symbolic links (where the OS can).
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class RunError(Exception):
    """A run folder or one of its files that cannot be used; one line for the user."""


class RunLocked(RunError):
    """Another process is writing this folder."""


# ------------------------------------------------------------------------------- reading
def read_json(path: Path) -> Any:
    """A JSON file, or a :class:`RunError` naming the file (and the line of a syntax error)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} cannot be read ({_reason(exc)})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} line {exc.lineno} is not valid JSON ({exc.msg})") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped); a bad line is a
    :class:`RunError` naming the file and the line number.

    A last line without its newline that does not parse is what a process killed while
    appending leaves: it is dropped (the record it was writing is lost, nothing else). A bad
    line that ends in a newline was written whole, and is damage."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RunError(f"{path} cannot be read ({_reason(exc)})") from None
    lines = raw.split(b"\n")
    last = len(lines)  # its line is b"" when the file ends with a newline, as appends do
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            if number == last:
                continue
            raise RunError(f"{path} line {number} is not UTF-8 ({exc.reason})") from None
        except json.JSONDecodeError as exc:
            if number == last:
                continue
            raise RunError(f"{path} line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise RunError(f"{path} line {number} is not a JSON object")
        records.append(record)
    return records


def read_metrics(path: Path, upto_epoch: int | None = None) -> list[dict[str, Any]]:
    """The epoch records of ``metrics.jsonl`` (those up to ``upto_epoch``); each must carry an
    integer ``epoch``."""
    records = read_jsonl(path)
    for number, record in enumerate(records, start=1):
        epoch = record.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise RunError(f"{path}: record {number} has no integer epoch")
    if upto_epoch is None:
        return records
    return [r for r in records if r["epoch"] <= upto_epoch]


_METRIC_KEYS = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "f1")


def read_summary(folder: Path) -> dict[str, Any] | None:
    """``summary.json`` of a finished run, checked to hold what is read from it (the epochs,
    the time, and val and test metrics as numbers); ``None`` when there is none. Damage is a
    :class:`RunError` naming the file and what is wrong."""
    path = Path(folder) / SUMMARY
    if not path.is_file():
        return None
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise RunError(f"{path} is damaged (not a JSON object)")

    def damaged(what: str) -> RunError:
        return RunError(f"{path} is damaged ({what})")

    epochs, elapsed = summary.get("epochs"), summary.get("elapsed_s")
    if not _is_int(epochs) or epochs < 1:
        raise damaged("no epoch count")
    if not _is_number(elapsed):
        raise damaged("no elapsed_s")
    for key in ("val", "test", "test_of_best_on_val"):
        metrics = summary.get(key)
        if metrics is None and key == "test_of_best_on_val":
            continue
        if not isinstance(metrics, dict):
            raise damaged(f"{key} is not an object")
        for name in _METRIC_KEYS:
            value = metrics.get(name)
            if value is not None and not _is_number(value):
                raise damaged(f"{key}.{name} is not a number")
    best = summary.get("best_epoch_on_val")
    if best is not None and not _is_int(best):
        raise damaged("best_epoch_on_val is not an epoch")
    return summary


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Settings that may differ between a run folder and a command that would train it again: the
# same run on another device, or with(out) CUDA graphs, is the same experiment.
_SAME_RUN_ANYWHERE = frozenset({"device", "cuda_graphs"})


def settings_differ(saved: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """The settings (sorted names) in which a run's ``settings.json`` and a command's settings
    differ, leaving out those that do not change the experiment."""
    return sorted(
        k
        for k in set(saved) | set(asked)
        if k not in _SAME_RUN_ANYWHERE and saved.get(k) != asked.get(k)
    )


def append_line(path: Path, line: str) -> None:
    """Append one line to a run's JSON-lines file in one write, never through a symbolic
    link (a link there is a :class:`RunError`). A kill mid-write leaves a last line without
    its newline, which :func:`read_jsonl` drops."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunError(f"{path} is a symbolic link; a run writes only its own files") from None
        raise
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------- state
def state(folder: Path) -> str:
    """What ``folder`` is, as a run:

    ``absent`` (no folder), ``empty``, ``unstarted`` (a start killed before ``run.json``:
    only start debris, safe to start again in place), ``started`` (no checkpoint yet: a
    resume starts over), ``resumable``, ``finished``, ``failed``, or ``other`` (files that
    are not a run's).
    """
    folder = Path(folder)
    if not folder.exists():
        return "absent"
    if not folder.is_dir():
        return "other"
    names = {p.name for p in folder.iterdir() if not _is_temporary(p.name)}
    if not names - {LOCK}:
        return "empty"
    if (folder / SUMMARY).is_file():
        return "finished"
    if (folder / FAILED).is_file():
        return "failed"
    if (folder / RUN).is_file() and (folder / SETTINGS).is_file():
        return "resumable" if (folder / LAST).is_file() else "started"
    if names <= _START_DEBRIS and not any((folder / SAMPLES).glob("*")):
        return "unstarted"
    return "other"


def run_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint file lies in (its ``run.json`` beside it), or ``None``."""
    folder = Path(checkpoint).parent
    return folder if (folder / RUN).is_file() else None


def holds_run(folder: Path) -> bool:
    """Whether starting a new run in ``folder`` would replace something worth keeping."""
    return state(folder) not in ("absent", "empty", "unstarted")


def _is_temporary(name: str) -> bool:
    """Temporaries of :mod:`fileio` (``.<name>.<random>.tmp``); the writer or the next
    run removes them."""
    return name.startswith(".") and name.endswith((".tmp", ".partial"))


_RUN_FILES = (SETTINGS, RUN, METRICS, SUMMARY, FAILED, LAST, BEST, FINAL)


def clear(folder: Path) -> None:
    """Delete what a run writes in ``folder`` (``train --force``), under its lock: the run's
    own files, its sample grids and its temporaries; anything else in the folder stays."""
    import shutil

    folder = Path(folder)
    for name in _RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    samples = folder / SAMPLES
    if samples.is_dir() and not samples.is_symlink():
        shutil.rmtree(samples)
    for entry in folder.iterdir():
        if _is_temporary(entry.name) and any(entry.name.startswith(f".{n}.") for n in _RUN_FILES):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


# ---------------------------------------------------------------------------------- lock
_HELD: dict[str, int] = {}  # lock files this process holds -> nesting depth
_HELD_GUARD = threading.Lock()


def _start_time(pid: int) -> str | None:
    """The start time of a process (Linux ``/proc``), so a reused pid is not mistaken for
    the holder; ``None`` where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process named in a lock file still runs (on this host; another host's
    holder is assumed alive, as it cannot be checked from here)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    started = holder.get("started_ticks")
    return started is None or _start_time(pid) in (None, started)


def _open_lock(path: Path, flags: int) -> int:
    """``.lock`` opened without following a symbolic link (nor blocking on a FIFO), and only
    when it is a regular file: a link or anything else there is refused, not written through."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EISDIR):
            raise _not_a_lock(path) from None
        raise
    import stat

    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_a_lock(path)
    return fd


def _not_a_lock(path: Path) -> RunError:
    kind = "a symbolic link" if path.is_symlink() else "not a regular file"
    return RunError(
        f"{path} is {kind}, not a lock file threengan wrote; it is left as it is (and so is "
        "anything it points to): remove it, then run the command again"
    )


def _holder(path: Path) -> dict[str, Any]:
    try:
        fd = _open_lock(path, os.O_RDONLY)
    except (OSError, RunError):
        return {}
    try:
        data = json.loads(os.read(fd, 4096).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else {}


def _flock_held(path: Path) -> bool | None:
    """Whether some process holds the ``flock`` on ``path``; ``None`` where that cannot be
    asked (no ``flock`` on this system or file system, or no lock file to ask)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    try:
        fd = _open_lock(path, os.O_RDONLY)
    except (OSError, RunError):
        return None
    try:
        # A shared lock is refused while a writer holds its exclusive one, and granted (then
        # dropped at once) otherwise; a writer that asks in between retries (see _acquire).
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        return None  # no flock here (some network file systems)
    finally:
        os.close(fd)
    return False


def locked_by(folder: Path) -> dict[str, Any] | None:
    """Who is writing ``folder`` now (pid, host...) as its lock file says, or ``None`` when no
    live process holds it. Where ``flock`` answers, it decides; the file only names."""
    path = Path(folder) / LOCK
    held = _flock_held(path)
    if held is False:
        return None
    holder = _holder(path)
    if held is None:
        return holder if holder and _alive(holder) else None
    return holder or {"pid": "?", "host": "?", "since": "?"}


def _refusal(folder: Path, what: str, holder: dict[str, Any]) -> RunLocked:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since = holder.get("since", "?")
    return RunLocked(
        f"{folder} is in use: another threengan (pid {pid} on {host}, since {since}) is "
        f"writing this {what}; wait for it to end or stop it (one writer per {what})"
    )


@contextlib.contextmanager
def lock(folder: Path, what: str = "run") -> Iterator[Path]:
    """Hold ``folder/.lock`` while writing ``folder``; refuse with :class:`RunLocked` when
    another process holds it. Re-entrant within one process (``train`` locks the folder
    before checking it, then the engine locks it again). A folder this call created is
    removed again if it is left empty."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    key = str(path.resolve())
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    try:
        fd = _acquire(folder, path, what)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    with _HELD_GUARD:
        _HELD[key] = 1
    try:
        yield path
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: it holds what was written
                folder.rmdir()


def _acquire(folder: Path, path: Path, what: str) -> int:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        fcntl = None  # type: ignore[assignment]
    busy = 0
    for _ in range(40):
        try:
            fd = _open_lock(path, os.O_RDWR | os.O_CREAT)
        except FileNotFoundError:  # the folder went with the last holder's clean-up
            folder.mkdir(parents=True, exist_ok=True)
            continue
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        busy += 1
                        # `runs` asks with a shared lock held for an instant: ask again
                        # before refusing
                        if busy < 5:
                            os.close(fd)
                            time.sleep(0.02)
                            continue
                        raise _refusal(folder, what, _holder(path)) from None
                    # no flock here (some network file systems): the pid decides
                    holder = _holder(path)
                    if holder and holder.get("pid") != os.getpid() and _alive(holder):
                        raise _refusal(folder, what, holder) from None
            else:  # pragma: no cover
                holder = _holder(path)
                if holder and _alive(holder):
                    raise _refusal(folder, what, holder) from None
            # The file may have been removed by the holder that just released it: a lock on
            # an unlinked file locks nothing, so try again on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "started_ticks": _start_time(os.getpid()),
            }
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(record) + "\n").encode())
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise RunLocked(f"{folder}: could not take {path} (it keeps changing)")


def writes_run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a function that writes the run folder given as its ``run_dir`` argument: it
    runs holding that folder's :func:`lock` (so every caller, ``train`` or a benchmark,
    is one writer per run)."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def locked(*args: Any, **kwargs: Any) -> Any:
        run_dir = signature.bind(*args, **kwargs).arguments["run_dir"]
        with lock(Path(run_dir)):
            return func(*args, **kwargs)

    return locked
