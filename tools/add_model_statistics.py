"""Fit a model's out-of-distribution statistics and temperature afresh and store them in it:
for a model trained before threengan fitted them at the end of every run (the bundled
default among them), or after its weights were converted (fp16 storage).

    python tools/add_model_statistics.py CHECKPOINT DATASET [--out FILE]

DATASET is the prepared dataset the model was trained on (``threengan prepare``). The
model's own settings (size, seed, unlabelled pool) pick its training images from it exactly
as training did; the temperature and the threshold come from the dataset's val split. The
test split is not read. The weights are copied unchanged; only ``stats/`` tensors and the
metadata's ``stats`` entry are added (or replaced).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from threengan_cli.core.settings import TrainSettings
from threengan_cli.data.datasets import load_prepared
from threengan_cli.data.training_data import load_run_data
from threengan_cli.infer.torch_engine import load_model
from threengan_cli.model import checkpoints
from threengan_cli.model.methods import METHODS
from threengan_cli.train import scoring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--out", type=Path, help="where to write (default: over CHECKPOINT)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(args.checkpoint, device="cpu")
    ckpt = checkpoints.load(args.checkpoint)
    settings = TrainSettings.from_stored(ckpt.meta["settings"])
    data = load_run_data(load_prepared(args.dataset), settings, torch.device("cpu"))
    data.test_x, data.test_y = data.test_x[:0], data.test_y[:0]  # never read here
    if list(data.classes) != list(model.classes):
        raise SystemExit(f"{args.dataset} has classes {data.classes}, the model {model.classes}")
    nets = {model.classifier: model.nets[model.classifier].float()}
    fitted = scoring.model_statistics(METHODS[model.method], nets, data)
    if fitted is None:
        raise SystemExit("too few training images to fit statistics")
    tensors, info = fitted
    meta = {**ckpt.meta, "stats": info}
    prefix = ckpt.weights_prefix
    meta.pop("weights", None)  # the weights to use are stored as net/ below
    kept = {name: ckpt.group(f"{prefix}/{name}") for name in ckpt.network_names}
    out = args.out or args.checkpoint
    checkpoints.save(out, meta, kept, stats=tensors)
    print(
        f"{out}: {out.stat().st_size / 1e6:.1f} MB; fitted on {info['ood']['fitted_on']}, "
        f"{info['ood']['dims']} directions, ood threshold {float(tensors['ood_threshold']):.4f}, "
        f"temperature {float(tensors['temperature']):.4f} (val, {info['temperature']['images']})"
    )


if __name__ == "__main__":
    main()
