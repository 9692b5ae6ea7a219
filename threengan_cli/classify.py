"""Classify image files with a trained model, streaming: rows come out as images go in.

Inputs are files, folders (the image files directly inside; with ``recursive`` the whole
tree), glob patterns (expanded here when the path does not exist and holds ``*?[``, so a
quoted ``'scans/**/*.jpg'`` works where a shell would hit its argument limit), and ``-`` for
paths read from a stream, one per line. Everything is expanded lazily: a list of 100,000
paths on stdin is never held in memory, and neither are the decoded images.

The pipeline: the main process cuts the path stream into batches of ``batch_size``, splits
each batch over a pool of decoding processes, and keeps at most three batches in flight,
which keeps memory flat and the pool busy while the main process runs the model on the
oldest decoded batch. Every worker decodes with :func:`images.load_image`, the very
function ``prepare`` uses, so training and classification see identically preprocessed
pixels. Rows come out in input order (folder contents sorted by name, files before
sub-folders). A file that cannot be read gives a row with ``error`` set and no label.

Decision: with two classes, class 1 (``pneumonia`` for the chest X-ray models) when its
probability is at least ``threshold``, else class 0; with more classes, the most probable.
"""

from __future__ import annotations

import glob
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import numpy as np

from threengan_cli import images
from threengan_cli.workers import decode_pool

if TYPE_CHECKING:
    from threengan_cli.inference import Model
    from threengan_cli.npclassifier import NumpyClassifier

    Classifier = Model | NumpyClassifier  # both have probabilities_of(uint8 images)

STDIN = "-"
# Batches in flight beyond the one being classified: enough for the pool to stay busy while
# the model runs, few enough that memory does not grow with the input (about
# (_WINDOW + 1) * batch_size decoded images at any time).
_WINDOW = 2
_GLOB_CHARS = frozenset("*?[")

Item = tuple[str, str | None]  # (path, error found while expanding the inputs, if any)


@dataclass(frozen=True)
class Row:
    """One input's result: a label and per-class probabilities, or an error and neither."""

    path: str
    label: str | None
    probabilities: dict[str, float] | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ------------------------------------------------------------------------------- inputs
def expand(
    inputs: Iterable[str], recursive: bool = False, stdin: TextIO | None = None
) -> Iterator[Item]:
    """The files to classify, lazily, in input order; inputs that give none yield an error."""
    for given in inputs:
        if given == STDIN:
            stream = sys.stdin if stdin is None else stdin
            for line in stream:
                line = line.rstrip("\r\n")
                if line.strip() and line != STDIN:
                    yield from _expand_one(line, recursive)
        else:
            yield from _expand_one(given, recursive)


def _expand_one(given: str, recursive: bool) -> Iterator[Item]:
    if "\0" in given:  # os.path would raise on it; one bad line must not end the run
        yield given, "invalid path (contains a NUL byte)"
    elif os.path.isdir(given):
        yield from _folder(given, recursive)
    elif os.path.lexists(given):
        yield given, None  # any file is tried, whatever its name; decoding decides
    elif _GLOB_CHARS & set(given):
        matches = sorted(glob.iglob(given, recursive=True))
        if not matches:
            yield given, "no file matches this pattern"
        for match in matches:
            if not os.path.isdir(match):
                yield match, None
            elif "**" not in given:  # with ** the pattern already reaches every file below
                yield from _folder(match, recursive)
    else:
        yield given, "file not found"


def _folder(folder: str, recursive: bool) -> Iterator[Item]:
    found = False
    subfolders: list[str] = []
    for item in _walk(folder, recursive, set(), subfolders):
        found = True
        yield item
    if not found:
        hint = " (use --recursive to look in sub-folders)" if subfolders else ""
        yield folder, f"no image files in folder{hint}"


def _walk(folder: str, recursive: bool, seen: set[str], subfolders: list[str]) -> Iterator[Item]:
    """Image files of a folder sorted by name, then (when recursive) its sub-folders'."""
    real = os.path.realpath(folder)
    if real in seen:  # a symlink loop
        return
    seen.add(real)
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield folder, f"cannot list folder ({exc.strerror or exc})"
        return
    below = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            if not entry.name.startswith("."):
                below.append(entry.path)
        elif images.is_image_file(entry.path):
            yield entry.path, None
    subfolders.extend(below)
    if recursive:
        for sub in below:
            yield from _walk(sub, recursive, seen, [])


# ----------------------------------------------------------------------------- decoding
def decode_chunk(paths: list[str], size: int, fit: str) -> tuple[np.ndarray, list[str | None]]:
    """Decode paths to a (B, size, size) uint8 array; a failed one leaves zeros and a reason."""
    out = np.zeros((len(paths), size, size), dtype=np.uint8)
    errors: list[str | None] = []
    for i, path in enumerate(paths):
        try:
            out[i] = images.load_image(path, size, fit)
            errors.append(None)
        except images.ImageReadError as exc:
            errors.append(str(exc))
        except Exception as exc:  # one odd file must not end a run over 100,000
            errors.append(f"cannot decode ({type(exc).__name__}: {exc})")
    return out, errors


