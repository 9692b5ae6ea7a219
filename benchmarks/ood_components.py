"""Candidate out-of-distribution detectors measured from cached features: docs/ood.md,
"Components measured (issue 23)".

    python benchmarks/ood_components.py DATASET --checkpoint FILE --cache FILE.npz
        [--external ../shared/data/external-dev]

The first run extracts, once, what every candidate reads, for the whole train split, val,
test and each external source (images loaded as classify loads them): the images themselves
(uint8, at the model's size), and each stage of the classifier's body averaged over 4x4
equal blocks of positions and each stage's per-channel standard deviation over positions,
from the NumPy engine's forward pass (what classify computes). It stores them in the cache
(an .npz, kept out of the repository: it holds features of the data); later runs read it.

Then every candidate is fitted on the whole train split (the set training fits on, less the
pool) and scored; its threshold is the 95th percentile of the val split's scores, the
external sources only measure (AUROC against the test split and the share flagged). Nothing
is chosen on the test split: it only gives its flagged share.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ood_compare import external_pixels  # a script beside this one

from threengan_cli.data.datasets import load_prepared
from threengan_cli.infer import numpy_engine, ood
from threengan_cli.metrics import roc_auc

SPLITS = ("train", "val", "test")
GRID = 4  # every stage is cached as 4x4 blocks of positions


def extract(model, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Each stage of the classifier's body as 4x4 position blocks (B, 4, 4, C) and as its
    per-channel standard deviation over positions (B, C), as the NumPy engine computes."""
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(pixels), 64):
        x = pixels[start : start + 64].astype(np.float32)[..., None] * np.float32(model.scale)
        x = x + np.float32(model.offset)
        for stage, (kernel, shift) in enumerate(model.layers, 1):
            x = numpy_engine._conv(x, kernel, 4, stride=2, pad=1)
            if shift is not None:
                x += shift
            np.maximum(x, x * np.float32(0.2), out=x)
            b, h, w, c = x.shape
            blocks = x.reshape(b, GRID, h // GRID, GRID, w // GRID, c).mean(axis=(2, 4))
            out.setdefault(f"s{stage}", []).append(blocks.astype(np.float32))
            out.setdefault(f"s{stage}std", []).append(x.std(axis=(1, 2)).astype(np.float32))
    return {k: np.concatenate(v) for k, v in out.items()}


def build_cache(dataset: Path, checkpoint: Path, external: Path, cache: Path) -> None:
    model = numpy_engine.load(checkpoint)
    prepared = load_prepared(dataset)
    sets = {name: prepared.subset(name)[0] for name in SPLITS}
    for name, pixels in external_pixels(external, model.image_size, model.fit).items():
        sets[f"ext_{name}"] = pixels
    arrays = {}
    for name, pixels in sets.items():
        arrays[f"{name}/pixels"] = pixels
        for key, value in extract(model, pixels).items():
            arrays[f"{name}/{key}"] = value
        print(f"cached {name}: {len(pixels)} images", flush=True)
    np.savez(cache, **arrays)


# ------------------------------------------------------------------------------ features
def pixel_blocks(pixels: np.ndarray, grid: int) -> np.ndarray:
    b, h, w = pixels.shape
    sums = pixels.reshape(b, grid, h // grid, grid, w // grid).sum(axis=(2, 4), dtype=np.int64)
    return (sums.reshape(b, -1) / (255.0 * (h // grid) * (w // grid))).astype(np.float32)


def pixel_block_std(pixels: np.ndarray, grid: int) -> np.ndarray:
    b, h, w = pixels.shape
    x = pixels.reshape(b, grid, h // grid, grid, w // grid).astype(np.int64)
    n = (h // grid) * (w // grid)
    s1, s2 = x.sum(axis=(2, 4)), np.square(x).sum(axis=(2, 4))
    var = (s2 * n - s1 * s1) / (n * n * 255.0**2)
    return np.sqrt(var).reshape(b, -1).astype(np.float32)


def gradient_blocks(pixels: np.ndarray, grid: int) -> np.ndarray:
    """Mean absolute horizontal + vertical difference in each block: how sharp it is."""
    x = pixels.astype(np.int64)
    d = np.zeros_like(x)
    d[:, :, :-1] += np.abs(np.diff(x, axis=2))
    d[:, :-1, :] += np.abs(np.diff(x, axis=1))
    b, h, w = x.shape
    sums = d.reshape(b, grid, h // grid, grid, w // grid).sum(axis=(2, 4))
    return (sums.reshape(b, -1) / (255.0 * (h // grid) * (w // grid))).astype(np.float32)


def intensity_histogram(pixels: np.ndarray, bins: int = 16) -> np.ndarray:
    """Each image's share of pixels in ``bins`` equal intensity bins: its exposure and contrast."""
    counts = [np.bincount(x.ravel() // (256 // bins), minlength=bins) for x in pixels]
    return (np.stack(counts) / pixels[0].size).astype(np.float32)


def intensity_quantiles(pixels: np.ndarray) -> np.ndarray:
    """Each image's 2nd, 8th, ..., 98th intensity percentiles (17 values), in [0, 1]."""
    levels = np.linspace(0.02, 0.98, 17)
    return (np.quantile(pixels.reshape(len(pixels), -1), levels, axis=1).T / 255.0).astype(
        np.float32
    )


def stage_blocks(blocks: np.ndarray, grid: int) -> np.ndarray:
    """Cached (B, 4, 4, C) blocks -> (B, grid * grid * C), averaged to ``grid``."""
    b, g, _, c = blocks.shape
    f = g // grid
    return blocks.reshape(b, grid, f, grid, f, c).mean(axis=(2, 4)).reshape(b, -1)


def fit_gaussian(train: np.ndarray, dims: int, shrink: float) -> Callable[[np.ndarray], np.ndarray]:
    """ood's Gaussian (principal directions, shrinkage) with the given settings: a scorer."""
    x = np.asarray(train, dtype=np.float64)
    mean = x.mean(axis=0)
    c = x - mean
    variance, vectors = np.linalg.eigh(c.T @ c / len(x))
    d = int(min(dims, len(x) // 2, x.shape[1]))
    variance, vectors = variance[::-1][:d], vectors[:, ::-1][:, :d]
    variance = np.maximum(variance, 0.0) + shrink * max(float(variance.mean()), 1e-12)
    projection = vectors / np.sqrt(variance)

    def score(v: np.ndarray) -> np.ndarray:
        z = (np.asarray(v, dtype=np.float64) - mean) @ projection
        return np.square(z).mean(axis=1)

    return score


class Components:
    """Candidate detectors' scores, one row per named combination."""

    def __init__(self, cache: dict[str, np.ndarray], fit_split: str = "train"):
        self.cache = cache
        self.fit_split = fit_split
        self.sets = ["val", "test"] + sorted(
            k.split("/")[0] for k in cache if k.startswith("ext_") and k.endswith("/pixels")
        )
        self.memo: dict[tuple, dict[str, np.ndarray]] = {}

    def features(self, kind: str, name: str) -> np.ndarray:
        """``kind``: ``pixG`` (pixels in GxG blocks), ``pixstdG`` (their standard deviations),
        ``gradG`` (sharpness in GxG blocks), ``hist`` / ``quant`` (the intensity histogram /
        percentiles), ``sS:G`` (stage S in GxG blocks), ``sSstd`` (stage S's channel standard
        deviations); ``a+b`` joins two kinds in one Gaussian."""
        c = self.cache
        if "+" in kind:
            return np.concatenate([self.features(k, name) for k in kind.split("+")], axis=1)
        if kind == "hist":
            return intensity_histogram(c[f"{name}/pixels"])
        if kind == "quant":
            return intensity_quantiles(c[f"{name}/pixels"])
        if kind.startswith("pixstd"):
            return pixel_block_std(c[f"{name}/pixels"], int(kind[6:]))
        if kind.startswith("grad"):
            return gradient_blocks(c[f"{name}/pixels"], int(kind[4:]))
        if kind.startswith("pix"):
            return pixel_blocks(c[f"{name}/pixels"], int(kind[3:]))
        if kind.endswith("std"):
            return c[f"{name}/{kind}"]
        stage, grid = kind.split(":")
        return stage_blocks(c[f"{name}/{stage}"], int(grid))

    def scores(self, kind: str, dims: int = 256, shrink: float = 0.01) -> dict[str, np.ndarray]:
        key = (kind, dims, shrink)
        if key not in self.memo:
            score = fit_gaussian(self.features(kind, self.fit_split), dims, shrink)
            self.memo[key] = {s: score(self.features(kind, s)) for s in self.sets}
        return self.memo[key]


def scaled(parts: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Each component's scores divided by the 95th percentile of its val scores."""
    return [{k: v / np.quantile(p["val"], 0.95) for k, v in p.items()} for p in parts]


def combine(parts: list[dict[str, np.ndarray]], how: str) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    parts = scaled(parts)
    keys = parts[0].keys()
    if how == "max":
        return {k: np.max([p[k] for p in parts], axis=0) for k in keys}
    if how == "sum":
        return {k: np.sum([p[k] for p in parts], axis=0) for k in keys}
    if how == "logsum":  # a product of the scaled scores
        return {k: np.sum([np.log(p[k]) for p in parts], axis=0) for k in keys}
    raise ValueError(how)


def row(name: str, scores: dict[str, np.ndarray], sets: list[str], quantile: float = 0.95) -> str:
    threshold = np.quantile(scores["val"], quantile)
    cells, flagged = [f"{np.mean(scores['test'] > threshold):.3f}"], []
    for source in sets:
        if not source.startswith("ext_"):
            continue
        is_ood = np.r_[np.zeros(len(scores["test"]), bool), np.ones(len(scores[source]), bool)]
        auroc = roc_auc(is_ood, np.r_[scores["test"], scores[source]])
        flagged.append(scores[source] > threshold)
        cells.append(f"{auroc:.3f}, {np.mean(flagged[-1]):.2f}")
    cells.append(f"{np.mean(np.concatenate(flagged)):.3f}")
    return f"| {name} | " + " | ".join(cells) + " |"


CANDIDATES: list[tuple[str, list[tuple], str]] = [
    # (row name, [(feature kind, dims, shrink), ...], how the scaled scores combine)
    ("last map 2x2 (256) + pixels 4x4, max: shipped", [("s4:2",), ("pix4",)], "max"),
    ("last map 2x2 (256)", [("s4:2",)], "max"),
    ("pixels 4x4", [("pix4",)], "max"),
    ("pixels 8x8", [("pix8",)], "max"),
    ("pixels 4x4 + 8x8, max", [("pix4",), ("pix8",)], "max"),
    ("pixels 4x4 + 8x8, sum", [("pix4",), ("pix8",)], "sum"),
    ("stage 1, 1x1 + std", [("s1:1+s1std",)], "max"),
    ("stage 1, 2x2", [("s1:2",)], "max"),
    ("stage 1, 4x4", [("s1:4",)], "max"),
    ("stage 2, 1x1 + std", [("s2:1+s2std",)], "max"),
    ("stage 2, 2x2", [("s2:2",)], "max"),
    ("stage 2, 4x4", [("s2:4",)], "max"),
    ("stage 3, 2x2", [("s3:2",)], "max"),
    ("last map 2x2, 64 dirs", [("s4:2", 64)], "max"),
    ("last map 2x2, 0.1 shrink", [("s4:2", 256, 0.1)], "max"),
    ("shipped, sum", [("s4:2",), ("pix4",)], "sum"),
    ("shipped, logsum", [("s4:2",), ("pix4",)], "logsum"),
    ("pixels 4x4 means + sds (32 dims)", [("pix4+pixstd4",)], "max"),
    ("last map 2x2 + pixels 4x4 means + sds, max", [("s4:2",), ("pix4+pixstd4",)], "max"),
    ("last map 2x2 + pixels 4x4 means + sds, sum", [("s4:2",), ("pix4+pixstd4",)], "sum"),
    ("stage 1 4x4 + pixels 4x4, sum", [("s1:4",), ("pix4",)], "sum"),
    ("stage 1 4x4 + pixels 4x4 means + sds, sum", [("s1:4",), ("pix4+pixstd4",)], "sum"),
    ("last 2x2 + stage 1 4x4 + pixels 4x4, sum", [("s4:2",), ("s1:4",), ("pix4",)], "sum"),
    ("last 2x2 + pix4 + pix8, max", [("s4:2",), ("pix4",), ("pix8",)], "max"),
    ("last 2x2 + pix4 + pix8, sum", [("s4:2",), ("pix4",), ("pix8",)], "sum"),
    ("last 2x2 + pix4 + s1 1x1+std, max", [("s4:2",), ("pix4",), ("s1:1+s1std",)], "max"),
    ("last 2x2 + pix4 + s1 1x1+std, sum", [("s4:2",), ("pix4",), ("s1:1+s1std",)], "sum"),
    ("last 2x2 + pix4 + s2 2x2, max", [("s4:2",), ("pix4",), ("s2:2",)], "max"),
    ("last 2x2 + pix4 + s2 2x2, sum", [("s4:2",), ("pix4",), ("s2:2",)], "sum"),
    # Tried after the first stage was shipped: sharpness and exposure, and the first stage's
    # own variants (docs/ood.md, "Tried since").
    ("sharpness 4x4", [("grad4",)], "max"),
    ("sharpness 8x8", [("grad8",)], "max"),
    ("intensity histogram (16 bins)", [("hist",)], "max"),
    ("intensity percentiles (17)", [("quant",)], "max"),
    ("stage 1 4x4 + pixels 4x4 + sharpness 4x4, sum", [("s1:4",), ("pix4",), ("grad4",)], "sum"),
    ("stage 1 4x4 + pixels and sharpness 4x4, sum", [("s1:4",), ("pix4+grad4",)], "sum"),
    ("stage 1 4x4 + pixels 4x4 + histogram, sum", [("s1:4",), ("pix4",), ("hist",)], "sum"),
    ("stage 1 4x4 + pixels 4x4 and percentiles, sum", [("s1:4",), ("pix4+quant",)], "sum"),
    ("stage 1 4x4 + std + pixels 4x4, sum", [("s1:4+s1std",), ("pix4",)], "sum"),
    ("stage 1 4x4 + stage 2 4x4 + pixels 4x4, sum", [("s1:4",), ("s2:4",), ("pix4",)], "sum"),
    ("stage 1 4x4 (128 dirs) + pixels 4x4, sum", [("s1:4", 128), ("pix4",)], "sum"),
    ("stage 1 4x4 (512 dirs) + pixels 4x4, sum", [("s1:4", 512), ("pix4",)], "sum"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--external", type=Path, default=Path("../shared/data/external-dev"))
    parser.add_argument("--only", help="rows whose name contains this")
    parser.add_argument(
        "--quantile", type=float, default=0.95, help="of val's scores: the threshold"
    )
    args = parser.parse_args()
    if not args.cache.is_file():
        build_cache(args.dataset, args.checkpoint, args.external, args.cache)
    with np.load(args.cache) as npz:
        cache = {k: npz[k] for k in npz.files}
    comps = Components(cache)
    sources = [s.removeprefix("ext_") for s in comps.sets if s.startswith("ext_")]
    head = " | ".join(f"{name}: AUROC, flagged" for name in sources)
    print(f"| detector | test flagged | {head} | adult X-rays flagged |")
    print("| --- | ---: |" + " ---: |" * (len(sources) + 1))
    for name, parts, how in CANDIDATES:
        if args.only and args.only not in name:
            continue
        scores = combine([comps.scores(*p) for p in parts], how)
        print(row(name, scores, comps.sets, args.quantile), flush=True)
    product = product_scores(comps)
    print(row("ood.fit_ood as training fits it", product, comps.sets, args.quantile))


def product_scores(comps: Components) -> dict[str, np.ndarray]:
    """The shipped detector itself (ood.fit_ood, ood.ModelStats.scores) on the cache."""
    kind = {"first": "s1:4", "last": "s4:2"}[ood.LAYER]
    feats = {s: comps.features(kind, s) for s in ["train", *comps.sets]}
    grids = {s: ood.pixel_features(comps.cache[f"{s}/pixels"]) for s in ["train", *comps.sets]}
    tensors, info = ood.fit_ood(feats["train"], feats["val"], pixels=(grids["train"], grids["val"]))
    tensors["temperature"] = np.float32(1.0)
    stats = ood.from_arrays(tensors, {ood.META_KEY: {"ood": info}})
    return {s: stats.scores(feats[s], grids[s]) for s in comps.sets}


if __name__ == "__main__":
    main()
