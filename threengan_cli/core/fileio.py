"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Temporaries are siblings of the target named ``.<name>.threengan-<pid>-<host>.<random>.<kind>``
(``tmp``: a file being written; ``partial``: a folder being built; ``old``: a folder holding
the one that a forced replace moved aside). The ``threengan-`` marker, the pid and ``<host>``
(a short hash of this machine's name) tell what a killed writer left behind from a write in
progress and from everybody else's files. The writer removes its own on any error; the next
write into the same folder removes those whose process is gone (another machine's only once
they are a day old). Nothing without the marker is ever touched: a user's ``.notes.old-1998``
or ``.thesis.abcd1234.tmp`` stays. A folder is removed only when it also holds
:data:`FOLDER_MARK`, the file this module puts into every folder it creates (or when it is
empty: killed between creating and marking it). Temporaries are made with the modes an
ordinary ``open`` or ``mkdir`` would give under the user's umask, not ``mkstemp``'s private
0600/0700.

Only regular files are replaced. A target that is a device, a FIFO or a socket, or that
leads into ``/dev`` or ``/proc`` (``/dev/null``, a named pipe, ``/dev/stdout``), is written
directly, as a shell's ``>`` would; through a symbolic link the file it points to is
replaced and the link is kept.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Another machine's temporaries are left alone until they are this old: its writer may
# still run, and its pid cannot be checked from here.
STALE_AFTER_S = 24 * 3600
MARK = "threengan"
FOLDER_MARK = ".threengan-temporary"  # inside every temporary folder, until it is renamed
_KINDS = ("tmp", "partial", "old")
_TEMP = re.compile(
    rf"^\.(?P<name>.+)\.{MARK}-(?P<pid>\d+)-(?P<host>[0-9a-f]{{8}})\.[A-Za-z0-9_]{{8}}"
    rf"\.(?P<kind>{'|'.join(_KINDS)})$"
)
_MOVED = "moved"  # the name of the folder moved aside, inside its ``old`` temporary
_SPECIAL_ROOTS = ("/dev/", "/proc/")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _prefix(name: str) -> str:
    # The name is only a hint to the reader; a long one is cut so that the temporary's name
    # stays within the 255 bytes a file name may have.
    if len(os.fsencode(name)) > 160:
        name = name[:40]
    return f".{name}.{MARK}-{os.getpid()}-{_host_tag()}."


def is_temporary(name: str) -> bool:
    """Whether a file name is one of this module's temporaries."""
    return _TEMP.match(name) is not None


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


def _writer_gone(found: re.Match, entry: os.DirEntry) -> bool:
    if found["host"] == _host_tag():
        pid = int(found["pid"])
        return pid != os.getpid() and _pid_gone(pid)
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
    except OSError:
        return False


def _made_here(folder: Path) -> bool:
    """Whether a folder carries this module's mark: its :data:`FOLDER_MARK` file."""
    try:
        return stat.S_ISREG(os.lstat(folder / FOLDER_MARK).st_mode)
    except OSError:
        return False


def clean_stale(folder: Path) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder``; returns what was removed.

    Only names carrying the marker are considered (see the module docstring), and of those
    only the ones whose writer is gone. A folder moved aside by a forced replace that was
    killed before the new folder took its place goes back under its name."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        found = _TEMP.match(entry.name)
        if not found or not _writer_gone(found, entry):
            continue
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if not is_dir:
            if found["kind"] == "tmp":
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
            continue
        if not _made_here(path):
            with contextlib.suppress(OSError):  # only an empty one: rmdir removes nothing else
                path.rmdir()
                removed.append(path)
            continue
        target = Path(folder) / found["name"]
        moved = path / _MOVED
        if found["kind"] == "old" and moved.is_dir() and not os.path.lexists(target):
            # killed between moving the old folder aside and the new one into place: the
            # old one is all there is, so it goes back
            with contextlib.suppress(OSError):
                os.replace(moved, target)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _marked_dir(parent: Path, name: str, kind: str) -> Path:
    """A new temporary folder beside ``parent / name``, carrying this module's mark."""
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(name), suffix=f".{kind}", dir=parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        (tmp / FOLDER_MARK).touch()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _leads_to_special(path: Path) -> bool:
    """Whether ``path``, or a symbolic link on its way, names something in /dev or /proc
    (``/dev/stdout`` -> ``/proc/self/fd/1`` -> the shell's redirection target)."""
    current = os.path.abspath(path)
    for _ in range(40):  # a loop of links ends here
        if current.startswith(_SPECIAL_ROOTS):
            return True
        try:
            link = os.readlink(current)
        except OSError:
            return False
        current = os.path.normpath(os.path.join(os.path.dirname(current), link))
    return False


def writes_in_place(path: Path) -> bool:
    """Whether :func:`atomic_file` writes ``path`` directly instead of replacing it: an
    existing target that is not a regular file (a device, a FIFO, a socket), or a path into
    /dev or /proc."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # absent (or unreadable: the atomic write reports why)
        return _leads_to_special(Path(path))
    return not stat.S_ISREG(mode) or _leads_to_special(Path(path))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", durable: bool = True) -> Iterator:
    """Write ``path`` through a temporary sibling, fsync it, then rename it into place.

    A device, a FIFO or a path into /dev or /proc is written directly instead (see the
    module docstring); a symbolic link is followed, so the file it points to is replaced.
    ``durable=False`` is for many small files that can be made again (a heatmap per image):
    no fsync and no clean-up of the folder on each write (the writer runs
    :func:`clean_stale` once); the file still appears whole or not at all."""
    path = Path(path)
    encoding = None if "b" in mode else "utf-8"  # what was written reads the same anywhere
    if writes_in_place(path):
        # Appending, never truncating: through /dev/stdout a file the shell opened for >>
        # keeps what it held, as with the shell's own redirection; a device or a FIFO is
        # written the same either way.
        with open(path, mode.replace("w", "a"), encoding=encoding) as fh:
            yield fh
        return
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if durable:
        clean_stale(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
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


def copy_file(source: Path, target: Path, link: bool = False) -> None:
    """Put a copy of ``source`` (bytes, mode and times) at ``target``, whole or not at all;
    with ``link`` a hard link to it, or a symbolic link to its real path where the file
    system refuses hard links. Symbolic links in ``source`` are followed, so a relative
    one does not dangle in its new place.

    Through a marked temporary, without fsync (sorting writes many files): a copy cut short
    by a kill is removed by :func:`clean_stale` of ``target``'s folder, which the caller
    runs once per folder rather than once per file."""
    real, target = os.path.realpath(source), Path(target)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(target.name), suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        if link:
            os.unlink(tmp)  # link() will not replace; the name stays reserved by its marker
            try:
                os.link(real, tmp)
            except OSError:  # another file system, or hard links not allowed
                os.symlink(real, tmp)
        else:
            shutil.copyfile(real, tmp)
            shutil.copystat(real, tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``path``; rename it into place at the end.

    With ``force`` an existing ``path`` is replaced only once the new one is complete (it is
    moved aside into an ``old`` temporary first, and comes back if the swap fails or is
    killed half-way). Without it, a ``path`` that appeared meanwhile (another writer of the
    same name) is a :class:`FileExistsError` and is left as it is.
    """
    path = Path(path)
    if force and os.path.lexists(path) and not path.is_dir():
        # a folder replaces a folder, never a file, a device or a FIFO of that name
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a folder", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp = _marked_dir(path.parent, path.name, "partial")
    old: Path | None = None
    try:
        yield tmp
        (tmp / FOLDER_MARK).unlink(missing_ok=True)
        if force and os.path.lexists(path):
            old = _marked_dir(path.parent, path.name, "old")
            os.replace(path, old / _MOVED)
        try:
            os.rename(tmp, path)  # a folder in the way (another writer's) is refused
        except OSError as exc:
            if old is not None and not os.path.lexists(path):
                os.replace(old / _MOVED, path)
            if path.exists():
                raise FileExistsError(
                    exc.errno, f"{path} appeared while it was being written", str(path)
                ) from None
            raise
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        # The old folder goes once the new one is in place, or once it is back; otherwise
        # (it could not be put back) it stays, marked, for clean_stale to restore.
        if old is not None and (not (old / _MOVED).exists() or path.exists()):
            shutil.rmtree(old, ignore_errors=True)


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
