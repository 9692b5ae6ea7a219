"""The run-folder contract: what a training run's files are called, whether a folder holds a run
and in what state, reading its JSON files, and which model file a run answers with.

A run folder (``threengan train``, or ``<benchmark>/runs/<method>-n<N>-r<R>``) holds:

- ``settings.json``   the resolved train settings (written first)
- ``run.json``        dataset, classes, versions, training subset (written second: a folder
                      with both has started; one without ``run.json`` never finished starting
                      and may be started again in place)
- ``metrics.jsonl``   one JSON line per epoch
- ``last.safetensors`` / ``best.safetensors``  resumable last checkpoint / best on val
- ``summary.json``    test metrics, written once at the end (the run is finished)
- ``failed.json``     a benchmark run whose loss became non-finite
- ``samples/``        sample grids
- ``.lock``           held while a process writes the run: pid, host, start time

The lock that allows one writer per run is :mod:`runlock`'s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from threengan_cli.core import paths
from threengan_cli.core.errors import Failure
from threengan_cli.core.settings import TrainSettings, with_stored_recipe
from threengan_cli.model.modelfile import (
    BEST,
    FINAL,
    LAST,
    ModelError,
    ModelNotFound,
    checked_file,
)

__all__ = [
    "BEST",
    "FAILED",
    "FINAL",
    "FOLDS",
    "LAST",
    "LOCK",
    "METRICS",
    "RUN",
    "SAMPLES",
    "SETTINGS",
    "SUMMARY",
    "RunError",
    "append_line",
    "clear",
    "holds_run",
    "read_json",
    "read_jsonl",
    "read_metrics",
    "read_summary",
    "Difference",
    "difference",
    "identity",
    "finished_summary",
    "done_line",
    "model_file",
    "init_file",
    "resolve_run",
    "run_of",
    "settings_differ",
    "state",
]

SETTINGS, RUN, METRICS, SUMMARY = "settings.json", "run.json", "metrics.jsonl", "summary.json"
FAILED, SAMPLES, LOCK = "failed.json", "samples", ".lock"
FOLDS = "folds"  # the calibration folds' runs (train/crossfit)
# What a start that was killed before run.json can leave behind: nothing worth keeping.
_START_DEBRIS = frozenset({SETTINGS, SAMPLES, LOCK, METRICS})
# A run's own files are opened without following symbolic links (where the OS can).
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class RunError(Failure):
    """A run folder or one of its files that cannot be used; one line for the user."""


# ------------------------------------------------------------------------------- reading
def read_json(path: Path) -> Any:
    """A JSON file, or a :class:`RunError` naming the file (and the line of a syntax error)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} cannot be read ({_reason(exc)})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} line {exc.lineno} is not valid JSON ({exc.msg})") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped); a bad line is a
    :class:`RunError` naming the file and the line number.

    A last line without its newline that does not parse is what a process killed while
    appending leaves: it is dropped (the record it was writing is lost, nothing else). A bad
    line that ends in a newline was written whole, and is damage."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RunError(f"{path} cannot be read ({_reason(exc)})") from None
    lines = raw.split(b"\n")
    last = len(lines)  # its line is b"" when the file ends with a newline, as appends do
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            if number == last:
                continue
            raise RunError(f"{path} line {number} is not UTF-8 ({exc.reason})") from None
        except json.JSONDecodeError as exc:
            if number == last:
                continue
            raise RunError(f"{path} line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise RunError(f"{path} line {number} is not a JSON object")
        records.append(record)
    return records


def read_metrics(path: Path, upto_epoch: int | None = None) -> list[dict[str, Any]]:
    """The epoch records of ``metrics.jsonl`` (those up to ``upto_epoch``); each must carry an
    integer ``epoch``."""
    records = read_jsonl(path)
    for number, record in enumerate(records, start=1):
        epoch = record.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise RunError(f"{path}: record {number} has no integer epoch")
    if upto_epoch is None:
        return records
    return [r for r in records if r["epoch"] <= upto_epoch]


_METRIC_KEYS = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "f1")


