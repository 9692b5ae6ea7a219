"""Why does the unlabelled pool pull C toward the first class? A training run with a pool of
the train images outside the N labelled ones (``unlabelled = "rest"``), whose labels are known
to this script and are never used to train: after every epoch C's pseudo-labels on the pool
are compared with them.

    python benchmarks/diagnose_pool.py DATASET OUT.jsonl [--set key=value ...]
    python benchmarks/diagnose_pool.py DATASET OUT.json --run RUN_DIR

Trains one run (robust recipe, 3ngan, N = 200, 30 epochs, width 32 unless ``--set`` says
otherwise; the run folder is OUT.jsonl's name without .jsonl) and writes one line per epoch:
for the live weights (what picks the pool's pseudo-labels in training) and, where the run
averages its weights, the averaged ones (a teacher), the pseudo-labels of pool batches the
size of a training batch, each normalised by its own statistics as in a training step:

- ``natural``: batches drawn from the pool as it is (74% pneumonia in Kermany's train split);
- ``balanced``: batches of half one class, half the other, the mix of the labelled batches;
- ``by_labelled``: ``natural`` batches normalised by the statistics of a class-balanced batch
  of the labelled images (what ``unlabelled_norm = labelled`` does in training).

For each: the share of each class among the argmax labels and among the confident ones
(probability over ``unlabelled_tau``), the confident share per true class, and the precision
of the confident labels per class. If C's call on an image depends on the batch it sits in
(BatchNorm's batch statistics), ``natural`` and ``balanced`` differ for the same images.
With ``--run`` it checks the last weights of a finished run (settings from its folder) once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def pool_with_labels(dataset: Path, size: int, seed: int):
    """The pool (train images outside the labelled subset) with its labels, the labelled
    subset's images by class, and the class names."""
    from threengan_cli.data.datasets import balanced_subset, load_prepared

    data = load_prepared(dataset)
    x, y = data.subset("train")
    pick = balanced_subset(y, size, seed, classes=list(data.classes))
    labelled = [x[pick][y[pick] == c] for c in range(len(data.classes))]
    return np.delete(x, pick, axis=0), np.delete(y, pick), labelled, list(data.classes)


def batches_of(y: np.ndarray, batch: int, balanced: bool, seed: int, count: int) -> np.ndarray:
    """(count, batch) indices into the pool: drawn as the pool is, or half per class."""
    rng = np.random.default_rng(seed)
    if not balanced:
        return rng.integers(0, len(y), (count, batch))
    by_class = [np.flatnonzero(y == c) for c in (0, 1)]
    half = batch // 2
    return np.stack(
        [
            np.concatenate([rng.choice(by_class[0], half), rng.choice(by_class[1], batch - half)])
            for _ in range(count)
        ]
    )


