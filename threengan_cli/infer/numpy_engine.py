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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from threengan_cli.infer import engine, ood
from threengan_cli.infer.blas import per_image
from threengan_cli.model import modelfile

_K = 4  # every convolution is 4x4
_LEAK = 0.2
_BN_EPS = 1e-5


def _conv(x: np.ndarray, kernel: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    """x (B, H, W, C) channels-last, ``kernel`` (k*k*C, O) from :func:`_kernel` -> (B, H', W', O).

    im2col with the channels innermost (each window is copied in runs of C contiguous values,
    not gathered value by value), then one matrix product per image (see ``blas.per_image``).
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
class NumpyClassifier(engine.Engine):
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

    def require_classifier(self) -> None:
        """Loading already checked that the classifier's weights are there."""

    def outputs_of(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 images (B, H, W) -> class probabilities (B, K) (calibrated by the model's
        temperature, where it has one) and out-of-distribution scores (B,), or ``None``
        for a model without statistics; float32."""
        logits, scores = per_image(self._forward, images_u8)
        return engine.probabilities(logits[:, : self.keep], self.stats), scores

    def _forward(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 images (B, H, W) -> all the head's logits (B, outputs), and the images'
        out-of-distribution scores (B,) where the model has statistics."""
        pixels = self.stats.pixel_inputs(images_u8) if self.stats is not None else None
        first, last = self.body_maps(images_u8)
        return self.head_outputs(last, pixels, first)

    def last_map(self, images_u8: np.ndarray) -> np.ndarray:
        """uint8 images (B, H, W) -> the body's last feature map (B, 4, 4, C), channels-last:
        what the head reads."""
        return self.body_maps(images_u8)[1]

    def body_maps(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (B, H, W) -> the body's first stage (B, H/2, W/2, C1) and its last
        feature map (B, 4, 4, C), channels-last: what the head and the out-of-distribution
        score read (:meth:`ood.ModelStats.feature_inputs`)."""
        scale, offset = np.float32(self.scale), np.float32(self.offset)
        x = images_u8.astype(np.float32)[..., None] * scale + offset
        first = None
        for kernel, shift in self.layers:
            x = _conv(x, kernel, _K, stride=2, pad=1)
            if shift is not None:
                x += shift
            np.maximum(x, x * np.float32(_LEAK), out=x)  # LeakyReLU, as the slope is < 1
            first = x if first is None else first
        return first, x

    def head_outputs(
        self, x: np.ndarray, pixels: np.ndarray | None = None, first: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The last feature map (B, 4, 4, C), the images' pixel features (where the model
        has a pixel Gaussian: :meth:`ood.ModelStats.pixel_inputs`) and the first stage's map
        (:meth:`body_maps`) -> all the head's logits (B, outputs), and the out-of-
        distribution scores (B,) where the model has statistics."""
        kernel, bias = self.head
        logits = _conv(x, kernel, _K, stride=1, pad=0).reshape(x.shape[0], -1)
        stats = self.stats
        scores = None
        if stats is not None:
            scores = stats.scores(stats.feature_inputs(first, x), pixels)
        return (logits if bias is None else logits + bias), scores


def load(checkpoint: Path | None = None) -> NumpyClassifier:
    """The classifier of ``checkpoint`` (the bundled model where it is None), read without
    torch."""
    path = modelfile.checked_file(checkpoint)

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
    spec = engine.spec_of(meta, path)
    if not weights:
        group = modelfile.weights_prefix(meta)
        held = ", ".join(sorted({k.split("/")[1] for k in keys if k.startswith(group)}))
        raise modelfile.ModelError(
            f"{spec.model_id} holds no weights for {spec.classifier} (it has {held or 'none'}); "
            "use a checkpoint of a run that trained that network"
        )
    modelfile.check_finite(weights, f"{path} (network {spec.classifier})")
    return NumpyClassifier(
        stats=engine.read_stats(path, meta, spec.settings.width),
        method=spec.method,
        classes=spec.classes,
        image_size=spec.image_size,
        fit=spec.fit,
        model_id=spec.model_id,
        path=path,
        layers=_layers(weights, path),
        head=(_kernel(weights["head.weight"]), weights.get("head.bias")),
        keep=spec.logits,
        meta=meta,
        scale=spec.scale,
        offset=spec.offset,
    )


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
