"""What classify is asked to read, checked before any model is loaded: the PATHs (or the
shipped examples) and stdin's first path."""

# No ``from __future__ import annotations``: as in the other command modules.

import sys

from threengan_cli.cli.common import fail
from threengan_cli.core.errors import EXIT_USAGE


def stdin_paths(inputs: list[str], allow_empty: bool):
    """stdin's lines, when ``-`` is among the inputs, read up to the first path before any
    model is loaded: ``-`` alone with nothing on stdin is a usage error, like no PATH,
    unless ``allow_empty``."""
    import itertools

    if "-" not in inputs:
        return None
    for line in sys.stdin:
        if line.strip() and line.rstrip("\r\n") != "-":
            return itertools.chain([line], sys.stdin)
    if inputs == ["-"] and not allow_empty:
        fail("no paths were given on stdin (one per line)", EXIT_USAGE)
    return iter(())


def inputs_or_exit(inputs: list[str] | None, examples: bool) -> list[str]:
    """The PATHs given, with the shipped example X-rays under --examples; none, or ``-``
    twice, is a usage error."""
    if examples:
        from threengan_cli.core.paths import example_images

        shipped = [str(p) for p in example_images()]
        if not shipped:
            fail("this installation has no example X-rays (threengan_cli/examples)")
        inputs = [*(inputs or []), *shipped]
    if not inputs:
        fail(
            "give at least one PATH (a file, folder or glob), --examples, or - to read paths "
            "from stdin",
            EXIT_USAGE,
        )
    if inputs.count("-") > 1:
        fail("- (paths from stdin) may be given once", EXIT_USAGE)
    return inputs
