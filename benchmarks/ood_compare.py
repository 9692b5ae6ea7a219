"""Out-of-distribution detectors compared on one model: the table of docs/ood.md.

    python benchmarks/ood_compare.py DATASET [--checkpoint FILE]
        [--external ../shared/data/external-dev]

DATASET is the prepared dataset the model was trained on; the model's settings pick its
training images from it (as tools/add_model_statistics.py does). Every detector is fitted
on those training images, its threshold set at the 95th percentile of the val split's
scores, and measured on the test split (the share flagged) and on each source under
--external (AUROC against the test split, share flagged). Nothing is tuned on the external
sources; they only measure. Candidates:

- output-based: maximum softmax probability, energy (logsumexp of the logits);
- kNN distance in L2-normalised feature space (Sun et al., ICML 2022), k = 10;
- Mahalanobis with class means and a shared covariance (Lee et al., NeurIPS 2018) on
  features pooled over positions (mean; mean and std) of one stage or of all;
- Gaussians in the top principal directions of the last feature map, whole (4x4
  positions) or in 2x2 blocks of positions: the last is the feature Gaussian threengan
  ships (ood.py), fitted here on the labelled images; the pixel Gaussian shipped beside it
  and the whole-train-split fit are measured by benchmarks/ood_fitsets.py;
- the 8x8-downsampled pixels themselves, as a baseline that needs no model;
- with --checkpoint a run's checkpoint that keeps D (a run's last.safetensors; the bundled
  model has none): the discriminator's score, minus its "real" logit (D was trained to tell
  real X-rays from generated ones).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from threengan_cli.core.settings import TrainSettings
from threengan_cli.data import images
from threengan_cli.data.datasets import load_prepared
from threengan_cli.data.training_data import load_run_data
from threengan_cli.data.walk import image_files
from threengan_cli.infer import numpy_engine, ood
from threengan_cli.metrics import roc_auc
from threengan_cli.model import modelfile


def external_pixels(folder: Path, size: int, fit: str) -> dict[str, np.ndarray]:
    """Each source folder under ``folder`` (external-dev's) -> its images at the model's size,
    decoded as classify decodes them, found by the project's one folder walker. The other
    ood scripts (ood_fitsets, ood_components) read the sources through this too."""
    return {
        source.name: np.stack([images.load_image(f, size, fit) for f in image_files(str(source))])
        for source in sorted(p for p in folder.iterdir() if p.is_dir())
    }


def activations(model, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Per stage: pooled mean and std over positions; the last map, whole and in 2x2 blocks;
    the logits; the pixels downsampled to 8x8."""
    out: dict[str, list] = {}

    def forward(chunk):
        x = chunk.astype(np.float32)[..., None] * np.float32(model.scale)
        x = x + np.float32(model.offset)
        found = {}
        for j, (kernel, shift) in enumerate(model.layers):
            x = numpy_engine._conv(x, kernel, 4, stride=2, pad=1)
            if shift is not None:
                x += shift
            np.maximum(x, x * np.float32(0.2), out=x)
            found[f"mean{j}"] = x.mean(axis=(1, 2))
            found[f"std{j}"] = x.std(axis=(1, 2))
        found["map"] = x.reshape(len(x), -1)
        found["blocks"] = ood.pooled_features(x)
        kernel, bias = model.head
        found["logits"] = numpy_engine._conv(x, kernel, 4, stride=1, pad=0).reshape(len(x), -1)
        found["logits"] = found["logits"] + bias
        return found

    for start in range(0, len(pixels), 64):
        for key, value in forward(pixels[start : start + 64]).items():
            out.setdefault(key, []).append(value)
    result = {k: np.concatenate(v) for k, v in out.items()}
    size = pixels.shape[-1]
    result["pixels"] = (pixels.astype(np.float32) / 255).reshape(
        len(pixels), 8, size // 8, 8, size // 8
    ).mean(axis=(2, 4)).reshape(len(pixels), -1)
    return result


def discriminator_logits(checkpoint: Path, pixels: np.ndarray) -> np.ndarray | None:
    """D's "real" logit of every image, in fp32; None where the checkpoint holds no D."""
    from threengan_cli.model import checkpoints
    from threengan_cli.model.methods import METHODS
    from threengan_cli.model.networks import to_model_range

    ckpt = checkpoints.load(checkpoint)
    # D is a training network: its weights to use are its live ones (a run's last checkpoint
    # keeps averaged weights under use/ for G and C only)
    prefix = ckpt.weights_prefix if "D" in ckpt.network_names else "net"
    if not ckpt.group(f"{prefix}/D"):
        return None
    settings = TrainSettings.from_stored(ckpt.meta["settings"])
    nets = METHODS[ckpt.meta["method"]].networks(
        settings, ckpt.meta["num_classes"], ckpt.meta["image_size"]
    )
    d = nets["D"]
    checkpoints.restore_networks(ckpt, {"D": d}, prefix=prefix)
    d.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), 64):
            chunk = pixels[start : start + 64]
            x = torch.from_numpy(chunk).reshape(len(chunk), *chunk.shape[-2:])
            out.append(d(to_model_range(x)).reshape(len(x), -1)[:, 0].float().numpy())
    return np.concatenate(out)[:, None]


