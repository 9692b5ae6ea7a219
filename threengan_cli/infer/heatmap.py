"""Heatmaps: where in an X-ray the classifier found its evidence for the label it gave.

The classifier's head is one 4x4 "valid" convolution over the body's last feature map
(B, 4, 4, C), so each class logit is a bias plus 16 terms, one per position of that map:
``logit_k = b_k + sum_p sum_c x[p, c] * W[p, c, k]``. The map drawn is that sum split by
position, exactly, with no gradients and no second pass (NumPy does it; torch is not needed):

    evidence[k, p] = (term[k, p] - mean_j term[j, p]) / temperature

Summed over the 16 positions, plus the centred bias, it is ``log p_k - mean_j log p_j`` of
the calibrated probabilities (with two classes: half the label's log-odds). Positive values
(red) argue for the label, negative ones (blue) against it. Each position of the 4x4 map
sees a 46x46 px window of the 64 px input (four 4x4 stride-2 convolutions) centred on its
own 16x16 block; the map is drawn smoothly (bilinear) over the image the model classified.

Chosen by measurement over Grad-CAM on the 8x8 map before the last stage
(``benchmarks/heatmap_compare.py``, docs/visual.md): this decomposition is exact, comes out
of the forward pass that gives the probabilities (one small product more per image), points
at blocks that hold more of the model's evidence than Grad-CAM's do (a deletion test), and
changes more than Grad-CAM when the classifier's weights are randomised (the sanity check of
Adebayo et al. 2018).

How maps reach rows without changing the classify hot path: :class:`Capture` wraps the
model; ``classify`` calls ``outputs_of`` once per batch, on the readable images of the batch
in row order, and yields that batch's rows before it asks for the next, so the rows that
carry a label take the captured images and maps in the order they were captured.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from threengan_cli.core import fileio
from threengan_cli.core.errors import Failure, UsageError
from threengan_cli.infer import engine
from threengan_cli.infer.blas import per_image

PANEL = 128  # pixels per side of the picture (the model's 64 px image, 2x)
_CAPTION = 26  # pixels of caption below it: two lines
_ALPHA = 0.6  # opacity of the strongest evidence


class VisualsError(Failure):
    """Heatmaps cannot be made with this engine, or a heatmap or the page cannot be
    written; one line for the user."""


def positional_evidence(
    last_map: np.ndarray, head_kernel: np.ndarray, keep: int | None, temperature: float
) -> np.ndarray:
    """The body's last map (B, h, w, C) and the head's (h*w*C, outputs) kernel -> each
    position's evidence (B, K, h, w) for each of the K classes kept, float32 (module
    docstring)."""
    b, h, w, c = last_map.shape
    kernel = head_kernel.reshape(h * w, c, -1)  # rows ordered (row, column, channel)
    terms = np.einsum("bpc,pco->bop", last_map.reshape(b, h * w, c), kernel)[:, :keep]
    centred = terms - terms.mean(axis=1, keepdims=True)
    return (centred / np.float32(temperature)).reshape(b, -1, h, w).astype(np.float32)


def numpy_explained(model, images_u8: np.ndarray) -> tuple[np.ndarray, Any, np.ndarray]:
    """The NumPy engine's probabilities and scores (the very values ``outputs_of`` gives)
    and the evidence maps (B, K, 4, 4) of the same forward pass."""
    temperature = model.stats.temperature if model.stats is not None else 1.0

    def forward(chunk: np.ndarray) -> tuple:
        first, x = model.body_maps(chunk)
        pixels = model.stats.pixel_inputs(chunk) if model.stats is not None else None
        logits, scores = model.head_outputs(x, pixels, first)
        return logits, scores, positional_evidence(x, model.head[0], model.keep, temperature)

    logits, scores, maps = per_image(forward, images_u8)
    return engine.probabilities(logits[:, : model.keep], model.stats), scores, maps


class Capture:
    """A classifier that also keeps, per readable image, the uint8 image it classified and,
    with ``maps``, its evidence maps, for the rows to take in order (:meth:`take`).

    Everything else is the wrapped model's; the probabilities and scores are the ones it
    gives without the wrapper."""

    def __init__(self, model, maps: bool):
        if maps and not hasattr(model, "explained_outputs") and not hasattr(model, "last_map"):
            raise VisualsError(
                "--heatmaps needs the numpy or onnx engine (not --engine torch, a GPU device "
                "or --adapt bn)"
            )
        self.model, self.maps = model, maps
        self._kept: deque[tuple[np.ndarray, np.ndarray | None]] = deque()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def outputs_of(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.maps:
            probs, scores = self.model.outputs_of(images_u8)
            self._kept.extend((image, None) for image in images_u8)
        else:
            explain = getattr(self.model, "explained_outputs", None)
            if explain is not None:
                probs, scores, maps = explain(images_u8)
            else:
                probs, scores, maps = numpy_explained(self.model, images_u8)
            self._kept.extend(zip(images_u8, maps, strict=True))
        return probs, scores

    def take(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The next labelled row's image (H, W) and evidence maps (K, 4, 4) or ``None``."""
        return self._kept.popleft()


