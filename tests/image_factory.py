"""Small images made on the fly for the image and dataset tests (never real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def pixels(seed: int, h: int = 24, w: int = 24) -> np.ndarray:
    """Distinct, deterministic 8-bit content for each seed (so hashes differ)."""
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def save(
    path: Path, seed: int = 0, mode: str = "L", size: tuple[int, int] = (24, 24), **kwargs
) -> Path:
    """Write an image of ``mode`` at ``size`` (w, h); the format follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = Image.fromarray(pixels(seed, size[1], size[0]))
    img = gray if mode == "L" else gray.convert(mode)
    img.save(path, **kwargs)
    return path


def class_tree(
    root: Path, counts: dict[str, int], prefix: str = "img", seed: int = 0, suffix: str = ".png"
) -> Path:
    """``root/<class>/<prefix>-<i>.png`` with distinct content; returns ``root``."""
    for c, (name, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            save(root / name / f"{prefix}-{c}-{i:03d}{suffix}", seed=seed + 1000 * c + i)
    return root


def kermany_like(root: Path, train: int = 12, val: int = 2, test: int = 4) -> Path:
    """A miniature of the public layout: train/ val/ test/, NORMAL and PNEUMONIA, with
    several images per patient named as Kermany names them."""
    seed = 0
    for split, n in (("train", train), ("val", val), ("test", test)):
        base = {"train": 0, "val": 500, "test": 900}[split]
        for i in range(n):
            patient = base + i // 2  # two images per patient
            seed += 1
            save(root / split / "NORMAL" / f"IM-{patient:04d}-{i % 2 + 1:04d}.jpeg", seed=seed)
            seed += 1
            save(root / split / "PNEUMONIA" / f"person{patient}_bacteria_{seed}.jpeg", seed=seed)
    return root
