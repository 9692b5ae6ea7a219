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
import itertools
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from threengan_cli import metrics
from threengan_cli.core.errors import Failure, UsageError
from threengan_cli.data import images
from threengan_cli.data.walk import identity, image_files
from threengan_cli.data.workers import decode_pool
from threengan_cli.infer.engine import exact

if TYPE_CHECKING:
    from threengan_cli.infer.numpy_engine import NumpyClassifier
    from threengan_cli.infer.torch_engine import Model

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
    """One input's result: a label and per-class probabilities, or an error and neither;
    with a model that has out-of-distribution statistics, the image's score and whether it
    is flagged as unlike the model's training X-rays (score above the threshold)."""

    path: str
    label: str | None
    probabilities: dict[str, float] | None
    error: str | None = None
    ood_score: float | None = None
    ood: bool | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ------------------------------------------------------------------------------- inputs
def inputs_of(given: list[str] | None, examples: bool) -> list[str]:
    """The PATHs given, with the shipped example X-rays under ``examples``; none, or ``-``
    twice, is a :class:`UsageError` (checked before any model is loaded)."""
    inputs = list(given or [])
    if examples:
        from threengan_cli.core.paths import example_images

        shipped = [str(p) for p in example_images()]
        if not shipped:
            raise Failure("this installation has no example X-rays (threengan_cli/examples)")
        inputs += shipped
    if not inputs:
        raise UsageError(
            "give at least one PATH (a file, folder or glob), --examples, or - to read paths "
            "from stdin"
        )
    if inputs.count(STDIN) > 1:
        raise UsageError("- (paths from stdin) may be given once")
    return inputs


def stdin_paths(inputs: list[str], stream: Iterable[str], allow_empty: bool):
    """``stream``'s lines (stdin), when ``-`` is among the inputs, read up to the first
    path before any model is loaded: ``-`` alone with nothing on it is a :class:`UsageError`,
    like no PATH, unless ``allow_empty``; ``None`` without ``-``."""
    if STDIN not in inputs:
        return None
    for line in stream:
        if line.strip() and line.rstrip("\r\n") != STDIN:
            return itertools.chain([line], stream)
    if inputs == [STDIN] and not allow_empty:
        raise UsageError("no paths were given on stdin (one per line)")
    return iter(())


def expand(
    inputs: Iterable[str],
    recursive: bool = False,
    stdin: Iterable[str] | None = None,
    exclude: Iterable[str | os.PathLike] = (),
    on_skip: Callable[[str], None] | None = None,
    allow_empty: bool = False,
) -> Iterator[Item]:
    """The files to classify, lazily, in input order; inputs that give none yield an error,
    except, with ``allow_empty``, a folder without images and a pattern that matches
    nothing (a nightly job's empty inbox), which yield nothing. A missing path stays an
    error: a misspelt folder is not an empty one.

    Folder scans and glob patterns leave out everything under the ``exclude`` folders (where
    ``--sort-into`` writes, so a rerun never classifies its own copies), and call
    ``on_skip(path)`` for each file they pass over because its name is not an image's
    (system files such as ``.DS_Store`` and ``Thumbs.db`` are passed over without a call).
    A file named as an input is always tried, whatever its name."""
    scan = _Scan(recursive, tuple(os.fspath(e) for e in exclude), on_skip, allow_empty)
    for given in inputs:
        if given == STDIN:
            stream = sys.stdin if stdin is None else stdin
            for line in stream:
                line = line.rstrip("\r\n")
                if line.strip() and line != STDIN:
                    yield from scan.one(line)
        else:
            yield from scan.one(given)