def read_summary(folder: Path) -> dict[str, Any] | None:
    """``summary.json`` of a finished run, checked to hold what is read from it (the epochs,
    the time, and val and test metrics as numbers); ``None`` when there is none. Damage is a
    :class:`RunError` naming the file and what is wrong."""
    path = Path(folder) / SUMMARY
    if not path.is_file():
        return None
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise RunError(f"{path} is damaged (not a JSON object)")

    def damaged(what: str) -> RunError:
        return RunError(f"{path} is damaged ({what})")

    epochs, elapsed = summary.get("epochs"), summary.get("elapsed_s")
    if not _is_int(epochs) or epochs < 1:
        raise damaged("no epoch count")
    if not _is_number(elapsed):
        raise damaged("no elapsed_s")
    for key in ("val", "test", "test_of_best_on_val"):
        metrics = summary.get(key)
        if metrics is None and key == "test_of_best_on_val":
            continue
        if not isinstance(metrics, dict):
            raise damaged(f"{key} is not an object")
        for name in _METRIC_KEYS:
            value = metrics.get(name)
            if value is not None and not _is_number(value):
                raise damaged(f"{key}.{name} is not a number")
    best = summary.get("best_epoch_on_val")
    if best is not None and not _is_int(best):
        raise damaged("best_epoch_on_val is not an epoch")
    return summary


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Settings that may differ between a run folder and a command that would train it again: the
# same run on another device, or with(out) CUDA graphs, is the same experiment.
_SAME_RUN_ANYWHERE = frozenset({"device", "cuda_graphs"})


