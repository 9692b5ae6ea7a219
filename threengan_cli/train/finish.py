"""The end of a run: the test split evaluated once (final model, best-on-val model, and the
BN-adapted final model in a column of its own), the model's statistics, and summary.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from threengan_cli.core import fileio
from threengan_cli.model import checkpoints
from threengan_cli.model.modelfile import NET
from threengan_cli.train import runs
from threengan_cli.train.runstate import (
    Loop,
    Stats,
    evaluate_adapted,
    weights_of,
)
from threengan_cli.train.scoring import (
    SplitOutputs,
    flagged_share,
    metrics_of_logits,
    model_statistics,
    split_outputs,
)


def summary_ok(run_dir: Path) -> bool:
    try:
        return runs.read_summary(run_dir) is not None
    except runs.RunError:
        return False


def final_outputs(loop: Loop, used: dict[str, torch.nn.Module]) -> dict[str, SplitOutputs]:
    """val and test through the classifier once each: their logits (metrics) and features
    (statistics, flagged shares)."""
    k = len(loop.data.classes)
    return {
        split: split_outputs(loop.method, used, getattr(loop.data, f"{split}_x"), k, amp=loop.amp)
        for split in ("val", "test")
    }


def finish(
    loop: Loop, used: dict[str, torch.nn.Module], stats: Stats, outputs: dict[str, SplitOutputs]
) -> dict:
    """Evaluate on test once (final model, best-on-val model, and the transductive BN-adapted
    final model in a column of its own) and write summary.json. The best-on-val checkpoint
    is written again with the statistics of its own weights. ``outputs``: the final model's
    pass over val and test (:func:`final_outputs`)."""
    settings, data = loop.settings, loop.data
    temperature = how_evaluated(loop, stats)["temperature"]
    final_test = metrics_of_logits(outputs["test"].logits, data.test_y, temperature)
    final_val = metrics_of_logits(outputs["val"].logits, data.val_y, temperature)
    adapted = evaluate_adapted(loop, used)
    best_test, best_stats = final_test, stats
    best = checkpoints.load(loop.run_dir / runs.BEST, map_location=data.train_x.device)
    if loop.best_epoch is not None and loop.best_epoch != settings.epochs:
        saved = weights_of(used)
        checkpoints.restore_networks(best, used)
        best_outputs = final_outputs(loop, used)
        best_stats = model_statistics(loop.method, used, data, val=best_outputs["val"])
        best_temperature = how_evaluated(loop, best_stats)["temperature"]
        best_test = metrics_of_logits(best_outputs["test"].logits, data.test_y, best_temperature)
        for name, net in used.items():
            net.load_state_dict(saved[name])
    if best_stats is not None:
        nets = {name: best.group(f"{NET}/{name}") for name in best.network_names}
        meta = {**best.meta, "stats": best_stats[1]}
        checkpoints.save(loop.run_dir / runs.BEST, meta, nets, stats=best_stats[0])
    flagged = {}
    if stats is not None:
        for split in ("val", "test"):
            flagged[split] = flagged_share(outputs[split], stats)
    summary = {
        "run": str(loop.run_dir),
        "method": settings.method,
        "recipe": settings.recipe,
        "epochs": settings.epochs,
        "train_images": loop.n,
        "unlabelled_images": loop.meta["unlabelled_images"],
        "classes": data.classes,
        "val": final_val,
        "test": final_test,
        "best_epoch_on_val": loop.best_epoch,
        "test_of_best_on_val": best_test,
        "test_adapted_bn": adapted,
        "stats": {
            "temperature": how_evaluated(loop, stats)["temperature"],
            "ood_threshold": float(stats[0]["ood_threshold"]) if stats is not None else None,
            "ood_flagged": flagged,
            "ood_fit": stats[1]["ood"] if stats is not None else None,
            "temperature_split": stats[1]["temperature"]["split"] if stats is not None else None,
            "temperature_fit": stats[1]["temperature"] if stats is not None else None,
        },
        "elapsed_s": round(loop.elapsed(), 2),
        "extended": loop.extended,
        "settings": settings.model_dump(mode="json"),
    }
    fileio.write_text(loop.run_dir / runs.SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def how_evaluated(loop: Loop, stats: Stats) -> dict[str, Any]:
    """How a finished model is evaluated: its precision, and the temperature of its stats."""
    temperature = float(stats[0]["temperature"]) if stats is not None else 1.0
    return {"amp": loop.amp, "temperature": temperature}
