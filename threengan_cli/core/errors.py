"""Exit codes, and the errors a user can act on: each class carries the exit code it ends with.

A command that meets one of these errors prints its message (one line) and exits with the
class's ``exit_code``: the app maps them in one place (``cli/common.handled``), so an engine module
says what went wrong by raising, never by choosing a number.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPT = 0, 1, 2, 3, 130
EXIT_OOD = 4  # classify --fail-on-ood: some images look unlike the model's training X-rays
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


class Failure(Exception):
    """Something the command could not do with good input (a damaged file, a full disk, a
    loss that became NaN): the message is one line meant for the user; exit 1."""

    exit_code = EXIT_FAIL


class UsageError(Failure):
    """Input the command cannot take (a missing file, a bad option value): exit 2."""

    exit_code = EXIT_USAGE