def _executor(workers: int) -> Executor:
    """Decoding processes; ``workers=1`` decodes in a thread of this process instead.

    Pillow releases the GIL while it decodes and resizes, so one thread still overlaps
    decoding with inference, without the cost of starting a process.
    """
    if workers == 1:
        return ThreadPoolExecutor(1, thread_name_prefix="threengan-decode")
    return decode_pool(workers)


def _chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- deciding
def decide(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class indices (B,) from probabilities (B, K): see the module docstring."""
    if probabilities.shape[1] == 2:
        return (probabilities[:, 1] >= threshold).astype(np.int64)
    return probabilities.argmax(axis=1)


def _rows(
    chunk: list[Item], decoded: list[Future], model: Classifier, threshold: float
) -> Iterator[Row]:
    parts = [future.result() for future in decoded]
    errors = [error for _, part_errors in parts for error in part_errors]
    arrays = np.concatenate([a for a, _ in parts]) if parts else None
    ok = [i for i, e in enumerate(errors) if e is None]
    probs: list[list[float]] = []
    labels: list[int] = []
    if ok:
        p = model.probabilities_of(arrays[ok])
        labels = decide(p, threshold).tolist()
        probs = p.tolist()
    results = iter(errors)
    done = 0
    for path, error in chunk:
        if error is None:
            error = next(results)
        if error is not None:
            yield Row(path, None, None, error)
            continue
        yield Row(
            path, model.classes[labels[done]], dict(zip(model.classes, probs[done], strict=True))
        )
        done += 1


def classify(
    inputs: Iterable[str],
    model: Classifier,
    batch_size: int = 64,
    workers: int = 0,
    threshold: float = 0.5,
    recursive: bool = False,
    stdin: TextIO | None = None,
) -> Iterator[Row]:
    """Rows for every input file, in input order (see the module docstring).

    ``workers=0`` uses every core; ``stdin`` is the stream ``-`` reads (default sys.stdin).
    """
    model.require_classifier()
    workers = workers or os.cpu_count() or 1
    size, fit = model.image_size, model.fit
    pending: deque[tuple[list[Item], list[Future]]] = deque()
    pool = _executor(workers)
    try:
        for chunk in _chunks(expand(inputs, recursive, stdin), batch_size):
            todo = [path for path, error in chunk if error is None]
            # Each batch is split over all workers, so that even one batch (a small folder)
            # decodes on every core.
            step = max(1, -(-len(todo) // workers))
            futures = [
                pool.submit(decode_chunk, todo[i : i + step], size, fit)
                for i in range(0, len(todo), step)
            ]
            pending.append((chunk, futures))
            if len(pending) > _WINDOW:
                yield from _rows(*pending.popleft(), model, threshold)
        while pending:
            yield from _rows(*pending.popleft(), model, threshold)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


ADAPT_MIN_IMAGES = 32  # fewer images give BatchNorm statistics too noisy to trust


class AdaptError(Exception):
    """Test-time adaptation cannot run on these inputs; one line for the user."""


def adapt_bn(
    inputs: list[str], model: Classifier, workers: int = 0, recursive: bool = False
) -> int:
    """``classify --adapt bn``: recompute the classifier's BatchNorm statistics on the readable
    images among ``inputs`` (no labels are used: transductive, label-free adaptation to the
    images at hand), before they are classified. Needs the torch engine; returns how many
    images the statistics came from. Fewer than :data:`ADAPT_MIN_IMAGES` is an
    :class:`AdaptError`."""
    import numpy as np
    import torch

    if not hasattr(model, "adapt_bn"):
        raise AdaptError("--adapt bn needs the torch engine (--engine torch)")
    workers = workers or os.cpu_count() or 1
    paths = [path for path, error in expand(inputs, recursive, None) if error is None]
    step = max(1, -(-len(paths) // workers))
    pool = _executor(workers)
    try:
        parts = [
            pool.submit(decode_chunk, paths[i : i + step], model.image_size, model.fit)
            for i in range(0, len(paths), step)
        ]
        arrays = [future.result()[0] for future in parts]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    images = np.concatenate(arrays) if arrays else np.zeros((0, 1, 1), np.uint8)
    if len(images) < ADAPT_MIN_IMAGES:
        raise AdaptError(
            f"--adapt bn needs at least {ADAPT_MIN_IMAGES} readable images to estimate "
            f"BatchNorm statistics from (got {len(images)})"
        )
    model.adapt_bn(torch.from_numpy(images))
    return len(images)