def mahalanobis(train, labels, shrink=0.1):
    """Class means, one covariance shrunk toward its mean variance; distance to the nearest."""
    means = np.stack([train[labels == c].mean(0) for c in np.unique(labels)])
    centred = train - means[labels]
    cov = centred.T @ centred / len(train)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = np.linalg.pinv(cov)
    return lambda x: np.min([(((x - m) @ precision) * (x - m)).sum(1) for m in means], axis=0)


def principal(train, dims):
    """One Gaussian in the top ``dims`` principal directions, as ood.fit_ood fits it (by an
    SVD of the data, cheaper than the covariance's eigenvectors where D > N)."""
    mean = train.mean(0)
    _, singular, vt = np.linalg.svd(train - mean, full_matrices=False)
    dims = min(dims, len(train) // 2, len(singular))
    variance = singular**2 / len(train)
    kept = variance[:dims] + ood.SHRINK * variance[:dims].mean()
    projection = vt[:dims].T / np.sqrt(kept)
    return lambda x: (((x - mean) @ projection) ** 2).mean(1)


def shipped(train):
    """ood.fit_ood itself, as training fits it."""
    tensors, info = ood.fit_ood(train, train[:1])
    stats = ood.ModelStats(tensors["ood_mean"], tensors["ood_projection"], 0.0, 1.0, info)
    return lambda x: stats.scores(x.astype(np.float32))


def knn(train, k=10):
    """Minus the cosine similarity to the k-th nearest training image."""
    bank = train / np.linalg.norm(train, axis=1, keepdims=True)
    return lambda x: -np.sort((x / np.linalg.norm(x, axis=1, keepdims=True)) @ bank.T, 1)[:, -k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--external", type=Path, default=Path("../shared/data/external-dev"))
    args = parser.parse_args()
    model = numpy_engine.load(args.checkpoint)
    meta = modelfile.read_meta(model.path)
    settings = TrainSettings.from_stored(meta["settings"])
    data = load_run_data(load_prepared(args.dataset), settings, torch.device("cpu"))
    pixels = {
        "train": data.train_x.numpy(),
        "val": data.val_x.numpy(),
        "test": data.test_x.numpy(),
    }
    pixels.update(external_pixels(args.external, model.image_size, model.fit))
    acts = {name: activations(model, p) for name, p in pixels.items()}
    for name, p in pixels.items():
        d = discriminator_logits(model.path, p)
        if d is not None:
            acts[name]["d"] = d
    labels = data.train_y.numpy()
    last = len(model.layers) - 1

    def both(j):
        return lambda a: np.c_[a[f"mean{j}"], a[f"std{j}"]]

    def logits(a):
        return a["logits"][:, : model.keep]

    candidates = {
        "max softmax probability": (logits, lambda t: lambda x: -_softmax(x).max(1)),
        "energy": (logits, lambda t: lambda x: -np.log(np.exp(x.astype(np.float64)).sum(1))),
        "kNN, last stage pooled (k=10)": (lambda a: a[f"mean{last}"], knn),
        "kNN, first stage pooled (k=10)": (lambda a: a["mean0"], knn),
        "Mahalanobis, last stage pooled (mean)": (
            lambda a: a[f"mean{last}"], lambda t: mahalanobis(t, labels, 0.0)
        ),
        "Mahalanobis, last stage pooled (mean, std)": (
            both(last), lambda t: mahalanobis(t, labels)
        ),
        "Mahalanobis, every stage pooled (mean, std)": (
            lambda a: np.concatenate([both(j)(a) for j in range(last + 1)], 1),
            lambda t: mahalanobis(t, labels),
        ),
        "pixels 8x8, Gaussian (all 64 directions)": (
            lambda a: a["pixels"], lambda t: principal(t, 64)
        ),
        "last map, 4x4 positions, principal directions (256)": (
            lambda a: a["map"], lambda t: principal(t, 256)
        ),
        "last map, 2x2 blocks, principal directions (256): shipped": (
            lambda a: a["blocks"], shipped
        ),
    }
    if "d" in acts["train"]:
        candidates["discriminator (minus its real logit)"] = (
            lambda a: a["d"], lambda t: lambda x: -x[:, 0]
        )
    external = [name for name in pixels if name not in ("train", "val", "test")]
    head = " | ".join(f"{name}: AUROC, flagged" for name in external)
    print(f"| detector | test flagged | {head} |")
    print("| --- | ---: |" + " ---: |" * len(external))
    for name, (features, fit) in candidates.items():
        score = fit(features(acts["train"]))
        scores = {k: score(features(v)) for k, v in acts.items() if k != "train"}
        threshold = np.quantile(scores["val"], 0.95)
        cells = [f"{np.mean(scores['test'] > threshold):.3f}"]
        for source in external:
            n_in, n_out = len(scores["test"]), len(scores[source])
            is_ood = np.r_[np.zeros(n_in, bool), np.ones(n_out, bool)]
            auroc = roc_auc(is_ood, np.r_[scores["test"], scores[source]])
            cells.append(f"{auroc:.3f}, {np.mean(scores[source] > threshold):.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


if __name__ == "__main__":
    main()
