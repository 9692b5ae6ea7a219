"""How unlike its training X-rays an image looks to a model: the out-of-distribution score,
and the temperature that calibrates the model's probabilities. NumPy only, shared by both
classify engines and by training, which fits both at the end of a run.

The score reads the classifier's own features: its first stage (the first convolution,
``width`` channels at 32x32 for 64-pixel images) averaged over 4x4 blocks of positions
(1,024 values at width 64); models fitted before it read the last map (the input to its
head, ``width * 8`` channels at 4x4) averaged over 2x2 blocks (2,048 values); both keep
roughly where in the chest a pattern lies. A Gaussian is fitted to the training images'
features in their top principal directions (at most :data:`DIMS`, and at most half as many
as there are images), with a little shrinkage toward equal variances so that rare
directions do not dominate. The score is the squared
Mahalanobis distance to that Gaussian divided by the number of directions: about 1 for a
typical training image, larger for one the model has not seen the like of. An image is
flagged where its score exceeds a threshold: by default the 95th percentile of the val
split's scores, so that about 5% of images like the training ones are flagged.

Chosen by measurement (docs/ood.md): on the bundled model, output-based scores (maximum
softmax probability, energy) separated adult X-rays from the Kermany test images with an
AUROC of 0.56 to 0.69; a kNN distance on pooled features reached 0.60 to 0.94, Mahalanobis
on pooled features 0.94 to 0.99, and the last map's 0.960 and 0.992 on the two external-dev
sources. On the models users train (200 labelled images, 2 or 30 epochs) the first stage
held where the last map did not, and its score summed with the images' own 4x4 blocks'
(:func:`pixel_features`) flagged 94% of the adult X-rays (docs/ood.md, issue 23).

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
MAX_THRESHOLD = 1e6  # the range of classify's --ood-threshold (use_settings.ClassifySettings)


class StatsError(ValueError):
    """Statistics in a checkpoint that do not fit its model; one line for the user."""


@dataclass(frozen=True)
class ModelStats:
    """A model's out-of-distribution statistics and its temperature. ``pixels``: the
    Gaussian of the images themselves, 4x4 blocks (:func:`pixel_features`), and the scales
    that put both scores on one footing; ``None`` for a model fitted before it existed,
    whose score is the features' alone."""

    mean: np.ndarray  # (D,) float32
    projection: np.ndarray  # (D, d) float32
    threshold: float  # flag above this score
    temperature: float  # logits are divided by it before the softmax
    info: dict[str, Any]
    pixels: PixelStats | None = None

    layer: str = "last"  # the classifier's map the features come from: "first" or "last"

    def pixel_inputs(self, images_u8: np.ndarray) -> np.ndarray | None:
        """What :meth:`scores` needs of the images: their :func:`pixel_features` where the
        model has a pixel Gaussian, else ``None`` (nothing computed)."""
        return pixel_features(images_u8) if self.pixels is not None else None

    def feature_inputs(self, first_map: np.ndarray | None, last_map: np.ndarray) -> np.ndarray:
        """What :meth:`scores` reads of the classifier, channels-last maps (B, h, w, C): the
        first stage's 4x4 blocks (:func:`first_stage_features`) for a model whose metadata
        says ``layer: first``, else the last map's 2x2 blocks (:func:`pooled_features`)."""
        if self.layer == "first":
            return first_stage_features(first_map)
        return pooled_features(last_map)

    def scores(self, features: np.ndarray, pixels: np.ndarray | None = None) -> np.ndarray:
        """Features (B, D) (:meth:`feature_inputs`) and the images' :func:`pixel_features`
        (B, 16) -> out-of-distribution scores (B,), float32. Where the model has a pixel
        Gaussian, each score is divided by its scale (the 95th percentile of its reference
        images') and the two are summed (metadata ``combine: sum``: the evidence of both
        adds up) or, fitted before, the larger is kept.

        One product per image (a stack of (1, D) rows), so that an image's score never
        depends on the other images in its batch: see ``blas.per_image``."""
        score = gaussian_scores(self.mean, self.projection, features)
        if self.pixels is None:
            return score
        if pixels is None:
            raise ValueError("this model's score reads the images too (pixel_inputs)")
        pixel = gaussian_scores(self.pixels.mean, self.pixels.projection, pixels)
        scales = self.pixels.scales
        if self.pixels.combine == "sum":
            return (score / scales[0] + pixel / scales[1]).astype(np.float32)
        return np.maximum(score / scales[0], pixel / scales[1]).astype(np.float32)


