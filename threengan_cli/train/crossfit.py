"""Cross-fitted calibration (``train --calibration-folds K``): a temperature fitted on images
the model did not train on, for a dataset without a val split.

The run's labelled images are dealt into K folds stratified by class (each class's images in
an order drawn from the run's seed, dealt round the folds in turn). For each fold a model is
trained with the run's own settings (method, recipe, init, pool, epochs, seed) on the other
K-1 folds, and its logits are taken on the fold it did not see. The temperature is fitted
(:func:`metrics.fit_temperature`) on the out-of-fold logits of all K folds, so on every
labelled image once, and stored in the final model's statistics, whose metadata says how:
``"temperature": {"split": "cross-fit", "folds": K, "images": n}``. The final model is the
run's own, trained on every labelled image exactly as without the option: only its
temperature changes. The ood threshold keeps its rule (every 5th fitted image held out of the
fit, :func:`ood.fit_ood`).

Each fold model is a run of its own under the run's folder, so an interrupted run resumes
its folds where they stopped (a finished fold is not trained again); once the final model
holds its temperature they are spent and deleted (:func:`remove_folds`)::

    RUN/folds/k/           fold k's run (k = 1..K): its summary's test metrics are fold k's
    RUN/folds/data/k/      its prepared dataset: train = the other folds, test = fold k, no val
    RUN/folds/data/pool/   the run's unlabelled pool (where it has one), less any copy of a
                           labelled image: a fold model never sees its held-out fold at all
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from threengan_cli.core import fileio, system
from threengan_cli.core.errors import Failure, UsageError
from threengan_cli.core.settings import TrainSettings
from threengan_cli.data.training_data import RunData
from threengan_cli.metrics import fit_temperature
from threengan_cli.train import runlock, runs
from threengan_cli.train.events import Event, Interrupted, RunStarted

SPLIT = "cross-fit"  # the temperature's source in a model's metadata
FOLD_STREAM = 700_001  # offset of the folds' seed stream (system.stream_seed)

# How a fold is trained: (dataset folder, settings, run folder, resume, emit) -> summary.
TrainFold = Callable[[Path, TrainSettings, Path, bool, Callable[[Event], None]], dict]


class CalibrationError(UsageError):
    """--calibration-folds that this dataset cannot take (exit 2)."""


def check(settings: TrainSettings, data: RunData) -> None:
    """Refuse, before anything is trained, a cross-fit the run's data cannot take: a dataset
    with a val split (its temperature is fitted on val), or a class with fewer labelled
    images than folds (every fold needs one image of each class)."""
    k = settings.calibration_folds
    if len(data.val_y):
        raise CalibrationError(
            f"--calibration-folds: the dataset has a val split ({len(data.val_y)} images), on "
            "which the temperature is fitted; cross-fitting is for datasets prepared with "
            "--val-fraction 0"
        )
    counts = np.bincount(data.train_y.cpu().numpy(), minlength=len(data.classes))
    for name, count in zip(data.classes, counts, strict=True):
        if count < k:
            raise CalibrationError(
                f"--calibration-folds {k} needs at least {k} labelled images of each class "
                f"(one per fold); {name} has {count}: give fewer folds"
            )


def folds_of(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each labelled image: each class's images in an order drawn from
    ``seed``, dealt round the folds in turn, one class after the other (stratified, and the
    folds' sizes differ by one at most)."""
    labels = np.asarray(labels).reshape(-1)
    gen = np.random.default_rng(system.stream_seed(seed, 0, FOLD_STREAM))
    by_class = [gen.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = np.concatenate(by_class)
    fold = np.empty(len(labels), dtype=np.int64)
    fold[order] = np.arange(len(order)) % k
    return fold


def fold_settings(settings: TrainSettings, pool: Path | None) -> TrainSettings:
    """A fold model's settings: the run's, on the fold dataset's whole train split (``size``
    picked the run's labelled images already), with the run's pool as written for the folds,
    and no folds of its own."""
    return settings.model_copy(
        update={"calibration_folds": 0, "size": None, "unlabelled": str(pool) if pool else None}
    )


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """The process's global random states as they were before: fold runs seed them, and what
    the run does after its folds must draw what it would have drawn without them."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def cross_fit(
    run_dir: Path,
    settings: TrainSettings,
    data: RunData,
    train_fold: TrainFold,
    emit: Callable[[Event], None],
    fit: str = "squash",
) -> tuple[float, dict[str, Any]]:
    """Train (or resume, or reuse) the K fold models of the run in ``run_dir`` and fit the
    temperature on their out-of-fold logits: (temperature, metadata of its fit). ``fit``:
    how the run's dataset made its images square (the fold datasets say the same)."""
    k = settings.calibration_folds
    labels = data.train_y.cpu().numpy()
    images = data.train_x.cpu().numpy()
    fold = folds_of(labels, k, settings.seed)
    root = Path(run_dir) / runs.FOLDS
    pool = _write_pool(root / "data" / "pool", data, images, fit)
    fold_cfg = fold_settings(settings, pool)
    logits = np.zeros((len(labels), len(data.classes)), dtype=np.float32)
    with rng_kept():
        for i in range(k):
            held = fold == i
            dataset = root / "data" / str(i + 1)
            split = np.where(held, 2, 0).astype(np.uint8)
            what = f"fold {i + 1}/{k} of {run_dir}"
            _write_dataset(dataset, (images, labels, split), data, what, fit)
            fold_dir = root / str(i + 1)
            _train_one(fold_dir, dataset, fold_cfg, train_fold, emit, (i + 1, k), run_dir)
            logits[held] = _test_logits(fold_dir, images[held], len(data.classes), settings)
    temperature = fit_temperature(logits, labels)
    return temperature, {"split": SPLIT, "folds": k, "images": int(len(labels))}


def remove_folds(run_dir: Path) -> None:
    """Delete the fold runs and their datasets of the finished run in ``run_dir``: the
    temperature they gave is stored in its final model, and they would keep K times its disk
    (185 MB a fold at width 64 with a pool). Extending the run trains them again."""
    import shutil

    folds = Path(run_dir) / runs.FOLDS
    if folds.is_dir() and not folds.is_symlink():
        shutil.rmtree(folds)


def _train_one(
    fold_dir: Path,
    dataset: Path,
    cfg: TrainSettings,
    train_fold: TrainFold,
    emit: Callable[[Event], None],
    which: tuple[int, int],
    run_dir: Path,
) -> None:
    """Fold ``which`` = (k, K) trained in ``fold_dir``, under its lock: not again where it
    finished with these settings, resumed where it stopped, else from the start (the files
    of a fold of other settings, which only a changed run can leave, are deleted first)."""
    with runlock.lock(fold_dir):
        state = runs.state(fold_dir)
        resume = state in ("started", "resumable", "finished")
        if resume:
            saved, _ = runs.identity(fold_dir)
            asked = cfg.model_dump(mode="json")
            differ = [key for key in runs.settings_differ(saved, asked) if key != "epochs"]
            summary = runs.read_summary(fold_dir) if state == "finished" and not differ else None
            if summary is not None and summary["epochs"] == cfg.epochs:
                return
            resume = not differ and saved.get("epochs", 0) <= cfg.epochs
        if not resume and state not in ("absent", "empty", "unstarted"):
            runs.clear(fold_dir)
        _train_fold(fold_dir, dataset, cfg, train_fold, emit, which, run_dir, resume)


def _train_fold(
    fold_dir: Path,
    dataset: Path,
    cfg: TrainSettings,
    train_fold: TrainFold,
    emit: Callable[[Event], None],
    which: tuple[int, int],
    run_dir: Path,
    resume: bool,
) -> None:
    def fold_emit(event: Event) -> None:
        emit(dataclasses.replace(event, fold=which) if isinstance(event, RunStarted) else event)

    try:
        train_fold(dataset, cfg, fold_dir, resume, fold_emit)
    except Interrupted as exc:
        stopped = Interrupted(Path(run_dir) / runs.LAST, exc.epoch, exc.step, exc.signum)
        stopped.args = (
            f"stopped in calibration fold {which[0]}/{which[1]} at epoch {exc.epoch + 1} step "
            f"{exc.step}; the run and its folds are resumable from {Path(run_dir) / runs.LAST}",
        )
        raise stopped from None
    except Failure as exc:  # its own type and exit code, the fold named
        exc.args = (f"calibration fold {which[0]}/{which[1]}: {exc}",)
        raise


def _test_logits(fold_dir: Path, images: np.ndarray, classes: int, settings) -> np.ndarray:
    """The class logits (N, K) of fold ``fold_dir``'s final model (the one --run loads) on
    the images it did not train on."""
    from threengan_cli.infer.torch_engine import load_model
    from threengan_cli.train.scoring import class_logits

    model = load_model(runs.model_file(run=str(fold_dir)), device=settings.device)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(model.device)
    return class_logits(model.nets[model.classifier], x, classes)


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def _write_pool(path: Path, data: RunData, labelled: np.ndarray, fit: str) -> Path | None:
    """The run's unlabelled pool as a prepared dataset (all train split) at ``path``, less
    the images that are copies of labelled ones; ``None`` for a run without a pool."""
    if data.unlabelled is None:
        return None
    pool = data.unlabelled.cpu().numpy()
    seen = {_digest(img) for img in labelled}
    keep = np.array([_digest(img) not in seen for img in pool], dtype=bool)
    pool = pool[keep]
    zeros = np.zeros(len(pool), dtype=np.int64)
    arrays = (pool, zeros, zeros.astype(np.uint8))
    _write_dataset(path, arrays, data, "the run's unlabelled pool", fit)
    return path


def _write_dataset(path: Path, arrays: tuple, data: RunData, what: str, fit: str) -> None:
    """A prepared dataset (the format ``prepare`` writes, read by ``load_prepared``) of the
    arrays (images, labels, split codes) at ``path``, replacing the one there; the images'
    hashes are of their pixels."""
    from safetensors.numpy import save_file

    images, labels, split = arrays
    names = ("train", "val", "test")
    manifest = {
        "format_version": 1,
        "source": what,
        "source_kind": "cross-fit",
        "settings": {"image_size": int(images.shape[-1]), "fit": fit},
        "classes": list(data.classes),
        "image_size": int(images.shape[-1]),
        "images": [
            {
                "path": f"{names[split[i]]}/{i}",
                "sha256": _digest(images[i]),
                "label": int(labels[i]),
                "class": data.classes[int(labels[i])],
                "split": names[split[i]],
            }
            for i in range(len(images))
        ],
    }
    tensors = {
        "images": np.ascontiguousarray(images, dtype=np.uint8),
        "labels": np.asarray(labels, dtype=np.int64),
        "split": np.asarray(split, dtype=np.uint8),
    }
    with fileio.atomic_dir(path, force=True) as tmp:
        save_file(tensors, str(tmp / "data.safetensors"), metadata={"format_version": "1"})
        os.chmod(tmp / "data.safetensors", 0o666 & ~fileio.umask())
        (tmp / "manifest.json").write_text(json.dumps(manifest) + "\n")
