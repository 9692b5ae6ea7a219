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

Decision: :func:`metrics.predict`, the one rule ``evaluate`` uses too: with two classes,
class 1 (``pneumonia`` for the chest X-ray models) when its probability is at least
``threshold``, else class 0; with more classes, the most probable.

Exactness: a row's probabilities are the model's float32 values written with the fewest
digits that read back as the same float32 (:func:`exact`), and the models compute each
image independently of the others in its batch, so ``--batch-size`` never changes a row.
``shard=(i, n)`` classifies the i-th of n contiguous slices of the expanded input list: the
shards' rows, concatenated in shard order, are exactly the rows of one unsharded run.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from threengan_cli import images, metrics
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


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 1 <= I <= N; anything else is a ValueError."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(f"--shard must be I/N with 1 <= I <= N, e.g. 2/8 (got {text!r})")
    return int(match[1]), int(match[2])


def shard_of(items: Iterable[Item], shard: tuple[int, int]) -> list[Item]:
    """The ``shard[0]``-th of ``shard[1]`` contiguous, near-equal slices of ``items``.

    Contiguous rather than every n-th item so that the shards' outputs, concatenated in
    shard order, are one unsharded run's output; that needs the whole list first (the
    paths only, never the images).
    """
    i, n = shard
    listed = list(items)
    return listed[(i - 1) * len(listed) // n : i * len(listed) // n]


# ----------------------------------------------------------------------------- deciding
def exact(p: float) -> float:
    """The float32 ``p`` as the shortest decimal that reads back as the same float32.

    Python writes a float32 widened to float64 with 17 digits (0.7571609616279602); rounding
    to a fixed number of decimals instead loses the ranking near 0 and 1 (0.9999999 -> 1.0).
    """
    return float(np.format_float_positional(np.float32(p), unique=True, trim="0"))


def decide(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class indices (B,) from probabilities (B, K): :func:`metrics.predict`'s rule."""
    return metrics.predict(probabilities, threshold)


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
        probs = [[exact(v) for v in image] for image in p.tolist()]
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
    shard: tuple[int, int] | None = None,
) -> Iterator[Row]:
    """Rows for every input file, in input order (see the module docstring).

    ``workers=0`` uses every core; ``stdin`` is the stream ``-`` reads (default sys.stdin).
    """
    model.require_classifier()
    workers = workers or os.cpu_count() or 1
    size, fit = model.image_size, model.fit
    pending: deque[tuple[list[Item], list[Future]]] = deque()
    items: Iterable[Item] = expand(inputs, recursive, stdin)
    if shard is not None:
        items = shard_of(items, shard)
    pool = _executor(workers)
    try:
        for chunk in _chunks(iter(items), batch_size):
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


# ------------------------------------------------------------------------------ sorting
def sort_into(row: Row, folder: Path | str, link: bool = False) -> Path | None:
    """Copy (or with ``link`` hard-link, else symlink) a classified input into
    ``folder/<label>/``; ``None`` for an error row.

    The file keeps its name; a different file of the same name already there gets the name
    with a short hash of its source path added, so two inputs never overwrite each other,
    and a rerun replaces what it wrote before. A copy appears whole or not at all.
    """
    if not row.ok or row.label is None:
        return None
    source = Path(row.path)
    target_dir = Path(folder) / row.label
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / source.name
    if target.exists() and not _same_file(source, target):
        tag = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
        target = target_dir / f"{source.stem}-{tag}{source.suffix}"
    if link:
        if target.exists() and _same_file(source, target):
            return target
        tmp = target_dir / f".{target.name}.{os.getpid()}.link"
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or links not allowed: a symbolic link
            os.symlink(source.resolve(), tmp)
        os.replace(tmp, target)
        return target
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target_dir)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        shutil.copystat(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _same_file(a: Path, b: Path) -> bool:
    """``b`` is ``a`` itself (a link to it) or a copy of it made by :func:`sort_into`."""
    try:
        if os.path.samefile(a, b):
            return True
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    if sa.st_size != sb.st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


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