def settings_differ(saved: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """The settings (sorted names) in which a run's ``settings.json`` and a command's settings
    differ, leaving out those that do not change the experiment."""
    return sorted(
        k
        for k in set(saved) | set(asked)
        if k not in _SAME_RUN_ANYWHERE and saved.get(k) != asked.get(k)
    )


def append_line(path: Path, line: str) -> None:
    """Append one line to a run's JSON-lines file in one write, never through a symbolic
    link (a link there is a :class:`RunError`). A kill mid-write leaves a last line without
    its newline, which :func:`read_jsonl` drops."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunError(f"{path} is a symbolic link; a run writes only its own files") from None
        raise
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------ identity
@dataclass(frozen=True)
class Difference:
    """How a run folder differs from the run a command asks for: its ``dataset`` (``there``
    is the folder's, None where it names none), or ``settings`` (the first differing
    ``key``, its value ``there`` and ``asked``, and how many ``more`` differ)."""

    what: str
    there: Any
    asked: Any = None
    key: str | None = None
    more: int = 0


def identity(folder: Path) -> tuple[dict[str, Any], str | None]:
    """What makes a run the run it is: its settings (with the recipe of their time: those
    written before recipes were the paper's) and the dataset ``run.json`` names (None when
    the start never wrote it). Unreadable or damaged files are a :class:`RunError`."""
    folder = Path(folder)
    saved = read_json(folder / SETTINGS)
    meta = read_json(folder / RUN) if (folder / RUN).is_file() else {}
    if not isinstance(saved, dict) or not isinstance(meta, dict):
        raise RunError(f"{folder}: {SETTINGS} and {RUN} must hold JSON objects")
    dataset = meta.get("dataset")
    return _with_later_defaults(with_stored_recipe(saved)), (
        dataset if isinstance(dataset, str) else None
    )


def _with_later_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A run's settings with the settings added after it was written, at their defaults: it
    was trained as they are (a new setting's default keeps what training did before it), so
    the same command finds it the same run."""
    later = {
        name: field.default
        for name, field in TrainSettings.model_fields.items()
        if name not in saved and not field.is_required()
    }
    return {**later, **saved}


def difference(folder: Path, asked: dict[str, Any], dataset: Path) -> Difference | None:
    """``None`` when ``folder`` holds (the start of) the run of settings ``asked`` on
    ``dataset``; else how it differs. ``train`` and the benchmark both ask this."""
    saved, there = identity(folder)
    if (Path(folder) / RUN).is_file() and (
        there is None or Path(there).expanduser().resolve() != Path(dataset).resolve()
    ):
        return Difference("dataset", there, str(dataset))
    differ = settings_differ(saved, asked)
    if not differ:
        return None
    key = differ[0]
    return Difference("settings", saved.get(key), asked.get(key), key, len(differ) - 1)


def finished_summary(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(summary, problem) of a finished run: ``(summary, None)``; ``(None, None)`` while it
    is not finished; ``(None, why)`` when its summary is damaged or missing (the final
    evaluation can write it again where the last checkpoint is kept)."""
    from threengan_cli.model.modelfile import read_meta

    folder = Path(folder)
    if (folder / LAST).is_file() and not read_meta(folder / LAST).get("finished"):
        return None, None
    try:
        summary = read_summary(folder)
    except RunError as exc:
        return None, str(exc)
    return summary, None


# --------------------------------------------------------------------------------- state
def state(folder: Path) -> str:
    """What ``folder`` is, as a run:

    ``absent`` (no folder), ``empty``, ``unstarted`` (a start killed before ``run.json``:
    only start debris, safe to start again in place), ``started`` (no checkpoint yet: a
    resume starts over), ``resumable``, ``finished``, ``failed``, or ``other`` (files that
    are not a run's).
    """
    folder = Path(folder)
    if not folder.exists():
        return "absent"
    if not folder.is_dir():
        return "other"
    names = {p.name for p in folder.iterdir() if not _is_temporary(p.name)}
    if not names - {LOCK}:
        return "empty"
    if (folder / SUMMARY).is_file():
        return "finished"
    if (folder / FAILED).is_file():
        return "failed"
    if (folder / RUN).is_file() and (folder / SETTINGS).is_file():
        return "resumable" if (folder / LAST).is_file() else "started"
    if names <= _START_DEBRIS and not any((folder / SAMPLES).glob("*")):
        return "unstarted"
    return "other"


def run_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint file lies in (its ``run.json`` beside it), or ``None``."""
    folder = Path(checkpoint).parent
    return folder if (folder / RUN).is_file() else None


def run_of_model(checkpoint: Path | None, run: str | None, which: str | None) -> Path | None:
    """The run folder of the model file ``--checkpoint``, ``--run`` and ``--model`` name, or
    ``None`` (a file of no run, or none: loading it says what is wrong)."""
    try:
        return run_of(model_file(checkpoint, run, which))
    except ModelError:
        return None


def holds_run(folder: Path) -> bool:
    """Whether starting a new run in ``folder`` would replace something worth keeping."""
    return state(folder) not in ("absent", "empty", "unstarted")


def _is_temporary(name: str) -> bool:
    """Temporaries of :mod:`fileio` (``.<name>.<random>.tmp``); the writer or the next
    run removes them."""
    return name.startswith(".") and name.endswith((".tmp", ".partial"))


_RUN_FILES = (SETTINGS, RUN, METRICS, SUMMARY, FAILED, LAST, BEST, FINAL)


def clear(folder: Path) -> None:
    """Delete what a run writes in ``folder`` (``train --force``), under its lock: the run's
    own files, its sample grids, its calibration folds and its temporaries; anything else in
    the folder stays."""
    import shutil

    folder = Path(folder)
    for name in _RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    for sub in (SAMPLES, FOLDS):
        if (folder / sub).is_dir() and not (folder / sub).is_symlink():
            shutil.rmtree(folder / sub)
    for entry in folder.iterdir():
        if _is_temporary(entry.name) and any(entry.name.startswith(f".{n}.") for n in _RUN_FILES):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


# ------------------------------------------------------------------- which model a run answers
# Which model of a run ``--run`` loads: the final one (the weights training ended with, whose
# test figures summary.json reports; for the robust recipe the averaged weights the study
# measured) unless ``--model best`` asks for the epoch best on val.
RUN_MODELS = ("final", "best")


def resolve_run(name_or_path: str) -> Path:
    """A training run given by name (under the data dir) or by folder path."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir() and (candidate / RUN).exists():
        return candidate
    if paths.is_name(name_or_path):
        return paths.runs_dir() / name_or_path
    return candidate


def model_file(
    checkpoint: Path | None = None, run: str | None = None, which: str | None = None
) -> Path:
    """The checkpoint file to load from ``--checkpoint``, ``--run`` or the bundled default.

    Of a run (``--run``, or a run folder as ``--checkpoint``), ``which`` picks the file:
    ``final`` (the default) the weights training ended with, pruned into final.safetensors
    or in last.safetensors (the latest epoch while the run is unfinished); ``best``
    best.safetensors, the epoch best on val."""
    if checkpoint is not None and run is not None:
        raise ModelNotFound("give either --checkpoint or --run, not both")
    if which is not None and which not in RUN_MODELS:
        raise ModelNotFound(f"--model must be {' or '.join(RUN_MODELS)} (got {which!r})")
    if checkpoint is not None and Path(checkpoint).expanduser().is_dir():
        run = str(checkpoint)  # a run folder passed as a checkpoint
    elif checkpoint is not None:
        if which is not None:
            raise ModelNotFound(
                f"--model {which} picks a model of a --run; --checkpoint names one file"
            )
        return checked_file(checkpoint)
    elif run is None:
        if which is not None:
            raise ModelNotFound(f"--model {which} picks a model of a --run: give --run as well")
        return checked_file(None)
    run_dir = resolve_run(run)
    if not run_dir.is_dir():
        raise ModelNotFound(f"no run {run!r} (looked in {run_dir})")
    names = (BEST,) if which == "best" else (FINAL, LAST)
    for name in names:
        if (run_dir / name).is_file():
            return run_dir / name
    if which is None and (run_dir / BEST).is_file():
        raise ModelNotFound(
            f"run {run_dir} holds no final model ({FINAL} or {LAST}), only {BEST}: "
            "--model best loads it"
        )
    raise ModelNotFound(f"run {run_dir} holds no {' or '.join(names)}")


def init_file(source: str) -> Path:
    """The checkpoint ``train --init`` starts from: ``default`` (the bundled model), a
    checkpoint file, or a run (name or folder), whose checkpoint is chosen as ``--run``
    chooses it."""
    if source == "default":
        return model_file()
    path = Path(source).expanduser()
    if path.is_file() or path.suffix == ".safetensors":
        return model_file(checkpoint=path)
    return model_file(run=source)


def _metric(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else f"{value:.4f}"


def done_line(summary: dict, run_dir: Path) -> str:
    """The test metrics of the model ``--run`` loads (the final one, which summary.json's
    ``test`` reports), and best.safetensors' accuracy beside them where that is another
    epoch: the line ``train`` ends with."""
    test = summary.get("test") or {}
    where = f"summary in {run_dir / SUMMARY}"
    if not test.get("n"):
        return f"done in {summary['elapsed_s']:.0f}s: no test split ({where})"
    best_epoch, epochs = summary.get("best_epoch_on_val"), summary["epochs"]
    best = summary.get("test_of_best_on_val") or {}
    if not (summary.get("val") or {}).get("n"):
        crossfit = (summary.get("stats") or {}).get("temperature_split") == "cross-fit"
        probs = "calibrated by cross-fitting" if crossfit else "uncalibrated (temperature 1)"
        whose, other = (
            f"epoch {epochs}; no val split: no epoch chosen on val, probabilities {probs}, "
            "ood threshold from images held out of its fit",
            "",
        )
    elif best_epoch is None or best_epoch == epochs:
        whose, other = f"epoch {epochs}, also the best on val", ""
    else:
        whose = f"epoch {epochs}"
        other = (
            f"; best on val, epoch {best_epoch} (--model best): test accuracy "
            f"{_metric(best, 'accuracy')}"
        )
    return (
        f"done in {summary['elapsed_s']:.0f}s: test accuracy {_metric(test, 'accuracy')}, "
        f"AUC {_metric(test, 'auc')}, sensitivity {_metric(test, 'sensitivity')}, "
        f"specificity {_metric(test, 'specificity')} of the final model, the one --run loads "
        f"({whose}){other} ({where})"
    )
