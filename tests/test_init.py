"""train --init: a run starts from a trained model's networks, says which model in its
settings, run.json and checkpoints, resumes exactly, and refuses a model that does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from model_factory import make_checkpoint, train_until_stopped, write_image
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.core import paths
from threengan_cli.core.settings import TrainSettings
from threengan_cli.model import checkpoints, modelfile
from threengan_cli.train import events, runstate, training

runner = CliRunner()
CLASSES = ("0", "1")  # the class names of the session's tiny dataset


def _settings(**kw) -> TrainSettings:
    base = {"width": 4, "latent": 16, "batch_size": 4, "epochs": 2, "device": "cpu", "seed": 3}
    return TrainSettings(**{**base, "size": 8, **kw})


def _nets_at_start(dataset, tmp_path, settings):
    loop = runstate.open_loop(torch.device("cpu"), dataset, settings, tmp_path / "run", None)
    return loop


def test_init_loads_the_models_networks_and_leaves_the_ones_it_lacks_fresh(dataset, tmp_path):
    model = make_checkpoint(tmp_path / "m.safetensors", classes=CLASSES, keep=("G", "C"))
    saved = checkpoints.load(model)
    fresh = _nets_at_start(dataset, tmp_path, _settings()).nets
    loop = _nets_at_start(dataset, tmp_path, _settings(init=str(model)))
    for name in ("G", "C"):
        mine, theirs = loop.nets[name].state_dict(), saved.group(f"net/{name}")
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name
    d_fresh, d_now = fresh["D"].state_dict(), loop.nets["D"].state_dict()
    assert all(torch.equal(d_fresh[k], d_now[k]) for k in d_fresh)  # no D in the model
    # the averaged weights (the teacher, and what evaluation uses) start from the model too
    avg = loop.averager.copies["C"].state_dict()
    assert all(torch.equal(avg[k], saved.group("net/C")[k]) for k in saved.group("net/C"))
    assert loop.meta["init"]["networks"] == ["G", "C"]


@pytest.mark.slow
def test_the_model_a_run_started_from_is_in_settings_run_json_and_checkpoints(dataset, tmp_path):
    model = make_checkpoint(tmp_path / "m.safetensors", classes=CLASSES)
    run = tmp_path / "run"
    training.train(dataset, _settings(init=str(model), epochs=1), run)
    assert json.loads((run / "settings.json").read_text())["init"] == str(model)
    recorded = json.loads((run / "run.json").read_text())["init"]
    assert recorded["file"] == modelfile.file_id(model)
    assert recorded["networks"] == ["G", "D", "C"] and recorded["method"] == "3ngan"
    for name in ("last.safetensors", "best.safetensors"):
        assert modelfile.read_meta(run / name)["init"] == recorded


@pytest.mark.slow
def test_a_run_started_from_a_model_resumes_exactly_without_reading_it_again(dataset, tmp_path):
    model = make_checkpoint(tmp_path / "m.safetensors", classes=CLASSES)
    settings = _settings(init=str(model), epochs=2, unlabelled="rest")
    full = tmp_path / "full"
    training.train(dataset, settings, full)
    stopped = tmp_path / "stopped"
    train_until_stopped(dataset, settings, stopped)
    model.rename(tmp_path / "moved.safetensors")  # resume needs only the run's checkpoint
    training.train(dataset, settings, stopped, resume=True)
    a = checkpoints.load(full / "last.safetensors")
    b = checkpoints.load(stopped / "last.safetensors")
    for group in ("net", "avg", "use"):
        ga, gb = a.group(group), b.group(group)
        assert ga and all(torch.equal(ga[k], gb[k]) for k in ga), group
    assert b.meta["init"] == a.meta["init"]


@pytest.mark.parametrize(
    ("model", "settings", "message"),
    [
        ({"classes": ("cat", "dog")}, {}, "the model's classes are cat, dog, this run's are 0, 1"),
        ({"image_size": 16}, {}, "the model's image size is 16, this run's is 32"),
        ({"width": 8}, {}, "the model's width is 8, this run's is 4"),
        ({}, {"latent": 8}, "the model's latent size is 16, this run's is 8"),
        ({"method": "sgan"}, {}, "a sgan model (classified by D) cannot start a 3ngan run"),
        ({"keep": ("G", "D")}, {}, "holds no C for 3ngan to start from"),
    ],
)
def test_a_model_that_does_not_fit_is_a_one_line_error(dataset, tmp_path, model, settings, message):
    path = make_checkpoint(tmp_path / "m.safetensors", **{"classes": CLASSES, **model})
    run = tmp_path / "run"
    with pytest.raises(events.TrainingError) as info:
        training.train(dataset, _settings(init=str(path), **settings), run)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (run / "run.json").exists()


def test_cli_init_a_missing_model_is_a_usage_error_and_a_misfit_a_failure(dataset, tmp_path):
    tiny = ["--width", "4", "--epochs", "1", "--size", "8", "--device", "cpu", "-q"]
    result = runner.invoke(app, ["train", str(dataset), "--init", "nosuch", *tiny])
    assert result.exit_code == 2
    assert "--init nosuch: no run 'nosuch'" in result.output
    wide = make_checkpoint(tmp_path / "wide.safetensors", classes=CLASSES, width=8)
    result = runner.invoke(app, ["train", str(dataset), "--init", str(wide), *tiny])
    assert result.exit_code == 1
    assert "width is 8, this run's is 4" in result.output


def test_init_default_starts_from_the_bundled_model(tmp_path):
    """The bundled model (G and C, no D, width 64, 64 px): its networks are loaded."""
    from threengan_cli.core.settings import PrepareSettings
    from threengan_cli.data.prepare import prepare

    bundled = paths.bundled_model()
    if bundled is None:
        pytest.skip("no bundled model in this install")
    for i in range(6):
        for label in ("NORMAL", "PNEUMONIA"):
            write_image(tmp_path / "src" / label / f"{i}.png", (64, 64), seed=i + 10 * len(label))
    prepare(tmp_path / "src", tmp_path / "ds", PrepareSettings(min_val=0, val_fraction=0.2))
    settings = TrainSettings(init="default", width=64, size=4, device="cpu", batch_size=2)
    run_dir = tmp_path / "run"
    loop = runstate.open_loop(torch.device("cpu"), tmp_path / "ds", settings, run_dir, None)
    assert loop.meta["init"]["networks"] == ["G", "C"]
    assert loop.meta["init"]["file"] == modelfile.file_id(bundled)
    c = checkpoints.load(bundled).group("net/C")
    mine = loop.nets["C"].state_dict()
    assert all(torch.equal(mine[k], c[k].to(mine[k].dtype)) for k in c)
