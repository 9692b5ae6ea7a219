"""What the shipped out-of-distribution detector gains from its fit set and its pixel
Gaussian, on one model: the table of docs/ood.md, "A detector for every run".

    python benchmarks/ood_fitsets.py DATASET [--checkpoint FILE]
        [--external ../shared/data/external-dev]

DATASET is the prepared dataset the model was trained on; the model's settings pick its
labelled images from it (as tools/add_model_statistics.py does). Rows: the feature Gaussian
(ood.py's, 2x2 blocks of the last map) fitted on the N labelled images only (what runs did
before) and on the whole train split; the pixel Gaussian alone (4x4 blocks, 16 directions);
and ``ood.fit_ood`` itself with both, as training fits it. Every threshold is the 95th
percentile of the val split's scores; the external sources only measure (AUROC against the
test split, share flagged), nothing is chosen on them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from ood_compare import external_pixels  # a script beside this one

from threengan_cli.core.settings import TrainSettings
from threengan_cli.data.datasets import load_prepared
from threengan_cli.data.training_data import load_run_data
from threengan_cli.infer import numpy_engine, ood
from threengan_cli.metrics import roc_auc
from threengan_cli.model import modelfile


def blocks(model, pixels: np.ndarray) -> np.ndarray:
    """The classifier's 2x2-block features of the last map, as the NumPy engine computes."""
    out = []
    for start in range(0, len(pixels), 64):
        x = pixels[start : start + 64].astype(np.float32)[..., None] * np.float32(model.scale)
        x = x + np.float32(model.offset)
        for kernel, shift in model.layers:
            x = numpy_engine._conv(x, kernel, 4, stride=2, pad=1)
            if shift is not None:
                x += shift
            np.maximum(x, x * np.float32(0.2), out=x)
        out.append(ood.pooled_features(x))
    return np.concatenate(out)


def gaussian(train: np.ndarray):
    """ood.fit_ood's Gaussian alone, fitted on all of ``train``: a scorer of features (the
    threshold it sets on ``train[:1]`` is not used; the table sets its own on val)."""
    tensors, _ = ood.fit_ood(train, train[:1])
    return lambda x: ood.gaussian_scores(tensors["ood_mean"], tensors["ood_projection"], x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--external", type=Path, default=Path("../shared/data/external-dev"))
    args = parser.parse_args()
    model = numpy_engine.load(args.checkpoint)
    settings = TrainSettings.from_stored(modelfile.read_meta(model.path)["settings"])
    prepared = load_prepared(args.dataset)
    data = load_run_data(prepared, settings, torch.device("cpu"))
    pixels = {
        "labelled": data.train_x.numpy(),
        "whole": prepared.subset("train")[0],
        "val": data.val_x.numpy(),
        "test": data.test_x.numpy(),
    }
    pixels.update(external_pixels(args.external, model.image_size, model.fit))
    feats = {k: blocks(model, v) for k, v in pixels.items()}
    grids = {k: ood.pixel_features(v) for k, v in pixels.items()}
    shipped_t, shipped_info = ood.fit_ood(
        feats["whole"], feats["val"], pixels=(grids["whole"], grids["val"])
    )
    shipped = ood.from_arrays(
        {**shipped_t, "temperature": np.float32(1.0)}, {ood.META_KEY: {"ood": shipped_info}}
    )
    rows = {
        "features, fitted on the N labelled images": (gaussian(feats["labelled"]), feats),
        "features, fitted on the whole train split": (gaussian(feats["whole"]), feats),
        "pixels 4x4, fitted on the whole train split": (gaussian(grids["whole"]), grids),
    }
    external = [k for k in pixels if k not in ("labelled", "whole", "val", "test")]
    head = " | ".join(f"{name}: AUROC, flagged" for name in external)
    print(f"| detector | test flagged | {head} | adult X-rays flagged |")
    print("| --- | ---: |" + " ---: |" * (len(external) + 1))

    def row(name: str, scores: dict[str, np.ndarray]) -> None:
        threshold = np.quantile(scores["val"], 0.95)
        cells, flagged = [f"{np.mean(scores['test'] > threshold):.3f}"], []
        for source in external:
            is_ood = np.r_[np.zeros(len(scores["test"]), bool), np.ones(len(scores[source]), bool)]
            auroc = roc_auc(is_ood, np.r_[scores["test"], scores[source]])
            flagged.append(scores[source] > threshold)
            cells.append(f"{auroc:.3f}, {np.mean(flagged[-1]):.2f}")
        cells.append(f"{np.mean(np.concatenate(flagged)):.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    for name, (score, inputs) in rows.items():
        row(name, {k: score(v) for k, v in inputs.items() if k in ("val", "test", *external)})
    both = {k: shipped.scores(feats[k], grids[k]) for k in ("val", "test", *external)}
    row("features + pixels, whole train split (shipped)", both)


if __name__ == "__main__":
    main()