@dataclass(frozen=True)
class PixelStats:
    """The images' own Gaussian: 4x4 blocks of pixels, in all 16 directions, and how its
    score joins the features' (``combine``: ``sum``, or ``max`` for a model fitted before the
    first-stage detector)."""

    mean: np.ndarray  # (16,) float32
    projection: np.ndarray  # (16, 16) float32
    scales: np.ndarray  # (2,) float32: what the feature and the pixel scores are divided by
    combine: str = "max"  # how the two scaled scores make one: "sum" or "max"


def gaussian_scores(mean: np.ndarray, projection: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The squared Mahalanobis distance of each row of ``x`` (B, D) per direction, float32,
    one (1, D) product per row."""
    centred = (np.asarray(x, dtype=np.float32) - mean)[:, None, :]
    z = np.matmul(centred, projection)[:, 0, :]  # (B, d)
    return (np.square(z).sum(axis=1) / np.float32(z.shape[1])).astype(np.float32)


PIXEL_GRID = 4  # the image's 4x4 blocks: see pixel_features


def pixel_features(images_u8: np.ndarray) -> np.ndarray:
    """uint8 images (B, H, W) -> (B, 16): the mean of each of 4x4 equal blocks, in [0, 1].

    Where the image lies and how bright each region is says a lot about what kind of X-ray
    it is, whatever the classifier learned: on external-dev this Gaussian alone separated
    adult X-rays from the Kermany test with an AUROC of 0.960 and 0.977 (docs/ood.md),
    better than the features of a weakly trained classifier."""
    x = np.asarray(images_u8)
    b, h, w = x.shape
    g = PIXEL_GRID
    # integer sums are exact, so a block's value never depends on how numpy reduces it
    sums = x.reshape(b, g, h // g, g, w // g).sum(axis=(2, 4), dtype=np.int64)
    return (sums.reshape(b, g * g) / (255.0 * (h // g) * (w // g))).astype(np.float32)


FIRST_GRID = 4  # the first stage's map is averaged over 4x4 blocks of positions
LAYER = "first"  # what training fits (docs/ood.md, issue 23)


def first_stage_features(first_map: np.ndarray) -> np.ndarray:
    """The classifier's first stage (the first convolution and its LeakyReLU), channels-
    last (B, S/2, S/2, C) -> (B, 16 * C): each of 4x4 equal blocks of positions averaged, in
    (row, column, channel) order. Edges and textures at each region of the image, which
    a classifier learns early and keeps: on two models, one trained 2 epochs and one 30,
    these with the pixel Gaussian flagged 94% of the external-dev adult X-rays (docs/ood.md)."""
    b, h, w, c = first_map.shape
    g = FIRST_GRID
    blocks = first_map.reshape(b, g, h // g, g, w // g, c).mean(axis=(2, 4), dtype=np.float32)
    return blocks.reshape(b, -1)


def pooled_features(last_map: np.ndarray) -> np.ndarray:
    """The classifier's last feature map, channels-last (B, 4, 4, C) -> (B, 4 * C): each
    2x2 block of positions averaged, in (row, column, channel) order."""
    b, h, w, c = last_map.shape
    blocks = last_map.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4), dtype=np.float32)
    return blocks.reshape(b, -1)


def feature_size(width: int, layer: str = "last", image_size: int = 64) -> int:
    """D for a classifier of this width: 2x2 positions of the last map's ``width * 8``
    channels, or 4x4 positions of the first stage's channels (``width`` times 32 over its
    side, at least 1: networks.DiscriminatorBody)."""
    if layer == "first":
        return FIRST_GRID * FIRST_GRID * width * max(1, 32 // (image_size // 2))
    return 4 * width * 8


# ----------------------------------------------------------------------------- fitting
def fit_ood(
    train: np.ndarray,
    val: np.ndarray,
    quantile: float = QUANTILE,
    pixels: tuple[np.ndarray, np.ndarray] | None = None,
    combine: str = "sum",
    layer: str = LAYER,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit the Gaussian on training features (N, D) of the classifier's ``layer`` (what
    :meth:`ModelStats.feature_inputs` reads) and set the threshold at ``quantile`` of the
    val features' scores. ``pixels``: the same images' :func:`pixel_features`, training and
    val, for the pixel Gaussian (see :class:`ModelStats`); each score's scale is the
    ``quantile`` of its own val scores, the two scaled scores are joined by ``combine``
    (``sum`` or ``max``), and the threshold is the ``quantile`` of that.

    Without a val split, every :data:`HOLD_OUT`-th training image is held out of the fit and
    the threshold set on those: a threshold taken from the scores of the images a Gaussian
    was fitted on flags far more than 5% of new images like them (they score lower than new
    ones), and one cross-fitted on folds is off the other way (each fold's Gaussian, fitted
    on fewer images, is a worse fit than the one stored). Returns the tensors (``ood_mean``,
    ``ood_projection``, ``ood_threshold``, with pixels ``ood_pixel_mean``,
    ``ood_pixel_projection``, ``ood_scales``) and a description for the metadata."""
    x = np.asarray(train, dtype=np.float64)
    n, size = x.shape
    if n < 4:
        raise StatsError(f"{n} training images are too few to fit out-of-distribution statistics")
    sets = [(x, np.asarray(val, dtype=np.float64))]
    if pixels is not None:
        sets.append(tuple(np.asarray(p, dtype=np.float64) for p in pixels))
    if len(val):
        split = "val"
        parts = [(fit, ref) for fit, ref in sets]
    elif n >= 4 * HOLD_OUT:
        held = np.arange(n) % HOLD_OUT == HOLD_OUT - 1
        split = f"held out of the fit (every {HOLD_OUT}th image)"
        parts = [(fit[~held], fit[held]) for fit, _ in sets]
    else:  # too few to hold any out: the fit images' own scores, as the metadata says
        split = "train"
        parts = [(fit, fit) for fit, _ in sets]
    fitted = [_gaussian(fit) for fit, _ in parts]
    reference = [
        gaussian_scores(m, p, ref) for (m, p, _), (_, ref) in zip(fitted, parts, strict=True)
    ]
    (mean, projection, dims) = fitted[0]
    tensors = {"ood_mean": mean, "ood_projection": projection}
    info = {
        "detector": "mahalanobis-pca",
        "features": LAYER_NAMES[layer],
        "layer": layer,
        "dims": dims,
        "shrinkage": SHRINK,
        "fitted_on": {"images": len(parts[0][0])},
    }
    combined = reference[0]
    if pixels is not None:
        scales = np.array([np.quantile(r.astype(np.float64), quantile) for r in reference])
        scales = np.maximum(scales, 1e-6).astype(np.float32)
        join = {"sum": np.add, "max": np.maximum}[combine]
        combined = join(reference[0] / scales[0], reference[1] / scales[1])
        tensors.update(
            ood_pixel_mean=fitted[1][0], ood_pixel_projection=fitted[1][1], ood_scales=scales
        )
        info["detector"] = "mahalanobis-pca+pixels"
        info["pixels"] = {"grid": PIXEL_GRID, "dims": fitted[1][2]}
        info["combine"] = combine
    threshold = float(np.quantile(combined.astype(np.float64), quantile))
    tensors["ood_threshold"] = np.array(threshold, dtype=np.float32)
    info["threshold"] = {"quantile": quantile, "split": split, "images": len(parts[0][1])}
    return tensors, info


