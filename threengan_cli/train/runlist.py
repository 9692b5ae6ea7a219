"""Training runs on disk: list them (``threengan runs``) and prune their resumable checkpoints.

A run folder holds ``run.json``, ``settings.json``, ``metrics.jsonl`` (one line per epoch),
``last.safetensors`` (everything a resume needs: weights, optimizer and RNG state; about
109 MB for a width-64 3ngan run), ``best.safetensors`` (the best-on-val weights) and, once
finished, ``summary.json``. :func:`read_run_info` sums up one folder for the listing; it reads
only the checkpoints' JSON headers, never their tensors, and never imports torch.

State: ``finished`` when the last checkpoint says so (or, once pruned, ``summary.json`` is
there), else ``running`` while a live process holds the run's writer lock (:mod:`runs`),
else ``stopped`` (resumable with ``train --resume``); ``damaged`` when one of its files
cannot be read as a run's (the reason in ``error``; the other runs list as usual). The files
are read with :mod:`runs`' readers, which own their format.

Accuracies are those of the model ``--run`` loads: the final one, whose test figures
``summary.json`` reports (the latest epoch's val accuracy while a run is unfinished); the
test accuracy of ``best.safetensors`` (``--model best``), the best epoch on val
(``best_epoch``), is ``test_accuracy_best``.

Pruning a finished run copies the final epoch's weights, byte for byte, into
``final.safetensors`` (a few MB: no optimizer state) and deletes ``last.safetensors``;
``--run`` then finds ``final.safetensors``, so classify, evaluate and generate keep
working. Only extending the run (``train --resume --epochs``) needs what was deleted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from threengan_cli.core import paths
from threengan_cli.core.errors import Failure, UsageError
from threengan_cli.model import modelfile
from threengan_cli.train import runlock, runs
from threengan_cli.train.runs import BEST, FINAL, LAST, METRICS, RUN, SETTINGS


@dataclass
class RunInfo:
    name: str
    path: str
    method: str | None
    size: int | None  # labelled training images N
    epochs_done: int
    epochs_planned: int | None
    state: str  # finished, failed (a loss became non-finite), running, stopped or damaged
    # Of the model that --run loads: the final one (the latest epoch while unfinished)
    val_accuracy: float | None
    test_accuracy: float | None
    bytes: int
    resumable: bool  # last.safetensors is there
    error: str | None = None  # what is damaged (state "damaged")
    best_epoch: int | None = None  # the epoch of best.safetensors
    test_accuracy_best: float | None = None  # of best.safetensors (--model best)
    ood_fit: dict[str, Any] | None = None  # how the final model's ood detector was fitted
    temperature: dict[str, Any] | None = None  # the final model's, and where it was fitted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Pruned:
    name: str
    freed_bytes: int
    wrote_final: bool


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


def read_run_info(run_dir: Path, name: str | None = None) -> RunInfo:
    """What a run folder says about itself (see the module docstring). A damaged file makes
    the run ``damaged``, with the reason in ``error``: never an exception, so one damaged run
    does not hide the others."""
    run_dir = Path(run_dir)
    try:
        return _read_run_info(run_dir, name or run_dir.name)
    except (runs.RunError, modelfile.CheckpointError) as exc:
        return RunInfo(
            name=name or run_dir.name,
            path=str(run_dir),
            method=None,
            size=None,
            epochs_done=0,
            epochs_planned=None,
            state="damaged",
            val_accuracy=None,
            test_accuracy=None,
            bytes=_disk_bytes(run_dir)[0],
            resumable=(run_dir / LAST).is_file(),
            error=str(exc),
        )


def _object(path: Path, optional: bool = False) -> dict[str, Any]:
    if optional and not path.is_file():
        return {}
    data = runs.read_json(path)
    if not isinstance(data, dict):
        raise runs.RunError(f"{path} is damaged (not a JSON object)")
    return data


def _typed(value: Any, kind: type, path: Path, what: str) -> Any:
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise runs.RunError(f"{path} is damaged ({what} is {type(value).__name__}: {value!r:.40})")


def _read_run_info(run_dir: Path, name: str) -> RunInfo:
    run = _object(run_dir / RUN, optional=True)
    settings = _object(run_dir / SETTINGS, optional=True) or run.get("settings") or {}
    if not isinstance(settings, dict):
        raise runs.RunError(f"{run_dir / RUN} is damaged (settings is not an object)")
    where = run_dir / SETTINGS
    method = _typed(settings.get("method") or run.get("method"), str, where, "method")
    size = _typed(settings.get("size") or run.get("train_images"), int, where, "size")
    planned = _typed(settings.get("epochs"), int, where, "epochs")
    records = runs.read_metrics(run_dir / METRICS)
    summary = runs.read_summary(run_dir)
    done = max((r["epoch"] for r in records), default=0)
    finished, best_epoch = False, None
    if (run_dir / LAST).is_file():
        meta = modelfile.read_meta(run_dir / LAST)
        position = meta.get("position")
        epoch = position.get("epoch") if isinstance(position, dict) else None
        done = _typed(epoch, int, run_dir / LAST, "position.epoch") or done
        saved = meta.get("settings")
        if isinstance(saved, dict):
            planned = _typed(saved.get("epochs"), int, run_dir / LAST, "epochs") or planned
        finished = bool(meta.get("finished")) and summary is not None
        best_epoch = _typed(meta.get("best_epoch"), int, run_dir / LAST, "best_epoch")
    elif summary is not None:  # pruned: the summary is what is left of the finish
        finished = True
        done = planned = summary["epochs"]
    state = runs.state(run_dir)  # finished and failed are the folder's; else held or not
    if state == "finished" and finished:
        best_epoch = summary.get("best_epoch_on_val") or best_epoch
    elif state != "failed":
        finished, state = False, "running" if runlock.locked_by(run_dir) else "stopped"
    # --run loads the final model (the latest epoch while unfinished): the numbers shown are
    # of that model, and best.safetensors' test accuracy (--model best) is shown beside them.
    has_best = (run_dir / BEST).is_file() and best_epoch is not None
    val = summary["val"] if finished else None
    if not isinstance(val, dict):
        val = next((r.get("val") for r in records if r["epoch"] == done), None) or {}
    val_accuracy = _typed(val.get("accuracy"), (int, float), run_dir / METRICS, "val accuracy")
    test_final = test_best = None
    if finished:
        test_final = summary["test"].get("accuracy")
        if has_best and summary.get("test_of_best_on_val") is not None:
            test_best = summary["test_of_best_on_val"].get("accuracy")
    return RunInfo(
        name=name,
        path=str(run_dir),
        method=method,
        size=size,
        epochs_done=int(done or 0),
        epochs_planned=planned,
        state=state,
        val_accuracy=val_accuracy,
        test_accuracy=test_final,
        bytes=_disk_bytes(run_dir)[0],
        resumable=(run_dir / LAST).is_file(),
        best_epoch=best_epoch if has_best else None,
        test_accuracy_best=test_best,
        ood_fit=_ood_fit(summary) if finished else None,
        temperature=_temperature(summary) if finished else None,
    )


def _ood_fit(summary: dict[str, Any]) -> dict[str, Any] | None:
    """What summary.json says of the detector's fit (runs from before it said: None)."""
    stats = summary.get("stats")
    found = stats.get("ood_fit") if isinstance(stats, dict) else None
    return found if isinstance(found, dict) else None


