"""Synthetic X-rays from a trained generator, optionally sorted by the classifier's label.

Image ``i`` depends only on the seed and ``i``: latents are drawn in fixed blocks of
:data:`Z_BLOCK`, each from its own ``torch.Generator`` seeded by (seed, block), so the same
seed gives the same images whatever the count or batch size (``--count 10`` is the first
ten images of ``--count 100``). G runs in eval mode, as for the sample grids saved during
training.

Files: ``gen_00000.png`` ... as 8-bit grayscale PNGs at the model's size. With ``label``
the classifier labels each image: it goes into a sub-folder named for its class, or into
``uncertain/`` where its highest probability is below ``tau``, and ``labels.csv`` lists
``file,label,p_<class>...`` (probabilities written as classify writes them:
:func:`engine.exact`). The folder is built under a temporary name and renamed into
place at the end, so an interrupted run leaves nothing half-written.

``generate.json`` in the folder records what made it (model id, count, seed, label, tau)
and the per-folder counts: the same command run again finds its own output and does nothing
(a CI job can run twice); other settings are refused unless ``force`` replaces the folder,
and a folder without that record, which this program did not make, is never replaced.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from threengan_cli.core import fileio, paths, system
from threengan_cli.core.errors import UsageError
from threengan_cli.data.images import grid_png
from threengan_cli.infer.engine import exact
from threengan_cli.infer.torch_engine import Model
from threengan_cli.model.networks import from_model_range

Z_BLOCK = 256
GRID_MAX = 64  # the grid shows the first images only: 10,000 thumbnails help no one
UNCERTAIN = "uncertain"
MADE_BY = "generate.json"


class GenerateError(UsageError):
    """Generation cannot start (output in the way, unusable class names); one line."""


@dataclass
class GenerateResult:
    count: int
    seed: int
    model: str
    out_dir: Path | None
    grid: Path | None
    labels: dict[str, int] = field(default_factory=dict)  # images per folder, with --label
    unchanged: bool = False  # out_dir already held exactly these images: nothing was written

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "count": self.count,
            "seed": self.seed,
            "out": str(self.out_dir) if self.out_dir else None,
            "grid": str(self.grid) if self.grid else None,
            "labels": self.labels or None,
        }


def latents(seed: int, start: int, stop: int, latent: int) -> torch.Tensor:
    """z of images ``start..stop-1`` (CPU, float32), a pure function of (seed, index)."""
    parts = []
    for block in range(start // Z_BLOCK, math.ceil(stop / Z_BLOCK)):
        gen = torch.Generator().manual_seed(system.stream_seed(seed, block))
        z = torch.randn(Z_BLOCK, latent, generator=gen)
        lo = max(start - block * Z_BLOCK, 0)
        hi = min(stop - block * Z_BLOCK, Z_BLOCK)
        parts.append(z[lo:hi])
    return torch.cat(parts)


to_uint8 = from_model_range  # [-1, 1] (B, 1, H, W) -> uint8 (B, H, W)


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _batches(model: Model, count: int, seed: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Generated images in [-1, 1], (B, 1, S, S) on the model's device."""
    G = model.nets["G"]
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            z = latents(seed, start, min(start + batch_size, count), model.latent)
            yield G(z.to(model.device))


def _check_classes(classes: list[str]) -> None:
    for name in classes:
        try:
            paths.check_class_folder(name)
        except ValueError as exc:
            raise GenerateError(f"--label sorts into class folders: {exc}") from None
        if name == UNCERTAIN:
            raise GenerateError(f"--label cannot sort a class named {name!r}: it is its own folder")


