"""The classify row writer: streams result rows as a table, CSV, JSON or JSONL, one at a time.

JSON and JSONL hold every value exactly: a file name that is not UTF-8 keeps its bytes as
``\\udcXX`` escapes (Python's ``json`` and ``os.fsencode`` give the bytes back). CSV and the
table are text for people and spreadsheets, so there (:func:`csv_cell`) such bytes are
written as ``\\xNN``, and a text cell that a spreadsheet would run as a formula (starting with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return, as OWASP lists them) gets a leading
``'``, as OWASP advises: the cell then shows as the text it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from threengan_cli.core import fileio
from threengan_cli.core.errors import UsageError

FORMATS = ("table", "csv", "json", "jsonl")
SUFFIX_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def choose_format(
    given: str | None, configured: str | None, output: Path | None, terminal: bool
) -> str:
    """The output format: ``--format``; else --output's suffix; else the config file's
    ``format``; else table on a ``terminal``, csv otherwise. An explicit flag or file name
    wins over the config file, which holds defaults. An --output that is not a regular file
    (``/dev/stdout``, a FIFO, a device) needs no suffix: it gets csv, as a pipe does."""
    fmt = given
    if fmt is None and output is not None:
        fmt = SUFFIX_FORMATS.get(output.suffix.lower()) or configured
        if fmt is None and fileio.writes_in_place(output):
            fmt = "csv"
        if fmt is None:
            raise UsageError(
                f"cannot tell the format of {output} from its suffix (known: "
                f"{', '.join(SUFFIX_FORMATS)}); give --format csv, json or jsonl"
            )
    if fmt is None:
        fmt = configured or ("table" if terminal else "csv")
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    return fmt
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def text(value: str) -> str:
    """A file name as UTF-8 text: bytes that are not UTF-8 (which Python keeps as lone
    surrogates) become ``\\xNN``, so writing the name can never fail."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no file name byte gives (from stdin, say)
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def csv_cell(value: Any) -> Any:
    """A value for a CSV cell: text made writable (:func:`text`) and never a live spreadsheet
    formula; numbers as they are."""
    if not isinstance(value, str):
        return value
    value = text(value)
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


class RowWriter:
    """Streams classify rows as table, csv, json or jsonl; one row at a time, never all.

    ``header`` is what the JSON header says of the decision besides the model: threshold,
    threshold_source, ood_threshold and ood_threshold_source. The ``ood_score`` and ``ood``
    columns are empty (null) for a model without out-of-distribution statistics.
    ``extra`` names columns added after ``error`` (``heatmap`` under ``--heatmaps``), whose
    values :meth:`write` receives by name; a row without one leaves it empty (null)."""

    def __init__(self, fmt: str, stream, model, header: dict[str, Any], extra: tuple = ()):
        self.fmt, self.stream, self.model, self.header = fmt, stream, model, header
        self.classes = list(model.classes)
        probs = [f"p_{c}" for c in self.classes]
        self.extra = tuple(extra)
        self.columns = ["path", "label", *probs, "ood_score", "ood", "error", *self.extra]
        self.first = True
        if fmt == "csv":
            import csv

            self.csv = csv.writer(stream, lineterminator="\n")

    def begin(self) -> None:
        if self.fmt == "csv":
            self.csv.writerow([csv_cell(c) for c in self.columns])
        elif self.fmt == "json":
            head = json.dumps(
                {
                    "model": self.model.model_id,
                    "which_model": getattr(self.model, "which", None),
                    "method": self.model.method,
                    **self.header,
                    "classes": self.classes,
                    "image_size": self.model.image_size,
                }
            )
            self.stream.write(head[:-1] + ', "rows": [')
        elif self.fmt == "table":
            self.widths = [max(5, *(len(c) for c in self.classes))] + [
                max(6, len(f"p_{c}")) for c in self.classes
            ]
            heads = ["label", *(f"p_{c}" for c in self.classes)]
            cells = [h.ljust(w) for h, w in zip(heads, self.widths, strict=True)]
            self.stream.write("  ".join([*cells, "ood_score", "path", *self.extra]) + "\n")

    def record(self, row, **extra: Any) -> dict[str, Any]:
        probs = row.probabilities or {}
        values = {f"p_{c}": probs.get(c) for c in self.classes}  # engine.exact's digits
        return {
            "path": row.path,
            "label": row.label,
            **values,
            "ood_score": row.ood_score,
            "ood": row.ood,
            "error": row.error,
            **{name: extra.get(name) for name in self.extra},
        }

    def write(self, row, **extra: Any) -> None:
        """One row; ``extra`` holds the values of the extra columns (paths as text)."""
        if self.fmt == "csv":
            rec = self.record(row, **extra)
            self.csv.writerow([_csv_value(rec[k]) for k in self.columns])
        elif self.fmt == "jsonl":
            self.stream.write(json.dumps(self.record(row, **extra)) + "\n")
        elif self.fmt == "json":
            sep = "\n  " if self.first else ",\n  "
            self.stream.write(sep + json.dumps(self.record(row, **extra)))
        else:
            probs = row.probabilities or {}
            cells = [(row.label or "-").ljust(self.widths[0])] + [
                (f"{probs[c]:.4f}" if c in probs else "-").ljust(w)
                for c, w in zip(self.classes, self.widths[1:], strict=True)
            ]
            score = "-" if row.ood_score is None else f"{row.ood_score:.2f}"
            cells.append((score + (" ood" if row.ood else "")).ljust(9))
            tail = f"  (error: {text(row.error)})" if row.error else ""
            more = [text(str(extra[n])) for n in self.extra if extra.get(n) is not None]
            self.stream.write("  ".join([*cells, text(row.path), *more]) + tail + "\n")
        self.first = False

    def end(self, summary: dict[str, Any]) -> None:
        if self.fmt == "json":
            self.stream.write(
                ("\n" if not self.first else "") + '], "summary": ' + json.dumps(summary) + "}\n"
            )
        self.stream.flush()


def _csv_value(value: Any) -> Any:
    """A CSV cell: empty for none, true/false as JSON writes them, else :func:`csv_cell`."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return csv_cell(value)