# ------------------------------------------------------------------------------ drawing
def render(image_u8: np.ndarray, evidence: np.ndarray, caption: str) -> np.ndarray:
    """One readable picture, (H, W, 3) uint8: the X-ray as the model saw it with the
    evidence for its label overlaid (red for, blue against, stronger = more opaque, so the
    anatomy shows through where the evidence is weak; scaled to the image's largest value,
    which the caption gives in log-probability units), drawn at the model's resolution and
    enlarged to :data:`PANEL` pixels, with the caption below.

    One panel of 128 px, not the X-ray beside it at 256 px (the first design): a heatmap
    then cost 12 ms against the model's 5 ms per image on the 2-core EPYC measured, and the
    picture holds no more than the model's 64 px anyway; the report's thumbnail shows the
    plain image."""
    side = image_u8.shape[0]
    gray = image_u8.astype(np.float32)[..., None]
    field = Image.fromarray(evidence.astype(np.float32), "F")
    value = np.asarray(field.resize((side, side), Image.Resampling.BILINEAR))[..., None]
    peak = float(np.abs(evidence).max()) or 1.0
    alpha = np.minimum(np.abs(value) / np.float32(peak), 1) * np.float32(_ALPHA)
    overlay = gray + (np.where(value >= 0, _FOR, _AGAINST) - gray) * alpha
    small = Image.fromarray(np.clip(overlay, 0, 255).astype(np.uint8), "RGB")
    canvas = Image.new("RGB", (PANEL, PANEL + _CAPTION), (255, 255, 255))
    canvas.paste(small.resize((PANEL, PANEL), Image.Resampling.BICUBIC), (0, 0))
    draw = ImageDraw.Draw(canvas)
    words = caption.encode("ascii", "replace").decode()
    draw.text((2, PANEL + 1), words, (0, 0, 0), font=_font())
    draw.text((2, PANEL + 13), f"max |evidence| {peak:.2f}", (90, 90, 90), font=_font())
    return np.asarray(canvas)


def png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 as a PNG: every row with the "Up" filter, zlib at level 1.

    Written here rather than by Pillow, whose encoder tries every filter on every row:
    3.8 ms against Pillow's 6.7 ms (level 1) per heatmap, for files of the same size
    (41 kB against 42 kB), measured on Kermany test images."""
    height, width, _ = pixels.shape
    rows = pixels.reshape(height, -1)
    up = rows.copy()
    up[1:] -= rows[:-1]  # uint8 arithmetic wraps, as the filter is defined
    raw = np.hstack([np.full((height, 1), 2, np.uint8), up]).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 1))
        + chunk(b"IEND", b"")
    )


_FOR = np.array([230, 40, 20], np.float32)  # red
_AGAINST = np.array([30, 90, 240], np.float32)  # blue


_FONTS = threading.local()


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font (nothing is read from the system), one per thread: a FreeType
    face must not be used by two threads at once."""
    if not hasattr(_FONTS, "font"):
        _FONTS.font = ImageFont.load_default()
    return _FONTS.font


