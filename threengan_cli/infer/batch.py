"""A classify batch streamed to its outputs: each row of :func:`classify.classify` goes to the
row writer, the ``--sort-into`` folders and the heatmaps, and is counted, one row at a time.

The caller gives the stream (a file it writes whole or not at all, or stdout) and shows the
counts; what the counts mean for the exit code is the caller's to say.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from threengan_cli.core.errors import Failure
from threengan_cli.infer.classify import Decision, Row, classify
from threengan_cli.infer.output import RowWriter


class SortError(Failure):
    """An input that could not be copied or linked into its ``--sort-into`` folder."""


class Tally:
    """Counts rows as they stream past (per label, unreadable, flagged), and the files folder
    scans passed over (names that are not image names); ``on_error(row)`` hears of each
    unreadable input as it comes."""

    def __init__(self, classes: list[str], on_error: Callable[[Row], None] | None = None):
        self.counts = {"inputs": 0, "classified": 0, "errors": 0, "skipped": 0, "ood": 0}
        self.per_label = dict.fromkeys(classes, 0)
        self.first_error: str | None = None
        self.first_skipped: str | None = None
        self.on_error = on_error

    def add(self, row: Row) -> None:
        self.counts["inputs"] += 1
        if row.ok:
            self.counts["classified"] += 1
            self.per_label[row.label] += 1
            self.counts["ood"] += bool(row.ood)
            return
        self.counts["errors"] += 1
        if self.first_error is None:
            self.first_error = f"{row.path}: {row.error}"
        if self.on_error is not None:
            self.on_error(row)

    def skip(self, path: str) -> None:
        self.counts["skipped"] += 1
        self.first_skipped = self.first_skipped or path

    def check_classified(self, inputs: list[str], shard: tuple[int, int] | None) -> None:
        """A :class:`Failure` when no input was classified: none was listed (an empty
        ``shard``, nothing on stdin, inputs that named no files) or none could be read."""
        if self.counts["inputs"] == 0:
            if shard is not None:
                raise Failure(
                    f"nothing to classify: shard {shard[0]}/{shard[1]} of the input list is "
                    "empty (fewer inputs than shards)"
                )
            raise Failure(
                "nothing to classify (no paths were given on stdin)"
                if "-" in inputs
                else "nothing to classify (the inputs named no files)"
            )
        if self.counts["classified"] == 0:
            raise Failure(
                f"none of the {self.counts['inputs']} inputs could be classified "
                f"({self.first_error})"
            )


def thresholds_of(model: Any, cfg: Any) -> tuple[Any, dict[str, Any], str]:
    """The classify settings ``cfg`` with the decision threshold in use (a given one, the
    model's stored one, or the default: ``Engine.decision_threshold``), the output's header
    (both thresholds and where they come from), and what stderr says of them."""
    given = cfg.threshold if "threshold" in cfg.model_fields_set else None
    value, source, source_note = model.decision_threshold(given)
    ood_value, ood_source, ood_note = model.ood_threshold(cfg.ood_threshold)
    header = {
        "threshold": value,
        "threshold_source": source,
        "ood_threshold": ood_value,
        "ood_threshold_source": ood_source,
    }
    ood_said = f", ood threshold {ood_value}" if ood_value is not None else ""
    said = f"threshold {value}{source_note}{ood_said}{ood_note}"
    return cfg.model_copy(update={"threshold": value}), header, said


def classify_into(
    stream: IO[str],
    inputs: list[str],
    model: Any,
    cfg: Any,
    fmt: str,
    header: dict[str, Any],
    tally: Tally,
    *,
    sorter: Any = None,
    visuals: Any = None,
    stdin: Any = None,
    on_total: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Classify ``inputs`` with ``model`` and the settings ``cfg`` (``ClassifySettings``, its
    threshold the one to use) into ``stream`` as ``fmt``; each row also goes to ``sorter``
    and ``visuals`` (``--sort-into``, ``--heatmaps``/``--report``) and ``tally``.
    ``on_total(n)`` hears how many inputs there are once they are listed, ``on_progress(k)``
    how many are done after each row."""
    writer = RowWriter(fmt, stream, model, header, visuals.columns if visuals else ())
    writer.begin()
    rows = classify(
        inputs,
        visuals.model if visuals is not None else model,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        decision=Decision(cfg.threshold, header["ood_threshold"]),
        recursive=cfg.recursive,
        stdin=stdin,
        shard=cfg.shard,
        # what this run writes into is never classified: --sort-into's and --heatmaps' folders
        exclude=[f for f in (sorter and sorter.folder, visuals and visuals.folder) if f],
        on_skip=tally.skip,
        on_total=on_total,
        allow_empty=cfg.allow_empty,
    )
    for row in rows:
        writer.write(row, **(visuals.add(row) if visuals is not None else {}))
        tally.add(row)
        if row.ok and sorter is not None:
            try:
                sorter(row)
            except OSError as exc:
                raise SortError(f"cannot sort {row.path} into {sorter.folder}: {exc}") from None
        if on_progress is not None:
            on_progress(tally.counts["inputs"])
    writer.end({**tally.counts, "labels": tally.per_label})
    if visuals is not None:
        visuals.finish()  # before the results are renamed into place: both or neither
