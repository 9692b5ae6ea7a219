"""Fingerprints of tiny training runs: one sha256 per method over the final checkpoint's
network weights and optimizer state, to show a refactor changed no CPU result.

    python benchmarks/hash_runs.py [--set key=value ...]

Prints one line per method: the method, a digest of its tensors and its test accuracy. Run it
before and after a change (with ``--set recipe=paper`` where the default recipe differs) and
compare the lines. Tensors are hashed in name order, weights under ``net/`` and optimizer
state under ``opt/`` only, so metadata and extra tensors of newer formats do not count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

METHODS = ("vanilla", "sgan", "ecgan", "3ngan")


def tiny_dataset(root: Path) -> Path:
    from threengan_cli.core.settings import PrepareSettings
    from threengan_cli.data.prepare import prepare

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 120, (n, 32, 32), dtype=np.uint8)
        images[labels == 1, 10:22, 10:22] += 120
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.reshape(-1, 1)
    np.savez(root / "tiny.npz", **arrays)
    out = root / "prepared"
    prepare(root / "tiny.npz", out, PrepareSettings(image_size=32, min_val=0, workers=1))
    return out


def digest(path: Path) -> str:
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="np") as fh:
        for key in sorted(k for k in fh.keys() if k.startswith(("net/", "opt/"))):  # noqa: SIM118
            h.update(key.encode())
            h.update(np.ascontiguousarray(fh.get_tensor(key)).tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], help="extra train setting k=v")
    args = parser.parse_args()
    extra = {k: json.loads(v) if v[:1] in "0123456789-[{tf" else v
             for k, v in (item.split("=", 1) for item in args.set)}

    import torch

    from threengan_cli.core.settings import TrainSettings
    from threengan_cli.train.training import train

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data = tiny_dataset(Path(tmp))
        for method in METHODS:
            settings = TrainSettings(
                method=method, size=20, epochs=2, batch_size=5, width=8, seed=3, device="cpu",
                **extra,
            )
            run = Path(tmp) / method
            summary = train(data, settings, run)
            print(f"{method:8s} {digest(run / 'last.safetensors')} "
                  f"test_accuracy={summary['test']['accuracy']:.6f}")


if __name__ == "__main__":
    main()