def generate(
    model: Model,
    count: int,
    seed: int = 0,
    out_dir: Path | None = None,
    grid: Path | None = None,
    label: bool = False,
    tau: float = 0.9,
    batch_size: int = 256,
    on_progress: Callable[[int], None] | None = None,
    force: bool = False,
) -> GenerateResult:
    """Write ``count`` images to ``out_dir`` and/or a grid of the first ones to ``grid``.

    ``out_dir`` must not exist, be empty, or hold this command's own earlier output (see the
    module docstring; ``result.unchanged`` says so); with ``force`` an earlier output of
    other settings is replaced. ``on_progress(n)`` is called with the number of images done
    after each batch.
    """
    model.require("G")
    if label:
        model.require_classifier()
        _check_classes(model.classes)
    if out_dir is None and grid is None:
        raise GenerateError("nothing to write: give an output folder, a grid file, or both")
    busy = out_dir is not None and out_dir.exists()
    if busy and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not (out_dir / MADE_BY).is_file():
            mine = f" (no {MADE_BY}: generate did not make it, and --force leaves it alone)"
            raise GenerateError(
                f"{out_dir} already exists and is not an empty folder{mine if force else ''}"
            )
    else:
        busy = False

    result = GenerateResult(count, seed, model.model_id, out_dir, grid)
    asked = {"model": model.model_id, "count": count, "seed": seed, "label": label}
    if label:
        asked["tau"] = tau
    if busy and not force:
        result.labels, result.unchanged = _same_output(out_dir, asked), True
        out_dir = None  # it holds these images already: only a grid is left to write
        if grid is None:
            return result
    grid_count = min(count, GRID_MAX)
    grid_parts: list[torch.Tensor] = []
    # Without an output folder only the grid's images are made.
    total = count if out_dir is not None else grid_count
    digits = max(5, len(str(total - 1)))
    counts: Counter[str] = Counter()

    def write_all(folder: Path | None, table: Any) -> None:
        done = 0
        for images in _batches(model, total, seed, batch_size):
            kept = sum(len(part) for part in grid_parts)
            if kept < grid_count:
                grid_parts.append(images[: grid_count - kept].cpu())
            if folder is not None:
                write_batch(folder, table, images, done)
            done += len(images)
            if on_progress is not None:
                on_progress(done)

    def write_batch(folder: Path, table: Any, images: torch.Tensor, first: int) -> None:
        pixels = to_uint8(images)
        names: list[str] = []
        probs: list[list[float]] = []
        if table is not None:
            p = model.predict_proba(pixels)  # the pixels as saved, as classify would see them
            best, index = p.max(dim=1)
            names = [
                model.classes[i] if b >= tau else UNCERTAIN
                for b, i in zip(best.tolist(), index.tolist(), strict=True)
            ]
            probs = p.tolist()
        for k, img in enumerate(pixels.cpu().numpy()):
            file = f"gen_{first + k:0{digits}d}.png"
            if table is not None:
                file = f"{names[k]}/{file}"
                counts[names[k]] += 1
                table.writerow([file, names[k], *(exact(v) for v in probs[k])])
            (folder / file).write_bytes(_png(img))

    if out_dir is not None:
        with fileio.atomic_dir(out_dir, force=busy) as tmp:
            if label:
                for name in [*model.classes, UNCERTAIN]:
                    (tmp / name).mkdir()
                with open(tmp / "labels.csv", "w", newline="") as fh:
                    table = csv.writer(fh)
                    table.writerow(["file", "label", *(f"p_{c}" for c in model.classes)])
                    write_all(tmp, table)
            else:
                write_all(tmp, None)
            if label:
                result.labels = {name: counts.get(name, 0) for name in [*model.classes, UNCERTAIN]}
            made = {**asked, "labels": result.labels or None}
            (tmp / MADE_BY).write_text(json.dumps(made, indent=2) + "\n")
    else:
        write_all(None, None)
    if grid is not None:
        images = torch.cat(grid_parts)[:grid_count]
        pixels = to_uint8(images).numpy()
        fileio.write_bytes(grid, grid_png(pixels, nrow=math.ceil(math.sqrt(len(images)))))
    return result


def _same_output(out_dir: Path, asked: dict[str, Any]) -> dict[str, int]:
    """The per-folder counts of ``out_dir`` when ``generate.json`` says it was made by this
    very command (same model, count, seed, label and tau); else a GenerateError saying what
    differs and naming --force."""
    try:
        made = json.loads((out_dir / MADE_BY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        made = None
    if not isinstance(made, dict):
        raise GenerateError(
            f"{out_dir / MADE_BY} is damaged; use another --out, or --force to replace the folder"
        )
    differ = [k for k in asked if made.get(k) != asked[k]]
    if differ or set(made) - {*asked, "labels"}:
        k = differ[0] if differ else "tau"
        raise GenerateError(
            f"{out_dir} holds images generated with other settings ({k} = {made.get(k)!r} "
            f"there, {asked.get(k)!r} asked); use another --out, or --force to replace them"
        )
    labels = made.get("labels")
    return labels if isinstance(labels, dict) else {}
