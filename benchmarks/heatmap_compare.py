"""Which heatmap ``classify --heatmaps`` draws: the head's exact split over its 4x4 positions
(``infer.heatmap``, NumPy) against Grad-CAM (Selvaraju et al. 2017) on the finer 8x8 map
before the last stage (torch, one backward pass per batch), on the same images.

Three measurements, medians or means over the images:

- faithfulness (deletion): the 16x16-pixel block (of the 64 px input) that the map rates
  highest is replaced by the image's mean grey, and the drop of the label's evidence
  (log p_label - mean log p, what the positional map adds up to) is measured; the larger
  the drop against a random block's, the more the map points at what the model uses.
  Grad-CAM's 8x8 map is averaged to 4x4 blocks for this.
- sanity (Adebayo et al. 2018): each map against the map of the same image after the
  head's weights, then every layer's, are shuffled (same values, random places); the rank
  correlation must fall near 0 for a map that depends on what the model learnt.
- cost: milliseconds per image for the maps alone, on this CPU.

    python benchmarks/heatmap_compare.py --folder ../shared/data/kermany-chest-xray/test
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from threengan_cli.data import images
from threengan_cli.infer import numpy_engine
from threengan_cli.infer.heatmap import numpy_explained


def load_folder(folder: Path, size: int, fit: str, limit: int) -> np.ndarray:
    files = sorted(p for p in folder.rglob("*") if images.is_image_file(p))
    step = max(1, len(files) // limit)
    return np.stack([images.load_image(p, size, fit) for p in files[::step][:limit]])


def evidence_of(model, pixels: np.ndarray, label: np.ndarray) -> np.ndarray:
    """log p_label - mean_j log p_j per image (the positional map's total)."""
    probs = model.outputs_of(pixels)[0].astype(np.float64)
    logs = np.log(np.maximum(probs, 1e-30))
    return logs[np.arange(len(pixels)), label] - logs.mean(axis=1)


def positional(model, pixels: np.ndarray, label: np.ndarray) -> np.ndarray:
    maps = numpy_explained(model, pixels)[2]
    return maps[np.arange(len(pixels)), label]  # (N, 4, 4)


def gradcam(net, pixels: np.ndarray, label: np.ndarray, classes: int, temperature: float):
    """Grad-CAM on the 8x8 map after the body's third stage, for the label's centred logit
    (the same quantity the positional map splits), ReLU'd as in the paper: (N, 8, 8)."""
    import torch

    from threengan_cli.model.networks import to_model_range

    x = to_model_range(torch.from_numpy(pixels))
    layers = list(net.body.layers)
    cut = [i for i, m in enumerate(layers) if isinstance(m, torch.nn.LeakyReLU)][-2] + 1
    with torch.enable_grad():
        a = torch.nn.Sequential(*layers[:cut])(x).detach().requires_grad_(True)  # (N, C, 8, 8)
        h = torch.nn.Sequential(*layers[cut:])(a)
        logits = net.head(h).flatten(1)[:, :classes] / temperature
        centred = logits - logits.mean(dim=1, keepdim=True)
        target = centred[torch.arange(len(pixels)), torch.from_numpy(label)]
        (grad,) = torch.autograd.grad(target.sum(), a)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * a).sum(dim=1)).detach().numpy()  # (N, 8, 8)


def occluded(pixels: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Each image with its 16x16 block ``blocks[i]`` (0..15, row-major over 4x4) set to its
    mean grey."""
    out = pixels.copy()
    side = pixels.shape[1] // 4
    for i, b in enumerate(blocks):
        r, c = divmod(int(b), 4)
        out[i, r * side : (r + 1) * side, c * side : (c + 1) * side] = int(pixels[i].mean())
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort(), b.argsort().argsort()
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--n", type=int, default=624, help="images at most (spread evenly)")
    args = parser.parse_args()

    import torch

    from threengan_cli.infer.torch_engine import load_model

    model = numpy_engine.load()
    torch_model = load_model(device="cpu")
    net = torch_model.nets[torch_model.classifier]
    temperature = model.stats.temperature if model.stats is not None else 1.0
    k = len(model.classes)
    pixels = load_folder(args.folder, model.image_size, model.fit, args.n)
    n = len(pixels)
    label = model.outputs_of(pixels)[0].argmax(axis=1)
    base = evidence_of(model, pixels, label)

    t0 = time.perf_counter()
    pos = positional(model, pixels, label)
    t_pos = (time.perf_counter() - t0) / n * 1e3
    t0 = time.perf_counter()
    cam = gradcam(net, pixels, label, k, temperature)
    t_cam = (time.perf_counter() - t0) / n * 1e3
    cam4 = cam.reshape(n, 4, 2, 4, 2).mean(axis=(2, 4))

    rng = np.random.default_rng(0)
    drops = {}
    for name, blocks in (
        ("positional", pos.reshape(n, -1).argmax(axis=1)),
        ("grad-cam", cam4.reshape(n, -1).argmax(axis=1)),
        ("random block", rng.integers(0, 16, n)),
    ):
        drops[name] = base - evidence_of(model, occluded(pixels, blocks), label)

    def shuffled(array):
        return rng.permutation(array.reshape(-1)).reshape(array.shape)

    head_only = replace(model, head=(shuffled(model.head[0]), model.head[1]))
    every = replace(head_only, layers=[(shuffled(w), s) for w, s in model.layers])
    sanity = {}
    for stage, randomised in (("head", head_only), ("all layers", every)):
        other = positional(randomised, pixels, label)
        sanity[("positional", stage)] = [
            spearman(a.ravel(), b.ravel()) for a, b in zip(pos, other, strict=True)
        ]
    torch_random = load_model(device="cpu").nets[torch_model.classifier]
    with torch.no_grad():
        torch_random.head.weight.copy_(torch.from_numpy(shuffled(torch_random.head.weight.numpy())))
        other = gradcam(torch_random, pixels, label, k, temperature)
        sanity[("grad-cam", "head")] = [
            spearman(a.ravel(), b.ravel()) for a, b in zip(cam, other, strict=True)
        ]
        for module in torch_random.body.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_(torch.from_numpy(shuffled(module.weight.numpy()).copy()))
    other = gradcam(torch_random, pixels, label, k, temperature)
    sanity[("grad-cam", "all layers")] = [
        spearman(a.ravel(), b.ravel()) for a, b in zip(cam, other, strict=True)
    ]

    print(f"images: {n} from {args.folder}; model: {model.model_id}")
    print("deletion (the map's top 16x16 block set to mean grey; drop of the label's evidence,")
    print("log p_label - mean log p; larger = the map found what the model uses):")
    for name, d in drops.items():
        print(f"  {name:13s} mean drop {d.mean():+.3f}  median {np.median(d):+.3f}")
    print("sanity (rank correlation with the map after shuffling weights; near 0 = passes):")
    for (method, stage), values in sanity.items():
        print(
            f"  {method:10s} {stage:10s} mean {np.mean(values):+.3f}  |mean| of |r| "
            f"{np.mean(np.abs(values)):.3f}"
        )
    print(f"cost: positional {t_pos:.3f} ms/image (numpy), grad-cam {t_cam:.3f} ms/image (torch)")


if __name__ == "__main__":
    main()