@torch.no_grad()
def pseudo_stats(net, x_u8, y, index, tau, reference=None):
    """Pseudo-labels of the pool batches ``index`` (rows of indices) against their labels;
    with ``reference`` (uint8 images), each batch normalised by its statistics instead."""
    from threengan_cli.model.networks import separately, to_model_range

    net.train()  # batch statistics, as in a training step
    probs = []
    for rows in np.array_split(index, max(1, len(index) // 25)):  # 25 batches per call
        parts = [to_model_range(x_u8[torch.from_numpy(row)]) for row in rows]
        if reference is None:
            probs += [torch.softmax(o.float(), 1) for o in separately(net, *parts)]
            continue
        ref = to_model_range(torch.from_numpy(reference))
        for part in parts:
            out = separately(net, ref, part, borrow={1: 0})[1]
            probs.append(torch.softmax(out.float(), 1))
    p = torch.cat(probs).numpy()
    truth = y[index.reshape(-1)]
    label = p.argmax(1)
    confident = p.max(1) > tau
    out = {
        "argmax_share_0": float((label == 0).mean()),
        "confident_rate": float(confident.mean()),
        "confident_share_0": float((label[confident] == 0).mean()) if confident.any() else None,
        "true_share_0": float((truth == 0).mean()),
        "accuracy": float((label == truth).mean()),
    }
    for c in (0, 1):
        mine = truth == c
        out[f"confident_rate_true{c}"] = float(confident[mine].mean()) if mine.any() else None
        chosen = confident & (label == c)
        out[f"precision_{c}"] = float((truth[chosen] == c).mean()) if chosen.any() else None
        out[f"recall_{c}"] = float((chosen & mine).sum() / max(mine.sum(), 1))
    return out


def check(ckpt, net, pool, tau: float) -> dict:
    """The stats of the live weights (``net``) and, where kept, the averaged ones (``avg``),
    on pool batches as drawn, class-balanced, and as drawn but normalised by a balanced
    batch of the labelled images (``unlabelled_norm = labelled``)."""
    from threengan_cli.model import checkpoints

    x_t, y, index, reference = pool
    record = {}
    for source in ("net", "avg"):
        averaged = ckpt.group("avg/C")
        if source == "avg" and not averaged:
            continue
        checkpoints.restore_networks(ckpt, {"C": net})
        if source == "avg":  # parameters only: in train mode BatchNorm uses the batch's
            net.load_state_dict(averaged, strict=False)
        for kind, idx in index.items():
            record[f"{source}_{kind}"] = pseudo_stats(net, x_t, y, idx, tau)
        record[f"{source}_by_labelled"] = pseudo_stats(
            net, x_t, y, index["natural"], tau, reference
        )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--set", action="append", default=[], help="train setting k=v")
    parser.add_argument("--batches", type=int, default=100, help="pool batches per check")
    parser.add_argument("--run", type=Path, help="check this finished run's last weights only")
    args = parser.parse_args()
    extra = {
        k: json.loads(v) if v[:1] in "0123456789-[{tf" else v
        for k, v in (item.split("=", 1) for item in args.set)
    }

    from threengan_cli.core.settings import TrainSettings
    from threengan_cli.model import checkpoints
    from threengan_cli.model.methods import METHODS
    from threengan_cli.train.events import EpochDone
    from threengan_cli.train.training import train

    torch.set_num_threads(2)
    values = {
        "method": "3ngan",
        "recipe": "robust",
        "size": 200,
        "epochs": 30,
        "width": 32,
        "seed": 0,
        "device": "cpu",
        "unlabelled": "rest",
        **extra,
    }
    if args.run is not None:
        values = json.loads((args.run / "settings.json").read_text())
    settings = TrainSettings(**values)
    x, y, labelled, classes = pool_with_labels(args.dataset, settings.size, settings.seed)
    half = settings.batch_size // 2
    reference = np.concatenate([labelled[0][:half], labelled[1][: settings.batch_size - half]])
    index = {
        kind: batches_of(y, settings.batch_size, kind == "balanced", 7, args.batches)
        for kind in ("natural", "balanced")
    }
    pool = (torch.from_numpy(x), y, index, reference)
    nets = METHODS[settings.method].networks(settings, len(classes), int(x.shape[-1]))
    tau = settings.unlabelled_tau
    if args.run is not None:
        record = check(checkpoints.load(args.run / "last.safetensors"), nets["C"], pool, tau)
        args.out.write_text(json.dumps({"run": str(args.run), **record}) + "\n")
        print(json.dumps(record, indent=1))
        return
    run_dir = args.out.with_suffix("")

    def on_epoch(event) -> None:
        if not isinstance(event, EpochDone):
            return
        ckpt = checkpoints.load(run_dir / "last.safetensors")
        record = {"epoch": event.epoch + 1, "val": event.record["val"].get("accuracy")}
        record.update(check(ckpt, nets["C"], pool, tau))
        record["engine"] = event.record.get("pseudo")
        with open(args.out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        live = record["net_natural"]
        print(
            f"epoch {record['epoch']:3d} val {record['val']:.4f} live natural: argmax N "
            f"{live['argmax_share_0']:.3f} confident {live['confident_rate']:.3f} "
            f"conf N {live['confident_share_0']} prec N {live['precision_0']} "
            f"prec P {live['precision_1']}",
            flush=True,
        )

    args.out.unlink(missing_ok=True)
    summary = train(args.dataset, settings, run_dir, on_event=on_epoch)
    print(json.dumps({k: summary[k] for k in ("val", "test")}, indent=1))
    print(f"classes: {classes}; pool {len(y)} images, share of {classes[0]} {np.mean(y == 0):.3f}")


if __name__ == "__main__":
    main()
