"""The lock that allows one writer per run folder: an ``flock`` on ``.lock``, naming its holder.

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

from threengan_cli.train.runs import _NOFOLLOW, LOCK, RunError

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class RunLocked(RunError):
    """Another process is writing this folder."""


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
