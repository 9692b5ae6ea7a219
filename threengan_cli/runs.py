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
dies); the pid and host written into the file name the holder in the refusal message. Where
``flock`` is not available the pid decides: a lock whose pid no longer runs on this host is
stale and taken over.
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

from threengan_cli.modelfile import BEST, LAST

__all__ = [
    "BEST",
    "FAILED",
    "LAST",
    "LOCK",
    "METRICS",
    "RUN",
    "SAMPLES",
    "SETTINGS",
    "SUMMARY",
    "RunError",
    "RunLocked",
    "holds_run",
    "lock",
    "locked_by",
    "read_json",
    "read_jsonl",
    "read_metrics",
    "state",
    "writes_run",
]

SETTINGS, RUN, METRICS, SUMMARY = "settings.json", "run.json", "metrics.jsonl", "summary.json"
FAILED, SAMPLES, LOCK = "failed.json", "samples", ".lock"
# What a start that was killed before run.json can leave behind: nothing worth keeping.
_START_DEBRIS = frozenset({SETTINGS, SAMPLES, LOCK, METRICS})


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
    :class:`RunError` naming the file and the line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} cannot be read ({_reason(exc)})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
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


def holds_run(folder: Path) -> bool:
    """Whether starting a new run in ``folder`` would replace something worth keeping."""
    return state(folder) not in ("absent", "empty", "unstarted")


def _is_temporary(name: str) -> bool:
    """Temporaries of :mod:`fileio` (``.<name>.<random>.tmp``); the writer or the next
    run removes them."""
    return name.startswith(".") and name.endswith((".tmp", ".partial"))


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


def _holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def locked_by(folder: Path) -> dict[str, Any] | None:
    """Who is writing ``folder`` now (pid, host...) as its lock file says, or ``None`` when no
    live process holds it."""
    holder = _holder(Path(folder) / LOCK)
    return holder if holder and _alive(holder) else None


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
    before checking it, then the engine locks it again)."""
    folder = Path(folder)
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
    fd = _acquire(folder, path, what)
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


def _acquire(folder: Path, path: Path, what: str) -> int:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        fcntl = None  # type: ignore[assignment]
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
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
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
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
