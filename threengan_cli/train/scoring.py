"""Scores a trained classifier on a labelled split (eval mode, no gradient, the metrics of
:mod:`metrics` from the class probabilities), and fits what a finished model carries about
itself: its out-of-distribution statistics and its temperature (:mod:`ood`)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from threengan_cli.infer import ood
from threengan_cli.metrics import classification_metrics, fit_temperature, softmax
from threengan_cli.model.networks import to_model_range


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
    logits_t = torch.cat(logits) / temperature
    loss = torch.nn.functional.cross_entropy(logits_t, labels).item()
    probs = softmax(logits_t.cpu().numpy())
    result = classification_metrics(labels.cpu().numpy(), probs)
    result["loss"] = loss
    return result


@torch.no_grad()
def _logits_and_features(
    net: torch.nn.Module, images_u8: torch.Tensor, classes: int, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """The class logits (N, K) and the ``ood`` features (N, D) of images, in fp32."""
    was_training = net.training
    net.eval()
    logits, features = [], []
    for start in range(0, len(images_u8), batch_size):
        out, feat = net.logits_and_features(to_model_range(images_u8[start : start + batch_size]))
        logits.append(out[:, :classes].float().cpu())
        features.append(feat.cpu())
    net.train(was_training)
    if not logits:
        return np.zeros((0, classes), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(logits).numpy(), torch.cat(features).numpy()


def model_statistics(
    method, nets, data
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The out-of-distribution statistics of the weights in ``nets``, fitted on the run's
    training images (the labelled ones and the unlabelled pool), their threshold and the
    temperature fitted on val; the tensors to store under ``stats/`` and the metadata
    describing them. ``None`` where the run has too few training images to fit them."""
    net = nets[method.classifier.network]
    k = len(data.classes)
    train = [data.train_x] + ([data.unlabelled] if data.unlabelled is not None else [])
    _, train_features = _logits_and_features(net, torch.cat(train), k)
    val_logits, val_features = _logits_and_features(net, data.val_x, k)
    try:
        tensors, ood_info = ood.fit_ood(train_features, val_features)
    except ood.StatsError:
        return None
    val_y = data.val_y.cpu().numpy()
    temperature = fit_temperature(val_logits, val_y) if len(val_y) else 1.0
    tensors["temperature"] = np.array(temperature, dtype=np.float32)
    stored = {k: torch.from_numpy(np.array(v, order="C")) for k, v in tensors.items()}
    labelled = len(data.train_x)
    fitted_on = {"labelled": labelled, "unlabelled": len(train_features) - labelled}
    info = {
        "ood": {**ood_info, "fitted_on": fitted_on},
        "temperature": {"split": "val" if len(val_y) else None, "images": len(val_y)},
    }
    return stored, info


def flagged_share(
    method, nets, images_u8: torch.Tensor, stats: dict[str, torch.Tensor]
) -> float | None:
    """The share of ``images_u8`` the out-of-distribution statistics ``stats`` flag."""
    if not len(images_u8):
        return None
    net = nets[method.classifier.network]
    _, features = _logits_and_features(net, images_u8, 1)
    arrays = {k: v.numpy() for k, v in stats.items()}
    model = ood.ModelStats(
        arrays["ood_mean"], arrays["ood_projection"], float(arrays["ood_threshold"]), 1.0, {}
    )
    return float(np.mean(model.scores(features) > model.threshold))
