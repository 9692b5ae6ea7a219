"""Exit codes, and the errors a user can act on: each class carries the exit code it ends with.

A command that meets one of these errors prints its message (one line) and exits with the
class's ``exit_code``: the app maps them in one place (``cli/common.handled``), so an engine module
says what went wrong by raising, never by choosing a number.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPT = 0, 1, 2, 3, 130
EXIT_OOD = 4  # classify --fail-on-ood: some images look unlike the model's training X-rays
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


def interrupt_code(signum: int | None) -> int:
    """The exit code of a command stopped by signal ``signum``: 128 + its number, as shells
    report it (SIGINT 130, SIGTERM 143); Ctrl+C's where it is not known."""
    return 128 + int(signum) if signum else EXIT_INTERRUPT


class Failure(Exception):
    """Something the command could not do with good input (a damaged file, a full disk, a
    loss that became NaN): the message is one line meant for the user; exit 1."""

    exit_code = EXIT_FAIL


class UsageError(Failure):
    """Input the command cannot take (a missing file, a bad option value): exit 2."""

    exit_code = EXIT_USAGE


def os_message(exc: OSError, doing: str, resume: object = None) -> str:
    """The one line an OS error while ``doing`` ("writing OUT") ends with, and what to do
    about it (full disk, read-only or missing folder...); ``resume``: the run that
    ``train --resume`` continues once there is space."""
    import errno

    what = exc.strerror or str(exc)
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    hint = ""
    if exc.errno == errno.ENOSPC:
        hint = "; free some space"
        if resume is not None:
            hint += f", then continue with: threengan train --resume {resume}"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; choose a writable place (--out, or THREENGAN_HOME for the data dir)"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        hint = "; a file stands where a folder is needed (--out, or THREENGAN_HOME)"
    return f"{doing} failed: {what}{where}{hint}"
