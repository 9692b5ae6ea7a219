"""train --calibration-folds: a temperature cross-fitted on fold models' out-of-fold logits
where the dataset has no val split (train/crossfit.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.core.errors import EXIT_USAGE
from threengan_cli.core.settings import TrainSettings
from threengan_cli.metrics import fit_temperature
from threengan_cli.model import checkpoints
from threengan_cli.train import crossfit, events, runs, training

runner = CliRunner()


def _settings(**kw):
    base = {"width": 4, "latent": 8, "batch_size": 4, "epochs": 2, "device": "cpu", "seed": 3}
    return TrainSettings(**{**base, "recipe": "paper", **kw})


@pytest.fixture(scope="module")
def no_val(tmp_path_factory) -> Path:
    """16 px images, 4 per class, prepared with --val-fraction 0 (no val, no test split)."""
    from model_factory import write_image

    from threengan_cli.core.settings import PrepareSettings
    from threengan_cli.data.prepare import prepare

    root = tmp_path_factory.mktemp("noval")
    for i in range(4):
        for label in ("a", "b"):
            seed = i + 100 * (label == "b")
            write_image(root / "src" / label / f"{label}{i}.png", (16, 16), seed=seed)
    prepare(root / "src", root / "ds", PrepareSettings(image_size=16, val_fraction=0.0, min_val=0))
    return root / "ds"


def test_folds_are_stratified_balanced_and_drawn_from_the_seed():
    labels = np.array([0] * 7 + [1] * 5)
    fold = crossfit.folds_of(labels, 3, seed=0)
    for k in range(3):
        assert sorted(np.bincount(labels[fold == k], minlength=2)) in ([2, 2], [1, 3], [2, 3])
        assert (labels[fold == k] == 0).sum() in (2, 3) and (labels[fold == k] == 1).sum() >= 1
    assert max(np.bincount(fold)) - min(np.bincount(fold)) <= 1
    assert np.array_equal(fold, crossfit.folds_of(labels, 3, seed=0))
    assert not np.array_equal(fold, crossfit.folds_of(labels, 3, seed=1))


@pytest.mark.parametrize("folds", [1, 11, -1])
def test_calibration_folds_outside_2_to_10_are_refused(folds):
    with pytest.raises(ValueError, match="calibration_folds"):
        _settings(calibration_folds=folds)


def test_calibration_folds_on_a_dataset_with_a_val_split_is_a_usage_error(dataset, tmp_path):
    args = ["train", str(dataset), "--out", str(tmp_path / "run"), "--width", "4"]
    result = runner.invoke(app, [*args, "--epochs", "1", "--calibration-folds", "2"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "val split" in result.output and "--val-fraction 0" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / runs.SETTINGS).exists()


def test_more_folds_than_images_of_a_class_is_a_usage_error(no_val, tmp_path):
    args = ["train", str(no_val), "--out", str(tmp_path / "run"), "--width", "4"]
    result = runner.invoke(app, [*args, "--epochs", "1", "--calibration-folds", "5"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "at least 5 labelled images of each class" in result.output
    assert not (tmp_path / "run" / runs.SETTINGS).exists()


def test_force_clears_a_runs_calibration_folds(tmp_path):
    (tmp_path / runs.FOLDS / "1").mkdir(parents=True)
    (tmp_path / runs.FOLDS / "1" / runs.SETTINGS).write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    runs.clear(tmp_path)
    assert not (tmp_path / runs.FOLDS).exists() and (tmp_path / "notes.txt").exists()


def test_the_done_line_says_the_probabilities_are_calibrated_by_cross_fitting(tmp_path):
    from threengan_cli.train.runs import done_line

    summary = {
        "epochs": 2,
        "elapsed_s": 1.0,
        "val": {},
        "test": {"n": 4, "accuracy": 0.5, "auc": 0.5},
        "stats": {"temperature": 1.7, "temperature_split": crossfit.SPLIT},
    }
    assert "calibrated by cross-fitting" in done_line(summary, tmp_path)
    summary["stats"]["temperature_split"] = None
    assert "uncalibrated (temperature 1)" in done_line(summary, tmp_path)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint but its statistics (which hold the temperature)."""
    ckpt = checkpoints.load(path)
    return {k: v for k, v in ckpt.tensors.items() if not k.startswith("stats/")}


