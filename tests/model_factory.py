"""Tiny checkpoints made on the fly, with the metadata that training writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from threengan_cli import checkpoints
from threengan_cli.images import NORMALISATION
from threengan_cli.methods import METHODS
from threengan_cli.settings import TrainSettings

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
) -> Path:
    """A randomly initialised model of ``method``; ``keep`` saves only those networks."""
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
    checkpoints.save(path, meta, nets)
    return path


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
