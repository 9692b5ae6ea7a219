"""The data one run trains on: its labelled subset, unlabelled pool, val and test splits, as
uint8 tensors on the device, and the order in which an epoch visits the labelled images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from threengan_cli.core import paths, system
from threengan_cli.core.errors import Failure
from threengan_cli.core.settings import TrainSettings
from threengan_cli.data.datasets import PreparedDataset, balanced_subset, load_prepared
from threengan_cli.data.images import ImageReadError, load_image_and_hash
from threengan_cli.data.walk import image_files


class DataError(Failure):
    """Data a run cannot train on; the message is one line meant for the user."""


class PoolNotFound(DataError):
    """The pool ``--unlabelled`` names is no prepared dataset, folder or ``rest``."""


def batch_order(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """The permutation of epoch ``epoch``: a pure function of (seed, epoch), so resume is exact."""
    gen = torch.Generator().manual_seed(system.stream_seed(seed, epoch))
    return torch.randperm(n, generator=gen).to(device)


def batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Slices of one epoch; a last batch of one image joins the one before (BatchNorm needs 2)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


@dataclass
class RunData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    image_size: int
    subset_paths: list[str] = field(default_factory=list)
    unlabelled: torch.Tensor | None = None  # uint8 (M, H, W) real images without labels
    # uint8: every image the run may use without its label, which the out-of-distribution
    # statistics are fitted on (scoring.model_statistics): the whole train split and the pool
    detector_x: torch.Tensor | None = None


def load_run_data(
    dataset: PreparedDataset, settings: TrainSettings, device: torch.device
) -> RunData:
    """The prepared splits as uint8 tensors on the device; train is a balanced subset of N,
    and the unlabelled pool is what ``settings.unlabelled`` names (see :func:`unlabelled_pool`)."""
    train_x, train_y = dataset.subset("train")
    whole_train = train_x
    train_index = np.flatnonzero(dataset.split == 0)
    rest = np.zeros((0, *train_x.shape[1:]), dtype=np.uint8)
    if settings.size is not None:
        pick = balanced_subset(train_y, settings.size, settings.seed, classes=list(dataset.classes))
        if settings.unlabelled == "rest":  # a copy of the rest only where it is used
            rest = np.delete(train_x, pick, axis=0)
        train_x, train_y, train_index = train_x[pick], train_y[pick], train_index[pick]
    val_x, val_y = dataset.subset("val")
    test_x, test_y = dataset.subset("test")
    sources = [img.get("source") for img in dataset.manifest.get("images", [])]
    fit = dataset.manifest.get("settings", {}).get("fit", "squash")
    pool = unlabelled_pool(
        settings.unlabelled, rest, int(train_x.shape[-1]), fit, held_out_hashes(dataset)
    )

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    # the train split's images outside the N carry labels the run does not use, but they are
    # the site's X-rays all the same: a detector fitted on them all (4,000 rather than 200 on
    # Kermany) describes the training population far better (docs/ood.md). ``rest`` is part
    # of the train split already.
    detector = whole_train
    if pool is not None and settings.unlabelled != "rest":
        detector = np.concatenate([whole_train, pool])
    train_t = t(train_x)

    return RunData(
        train_x=train_t,
        train_y=t(train_y.astype(np.int64)),
        val_x=t(val_x),
        val_y=t(val_y.astype(np.int64)),
        test_x=t(test_x),
        test_y=t(test_y.astype(np.int64)),
        classes=list(dataset.classes),
        image_size=int(train_x.shape[-1]),
        subset_paths=[sources[i] for i in train_index] if sources else [],
        unlabelled=t(pool) if pool is not None else None,
        detector_x=train_t if detector is train_x else t(detector),  # one copy on the device
    )


def held_out_hashes(dataset: PreparedDataset) -> dict[str, str]:
    """sha256 -> split of the images a run must never train on, labels or not: the test split
    (its metrics) and val (the choice of the best checkpoint). prepare hashed them: the file's
    bytes, or an .npz row's pixels."""
    return {
        img["sha256"]: img["split"]
        for img in dataset.manifest.get("images", [])
        if img.get("split") in ("test", "val") and img.get("sha256")
    }


def unlabelled_pool(
    source: str | None,
    rest: np.ndarray,
    image_size: int,
    fit: str,
    held_out: dict[str, str] | None = None,
) -> np.ndarray | None:
    """Real images without labels, uint8 (M, H, W) at the model size, or ``None``.

    ``rest``: the train-split images outside the N labelled ones (none when all are labelled,
    which leaves the run without a pool rather than failing); a prepared dataset (name or
    folder): all its train-split images, labels ignored; a folder: every image in it, at any
    depth, decoded as ``prepare`` decodes (unreadable files are skipped).

    A pool that holds exact copies of the run's test or val images (``held_out``: sha256 ->
    split) is refused: trained on, even without labels, they would make the test metrics
    transductive. ``rest`` never does (prepare removes train images that are also in test).
    """
    if source is None:
        return None
    if source == "rest":
        return rest if len(rest) else None
    path = paths.resolve_dataset(source)
    if (path / "manifest.json").is_file():
        other = load_prepared(path)
        images, _ = other.subset("train")
        if images.shape[1:] != (image_size, image_size):
            raise DataError(
                f"unlabelled dataset {source} holds {images.shape[-1]} px images; "
                f"this run trains at {image_size} px"
            )
        found = [
            (img.get("sha256", ""), img.get("path", "?"))
            for img in other.manifest.get("images", [])
            if img.get("split") == "train"
        ]
    elif Path(source).expanduser().is_dir():
        images, found = _decode_folder(Path(source).expanduser(), image_size, fit)
    else:
        raise PoolNotFound(
            f"--unlabelled {source}: not 'rest', a prepared dataset or a folder of images "
            f"(looked in {paths.datasets_dir()})"
        )
    if not len(images):
        raise DataError(f"--unlabelled {source} holds no readable images")
    _refuse_held_out(source, found, held_out or {})
    return images


def _refuse_held_out(source: str, found: list[tuple[str, str]], held_out: dict[str, str]) -> None:
    copies = [(where, held_out[digest]) for digest, where in found if digest in held_out]
    if copies:
        splits = " and ".join(sorted({split for _, split in copies}, reverse=True))
        raise DataError(
            f"--unlabelled {source} holds {len(copies)} exact copies of this dataset's "
            f"{splits} images (first: {copies[0][0]}, a {copies[0][1]} image): training on "
            "them would make the test metrics transductive; use a pool without them"
        )


def _decode_folder(
    folder: Path, image_size: int, fit: str
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The folder's readable images, and (sha256 of the file, path) of each."""
    # Sorted by path, as the pool has always been ordered (the walk's own order differs).
    found = sorted(Path(p) for p in image_files(str(folder), follow_links=False))
    decoded, hashes = [], []
    for path in found:
        try:
            pixels, digest = load_image_and_hash(path, image_size, fit)
        except ImageReadError:
            continue  # an unlabelled pool is a bonus: a bad file only makes it smaller
        decoded.append(pixels)
        hashes.append((digest, str(path)))
    empty = np.zeros((0, image_size, image_size), np.uint8)
    return (np.stack(decoded) if decoded else empty), hashes