@dataclass(frozen=True)
class _Scan:
    """How inputs are expanded: see :func:`expand`."""

    recursive: bool
    exclude: tuple[str, ...]
    on_skip: Callable[[str], None] | None
    allow_empty: bool = False

    def one(self, given: str) -> Iterator[Item]:
        if "\0" in given:  # os.path would raise on it; one bad line must not end the run
            yield given, "invalid path (contains a NUL byte)"
        elif os.path.isdir(given):
            yield from self.folder(given)
        elif os.path.lexists(given):
            yield given, None  # any file is tried, whatever its name; decoding decides
        elif _GLOB_CHARS & set(given):
            matches = sorted(glob.iglob(given, recursive=True))
            if not matches and not self.allow_empty:
                yield given, "no file matches this pattern"
            for match in matches:
                if self.excluded(match):
                    continue
                if not os.path.isdir(match):
                    yield match, None
                elif "**" not in given:  # with ** the pattern already reaches every file below
                    yield from self.folder(match)
        else:
            yield given, "file not found"

    def excluded(self, path: str) -> bool:
        """Whether a glob's match lies in an excluded folder."""
        if not self.exclude:
            return False
        real = os.path.realpath(path)
        for folder in map(os.path.realpath, self.exclude):
            if real == folder or real.startswith(folder.rstrip(os.sep) + os.sep):
                return True
        return False

    def excluded_folders(self) -> set[tuple[int, int]]:
        """The excluded folders that exist now, as (device, inode): --sort-into's appears
        during the run."""
        return {found for found in map(identity, self.exclude) if found is not None}

    def folder(self, folder: str) -> Iterator[Item]:
        found = False
        subfolders: list[str] = []
        errors: list[Item] = []
        for path in image_files(
            folder,
            recursive=self.recursive,
            skip=lambda inode: inode in self.excluded_folders(),
            on_other=self.on_skip,
            on_error=lambda where, exc: errors.append(
                (where, f"cannot list folder ({exc.strerror or exc})")
            ),
            subfolders=subfolders,
        ):
            yield from errors
            errors.clear()
            found = True
            yield path, None
        yield from errors
        if not found and not errors and not self.allow_empty:
            hint = " (use --recursive to look in sub-folders)" if subfolders else ""
            yield folder, f"no image files in folder{hint}"


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
def decide(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class indices (B,) from probabilities (B, K): :func:`metrics.predict`'s rule."""
    return metrics.predict(probabilities, threshold)


def _rows(
    chunk: list[Item], decoded: list[Future], model: Classifier, decision: Decision
) -> Iterator[Row]:
    parts = [future.result() for future in decoded]
    errors = [error for _, part_errors in parts for error in part_errors]
    arrays = np.concatenate([a for a, _ in parts]) if parts else None
    ok = [i for i, e in enumerate(errors) if e is None]
    probs: list[list[float]] = []
    labels: list[int] = []
    scores: list[float | None] = [None] * len(ok)
    flags: list[bool | None] = [None] * len(ok)
    if ok:
        p, s = model.outputs_of(arrays[ok])
        labels = decide(p, decision.threshold).tolist()
        probs = [[exact(v) for v in image] for image in p.tolist()]
        if s is not None and decision.ood_threshold is not None:
            scores = [exact(v) for v in s.tolist()]
            flags = (s > np.float32(decision.ood_threshold)).tolist()
    results = iter(errors)
    done = 0
    for path, error in chunk:
        if error is None:
            error = next(results)
        if error is not None:
            yield Row(path, None, None, error)
            continue
        label = model.classes[labels[done]]
        p_row = dict(zip(model.classes, probs[done], strict=True))
        yield Row(path, label, p_row, ood_score=scores[done], ood=flags[done])
        done += 1


@dataclass(frozen=True)
class Decision:
    """How rows are decided: the class threshold (:func:`decide`) and the out-of-distribution
    score above which an image is flagged (``None``: no flag, for a model without
    statistics)."""

    threshold: float = 0.5
    ood_threshold: float | None = None


def classify(
    inputs: Iterable[str],
    model: Classifier,
    batch_size: int = 64,
    workers: int = 0,
    decision: Decision | None = None,
    recursive: bool = False,
    stdin: Iterable[str] | None = None,
    shard: tuple[int, int] | None = None,
    exclude: Iterable[str | os.PathLike] = (),
    on_skip: Callable[[str], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    allow_empty: bool = False,
) -> Iterator[Row]:
    """Rows for every input file, in input order (see the module docstring).

    ``workers=0`` uses every core; ``stdin`` is the stream ``-`` reads (default sys.stdin);
    ``exclude`` and ``on_skip`` as for :func:`expand`; ``decision`` defaults to threshold 0.5
    and the model's own out-of-distribution threshold; ``allow_empty`` as for :func:`expand`.
    ``on_total(n)``, where given, is
    called with the number of rows to come before the first one, whenever it is known
    without reading stdin (files, folders, globs; a shard, which lists its inputs anyway).
    """
    if decision is None:
        stats = getattr(model, "stats", None)
        decision = Decision(ood_threshold=stats.threshold if stats is not None else None)
    model.require_classifier()
    workers = workers or os.cpu_count() or 1
    size, fit = model.image_size, model.fit
    pending: deque[tuple[list[Item], list[Future]]] = deque()
    items: Iterable[Item] = expand(inputs, recursive, stdin, exclude, on_skip, allow_empty)
    if shard is not None:
        items = shard_of(items, shard)
    elif on_total is not None and isinstance(inputs, list | tuple) and STDIN not in inputs:
        # The expanded list of a folder or of named files is held (paths only, ~100 bytes
        # each) for a bar with a total and an ETA; stdin's paths stay a stream.
        items = list(items)
    if on_total is not None and isinstance(items, list):
        on_total(len(items))
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
                yield from _rows(*pending.popleft(), model, decision)
        while pending:
            yield from _rows(*pending.popleft(), model, decision)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


ADAPT_MIN_IMAGES = 32  # fewer images give BatchNorm statistics too noisy to trust


class AdaptError(UsageError):
    """Test-time adaptation cannot run on these inputs; one line for the user."""


def adapt_bn(
    inputs: list[str],
    model: Classifier,
    workers: int = 0,
    recursive: bool = False,
    exclude: Iterable[str | os.PathLike] = (),
    stdin: Iterable[str] | None = None,
) -> tuple[int, list[str]]:
    """``classify --adapt bn``: recompute the classifier's BatchNorm statistics on the readable
    images among ``inputs`` (no labels are used: transductive, label-free adaptation to the
    images at hand), before they are classified. Needs the torch engine; returns how many
    images the statistics came from (those that decoded, never the unreadable ones), and the
    inputs with the paths of ``stdin`` (the stream ``-`` reads) read once in its place, since
    classify reads them again. Fewer than :data:`ADAPT_MIN_IMAGES` is an :class:`AdaptError`."""
    import numpy as np
    import torch

    if stdin is not None:
        inputs = [p for p in inputs if p != STDIN] + [
            line.strip() for line in stdin if line.strip()
        ]
    if not hasattr(model, "adapt_bn"):
        raise AdaptError("--adapt bn needs the torch engine (--engine torch)")
    workers = workers or os.cpu_count() or 1
    found = [path for path, error in expand(inputs, recursive, None, exclude) if error is None]
    step = max(1, -(-len(found) // workers))
    pool = _executor(workers)
    try:
        parts = [
            pool.submit(decode_chunk, found[i : i + step], model.image_size, model.fit)
            for i in range(0, len(found), step)
        ]
        decoded = [future.result() for future in parts]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    # A file that failed to decode left a zero image in its place: it is no X-ray.
    arrays = [a[[i for i, e in enumerate(errors) if e is None]] for a, errors in decoded]
    images = np.concatenate(arrays) if arrays else np.zeros((0, 1, 1), np.uint8)
    if len(images) < ADAPT_MIN_IMAGES:
        raise AdaptError(
            f"--adapt bn needs at least {ADAPT_MIN_IMAGES} readable images to estimate "
            f"BatchNorm statistics from (got {len(images)})"
        )
    model.adapt_bn(torch.from_numpy(images))
    return len(images), inputs
