"""The three players: DCGAN generator G, discriminator D and classifier C.

All networks take their sizes as arguments, and images enter them through
:func:`to_model_range` (uint8 -> [-1, 1]). The layout is DCGAN's (Radford et al. 2016, as in
pytorch/examples ``dcgan/main.py``): 4x4 kernels, stride 2, BatchNorm, ReLU in G and
LeakyReLU(0.2) in D. At ``image_size=64`` the layers are exactly DCGAN's; other sizes
(8, 16, 32, 128, 256, ...) add or remove stride-2 stages, so the 4x4 stage always carries
``width*8`` channels and the channel count halves per doubling of the side, never below
``width``.

D and C share one body (:class:`DiscriminatorBody`) and differ only in the head: one
real/fake logit, K class logits, or K+1 logits for the multi-task discriminator of ``sgan``.

:func:`separately` runs one network on several batches (D on real and on generated images)
in one call, each batch normalised with its own statistics exactly as separate calls would:
the convolutions then see one batch twice as large, which runs faster on a CPU and launches
one convolution per layer instead of two on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from threengan_cli.data.images import NORMALISATION


def to_model_range(images_u8: torch.Tensor, normalisation: dict | None = None) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H, W) in the model's input range (``NORMALISATION``
    unless a checkpoint recorded another)."""
    norm = normalisation or NORMALISATION
    return images_u8.unsqueeze(1).float() * norm["scale"] + norm["offset"]


def from_model_range(images: torch.Tensor) -> torch.Tensor:
    """The inverse for generated images: float (B, 1, H, W) in [-1, 1] -> uint8 (B, H, W)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state dict) that, inside
    :func:`separately`, normalises each part of a stacked batch on its own: the same outputs,
    gradients and running statistics as one call per part, in order. A part may instead be
    normalised by another part's statistics (``borrow``: part -> the part it borrows from),
    taken as constants; such a part leaves the running statistics alone."""

    parts: Sequence[int] | None = None  # batch sizes of the stacked parts, set by separately()
    borrow: dict[int, int] | None = None  # part -> the part whose statistics it uses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parts is None or not self.training:
            return super().forward(x)
        one = super().forward  # (a comprehension cannot call super() itself)
        chunks = x.split(self.parts)
        if not self.borrow:
            return torch.cat([one(part) for part in chunks])
        out = []
        for i, part in enumerate(chunks):
            source = self.borrow.get(i)
            if source is None:
                out.append(one(part))
                continue
            ref = chunks[source].detach()
            mean, var = ref.mean(dim=(0, 2, 3)), ref.var(dim=(0, 2, 3), unbiased=False)
            out.append(
                nn.functional.batch_norm(
                    part, mean, var, self.weight, self.bias, False, 0.0, self.eps
                )
            )
        return torch.cat(out)


def separately(
    net: nn.Module, *batches: torch.Tensor, borrow: dict[int, int] | None = None
) -> tuple[torch.Tensor, ...]:
    """``tuple(net(b) for b in batches)`` computed in one call of ``net`` on the stacked batch.

    Exact for these networks: convolutions, activations and heads act on each image alone,
    and every BatchNorm layer is a :class:`BatchNorm2d` that splits the batch back into its
    parts in training mode (in eval mode it uses running statistics, per image anyway).
    ``borrow`` maps a batch's index to the index of the batch whose statistics normalise it
    (:class:`BatchNorm2d`)."""
    sizes = [b.shape[0] for b in batches]
    norms = [m for m in net.modules() if isinstance(m, BatchNorm2d)]
    for m in norms:
        m.parts, m.borrow = sizes, borrow
    try:
        out = net(torch.cat(batches))
    finally:
        for m in norms:
            m.parts = m.borrow = None
    return out.split(sizes)


