"""Where a model holds: its out-of-distribution flags and its metrics on the Kermany test set
and on other X-ray collections, as ``classify`` computes them.

    python benchmarks/ood_report.py [--checkpoint FILE] [--engine numpy|torch]
        [--test ../shared/data/kermany-chest-xray/test]
        [--external ../shared/data/external-dev] [--json out.json]

For each folder of class folders (the test set, and each source under --external): the share
of images flagged, accuracy, AUC, sensitivity and specificity (threshold 0.5 unless the model
stores one), ECE (15 bins) and Brier score, also over the unflagged images alone; and the
AUROC with which the out-of-distribution score separates that source from the test set.
Nothing here is fitted or chosen: the model's stored statistics and threshold are used as
they are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from threengan_cli import metrics
from threengan_cli.infer.classify import classify


def _labelled(folder: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for k, name in enumerate(classes):
        for p in sorted((folder / name).glob("*")):
            if p.is_file() and not p.name.startswith("."):
                paths.append(str(p))
                labels.append(k)
    return paths, np.array(labels)


def _scores(model, paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = list(classify(paths, model, workers=0))
    bad = [r for r in rows if not r.ok]
    if bad:
        print(f"  {len(bad)} unreadable, e.g. {bad[0].path}: {bad[0].error}", file=sys.stderr)
    ok = np.array([r.ok for r in rows])
    probs = np.array([[r.probabilities[c] for c in model.classes] for r in rows if r.ok])
    scores = np.array([np.nan if r.ood_score is None else r.ood_score for r in rows if r.ok])
    return ok, probs, scores


def _summary(labels: np.ndarray, probs: np.ndarray, flags: np.ndarray, threshold: float) -> dict:
    out = {"images": len(labels), "flagged": float(flags.mean()) if len(flags) else None}
    for part, keep in (("all", np.ones(len(labels), bool)), ("unflagged", ~flags)):
        y, p = labels[keep], probs[keep]
        m = metrics.classification_metrics(y, p, threshold) if len(y) else {}
        out[part] = {k: m.get(k) for k in ("n", "accuracy", "auc", "sensitivity", "specificity")}
        out[part]["ece"] = metrics.expected_calibration_error(y, p)
        out[part]["brier"] = metrics.brier_score(y, p)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--engine", choices=("numpy", "torch"), default="numpy")
    parser.add_argument("--test", type=Path, default=Path("../shared/data/kermany-chest-xray/test"))
    parser.add_argument("--external", type=Path, default=Path("../shared/data/external-dev"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.engine == "numpy":
        from threengan_cli.infer.numpy_engine import load

        model = load(args.checkpoint)
    else:
        from threengan_cli.infer.torch_engine import load_model

        model = load_model(args.checkpoint, device="cpu")
    if model.stats is None:
        raise SystemExit(f"{model.model_id} has no out-of-distribution statistics")
    stored = model.stored_threshold
    threshold = float(stored["value"]) if stored else 0.5
    sets = {"kermany-test": args.test}
    if args.external.is_dir():
        sets.update({p.name: p for p in sorted(args.external.iterdir()) if p.is_dir()})
    report: dict = {
        "model": model.model_id,
        "engine": args.engine,
        "ood_threshold": model.stats.threshold,
        "temperature": model.stats.temperature,
        "sets": {},
    }
    reference = None
    for name, folder in sets.items():
        paths, labels = _labelled(folder, model.classes)
        ok, probs, scores = _scores(model, paths)
        labels = labels[ok]
        flags = scores > np.float32(model.stats.threshold)
        entry = _summary(labels, probs, flags, threshold)
        if reference is None:
            reference = scores
        else:
            is_ood = np.r_[np.zeros(len(reference), bool), np.ones(len(scores), bool)]
            entry["auroc_against_test"] = metrics.roc_auc(is_ood, np.r_[reference, scores])
        # the same probabilities before calibration, for the ECE it replaced
        t = np.float32(model.stats.temperature)
        logits = np.log(np.clip(probs, 1e-38, None)) * t
        raw = metrics.softmax(logits)
        entry["all"]["ece_uncalibrated"] = metrics.expected_calibration_error(labels, raw)
        report["sets"][name] = entry
        a = entry["all"]
        auroc = entry.get("auroc_against_test")
        print(
            f"{name:24s} n={len(labels):4d} flagged {entry['flagged']:.3f} "
            f"AUROC-vs-test {'-' if auroc is None else f'{auroc:.3f}'} "
            f"acc {a['accuracy']:.4f} AUC {a['auc'] or float('nan'):.4f} "
            f"sens {a['sensitivity'] or float('nan'):.3f} "
            f"spec {a['specificity'] or float('nan'):.3f} "
            f"ECE {a['ece']:.4f} (uncalibrated {a['ece_uncalibrated']:.4f}) Brier {a['brier']:.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
