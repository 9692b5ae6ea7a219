"""Training runs on disk: list them (``threengan runs``) and prune their resumable checkpoints.

A run folder holds ``run.json``, ``settings.json``, ``metrics.jsonl`` (one line per epoch),
``last.safetensors`` (everything a resume needs: weights, optimizer and RNG state; about
109 MB for a width-64 3ngan run), ``best.safetensors`` (the best-on-val weights) and, once
finished, ``summary.json``. :func:`read_run` sums up one folder for the listing; it reads
only the checkpoints' JSON headers, never their tensors, and never imports torch.

State: ``finished`` when the last checkpoint says so (or, once pruned, ``summary.json`` is
there), else ``running`` while a live process holds the run's writer lock (:mod:`runs`),
else ``stopped`` (resumable with ``train --resume``).

Pruning a finished run copies the final epoch's weights, byte for byte, into
``final.safetensors`` (a few MB: no optimizer state) and deletes ``last.safetensors``;
``--run`` still finds ``best.safetensors`` (or ``final``), so classify, evaluate and
generate keep working. Only extending the run (``train --resume --epochs``) needs what was
deleted.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from threengan_cli import modelfile, paths, runs
from threengan_cli.modelfile import BEST, FINAL, LAST
from threengan_cli.runs import METRICS, RUN, SETTINGS, SUMMARY


@dataclass
class RunInfo:
    name: str
    path: str
    method: str | None
    size: int | None  # labelled training images N
    epochs_done: int
    epochs_planned: int | None
    state: str  # finished, running or stopped
    val_accuracy: float | None
    test_accuracy: float | None
    bytes: int
    resumable: bool  # last.safetensors is there
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Pruned:
    name: str
    freed_bytes: int
    wrote_final: bool


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _metrics_tail(path: Path) -> tuple[int, float | None]:
    """Epochs recorded in metrics.jsonl and the last one's val accuracy."""
    epochs, val = 0, None
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                epochs = max(epochs, int(record.get("epoch", 0)))
                val = (record.get("val") or {}).get("accuracy", val)
    except OSError:
        pass
    return epochs, val


def _disk_bytes(folder: Path) -> tuple[int, float]:
    """Bytes of every file under ``folder`` and the newest modification time."""
    total, newest = 0, 0.0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_size
            newest = max(newest, st.st_mtime)
    return total, newest


def read_run(run_dir: Path, name: str | None = None) -> RunInfo:
    """What a run folder says about itself (see the module docstring)."""
    run_dir = Path(run_dir)
    run = _json(run_dir / RUN)
    settings = _json(run_dir / SETTINGS) or run.get("settings") or {}
    summary = _json(run_dir / SUMMARY)
    size_bytes, newest = _disk_bytes(run_dir)
    done, val = _metrics_tail(run_dir / METRICS)
    planned = settings.get("epochs")
    finished = False
    error = None
    if (run_dir / LAST).is_file():
        try:
            meta = modelfile.read_meta(run_dir / LAST)
        except modelfile.CheckpointError as exc:
            error = str(exc)
        else:
            done = int(meta.get("position", {}).get("epoch", done))
            planned = (meta.get("settings") or {}).get("epochs", planned)
            finished = bool(meta.get("finished")) and bool(summary)
    elif summary:  # pruned: the summary is what is left of the finish
        finished = True
        done = planned = summary.get("epochs", planned)
    if finished:
        state = "finished"
        val = (summary.get("val") or {}).get("accuracy", val)
    else:
        state = "running" if runs.locked_by(run_dir) else "stopped"
    return RunInfo(
        name=name or run_dir.name,
        path=str(run_dir),
        method=settings.get("method") or run.get("method"),
        size=settings.get("size") or run.get("train_images"),
        epochs_done=int(done or 0),
        epochs_planned=planned,
        state=state,
        val_accuracy=val,
        test_accuracy=(summary.get("test") or {}).get("accuracy") if finished else None,
        bytes=size_bytes,
        resumable=(run_dir / LAST).is_file(),
        error=error,
    )


def run_folders(home: Path | None = None) -> list[tuple[str, Path]]:
    """(name, folder) of every run under the data dir: ``runs/<name>`` as ``<name>``, and a
    benchmark's ``benchmarks/<bench>/runs/<name>`` as ``<bench>/<name>``."""
    home = Path(home) if home is not None else paths.home()
    found: list[tuple[str, Path]] = []

    def visible(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    for run_dir in visible(home / "runs"):
        if (run_dir / RUN).is_file():
            found.append((run_dir.name, run_dir))
    for bench in visible(home / "benchmarks"):
        for run_dir in visible(bench / "runs"):
            if (run_dir / RUN).is_file():
                found.append((f"{bench.name}/{run_dir.name}", run_dir))
    return found


def list_runs(home: Path | None = None) -> list[RunInfo]:
    return [read_run(folder, name) for name, folder in run_folders(home)]


def prune_last(run: RunInfo) -> Pruned | None:
    """Drop a finished run's resumable checkpoint, keeping its final weights (see the
    module docstring); ``None`` when there is nothing to prune."""
    run_dir = Path(run.path)
    last = run_dir / LAST
    if run.state != "finished" or not last.is_file():
        return None
    wrote = False
    if not (run_dir / FINAL).is_file():
        modelfile.copy_weights(
            last, run_dir / FINAL, {"weights": "final", "optimizers": None, "pruned_from": LAST}
        )
        wrote = True
    freed = last.stat().st_size
    last.unlink()
    return Pruned(run.name, freed, wrote)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


__all__ = ["BEST", "FINAL", "LAST", "RunInfo", "list_runs", "prune_last", "read_run"]
