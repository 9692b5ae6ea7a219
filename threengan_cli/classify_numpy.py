"""The classifier's forward pass in NumPy: ``threengan classify`` on a CPU without torch.

A classify of a few images is mostly start-up, and importing torch alone takes 3 to 4
seconds on a small CPU. The classifier (:class:`networks.Classifier`, or ``sgan``'s
multi-task discriminator) is a short stack of 4x4 stride-2 convolutions, BatchNorm in eval
mode and LeakyReLU(0.2), then a 4x4 "valid" convolution to the class logits: a few matrix
products, which NumPy does as fast as torch does on a CPU. The layer stack is read from the
checkpoint's weights (``body.layers.<i>.*``, ``head.*``), the same names torch's modules
save, and a test checks that this forward pass gives torch's probabilities.

Images go through exactly the preprocessing recorded in the checkpoint: ``prepare``'s and
``classify``'s shared :func:`images.load_image`, then uint8 -> [-1, 1].
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from threengan_cli import modelfile, ood

_K = 4  # every convolution is 4x4
_LEAK = 0.2
_BN_EPS = 1e-5


def _conv(x: np.ndarray, kernel: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    """x (B, H, W, C) channels-last, ``kernel`` (k*k*C, O) from :func:`_kernel` -> (B, H', W', O).

    im2col with the channels innermost (each window is copied in runs of C contiguous values,
    not gathered value by value), then one matrix product per image (see :func:`per_image`).
    """
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    windows = windows[:, ::stride, ::stride].transpose(0, 1, 2, 4, 5, 3)  # (B, H', W', k, k, C)
    b, h, w = windows.shape[:3]
    columns = windows.reshape(b, h * w, -1)  # (B, H'*W', k*k*C)
    return np.matmul(columns, kernel).reshape(b, h, w, kernel.shape[1])


def _kernel(weight: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """torch's (O, C, k, k) weight as the (k*k*C, O) matrix :func:`_conv` multiplies by,
    with an eval-mode BatchNorm's per-channel ``scale`` folded in."""
    out_ch = weight.shape[0]
    if scale is not None:
        weight = weight * scale.reshape(out_ch, 1, 1, 1)
    return np.ascontiguousarray(weight.transpose(0, 2, 3, 1).reshape(out_ch, -1).T)


@dataclass
class NumpyClassifier:
    """The classifier of one checkpoint, with what ``classify`` needs to report on it."""

    method: str
    classes: list[str]
    image_size: int
    fit: str
    model_id: str
    path: Path
    layers: list[tuple[np.ndarray, np.ndarray | None]] = field(repr=False)  # (kernel, shift)
    head: tuple[np.ndarray, np.ndarray | None] = field(repr=False)  # (kernel, bias)
    keep: int | None = None  # logits kept (sgan drops its last, "fake")
    scale: float = 1 / 127.5  # uint8 -> model range, as the checkpoint records
    offset: float = -1.0
    device: str = "cpu (numpy)"
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    stats: ood.ModelStats | None = field(default=None, repr=False)

    @property
    def stored_threshold(self) -> dict[str, Any] | None:
        """The threshold ``evaluate --threshold-from`` stored in the metadata, if any."""
        return modelfile.stored_threshold(self.meta, self.path)

    def require_classifier(self) -> None:
        """Loading already checked that the classifier's weights are there."""

    def probabilities_of(self, images_u8: np.ndarray) -> np.ndarray:
        """uint8 images (B, H, W) at the model's size -> class probabilities (B, K), float32."""
        return self.outputs_of(images_u8)[0]

    def outputs_of(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 images (B, H, W) -> class probabilities (B, K) (calibrated by the model's
        temperature, where it has one) and out-of-distribution scores (B,), or ``None``
        for a model without statistics; float32."""
        logits, scores = per_image(self._forward, images_u8)
        return softmax(logits[:, : self.keep], self.stats), scores

    def _forward(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 images (B, H, W) -> all the head's logits (B, outputs), and the images'
        out-of-distribution scores (B,) where the model has statistics."""
        scale, offset = np.float32(self.scale), np.float32(self.offset)
        x = images_u8.astype(np.float32)[..., None] * scale + offset
        for kernel, shift in self.layers:
            x = _conv(x, kernel, _K, stride=2, pad=1)
            if shift is not None:
                x += shift
            np.maximum(x, x * np.float32(_LEAK), out=x)  # LeakyReLU, as the slope is < 1
        kernel, bias = self.head
        logits = _conv(x, kernel, _K, stride=1, pad=0).reshape(x.shape[0], -1)
        stats = self.stats
        scores = None
        if stats is not None:
            scores = stats.scores(ood.pooled_features(x), stats.pixel_inputs(images_u8))
        return (logits if bias is None else logits + bias), scores


def softmax(logits: np.ndarray, stats: ood.ModelStats | None) -> np.ndarray:
    """Class probabilities (float32) from logits, divided by the model's temperature first."""
    if stats is not None:
        logits = logits / np.float32(stats.temperature)
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# Why one matrix product per image, on one BLAS thread: OpenBLAS's GEMM kernels sum a row's
# terms in an order that depends on where the row falls in the call (its tile, the tail of a
# block, the slice a thread takes). Measured on an AMD EPYC under the Haswell/Zen kernels
# (the ones OpenBLAS picks on AVX2 CPUs): moving the same rows by one position in a call
# changed a sixth of them in the last bits, even at a fixed call shape, so images batched
# into one product got probabilities that depended on their neighbours (525 of the 624 test
# images changed between --batch-size 1 and 64). np.matmul over a stack makes one call per
# image, always of the same shape and at the same position, so an image's probabilities are
# the same in every batch, shard and position. One BLAS thread per call keeps them the same
# for any thread count too, and is faster on these small products than two (measured: the
# classifier at 1.18x the time of one batched product, against 3x with BLAS threads); the
# images are spread over a thread pool instead (matmul releases the GIL).
@functools.cache
def _threads() -> tuple[int, ThreadPoolExecutor, Any]:
    """One thread per usable core, their pool, and a handle on BLAS's own thread count."""
    from threadpoolctl import ThreadpoolController

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, cores or 1)
    return cores, ThreadPoolExecutor(cores), ThreadpoolController()


