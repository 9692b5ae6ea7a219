"""Fit a model's out-of-distribution statistics and temperature afresh and store them in it:
for a model trained before threengan fitted them at the end of every run (the bundled
default among them), or after its weights were converted (fp16 storage).

    python tools/add_model_statistics.py CHECKPOINT DATASET [--out FILE]

DATASET is the prepared dataset the model was trained on (``threengan prepare``), by name or
folder as every threengan command takes it. The
model's own settings (size, seed, unlabelled pool) pick its training images from it exactly
as training did; the temperature and the threshold come from the dataset's val split. The
test split is not read. The weights are copied unchanged; only ``stats/`` tensors and the
metadata's ``stats`` entry are added (or replaced).

A missing checkpoint or dataset, or a dataset of another image size, fit or classes, is one
line on stderr and exit 2; a damaged checkpoint or dataset, or too few training images,
exit 1 (threengan's exit codes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from threengan_cli.core.errors import EXIT_FAIL, EXIT_USAGE


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument(
        "dataset", help="a prepared dataset: a name from threengan datasets, or a folder"
    )
    parser.add_argument("--out", type=Path, help="where to write (default: over CHECKPOINT)")
    args = parser.parse_args(argv)

    import torch

    from threengan_cli.core import paths
    from threengan_cli.core.settings import TrainSettings
    from threengan_cli.data.datasets import load_prepared
    from threengan_cli.data.sources import DatasetError
    from threengan_cli.data.training_data import DataError, load_run_data
    from threengan_cli.infer.torch_engine import load_model
    from threengan_cli.model import checkpoints, modelfile
    from threengan_cli.model.methods import METHODS
    from threengan_cli.train import scoring

    torch.manual_seed(0)
    try:
        model = load_model(args.checkpoint, device="cpu")
        ckpt = checkpoints.load(args.checkpoint)
    except modelfile.ModelNotFound as exc:
        fail(str(exc), EXIT_USAGE)
    except (modelfile.ModelError, modelfile.CheckpointError) as exc:
        fail(str(exc))
    dataset = paths.resolve_dataset(args.dataset)
    if not (dataset / "manifest.json").is_file():
        fail(
            f"no prepared dataset {args.dataset!r} (looked in {dataset}); run "
            "`threengan prepare SOURCE --name NAME` first",
            EXIT_USAGE,
        )
    try:
        prepared = load_prepared(dataset)
    except DatasetError as exc:
        fail(str(exc))
    if prepared.image_size != model.image_size:
        fail(
            f"{args.dataset} holds {prepared.image_size}px images and {args.checkpoint} takes "
            f"{model.image_size}px: give the dataset the model was trained on",
            EXIT_USAGE,
        )
    fit = prepared.manifest.get("settings", {}).get("fit", "squash")
    if fit != model.fit or list(prepared.classes) != list(model.classes):
        fail(
            f"{args.dataset} (classes {', '.join(prepared.classes)}, --fit {fit}) is not what "
            f"{args.checkpoint} was trained on (classes {', '.join(model.classes)}, --fit "
            f"{model.fit})",
            EXIT_USAGE,
        )
    settings = TrainSettings.from_stored(ckpt.meta["settings"])
    try:
        data = load_run_data(prepared, settings, torch.device("cpu"))
    except (DataError, DatasetError, ValueError) as exc:
        fail(str(exc))
    data.test_x, data.test_y = data.test_x[:0], data.test_y[:0]  # never read here
    nets = {model.classifier: model.nets[model.classifier].float()}
    fitted = scoring.model_statistics(METHODS[model.method], nets, data)
    if fitted is None:
        fail("too few training images to fit statistics")
    tensors, info = fitted
    meta = {**ckpt.meta, "stats": info}
    prefix = ckpt.weights_prefix
    meta.pop("weights", None)  # the weights to use are stored as net/ below
    kept = {name: ckpt.group(f"{prefix}/{name}") for name in ckpt.network_names}
    out = args.out or args.checkpoint
    try:
        checkpoints.save(out, meta, kept, stats=tensors)  # whole or not at all
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
    print(
        f"{out}: {out.stat().st_size / 1e6:.1f} MB; fitted on {info['ood']['fitted_on']}, "
        f"{info['ood']['dims']} directions, ood threshold {float(tensors['ood_threshold']):.4f}, "
        f"temperature {float(tensors['temperature']):.4f} (val, {info['temperature']['images']})"
    )


if __name__ == "__main__":
    main()
