"""The classify row writer: streams result rows as a table, CSV, JSON or JSONL, one at a time."""

from __future__ import annotations

import json
from typing import Any

FORMATS = ("table", "csv", "json", "jsonl")
SUFFIX_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class RowWriter:
    """Streams classify rows as table, csv, json or jsonl; one row at a time, never all."""

    def __init__(
        self, fmt: str, stream, model, threshold: float, threshold_source: str = "default"
    ):
        self.fmt, self.stream, self.model, self.threshold = fmt, stream, model, threshold
        self.threshold_source = threshold_source
        self.classes = list(model.classes)
        self.columns = ["path", "label", *(f"p_{c}" for c in self.classes), "error"]
        self.first = True
        if fmt == "csv":
            import csv

            self.csv = csv.writer(stream, lineterminator="\n")

    def begin(self) -> None:
        if self.fmt == "csv":
            self.csv.writerow(self.columns)
        elif self.fmt == "json":
            head = json.dumps(
                {
                    "model": self.model.model_id,
                    "method": self.model.method,
                    "threshold": self.threshold,
                    "threshold_source": self.threshold_source,
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
            self.stream.write("  ".join([*cells, "path"]) + "\n")

    def record(self, row) -> dict[str, Any]:
        probs = row.probabilities or {}
        values = {f"p_{c}": probs.get(c) for c in self.classes}  # classify.exact's digits
        return {"path": row.path, "label": row.label, **values, "error": row.error}

    def write(self, row) -> None:
        if self.fmt == "csv":
            rec = self.record(row)
            self.csv.writerow(["" if rec[k] is None else rec[k] for k in self.columns])
        elif self.fmt == "jsonl":
            self.stream.write(json.dumps(self.record(row)) + "\n")
        elif self.fmt == "json":
            sep = "\n  " if self.first else ",\n  "
            self.stream.write(sep + json.dumps(self.record(row)))
        else:
            probs = row.probabilities or {}
            cells = [(row.label or "-").ljust(self.widths[0])] + [
                (f"{probs[c]:.4f}" if c in probs else "-").ljust(w)
                for c, w in zip(self.classes, self.widths[1:], strict=True)
            ]
            tail = f"  (error: {row.error})" if row.error else ""
            self.stream.write("  ".join([*cells, row.path]) + tail + "\n")
        self.first = False

    def end(self, summary: dict[str, int]) -> None:
        if self.fmt == "json":
            self.stream.write(
                ("\n" if not self.first else "") + '], "summary": ' + json.dumps(summary) + "}\n"
            )
        self.stream.flush()
