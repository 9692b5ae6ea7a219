"""Scores a trained classifier on a labelled split (eval mode, no gradient, the metrics of
:mod:`metrics` from the class probabilities), and fits what a finished model carries about
itself: its out-of-distribution statistics and its temperature (:mod:`ood`)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from threengan_cli.infer import ood
from threengan_cli.metrics import classification_metrics, fit_temperature, softmax
from threengan_cli.model.networks import to_model_range


@dataclass
class SplitOutputs:
    """One pass of a split through the classifier: what the end of a run needs of it."""

    logits: torch.Tensor  # (N, K) float32 class logits, on the images' device
    features: np.ndarray  # (N, D) float32: what the out-of-distribution score reads
    pixels: np.ndarray  # (N, 16) float32: the images' ood.pixel_features


@torch.no_grad()
def score_split(
    method,
    nets,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    batch_size: int = 256,
    amp: torch.dtype | None = None,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Metrics of the method's classifier on one split (eval mode, no gradient), of the
    probabilities softmax(logits / ``temperature``)."""
    if len(labels) == 0:
        return {}
    for net in nets.values():
        net.eval()
    logits = []
    device = images_u8.device
    ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    with ctx:
        for start in range(0, len(labels), batch_size):
            x = to_model_range(images_u8[start : start + batch_size])
            logits.append(method.predict(nets, x).float())
    for net in nets.values():
        net.train()
    return metrics_of_logits(torch.cat(logits), labels, temperature)


def metrics_of_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> dict[str, Any]:
    """:func:`score_split`'s metrics from logits already computed (``{}`` for no images)."""
    if len(labels) == 0:
        return {}
    logits_t = logits / temperature
    loss = torch.nn.functional.cross_entropy(logits_t, labels).item()
    probs = softmax(logits_t.cpu().numpy())
    result = classification_metrics(labels.cpu().numpy(), probs)
    result["loss"] = loss
    return result


@torch.no_grad()
def split_outputs(
    method,
    nets,
    images_u8: torch.Tensor,
    num_classes: int,
    batch_size: int = 256,
    amp: torch.dtype | None = None,
) -> SplitOutputs:
    """The logits and the out-of-distribution features of a split in one pass: the end of a
    run reads both of val and of test, and a second pass would double that time. The logits
    are those :func:`score_split` computes (the same network call). Under ``amp`` (bf16)
    the logits take a pass of their own under autocast: the features must be the fp32 ones
    that both classify engines compute."""
    net = nets[method.classifier.network]
    logits, features = _logits_and_features(net, images_u8, num_classes, batch_size, cpu=False)
    if amp:
        with torch.autocast(images_u8.device.type, dtype=amp):
            logits, _ = _logits_and_features(net, images_u8, num_classes, batch_size, cpu=False)
    return SplitOutputs(logits, features, ood.pixel_features(images_u8.cpu().numpy()))


@torch.no_grad()
def _logits_and_features(
    net: torch.nn.Module,
    images_u8: torch.Tensor,
    classes: int,
    batch_size: int = 256,
    cpu: bool = True,
) -> tuple[Any, np.ndarray]:
    """The class logits (N, K) and the ``ood`` features (N, D) of images, in fp32: the
    logits as NumPy, or with ``cpu=False`` as a tensor on the images' device."""
    was_training = net.training
    net.eval()
    logits, features = [], []
    for start in range(0, len(images_u8), batch_size):
        x = to_model_range(images_u8[start : start + batch_size])
        out, feat = net.logits_and_features(x, ood.LAYER)
        logits.append(out[:, :classes].float())
        features.append(feat.float().cpu())
    net.train(was_training)
    if not logits:
        empty = torch.zeros((0, classes), device=images_u8.device)
        return (empty.numpy() if cpu else empty), np.zeros((0, 0), np.float32)
    joined = torch.cat(logits)
    return (joined.cpu().numpy() if cpu else joined), torch.cat(features).numpy()


def class_logits(net: torch.nn.Module, images_u8: torch.Tensor, classes: int) -> np.ndarray:
    """The class logits (N, K) of a classifier on uint8 images, fp32 NumPy (eval mode)."""
    return _logits_and_features(net, images_u8, classes)[0]


def with_temperature(
    stats: tuple[dict[str, torch.Tensor], dict[str, Any]], temperature: float, how: dict
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``stats`` (:func:`model_statistics`) with another temperature, fitted as ``how`` says
    (its metadata, e.g. ``{"split": "cross-fit", "folds": 5, "images": 40}``)."""
    tensors = {**stats[0], "temperature": torch.tensor(temperature, dtype=torch.float32)}
    return tensors, {**stats[1], "temperature": how}


def model_statistics(
    method, nets, data, val: SplitOutputs | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The out-of-distribution statistics of the weights in ``nets``, fitted on every image
    the run may use without its label (``data.detector_x``: the whole train split and the
    unlabelled pool), their threshold (on val, or cross-fitted where there is no val) and
    the temperature fitted on val (none without val: the model is then uncalibrated and its
    metadata says so); the tensors to store under ``stats/`` and the metadata describing
    them. ``val``: the val split's outputs where the caller has them already. ``None``
    where the run has too few images to fit them."""
    net = nets[method.classifier.network]
    k = len(data.classes)
    _, fit_features = _logits_and_features(net, data.detector_x, k)
    fit_pixels = ood.pixel_features(data.detector_x.cpu().numpy())
    if val is None:
        val = split_outputs(method, nets, data.val_x, k)
    try:
        pixels = (fit_pixels, val.pixels)
        tensors, ood_info = ood.fit_ood(fit_features, val.features, pixels=pixels)
    except ood.StatsError:
        return None
    val_y = data.val_y.cpu().numpy()
    calibrated = len(val_y) > 0
    val_logits = val.logits.cpu().numpy()
    temperature = fit_temperature(val_logits, val_y) if calibrated else 1.0
    tensors["temperature"] = np.array(temperature, dtype=np.float32)
    stored = {k: torch.from_numpy(np.array(v, order="C")) for k, v in tensors.items()}
    info = {
        "ood": ood_info,
        "temperature": {"split": "val" if calibrated else None, "images": len(val_y)},
    }
    return stored, info


def flagged_share(
    outputs: SplitOutputs, stats: tuple[dict[str, torch.Tensor], dict[str, Any]]
) -> float | None:
    """The share of a split's images (:func:`split_outputs`) that the statistics flag."""
    if not len(outputs.features):
        return None
    arrays = {k: v.cpu().numpy() for k, v in stats[0].items()}
    model = ood.from_arrays(arrays, {ood.META_KEY: stats[1]})
    scores = model.scores(outputs.features, outputs.pixels)
    return float(np.mean(scores > np.float32(model.threshold)))
