"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Temporaries are siblings of the target named ``.<name>.<pid>-<host>.<random>.tmp`` (files)
and ``.<name>.<pid>-<host>.<random>.partial`` (folders), so that what a killed writer left
behind can be told from a write in progress: the writer removes its own on any error, and
the next write of the same name removes those whose process is gone (``<host>`` is a short
hash of this machine's name: another machine's temporaries on a shared disk are removed only
once they are a day old). They are made with the modes an ordinary ``open`` or ``mkdir``
would give under the user's umask, not ``mkstemp``'s private 0600/0700.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Someone else's temporaries, or ones without a pid (older threengan), are left alone
# until they are this old.
STALE_AFTER_S = 24 * 3600
_TEMP = re.compile(
    r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)-(?P<host>[0-9a-f]{8})\.)?[A-Za-z0-9_]{8}\.(?:tmp|partial)$"
)
_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _prefix(name: str) -> str:
    return f".{name}.{os.getpid()}-{_host_tag()}."


def umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, set straight back
    os.umask(mask)
    return mask


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def clean_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Remove temporaries in ``folder`` whose writer is gone; returns what was removed.

    A temporary of this machine is stale once its pid no longer runs; one of another machine
    once it is :data:`STALE_AFTER_S` old. Names without a pid (written by an older
    threengan, or perhaps by another program) are removed only when they belong to the
    target ``name`` and are that old."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    tag, now = _host_tag(), time.time()
    for entry in entries:
        found = _TEMP.match(entry.name) or _OLD.match(entry.name)
        if not found:
            continue
        pid = found["pid"]
        if pid is None and found["name"] != name:
            continue
        if pid is not None and found.groupdict().get("host", tag) == tag:
            stale = int(pid) != os.getpid() and _pid_gone(int(pid))
        else:
            try:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            except OSError:
                stale = False
        if not stale:
            continue
        path = Path(entry.path)
        target = Path(folder) / found["name"]
        if _OLD.match(entry.name) and not target.exists():
            # killed between moving the old folder aside and the new one into place: the
            # old one is all there is, so it goes back
            with contextlib.suppress(OSError):
                os.replace(path, target)
                removed.append(path)
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator:
    """Write ``path`` through a temporary sibling, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as fh:
        fh.write(data)


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``path``; rename it into place at the end.

    With ``force`` an existing ``path`` is replaced only once the new one is complete.
    Without it, a ``path`` that appeared meanwhile (another writer of the same name) is a
    :class:`FileExistsError` and is left as it is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path.name), suffix=".partial", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        if force:
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, old)
        try:
            os.rename(tmp, path)  # a folder in the way (another writer's) is refused
        except OSError as exc:
            if force and not path.exists():
                with contextlib.suppress(OSError):
                    os.replace(old, path)
            if path.exists():
                raise FileExistsError(
                    exc.errno, f"{path} appeared while it was being written", str(path)
                ) from None
            raise
        if force:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
