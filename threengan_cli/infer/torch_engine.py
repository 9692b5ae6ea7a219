"""A trained model ready for use: load a checkpoint once, then classify or generate with it.

The weights come from a checkpoint file (which file ``--run`` names is
:func:`threengan_cli.train.runs.model_file`'s answer), or from the default model bundled with
the package (``threengan_cli/models/default.safetensors``).

A checkpoint may hold only some of its method's networks: the shipped default keeps G and C
and drops D to stay small. All of the method's networks are built, only those present are
restored, and a job that needs a missing one (classify needs the classifier, generate needs
G) gets a :class:`ModelError` that says which.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from threengan_cli.core import system
from threengan_cli.infer import engine, ood
from threengan_cli.infer.blas import per_image
from threengan_cli.model import checkpoints, modelfile
from threengan_cli.model.modelfile import (
    STATS,
    ModelError,
    ModelNotFound,
    check_finite,
    check_shapes,
    checked_file,
)
from threengan_cli.model.networks import Classifier, Generator, to_model_range

__all__ = ["Model", "load_model"]


@dataclass
class Model(engine.Engine):
    """Networks of one checkpoint in eval mode on one device, with what is needed to use them."""

    method: str
    nets: dict[str, nn.Module]
    classes: list[str]
    image_size: int
    fit: str
    model_id: str
    meta: dict[str, Any] = field(repr=False)
    device: torch.device
    latent: int = 100
    path: Path | None = None
    classifier: str = "C"  # the network whose logits classify (sgan: its multi-task D)
    logits: int = 2  # how many of its first logits are the classes
    normalisation: dict[str, float] = field(default_factory=dict)
    stats: ood.ModelStats | None = field(default=None, repr=False)
    unadapted: nn.Module | None = field(default=None, repr=False)  # before --adapt bn

    def require(self, *names: str) -> None:
        """Raise a :class:`ModelError` naming the networks this checkpoint lacks."""
        missing = [n for n in names if n not in self.nets]
        if missing:
            held = ", ".join(sorted(self.nets)) or "none"
            raise ModelError(
                f"{self.model_id} holds no weights for {', '.join(missing)} (it has {held}); "
                "use a checkpoint of a run that trained that network"
            )

    def require_classifier(self) -> None:
        self.require(self.classifier)

    def outputs_of(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 NumPy images (B, H, W) -> class probabilities (B, K) (calibrated by the
        model's temperature, where it has one) and out-of-distribution scores (B,), or
        ``None`` for a model without statistics; NumPy float32. The scores are computed
        from the features of the classifier as loaded, before any ``--adapt bn``."""
        self.require_classifier()
        images = torch.from_numpy(np.ascontiguousarray(images_u8))
        with torch.inference_mode():
            x = to_model_range(images.to(self.device), self.normalisation or None)
            layer = self.stats.layer if self.stats is not None else "last"
            logits, features = self.nets[self.classifier].logits_and_features(x, layer)
            probs = engine.probabilities(logits[:, : self.logits].float().cpu(), self.stats)
            if self.stats is None:
                return probs, None
            if self.unadapted is not None:
                _, features = self.unadapted.logits_and_features(x, layer)
            features = features.cpu().numpy()
        # The score's products run image by image in NumPy, as in the NumPy engine, so that
        # an image's score never depends on its batch. The images' pixel features (where
        # the model has a pixel Gaussian) travel beside the features: one array to split.
        pixels = self.stats.pixel_inputs(images_u8)
        if pixels is None:
            (scores,) = per_image(lambda f: (self.stats.scores(f),), features)
            return probs, scores
        size = features.shape[1]
        both = np.concatenate([features, pixels], axis=1)
        (scores,) = per_image(lambda f: (self.stats.scores(f[:, :size], f[:, size:]),), both)
        return probs, scores

    def predict_proba(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W) at the model size -> class probabilities (B, K), float32 on CPU."""
        self.require_classifier()
        with torch.inference_mode():
            x = to_model_range(images_u8.to(self.device), self.normalisation or None)
            logits = self.nets[self.classifier](x)[:, : self.logits].float().cpu()
        return torch.from_numpy(engine.probabilities(logits.numpy(), self.stats))

    def adapt_bn(self, images_u8: torch.Tensor, batch_size: int = 64) -> None:
        """Recompute the classifier's BatchNorm statistics on these images (no labels): the
        transductive test-time adaptation of ``classify --adapt bn``."""
        from threengan_cli.model.averaging import recompute_bn

        net = self.nets[self.classifier]
        if self.stats is not None and self.unadapted is None:
            self.unadapted = copy.deepcopy(net)  # the statistics describe these features
        x = to_model_range(images_u8.to(self.device), self.normalisation or None)
        with torch.inference_mode(False):
            recompute_bn(net, (b for b in x.split(batch_size) if len(b) > 1))
        net.eval()


def load_model(checkpoint: Path | None = None, device: str = "auto") -> Model:
    """Load a model for inference from ``checkpoint`` (the bundled model where it is None)."""
    path = checked_file(checkpoint)
    try:
        torch_device = system.select_device(device)
    except (ValueError, RuntimeError) as exc:
        raise ModelNotFound(str(exc)) from None
    try:
        ckpt = checkpoints.load(path, map_location="cpu")
    except modelfile.CheckpointError as exc:
        raise ModelError(str(exc)) from None
    meta = ckpt.meta
    # Everything the networks are built from is checked, and each tensor's shape compared
    # with a build on the "meta" device (shapes only, no memory), before anything is
    # allocated: damaged or hostile metadata could otherwise ask for any size. The networks
    # are built from the metadata alone: the classifier (C, or sgan's multi-task D: the same
    # body with one more logit) and G where the file holds them.
    spec = engine.spec_of(meta, path)
    settings, channels, image_size = spec.settings, spec.channels, spec.image_size
    classifier, outputs = spec.classifier, spec.outputs
    prefix = ckpt.weights_prefix
    with torch.device("meta"):
        shapes: dict[str, nn.Module] = {}
        for name in ckpt.network_names:
            if name == classifier:
                shapes[name] = Classifier(outputs, settings.width, image_size, channels)
            elif name == "G":
                shapes[name] = Generator(settings.latent, settings.width, image_size, channels)
    present = list(shapes)
    if not present:
        raise ModelError(f"{path} holds no network weights")
    for name in present:
        weights = ckpt.group(f"{prefix}/{name}")
        found = {k: tuple(v.shape) for k, v in weights.items()}
        expected = {k: tuple(v.shape) for k, v in shapes[name].state_dict().items()}
        check_shapes(found, expected, f"{path} (network {name})")
        check_finite({k: v.float().numpy() for k, v in weights.items()}, f"{path} (network {name})")
    # Only the networks the file holds, with memory for exactly what it holds; every
    # parameter and buffer is then filled from it (a strict load).
    nets = {name: shapes[name].to_empty(device="cpu") for name in present}
    try:
        checkpoints.restore_networks(ckpt, nets, prefix=prefix)
    except modelfile.CheckpointError as exc:
        raise ModelError(str(exc)) from None
    nets = {name: net.to(torch_device).eval().requires_grad_(False) for name, net in nets.items()}
    if classifier in nets and torch_device.type in ("cpu", "cuda"):
        # Measured: oneDNN runs the classifier 1.5x faster in channels_last on CPU (450 ->
        # 700 img/s at width 64, 2 cores), which matters because classify is CPU-bound with
        # decoding. Inputs have one channel, so they need no conversion.
        nets[classifier] = nets[classifier].to(memory_format=torch.channels_last)
    return Model(
        stats=engine.read_stats(
            path, meta, settings.width, {k: v.float().numpy() for k, v in ckpt.group(STATS).items()}
        ),
        method=spec.method,
        nets=nets,
        classes=spec.classes,
        image_size=image_size,
        fit=spec.fit,
        model_id=spec.model_id,
        meta=meta,
        device=torch_device,
        latent=settings.latent,
        path=path,
        classifier=classifier,
        logits=spec.logits,
        normalisation={"scale": spec.scale, "offset": spec.offset},
    )