class HeatmapWriter:
    """``--heatmaps DIR``: one PNG per labelled row, named ``<file stem>-<hash>.png`` (the
    hash of the input's path, so that inputs of the same name in different folders get
    different files and a rerun replaces its own). Each appears whole or not at all; they
    are not fsynced one by one (they can be made again), and what a killed run left is
    removed when the next run starts.

    Drawn and written on background threads (zlib and Pillow's resizing release the GIL), at
    most :data:`_IN_FLIGHT` at a time: classify decodes in other processes and the model
    waits on them, so a core is often free. :meth:`close` waits for the last; a failed write
    is raised by the next call or by :meth:`close`."""

    def __init__(self, folder: Path | str, classes: list[str]):
        self.folder, self.classes = Path(folder), list(classes)
        self.folder.mkdir(parents=True, exist_ok=True)
        fileio.clean_stale(self.folder)
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="threengan-heatmap")
        self._pending: deque[Future] = deque()

    def name(self, path: str) -> str:
        tag = hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()[:8]
        stem = Path(path).stem[:100] or "image"
        return f"{stem}-{tag}.png"

    def __call__(self, row, image_u8: np.ndarray, maps: np.ndarray) -> Path:
        """Queue the row's heatmap; returns the path it will have."""
        k = self.classes.index(row.label)
        caption = f"{row.label} {row.probabilities[row.label]:.3f}" + (" ood" if row.ood else "")
        target = self.folder / self.name(row.path)
        while len(self._pending) >= _IN_FLIGHT:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(_write, target, image_u8, maps[k], caption))
        return target

    def close(self) -> None:
        """Wait for every heatmap to be written; the first failure is raised."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


_IN_FLIGHT = 64


def _write(target: Path, image_u8: np.ndarray, evidence: np.ndarray, caption: str) -> None:
    data = png(render(image_u8, evidence, caption))
    try:
        with fileio.atomic_file(target, "wb", durable=False) as fh:
            fh.write(data)
    except OSError as exc:
        raise VisualsError(f"cannot write the heatmap {target}: {exc.strerror or exc}") from None


class Visuals:
    """What ``--heatmaps DIR`` and ``--report FILE`` add to a classify run: the model to
    classify with (a :class:`Capture`), the extra ``heatmap`` column, and per row the
    heatmap written and the row kept for the page (:meth:`add`); :meth:`finish` writes the
    page."""

    def __init__(self, model, heatmaps: Path | None, report: Path | None, info: dict):
        self.model = Capture(model, maps=heatmaps is not None)
        self.columns = ("heatmap",) if heatmaps is not None else ()
        self.folder = heatmaps  # where the run writes: folder scans leave it out
        self.heatmaps = None
        if heatmaps is not None:
            try:
                self.heatmaps = HeatmapWriter(heatmaps, model.classes)
            except OSError as exc:
                raise VisualsError(f"cannot make {heatmaps}: {exc.strerror or exc}") from None
        self.page = None
        if report is not None:
            from threengan_cli.infer.report_page import ReportPage

            self.page = ReportPage(report, model.classes, info)

    def add(self, row) -> dict[str, str | None]:
        """The row's extra column values; queues its heatmap (a failed write is raised as a
        :class:`VisualsError` that names the file)."""
        image, maps, made = None, None, None
        if row.ok:
            image, maps = self.model.take()
            if self.heatmaps is not None:
                made = self.heatmaps(row, image, maps)
        if self.page is not None:
            self.page.add(row, image, made)
        return {"heatmap": os.fspath(made) if made is not None else None} if self.columns else {}

    def finish(self) -> None:
        """Wait for the heatmaps, then write the page."""
        if self.heatmaps is not None:
            self.heatmaps.close()
        if self.page is not None:
            try:
                self.page.write()
            except OSError as exc:
                why = exc.strerror or exc
                raise VisualsError(f"cannot write the report {self.page.path}: {why}") from None


def visuals_for(model, cfg: Any, header: dict[str, Any]) -> Visuals | None:
    """What ``--heatmaps`` and ``--report`` add to a classify run (settings ``cfg``, the
    output's ``header``), or ``None`` without either; one that cannot be made (this engine,
    an unwritable folder) is a :class:`UsageError`, before anything is classified."""
    if cfg.heatmaps is None and cfg.report is None:
        return None
    info = {"model": model.model_id, "method": model.method, "engine": model.device, **header}
    try:
        return Visuals(model, cfg.heatmaps, cfg.report, info)
    except VisualsError as exc:
        raise UsageError(str(exc)) from None
