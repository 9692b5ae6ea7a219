"""Tiny checkpoints made on the fly, with the metadata that training writes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from threengan_cli.core.settings import TrainSettings
from threengan_cli.data.images import NORMALISATION
from threengan_cli.model import checkpoints
from threengan_cli.model.methods import METHODS

CLASSES = ("normal", "pneumonia")


def make_checkpoint(
    path: Path,
    method: str = "3ngan",
    classes: tuple[str, ...] = CLASSES,
    image_size: int = 32,
    width: int = 4,
    keep: tuple[str, ...] | None = None,
    seed: int = 0,
    fit: str = "squash",
    stats: bool = False,
) -> Path:
    """A randomly initialised model of ``method``; ``keep`` saves only those networks.
    ``stats``: with out-of-distribution statistics and a temperature, fitted as training
    fits them, on dark noise images (:func:`familiar_images`): brighter ones look unlike
    them."""
    settings = TrainSettings(method=method, width=width, latent=16, seed=seed)
    torch.manual_seed(seed)
    nets = METHODS[method].networks(settings, len(classes), image_size)
    # Random BatchNorm statistics, so eval mode differs visibly from an identity.
    for net in nets.values():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    if keep is not None:
        nets = {k: v for k, v in nets.items() if k in keep}
    meta = {
        "kind": "threengan-run",
        "method": method,
        "settings": settings.model_dump(mode="json"),
        "classes": list(classes),
        "num_classes": len(classes),
        "image_size": image_size,
        "channels": 1,
        "fit": fit,
        "normalisation": NORMALISATION,
        "seed": seed,
    }
    path = Path(path)
    fitted = None
    if stats:
        from threengan_cli.train import scoring

        rng = np.random.default_rng(seed)
        data = SimpleNamespace(
            classes=list(classes),
            detector_x=torch.from_numpy(familiar_images(48, image_size, seed)),
            val_x=torch.from_numpy(familiar_images(24, image_size, seed + 1)),
            val_y=torch.from_numpy(rng.integers(0, len(classes), 24)),
        )
        fitted = scoring.model_statistics(METHODS[method], nets, data)
        meta["stats"] = fitted[1]
    checkpoints.save(path, meta, nets, stats=fitted[0] if fitted else None)
    return path


def familiar_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size) dark noise: the images a ``stats=True`` model was fitted on."""
    return np.random.default_rng(seed).integers(0, 100, (n, size, size), dtype=np.uint8)


def make_run(run_dir: Path, **kwargs) -> Path:
    """A run folder as training leaves it: run.json and best/last checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text("{}\n")
    make_checkpoint(run_dir / "best.safetensors", **kwargs)
    make_checkpoint(run_dir / "last.safetensors", **{**kwargs, "seed": 99})
    return run_dir


def write_image(
    path: Path, size: tuple[int, int] = (40, 48), seed: int = 0, fmt: str | None = None
) -> Path:
    """A small grayscale test image with some structure (so models give varied outputs)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").save(path, format=fmt)
    return path


def train_until_stopped(dataset, settings, run_dir: Path, at: tuple[int, int] = (1, 1)) -> None:
    """Train ``settings`` into ``run_dir`` and stop it between steps once step ``at``
    (epoch, step) is done, as Ctrl+C would: the run is left resumable mid-epoch."""
    import threading

    import pytest

    from threengan_cli.train import events, training

    flag = threading.Event()

    def stop_there(event):
        if isinstance(event, events.StepDone) and (event.epoch, event.step) == at:
            flag.set()

    with pytest.raises(events.Interrupted):
        training.train(dataset, settings, run_dir, on_event=stop_there, stop_flag=flag)
