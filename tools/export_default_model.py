"""Turn a run's checkpoint into the model shipped inside the package.

Keeps only what classify and generate need (the network that classifies, and G), stored as
fp16 to stay small, with the metadata that says how to use them; records the run's test
metrics so the model card can cite them.

    python tools/export_default_model.py RUN_DIR [--weights best|final]
        [--out threengan_cli/models/default.safetensors]

``best``: the best-on-val checkpoint; ``final``: the weights to use of the last epoch
(averaged, with recomputed BatchNorm statistics, where the run's recipe makes them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from threengan_cli.model import checkpoints, modelfile
from threengan_cli.train import runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--weights", choices=("best", "final"), default="best")
    parser.add_argument(
        "--out", type=Path, default=Path("threengan_cli/models/default.safetensors")
    )
    args = parser.parse_args()
    name = runs.BEST if args.weights == "best" else runs.LAST
    ckpt = checkpoints.load(args.run / name)
    meta = ckpt.meta
    classifier = modelfile.classifier_spec(meta, args.run / name)[0]
    prefix = ckpt.weights_prefix
    keep = {
        net: ckpt.group(f"{prefix}/{net}")
        for net in (classifier, "G")
        if ckpt.group(f"{prefix}/{net}")
    }
    summary = json.loads((args.run / "summary.json").read_text())
    test = summary.get("test_of_best_on_val") if args.weights == "best" else summary.get("test")
    dropped = ("optimizers", "position", "dataset", "weights", "finished", "elapsed_s")
    shipped = {
        **{k: v for k, v in meta.items() if k not in dropped},
        "weights_kind": f"{args.weights}, fp16 storage",
        "test": test,
        "source_run": args.run.name,
    }
    checkpoints.save(args.out, shipped, keep, dtype=torch.float16)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB, networks {sorted(keep)}")


if __name__ == "__main__":
    main()