def _resolutions(image_size: int) -> list[int]:
    """Sides of the hidden feature maps, 4, 8, ..., image_size // 2."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    sides = []
    side = 4
    while side < image_size:
        sides.append(side)
        side *= 2
    return sides


def _multiplier(side: int) -> int:
    """Channels per ``width`` at a feature map of this side: 8 at 4x4, halving, at least 1."""
    return max(1, 32 // side)


class Generator(nn.Module):
    """z (B, latent) or (B, latent, 1, 1) -> images (B, channels, S, S) in [-1, 1]."""

    def __init__(self, latent: int = 100, width: int = 64, image_size: int = 64, channels: int = 1):
        super().__init__()
        sides = _resolutions(image_size)
        self.latent = latent
        self.project = nn.Sequential(
            nn.ConvTranspose2d(latent, width * 8, 4, 1, 0, bias=False),
            BatchNorm2d(width * 8),
            nn.ReLU(inplace=True),
        )
        grow = []
        for side in sides[:-1]:
            c_in, c_out = width * _multiplier(side), width * _multiplier(2 * side)
            grow += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.grow = nn.Sequential(*grow)
        self.to_image = nn.Sequential(
            nn.ConvTranspose2d(width * _multiplier(sides[-1]), channels, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z.reshape(z.shape[0], self.latent, 1, 1)  # (B, latent, 1, 1)
        x = self.project(x)  # (B, width*8, 4, 4)
        x = self.grow(x)  # (B, width*m, S/2, S/2); at S=64: 8->4->2->1 x width, 4->8->16->32 px
        return self.to_image(x)  # (B, channels, S, S)


class DiscriminatorBody(nn.Module):
    """Images (B, channels, S, S) -> features (B, width*8, 4, 4); shared by D and C."""

    def __init__(self, width: int = 64, image_size: int = 64, channels: int = 1):
        super().__init__()
        sides = _resolutions(image_size)[::-1]  # S/2, ..., 8, 4
        # DCGAN: no BatchNorm on the first layer, it would normalise away the input's scale.
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width * _multiplier(sides[0]), 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for side in sides[1:]:
            c_in, c_out = width * _multiplier(2 * side), width * _multiplier(side)
            layers += [
                nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        self.layers = nn.Sequential(*layers)
        self.features = width * 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, channels, S, S) -> (B, width*m, S/2, S/2) -> ... -> (B, width*8, 4, 4)
        return self.layers(x)


class _Headed(nn.Module):
    """A body plus a 4x4 'valid' convolution to ``outputs`` logits, as DCGAN's last layer."""

    def __init__(self, outputs: int, width: int, image_size: int, channels: int, bias: bool):
        super().__init__()
        self.body = DiscriminatorBody(width, image_size, channels)
        self.head = nn.Conv2d(self.body.features, outputs, 4, 1, 0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (B, width*8, 4, 4)
        return self.head(h).flatten(1)  # (B, outputs)

    def logits_and_features(
        self, x: torch.Tensor, layer: str = "last"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits (B, outputs) and what the out-of-distribution score reads (``ood``), in
        (row, column, channel) order: the last feature map averaged over 2x2 blocks of
        positions (B, 4 * width * 8), or with ``layer="first"`` the first stage (the first
        convolution and its LeakyReLU) averaged over 4x4 blocks (B, 16 * its channels)."""
        first = self.body.layers[:2](x)  # (B, C1, S/2, S/2)
        h = self.body.layers[2:](first)  # (B, width*8, 4, 4)
        if layer == "first":
            blocks = nn.functional.avg_pool2d(first.float(), first.shape[-1] // 4)
        else:
            blocks = nn.functional.avg_pool2d(h.float(), 2)  # (B, width*8, 2, 2)
        return self.head(h).flatten(1), blocks.permute(0, 2, 3, 1).flatten(1)


class Discriminator(_Headed):
    """Images -> one real/fake logit per image, shape (B,)."""

    def __init__(self, width: int = 64, image_size: int = 64, channels: int = 1):
        super().__init__(1, width, image_size, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(1)  # (B,)


class Classifier(_Headed):
    """Images -> K class logits, shape (B, K). The body is D's; the head has a bias."""

    def __init__(
        self, num_classes: int = 2, width: int = 64, image_size: int = 64, channels: int = 1
    ):
        super().__init__(num_classes, width, image_size, channels, bias=True)
        self.num_classes = num_classes


class MultiTaskDiscriminator(_Headed):
    """``sgan``'s D (Salimans et al. 2016): logits (B, K+1); index K is the class 'fake'."""

    def __init__(
        self, num_classes: int = 2, width: int = 64, image_size: int = 64, channels: int = 1
    ):
        super().__init__(num_classes + 1, width, image_size, channels, bias=True)
        self.num_classes = num_classes


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN's init, for ``net.apply``: conv N(0, 0.02), BatchNorm weight N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
