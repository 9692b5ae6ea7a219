"""What classify counts while rows stream past, and what it says at the end: the closing
lines on stderr and the exit code (1 nothing classified, 3 some inputs unreadable, 4 an
ood gate tripped)."""

# No ``from __future__ import annotations``: as in the other command modules.

import typer

from threengan_cli.cli.common import MAX_LISTED, fail
from threengan_cli.cli.views import note, warn
from threengan_cli.core.errors import EXIT_OOD, EXIT_PARTIAL
from threengan_cli.infer import gate


class Listing:
    """The first unreadable inputs, listed on stderr as they come; none unless ``on``."""

    def __init__(self, on: bool):
        self.on, self.listed = on, 0

    def __call__(self, row) -> None:
        if self.on and self.listed < MAX_LISTED:
            warn(f"{row.path}: {row.error}")
            self.listed += 1


def report_or_exit(tally, listing: Listing, cfg, inputs, ood_value, quiet) -> None:
    """What was classified, on stderr, and the exit code: 1 when nothing was, 3 when some
    inputs could not be, 4 under --fail-on-ood when an image was flagged."""
    counts, shard_ij, output, sort_into = tally.counts, cfg.shard, cfg.output, cfg.sort_into
    if counts["inputs"] == 0 and cfg.allow_empty:
        if not quiet:
            where = f" ({output} holds no rows)" if output is not None else ""
            note(f"nothing to classify: no image files in the inputs (--allow-empty){where}")
        return
    tally.check_classified(inputs, shard_ij)
    if not quiet:
        where = f" -> {output}" if output is not None else ""
        note(f"classified {counts['classified']} of {counts['inputs']} inputs{where}")
        labels = ", ".join(f"{label} {n}" for label, n in tally.per_label.items())
        errors = f", errors {counts['errors']}" if counts["errors"] else ""
        sorted_to = f" (sorted into {sort_into})" if sort_into is not None else ""
        note(f"labels: {labels}{errors}{sorted_to}")
        if ood_value is not None:
            note(
                f"ood: {counts['ood']} of {counts['classified']} images look unlike the "
                "model's training X-rays (score above "
                f"{ood_value}); their labels are not reliable (docs/guide.md, 'Images unlike "
                "the training set')"
            )
        if counts["skipped"]:
            files = f"{counts['skipped']} file" + ("s" if counts["skipped"] != 1 else "")
            warn(
                f"skipped {files} in the folders whose names are not image names (the first: "
                f"{tally.first_skipped}); give them as PATHs to classify them anyway"
            )
    if counts["errors"]:
        if not quiet:
            if listing.on and listing.listed < counts["errors"]:
                warn(f"... and {counts['errors'] - listing.listed} more")
            warn(f"{counts['errors']} inputs could not be classified (see the error column)")
        raise typer.Exit(EXIT_PARTIAL)
    tripped = gate.breach(cfg, counts["ood"], counts["classified"])
    if tripped is not None:  # said at any verbosity: it sets the exit code
        fail(tripped, EXIT_OOD)
