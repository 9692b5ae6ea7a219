"""Turn a run's best-on-val checkpoint into the model shipped inside the package.

Keeps only what classify and generate need (G and C, or D for sgan), stored as fp16 to stay
small; records the run's test metrics so `threengan info`-style tools and the model card can
cite them.

    python tools/export_default_model.py RUN_DIR [--out threengan_cli/models/default.safetensors]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from threengan_cli import checkpoints
from threengan_cli.methods import METHODS
from threengan_cli.settings import TrainSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument(
        "--out", type=Path, default=Path("threengan_cli/models/default.safetensors")
    )
    args = parser.parse_args()
    ckpt = checkpoints.load(args.run / "best.safetensors")
    meta = ckpt.meta
    method = METHODS[meta["method"]]
    nets = method.networks(
        TrainSettings(**meta["settings"]), meta["num_classes"], meta["image_size"]
    )
    checkpoints.restore_networks(ckpt, nets)
    # D is only needed where it is the classifier (sgan); otherwise G and C suffice.
    keep = {k: v for k, v in nets.items() if k in ("G", "C")} if "C" in nets else nets
    summary = json.loads((args.run / "summary.json").read_text())
    shipped = {
        **{k: v for k, v in meta.items() if k not in ("optimizers", "position", "dataset")},
        "weights": "best-on-val, fp16 storage",
        "test_of_best_on_val": summary.get("test_of_best_on_val"),
        "source_run": args.run.name,
    }
    checkpoints.save(args.out, shipped, keep, dtype=torch.float16)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB, networks {sorted(keep)}")


if __name__ == "__main__":
    main()