def _out_of_fold_logits(run: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each fold model's logits on its own dataset's test split (the fold it did not train
    on), recomputed here: (logits, labels) of every labelled image once."""
    from threengan_cli.data.datasets import load_prepared
    from threengan_cli.infer.torch_engine import load_model
    from threengan_cli.model.networks import to_model_range

    logits, labels = [], []
    for i in range(1, k + 1):
        data = load_prepared(run / runs.FOLDS / "data" / str(i))
        x, y = data.subset("test")
        model = load_model(run / runs.FOLDS / str(i) / runs.LAST, device="cpu")
        model.nets[model.classifier].eval()
        with torch.no_grad():
            out = model.nets[model.classifier](to_model_range(torch.from_numpy(x)))
        logits.append(out[:, : model.logits].float().numpy())
        labels.append(y)
        assert len(load_prepared(run / runs.FOLDS / "data" / str(i)).subset("val")[1]) == 0
    return np.concatenate(logits), np.concatenate(labels)


@pytest.mark.slow
def test_a_cross_fitted_run_keeps_the_final_model_and_fits_its_temperature_out_of_fold(
    no_val, tmp_path, monkeypatch
):
    # The fold models are kept here to recompute their logits (a finished run deletes them).
    monkeypatch.setattr(crossfit, "remove_folds", lambda run_dir: None)
    plain = training.train(no_val, _settings(), tmp_path / "plain")
    seen = []
    summary = training.train(
        no_val, _settings(calibration_folds=2), tmp_path / "cf", on_event=seen.append
    )
    # The final model is the one trained without the option, bit for bit.
    a, b = _tensors(tmp_path / "plain" / runs.LAST), _tensors(tmp_path / "cf" / runs.LAST)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain["stats"]["temperature_split"] is None
    meta = checkpoints.load(tmp_path / "cf" / runs.LAST).meta
    assert meta["stats"]["temperature"] == {"split": "cross-fit", "folds": 2, "images": 8}
    assert summary["stats"]["temperature_fit"] == meta["stats"]["temperature"]
    # Its temperature is the one fitted on the fold models' logits on their held-out folds.
    logits, labels = _out_of_fold_logits(tmp_path / "cf", 2)
    assert len(labels) == 8 and sorted(np.bincount(labels)) == [4, 4]
    assert summary["stats"]["temperature"] == pytest.approx(fit_temperature(logits, labels))
    folds = [e.fold for e in seen if isinstance(e, events.RunStarted)]
    assert folds == [None, (1, 2), (2, 2)]
    # evaluate --json and runs --json say where the temperature comes from.
    args = ["evaluate", str(no_val), "--split", "train", "--run", str(tmp_path / "cf"), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)["temperature"]
    assert found["split"] == "cross-fit" and found["folds"] == 2
    assert found["value"] == pytest.approx(summary["stats"]["temperature"], rel=1e-6)
    from threengan_cli.train.runlist import read_run_info

    assert read_run_info(tmp_path / "cf").temperature["split"] == "cross-fit"


@pytest.mark.slow
def test_a_run_stopped_in_a_fold_resumes_its_folds_to_the_same_temperature(no_val, tmp_path):
    whole = training.train(no_val, _settings(calibration_folds=2), tmp_path / "whole")
    # Spent once the temperature is stored: the fold runs and their datasets are deleted.
    assert not (tmp_path / "whole" / runs.FOLDS).exists()
    assert runs.state(tmp_path / "whole") == "finished"
    stop = threading.Event()

    def on_event(event):
        if isinstance(event, events.RunStarted) and event.fold == (2, 2):
            stop.set()

    run = tmp_path / "run"
    with pytest.raises(events.Interrupted) as caught:
        cfg = _settings(calibration_folds=2)
        training.train(no_val, cfg, run, on_event=on_event, stop_flag=stop)
    assert caught.value.path == run / runs.LAST and "calibration fold 2/2" in str(caught.value)
    seen = []
    summary = training.train(
        no_val, _settings(calibration_folds=2), run, resume=True, on_event=seen.append
    )
    assert [e.fold for e in seen if isinstance(e, events.RunStarted)] == [None, (2, 2)]
    assert not (run / runs.FOLDS).exists()
    assert summary["stats"]["temperature"] == whole["stats"]["temperature"]