LAYER_NAMES = {
    "first": "classifier's first stage, 4x4 position blocks",
    "last": "classifier's last feature map, 2x2 position blocks",
}
HOLD_OUT = 5  # without a val split, every 5th fit image sets the threshold instead


def _gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The mean (D,) and whitening projection (D, d) of features ``x`` (N, D), float32, and
    d: the top principal directions, each variance raised by the shrinkage."""
    n, size = x.shape
    mean = x.mean(axis=0)
    centred = x - mean
    # principal directions from the covariance's eigenvectors, largest variance first
    variance, vectors = np.linalg.eigh(centred.T @ centred / n)
    dims = int(min(DIMS, n // 2, size))
    variance, vectors = variance[::-1][:dims], vectors[:, ::-1][:, :dims]
    variance = np.maximum(variance, 0.0) + SHRINK * max(float(variance.mean()), 1e-12)
    projection = (vectors / np.sqrt(variance)).astype(np.float32)
    return mean.astype(np.float32), projection, dims


# --------------------------------------------------------------------------- checkpoint
def expected_shapes(meta: dict[str, Any], width: int) -> dict[str, tuple[int, ...]]:
    """The shapes the ``stats/`` tensors of a checkpoint must have, from its metadata and
    its classifier's width, checked before any is read."""
    layer, combine = layout(meta)
    size = feature_size(width, layer, int(meta.get("image_size") or 64))
    dims = (meta.get(META_KEY) or {}).get("ood", {}).get("dims")
    if type(dims) is not int or not 1 <= dims <= size:
        raise StatsError(f"damaged metadata (out-of-distribution dims {dims!r})")
    shapes = {
        "ood_mean": (size,),
        "ood_projection": (size, dims),
        "ood_threshold": (),
        "temperature": (),
    }
    pixels = (meta.get(META_KEY) or {}).get("ood", {}).get("pixels")
    if pixels is not None:
        cells = PIXEL_GRID * PIXEL_GRID
        pixel_dims = pixels.get("dims") if isinstance(pixels, dict) else None
        if type(pixel_dims) is not int or not 1 <= pixel_dims <= cells:
            raise StatsError(f"damaged metadata (pixel dims {pixel_dims!r})")
        shapes.update(
            ood_pixel_mean=(cells,), ood_pixel_projection=(cells, pixel_dims), ood_scales=(2,)
        )
    return shapes


