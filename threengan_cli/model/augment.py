"""Differentiable augmentation of image batches, applied alike to real and generated images.

DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
Training"): every image D or C sees, real or generated, goes through the same random
transformations, and the generator's loss sees them too, so gradients flow through them into
G. With few labelled images this keeps D from memorising the real batch and gives C's
supervised term new views of its N images.

Each transform draws per-image parameters from the run's own ``torch.Generator`` (the one
that draws z), so an augmented run is seeded and resumes exactly, and every draw has a fixed
shape, so a step with augmentation is still capturable in a CUDA graph. Images are
(B, C, H, W) in [-1, 1]; uncovered pixels become 0 (mid-grey), as in DiffAugment.

torchvision's transforms v2 draw one set of parameters per call (per batch), not per image,
and take no generator; per-image draws from the run's generator are what these need, so
they are written here in a few lines of tensor code instead.

The strengths are milder than DiffAugment's defaults for natural images (which shift by 1/8,
cut out half the side and move brightness by ±0.5): a chest X-ray's finding is often small and
near the edge of a lung, so a half-size cutout can remove the very evidence of the label.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SHIFT = 0.125  # translation: up to this fraction of the side, each way (DiffAugment's)
CUTOUT = 0.25  # cutout: a square of this fraction of the side
BRIGHTNESS = 0.2  # added, on the [-1, 1] scale
CONTRAST = (0.75, 1.25)  # factor around each image's mean

Augment = Callable[[torch.Tensor], torch.Tensor]


def _uniform(x: torch.Tensor, rng: torch.Generator | None, lo: float, hi: float) -> torch.Tensor:
    """One value per image, shape (B, 1, 1, 1), uniform in [lo, hi)."""
    u = torch.rand(x.shape[0], 1, 1, 1, generator=rng, device=x.device, dtype=x.dtype)
    return lo + (hi - lo) * u


def color(x: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    """Brightness then contrast, per image."""
    x = x + _uniform(x, rng, -BRIGHTNESS, BRIGHTNESS)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x, rng, *CONTRAST) + mean


def translation(x: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by whole pixels, up to ``SHIFT`` of its side; zeros come in."""
    b, c, h, w = x.shape
    sh, sw = int(h * SHIFT + 0.5), int(w * SHIFT + 0.5)
    dy = torch.randint(-sh, sh + 1, (b, 1, 1), generator=rng, device=x.device)
    dx = torch.randint(-sw, sw + 1, (b, 1, 1), generator=rng, device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    # Index into the image padded by 1 with zeros; clamping lands off-image reads on the pad.
    r = (rows + dy + 1).clamp(0, h + 1).expand(b, h, w)
    q = (cols + dx + 1).clamp(0, w + 1).expand(b, h, w)
    padded = F.pad(x, (1, 1, 1, 1))  # (B, C, H+2, W+2)
    flat = (r * (w + 2) + q).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)


def cutout(x: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    """Zero a square of ``CUTOUT`` of the side at a random centre in each image."""
    b, _, h, w = x.shape
    ch, cw = max(1, int(h * CUTOUT + 0.5)), max(1, int(w * CUTOUT + 0.5))
    cy = torch.randint(0, h, (b, 1, 1), generator=rng, device=x.device)
    cx = torch.randint(0, w, (b, 1, 1), generator=rng, device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows - cy).abs() <= ch // 2) & ((cols - cx).abs() <= cw // 2)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def flip(x: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    """Mirror left-right, each image with probability 1/2 (off in the recipes: a chest X-ray's
    heart sits on one side)."""
    coin = _uniform(x, rng, 0.0, 1.0) < 0.5
    return torch.where(coin, x.flip(3), x)


TRANSFORMS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "color": color,
    "translation": translation,
    "cutout": cutout,
    "flip": flip,
}


def policy(names: tuple[str, ...], rng: torch.Generator | None) -> Augment | None:
    """The transforms ``names`` in DiffAugment's order (color, translation, cutout), drawing
    from ``rng``; ``None`` for no augmentation (callers then skip it altogether)."""
    ordered = [TRANSFORMS[n] for n in ("flip", "color", "translation", "cutout") if n in names]
    if not ordered:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        for transform in ordered:
            x = transform(x, rng)
        return x

    return apply