def _temperature(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The final model's temperature and where it was fitted (``split``: val, cross-fit, or
    None for uncalibrated), as summary.json says (runs from before it said: None)."""
    stats = summary.get("stats")
    if not isinstance(stats, dict) or not isinstance(stats.get("temperature"), (int, float)):
        return None
    how = stats.get("temperature_fit")
    how = how if isinstance(how, dict) else {"split": stats.get("temperature_split")}
    return {"value": stats["temperature"], **how}


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


def list_runs(home: Path | None = None, names: list[str] | None = None) -> list[RunInfo]:
    """The runs in the data dir, or only those ``names`` (as listed: one that is not is a
    :class:`UsageError`)."""
    found = run_folders(home)
    missing = [n for n in names or () if n not in {name for name, _ in found}]
    if missing:
        raise UsageError(f"no run named {missing[0]} (see `threengan runs`)")
    return [read_run_info(folder, name) for name, folder in found if not names or name in names]


def prune_last(run: RunInfo) -> Pruned | None:
    """Drop a finished run's resumable checkpoint, keeping its final weights (see the
    module docstring); ``None`` when there is nothing to prune. It holds the run's writer
    lock while it works (:class:`runlock.RunLocked` while another process writes the run) and
    looks at the run again under it: a run being extended is not finished any more."""
    run_dir = Path(run.path)
    with runlock.lock(run_dir):
        return _prune_locked(run_dir, run.name)


def prune_finished(
    found: list[RunInfo], on_busy: Callable[[str, str], None]
) -> tuple[list[RunInfo], list[Pruned], list[str]]:
    """:func:`prune_last` of each run: the runs read again, what was pruned, and the runs
    left alone because another process writes them (``on_busy(name, why)`` hears of each
    as it comes). Any other error stops with a Failure naming the run."""
    pruned, busy = [], []
    for run in found:
        try:
            done = prune_last(run)
        except runlock.RunLocked as exc:  # another process writes it: never pruned
            on_busy(run.name, str(exc))
            busy.append(run.name)
            continue
        except (OSError, modelfile.CheckpointError, runs.RunError) as exc:
            raise Failure(f"cannot prune {run.name}: {exc}") from None
        if done is not None:
            pruned.append(done)
    return [read_run_info(Path(r.path), r.name) for r in found], pruned, busy


def _prune_locked(run_dir: Path, name: str) -> Pruned | None:
    run = read_run_info(run_dir, name)
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


__all__ = ["RunInfo", "list_runs", "prune_last", "read_run_info"]