def per_image(forward: Callable[[np.ndarray], tuple], images: np.ndarray) -> tuple:
    """``forward`` (images -> a tuple of per-image arrays, or ``None``s) over ``images``,
    split across the thread pool, with BLAS at one thread; the parts joined in order."""
    cores, pool, blas = _threads()
    chunks = [c for c in np.array_split(images, cores) if len(c)] or [images]
    with blas.limit(limits=1, user_api="blas"):
        parts = list(pool.map(forward, chunks))
    return tuple(
        None if pieces[0] is None else np.concatenate(pieces) for pieces in zip(*parts, strict=True)
    )


def load(checkpoint: Path | None = None, run: str | None = None) -> NumpyClassifier:
    """The classifier of ``--checkpoint``, ``--run`` or the bundled model, read without torch."""
    path = modelfile.resolve_checkpoint(checkpoint, run)

    def classifier_prefix(meta: dict[str, Any]) -> str:
        return modelfile.weights_prefix(meta) + modelfile.classifier_spec(meta, path)[0] + "/"

    def classifier_shapes(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """What the metadata's classifier holds: checked before any weight is read."""
        spec = modelfile.check_meta(meta, path)
        outputs = modelfile.classifier_spec(meta, path)[2]  # sgan's D adds a "fake" logit
        width, size = spec["settings"].width, spec["image_size"]
        return modelfile.headed_shapes(outputs, width, size, spec["channels"])

    try:
        meta, weights, keys = modelfile.read_arrays(path, classifier_prefix, classifier_shapes)
    except modelfile.CheckpointError as exc:
        raise modelfile.ModelError(str(exc)) from None
    spec = modelfile.check_meta(meta, path)
    method = spec["method"]
    name, keep, _ = modelfile.classifier_spec(meta, path)
    scale, offset = modelfile.normalisation(meta, path)
    if not weights:
        group = modelfile.weights_prefix(meta)
        held = ", ".join(sorted({k.split("/")[1] for k in keys if k.startswith(group)}))
        raise modelfile.ModelError(
            f"{modelfile.file_id(path)} holds no weights for {name} (it has {held or 'none'}); "
            "use a checkpoint of a run that trained that network"
        )
    modelfile.check_finite(weights, f"{path} (network {name})")
    return NumpyClassifier(
        stats=_stats(path, meta, spec["settings"].width),
        method=method,
        classes=spec["classes"],
        image_size=spec["image_size"],
        fit=spec["fit"],
        model_id=modelfile.file_id(path),
        path=path,
        layers=_layers(weights, path),
        head=(_kernel(weights["head.weight"]), weights.get("head.bias")),
        keep=keep,
        meta=meta,
        scale=scale,
        offset=offset,
    )


def _stats(path: Path, meta: dict[str, Any], width: int) -> ood.ModelStats | None:
    """The model's out-of-distribution statistics and temperature, or ``None`` for a model
    trained before they existed; their shapes are checked before they are read, and their
    checksum after."""
    if not ood.has_stats(meta):
        return None
    try:
        shapes = ood.expected_shapes(meta, width)
        group = modelfile.STATS + "/"
        _, arrays, _ = modelfile.read_arrays(path, lambda _: group, lambda _: shapes)
        if set(arrays) != set(shapes):
            raise ood.StatsError(f"its {modelfile.STATS} tensors are missing (damaged file)")
        return ood.from_arrays(arrays, meta)
    except ood.StatsError as exc:
        raise modelfile.ModelError(f"{path}: {exc}") from None
    except modelfile.CheckpointError as exc:
        raise modelfile.ModelError(str(exc)) from None


def _layers(weights: dict[str, np.ndarray], path: Path) -> list[tuple[Any, Any]]:
    """(kernel, shift or None) per stage of ``body.layers``: conv, [BatchNorm,] LeakyReLU."""
    index = sorted({int(k.split(".")[2]) for k in weights if k.startswith("body.layers.")})
    convs: list[list[Any]] = []  # [weight, BatchNorm scale, BatchNorm shift]
    for i in index:
        w = weights.get(f"body.layers.{i}.weight")
        if f"body.layers.{i}.running_mean" in weights:  # BatchNorm after the last conv
            if not convs or convs[-1][1] is not None:
                raise modelfile.ModelError(f"{path}: unexpected layer layout at body.layers.{i}")
            mean = weights[f"body.layers.{i}.running_mean"]
            var = weights[f"body.layers.{i}.running_var"]
            scale = w / np.sqrt(var + np.float32(_BN_EPS))
            convs[-1][1:] = [scale, weights[f"body.layers.{i}.bias"] - mean * scale]
        elif w is not None and w.ndim == 4:
            if w.shape[2:] != (_K, _K):
                raise modelfile.ModelError(f"{path}: body.layers.{i} is not a 4x4 convolution")
            convs.append([w, None, None])
    if not convs or "head.weight" not in weights:
        raise modelfile.ModelError(f"{path}: the classifier's weights are incomplete")
    return [
        (_kernel(w, scale), None if shift is None else shift.astype(np.float32))
        for w, scale, shift in convs
    ]