def layout(meta: dict[str, Any]) -> tuple[str, str]:
    """Which map of the classifier a checkpoint's statistics read, and how the pixel score
    joins theirs, from its metadata; a model fitted before the first-stage detector says
    neither (the last map, the larger score)."""
    fit = (meta.get(META_KEY) or {}).get("ood", {})
    fit = fit if isinstance(fit, dict) else {}
    layer, combine = fit.get("layer", "last"), fit.get("combine", "max")
    if layer not in LAYER_NAMES or combine not in ("sum", "max"):
        raise StatsError(f"damaged metadata (layer {layer!r}, combine {combine!r})")
    return layer, combine


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
    for key in ("ood_projection", "ood_pixel_projection"):
        if key in values and not np.abs(values[key]).sum(axis=0).all():
            raise StatsError("its out-of-distribution projection has a direction of zeros")
    pixels = None
    if "ood_pixel_mean" in values:
        if not (values["ood_scales"] > 0).all():
            raise StatsError(f"its out-of-distribution scales {values['ood_scales']} are unusable")
        pixels = PixelStats(
            values["ood_pixel_mean"],
            values["ood_pixel_projection"],
            values["ood_scales"],
            combine=layout(meta)[1],
        )
    return ModelStats(
        mean=values["ood_mean"],
        projection=values["ood_projection"],
        threshold=threshold,
        temperature=temperature,
        info=dict(meta[META_KEY]),
        pixels=pixels,
        layer=layout(meta)[0],
    )


def describe_fit(fit: dict[str, Any] | None, short: bool = True) -> str:
    """How a detector was fitted, from the ``info`` :func:`fit_ood` wrote: ``4683 img, 256+16
    dir`` (features + pixels), or in words; ``–`` where unknown."""
    if not fit:
        return "–"
    images = (fit.get("fitted_on") or {}).get("images", "?")
    pixels = (fit.get("pixels") or {}).get("dims")
    dims = f"{fit.get('dims', '?')}" + (f"+{pixels}" if pixels else "")
    if short:
        return f"{images} img, {dims} dir"
    threshold = (fit.get("threshold") or {}).get("split", "?")
    return f"{images} images, {dims} directions (features + pixels), threshold on {threshold}"
