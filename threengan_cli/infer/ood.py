"""How unlike its training X-rays an image looks to a model: the out-of-distribution score,
and the temperature that calibrates the model's probabilities. NumPy only, shared by both
classify engines and by training, which fits both at the end of a run.

The score reads the classifier's own features: its last feature map (the input to its head,
``width * 8`` channels at 4x4), averaged over 2x2 blocks of positions, so that it keeps
roughly where in the chest a pattern lies (``4 * width * 8`` values; 2,048 at width 64). A
Gaussian is fitted to the training images' features in their top principal directions (at
most :data:`DIMS`, and at most half as many as there are images), with a little shrinkage
toward equal variances so that rare directions do not dominate. The score is the squared
Mahalanobis distance to that Gaussian divided by the number of directions: about 1 for a
typical training image, larger for one the model has not seen the like of. An image is
flagged where its score exceeds a threshold: by default the 95th percentile of the val
split's scores, so that about 5% of images like the training ones are flagged.

Chosen by measurement (docs/ood.md): on the bundled model, output-based scores (maximum
softmax probability, energy) separated adult X-rays from the Kermany test images with an
AUROC of 0.56 to 0.69; a kNN distance on pooled features reached 0.60 to 0.94, Mahalanobis
on pooled features 0.94 to 0.99, and this one 0.960 and 0.992 on the two external-dev
sources.

What a checkpoint stores (tensors under ``stats/``, checksummed like the weights):
``ood_mean`` (D,), ``ood_projection`` (D, d) — the whitening map, so that a score is
``mean(((f - mean) @ projection) ** 2)`` — ``ood_threshold`` () and ``temperature`` ();
the metadata's ``stats`` entry says how they were fitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DIMS = 256  # principal directions kept at most
SHRINK = 0.01  # share of the mean variance added to every direction's variance
QUANTILE = 0.95  # of the val split's scores: the default threshold flags 5% of val
META_KEY = "stats"  # the metadata entry describing it
MAX_THRESHOLD = 1e6  # the range of classify's --ood-threshold (settings.ClassifySettings)


class StatsError(ValueError):
    """Statistics in a checkpoint that do not fit its model; one line for the user."""


@dataclass(frozen=True)
class ModelStats:
    """A model's out-of-distribution statistics and its temperature."""

    mean: np.ndarray  # (D,) float32
    projection: np.ndarray  # (D, d) float32
    threshold: float  # flag above this score
    temperature: float  # logits are divided by it before the softmax
    info: dict[str, Any]

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Features (B, D) -> out-of-distribution scores (B,), float32.

        One product per image (a stack of (1, D) rows), so that an image's score never
        depends on the other images in its batch: see ``blas.per_image``."""
        centred = (np.asarray(features, dtype=np.float32) - self.mean)[:, None, :]
        z = np.matmul(centred, self.projection)[:, 0, :]  # (B, d)
        return (np.square(z).sum(axis=1) / np.float32(z.shape[1])).astype(np.float32)


def pooled_features(last_map: np.ndarray) -> np.ndarray:
    """The classifier's last feature map, channels-last (B, 4, 4, C) -> (B, 4 * C): each
    2x2 block of positions averaged, in (row, column, channel) order."""
    b, h, w, c = last_map.shape
    blocks = last_map.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4), dtype=np.float32)
    return blocks.reshape(b, -1)


def feature_size(width: int) -> int:
    """D for a classifier of this width: 2x2 positions of ``width * 8`` channels."""
    return 4 * width * 8


# ----------------------------------------------------------------------------- fitting
def fit_ood(
    train: np.ndarray, val: np.ndarray, quantile: float = QUANTILE
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit the Gaussian on training features (N, D) and set the threshold at ``quantile`` of
    the val features' scores (of the training features' where there is no val split).
    Returns the tensors (``ood_mean``, ``ood_projection``, ``ood_threshold``) and a
    description for the metadata."""
    x = np.asarray(train, dtype=np.float64)
    n, size = x.shape
    if n < 4:
        raise StatsError(f"{n} training images are too few to fit out-of-distribution statistics")
    mean = x.mean(axis=0)
    centred = x - mean
    # principal directions from the covariance's eigenvectors, largest variance first
    variance, vectors = np.linalg.eigh(centred.T @ centred / n)
    dims = int(min(DIMS, n // 2, size))
    variance, vectors = variance[::-1][:dims], vectors[:, ::-1][:, :dims]
    variance = np.maximum(variance, 0.0) + SHRINK * max(float(variance.mean()), 1e-12)
    projection = (vectors / np.sqrt(variance)).astype(np.float32)
    tensors = {"ood_mean": mean.astype(np.float32), "ood_projection": projection}
    probe = ModelStats(tensors["ood_mean"], projection, 0.0, 1.0, {})
    split = "val" if len(val) else "train"
    reference = probe.scores(val if len(val) else train)
    threshold = float(np.quantile(reference.astype(np.float64), quantile))
    tensors["ood_threshold"] = np.array(threshold, dtype=np.float32)
    info = {
        "detector": "mahalanobis-pca",
        "features": "classifier's last feature map, 2x2 position blocks",
        "dims": dims,
        "shrinkage": SHRINK,
        "fitted_on": {"images": n},
        "threshold": {"quantile": quantile, "split": split, "images": len(reference)},
    }
    return tensors, info


# --------------------------------------------------------------------------- checkpoint
def expected_shapes(meta: dict[str, Any], width: int) -> dict[str, tuple[int, ...]]:
    """The shapes the ``stats/`` tensors of a checkpoint must have, from its metadata and
    its classifier's width, checked before any is read."""
    size = feature_size(width)
    dims = (meta.get(META_KEY) or {}).get("ood", {}).get("dims")
    if type(dims) is not int or not 1 <= dims <= size:
        raise StatsError(f"damaged metadata (out-of-distribution dims {dims!r})")
    return {
        "ood_mean": (size,),
        "ood_projection": (size, dims),
        "ood_threshold": (),
        "temperature": (),
    }


def has_stats(meta: dict[str, Any]) -> bool:
    return isinstance(meta.get(META_KEY), dict)


def from_arrays(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> ModelStats:
    """:class:`ModelStats` from a checkpoint's ``stats/`` arrays (shapes already checked)."""
    values = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    for key, value in values.items():
        if not np.isfinite(value).all():
            raise StatsError(f"its statistics {key} hold NaN or infinite values")
    temperature = float(values["temperature"])
    if not 0.0 < temperature < 1000.0:
        raise StatsError(f"its temperature {temperature} is not a usable value")
    # a score is a mean of squares, about 1 for a training image: a threshold at or below 0
    # would flag every image, one beyond the range --ood-threshold takes none
    threshold = float(values["ood_threshold"])
    if not 0.0 < threshold < MAX_THRESHOLD:
        raise StatsError(f"its out-of-distribution threshold {threshold} is not a usable value")
    if not np.abs(values["ood_projection"]).sum(axis=0).all():
        raise StatsError("its out-of-distribution projection has a direction of zeros")
    return ModelStats(
        mean=values["ood_mean"],
        projection=values["ood_projection"],
        threshold=threshold,
        temperature=temperature,
        info=dict(meta[META_KEY]),
    )
