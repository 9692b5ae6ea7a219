"""Scores a trained classifier on a labelled split: eval mode, no gradient, the metrics of
:mod:`metrics` from the class probabilities."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from threengan_cli.metrics import classification_metrics
from threengan_cli.networks import to_model_range


@torch.no_grad()
def evaluate(
    method,
    nets,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    batch_size: int = 256,
    amp: torch.dtype | None = None,
) -> dict[str, Any]:
    """Metrics of the method's classifier on one split (eval mode, no gradient)."""
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
    logits_t = torch.cat(logits)
    loss = torch.nn.functional.cross_entropy(logits_t, labels).item()
    probs = torch.softmax(logits_t, dim=1).cpu().numpy()
    result = classification_metrics(labels.cpu().numpy(), probs)
    result["loss"] = loss
    return result
