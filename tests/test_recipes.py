"""Recipes and the robust options: precise BatchNorm statistics, weight averaging,
augmentation, unlabelled images, test-time BN adaptation, and the paper recipe unchanged."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from threengan_cli.bench import benchmark, grid
from threengan_cli.cli.app import app
from threengan_cli.core import names
from threengan_cli.core.config import SettingsError, resolve
from threengan_cli.core.settings import RECIPES, TrainSettings
from threengan_cli.data.datasets import load_prepared
from threengan_cli.data.training_data import load_run_data
from threengan_cli.infer.torch_engine import load_model
from threengan_cli.model import augment, checkpoints, methods
from threengan_cli.model.averaging import Averager, recompute_bn
from threengan_cli.model.networks import Classifier, to_model_range
from threengan_cli.train import events, runs, training

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kermany-chest-xray"


def _settings(**kw) -> TrainSettings:
    base = {"width": 4, "latent": 8, "batch_size": 4, "epochs": 2, "device": "cpu", "seed": 3}
    return TrainSettings(**{**base, **kw})


# ------------------------------------------------------------------------------- settings
def test_a_recipe_fills_only_the_settings_not_given():
    robust = TrainSettings(recipe="robust", ema=0.5)
    assert robust.ema == 0.5 and robust.precise_bn is True and robust.unlabelled is None
    paper = TrainSettings(recipe="paper")
    assert {k: getattr(paper, k) for k in RECIPES["paper"]} == RECIPES["paper"]


def test_train_defaults_to_the_robust_recipe_and_benchmark_profiles_to_the_paper_one():
    assert TrainSettings().recipe == "robust"
    for profile in ("smoke", "quick", "paper"):
        assert grid.resolve_settings(profile).recipes == ("paper",)
    assert grid.resolve_settings("study").recipes == ("paper", "robust")


def test_settings_stored_before_recipes_existed_read_as_the_paper_recipe():
    old = _settings().model_dump(mode="json")
    for key in ("recipe", *RECIPES["paper"]):
        old.pop(key)
    assert TrainSettings.from_stored(old).recipe == "paper"
    assert TrainSettings.from_stored(old).ema == 0.0


def test_help_lists_exactly_the_registered_methods():
    """A method added to model/methods.py without its line in core/names.py could not be
    trained: settings check --method against that torch-free list before torch loads."""
    from threengan_cli.core.names import BUILT_IN, METHOD_NAMES

    built_in = [n for n, cls in methods.METHODS.items() if cls.__module__ == methods.__name__]
    assert list(BUILT_IN) == built_in
    assert METHOD_NAMES == list(methods.METHODS)


def test_an_unknown_augmentation_is_a_one_line_settings_error():
    with pytest.raises(SettingsError, match="train.augment: unknown augmentation 'blur'"):
        resolve("train", None, augment="translation,blur")


# --------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("name", sorted(augment.TRANSFORMS))
def test_each_augmentation_is_seeded_shape_preserving_and_differentiable(name):
    x = (torch.rand(6, 1, 16, 16) * 2 - 1).requires_grad_()
    first = augment.TRANSFORMS[name](x, torch.Generator().manual_seed(1))
    again = augment.TRANSFORMS[name](x, torch.Generator().manual_seed(1))
    assert first.shape == x.shape and torch.equal(first, again)
    first.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_translation_moves_content_by_whole_pixels_and_fills_with_zeros():
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 8, 8] = 1.0
    moved = augment.translation(x, torch.Generator().manual_seed(0))
    assert torch.equal(moved.sum(dim=(1, 2, 3)), torch.ones(64))  # one pixel, still whole
    assert (moved[:, 0, 8, 8] == 0).any()  # ... and somewhere else for some images


def test_no_augmentation_means_no_transform_at_all():
    assert augment.policy((), None) is None


# ----------------------------------------------------------------------------- averaging
def test_ema_warms_up_and_then_follows_its_decay():
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    avg = Averager({"C": net}, ["C"], decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    avg.update()  # decay min(0.9, 2/11): the average moves most of the way at once
    assert avg.copies["C"].weight.item() == pytest.approx(1 - 2 / 11)
    for _ in range(200):
        avg.update()
    assert avg.copies["C"].weight.item() == pytest.approx(1.0, abs=1e-6)


def test_precise_bn_makes_eval_mode_agree_with_train_mode_on_the_same_images():
    torch.manual_seed(0)
    net = Classifier(2, width=4, image_size=16)
    x = torch.rand(40, 1, 16, 16) * 2 - 1
    net.train()
    with torch.no_grad():
        train_mode = net(x)
    recompute_bn(net, [x])
    net.eval()
    with torch.no_grad():
        eval_mode = net(x)
    assert torch.equal(train_mode.argmax(1), eval_mode.argmax(1))
    assert torch.allclose(train_mode, eval_mode, atol=0.05)


# ------------------------------------------------------------------------------ unlabelled
def test_unlabelled_rest_is_the_train_images_outside_the_labelled_subset(dataset):
    prepared = load_prepared(dataset)
    data = load_run_data(prepared, _settings(size=8, unlabelled="rest"), torch.device("cpu"))
    labelled = {bytes(x.numpy()) for x in data.train_x}
    pool = {bytes(x.numpy()) for x in data.unlabelled}
    assert len(data.train_x) == 8 and len(data.unlabelled) == 24 - 8
    assert not labelled & pool
    everything = load_run_data(prepared, _settings(unlabelled="rest"), torch.device("cpu"))
    assert everything.unlabelled is None  # all labelled: no pool, not an error


def test_unlabelled_images_can_come_from_a_folder(dataset, tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((40, 40), 30 * i, np.uint8)).save(tmp_path / f"u{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    prepared = load_prepared(dataset)
    data = load_run_data(prepared, _settings(unlabelled=str(tmp_path)), torch.device("cpu"))
    assert tuple(data.unlabelled.shape) == (3, 32, 32)


@pytest.mark.parametrize("method", ["vanilla", "sgan", "ecgan", "3ngan"])
def test_every_method_trains_with_augmentation_and_unlabelled_images(method):
    settings = _settings(method=method, recipe="robust")
    torch.manual_seed(0)
    cls = methods.METHODS[method]
    nets = cls.networks(settings, 2, 16)
    opts = cls.optimizers(nets, settings)
    rng = torch.Generator().manual_seed(0)
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    out = cls.step(
        nets,
        opts,
        real,
        torch.tensor([0, 1, 0, 1]),
        settings,
        rng=rng,
        aug=augment.policy(settings.augments, rng),
        unlabelled=torch.rand(4, 1, 16, 16) * 2 - 1,
    )
    assert all(torch.isfinite(v) for v in out.as_dict().values())


# ------------------------------------------------------------------------------ the loop
def _stop_at(epoch: int, step: int, flag: threading.Event):
    def on_event(event):
        if isinstance(event, events.StepDone) and (event.epoch, event.step) == (epoch, step):
            flag.set()

    return on_event


@pytest.mark.slow
def test_a_robust_run_resumes_exactly_averages_included(dataset, tmp_path):
    settings = _settings(recipe="robust", unlabelled="rest", size=8, epochs=3)
    full = tmp_path / "full"
    training.train(dataset, settings, full)
    stopped = tmp_path / "stopped"
    flag = threading.Event()
    with pytest.raises(events.Interrupted):
        training.train(dataset, settings, stopped, on_event=_stop_at(1, 1, flag), stop_flag=flag)
    training.train(dataset, settings, stopped, resume=True)
    a = checkpoints.load(full / "last.safetensors")
    b = checkpoints.load(stopped / "last.safetensors")
    for group in ("net", "avg", "use"):
        ga, gb = a.group(group), b.group(group)
        assert ga and ga.keys() == gb.keys()
        assert all(torch.equal(ga[k], gb[k]) for k in ga), group


@pytest.mark.slow
def test_a_robust_run_keeps_raw_weights_to_resume_and_averaged_ones_to_use(dataset, tmp_path):
    run = tmp_path / "run"
    summary = training.train(dataset, _settings(recipe="robust", size=8), run)
    last = checkpoints.load(run / "last.safetensors")
    assert last.meta["weights"] == "use" and last.weights_prefix == "use"
    assert set(last.network_names) == {"C", "G"}  # what a model is used through; no D
    assert last.meta["classifier"] == {"network": "C", "logits": 2, "outputs": 2}
    raw, used = last.group("net/C"), last.group("use/C")
    assert any(not torch.equal(raw[k], used[k]) for k in raw)
    # the test column of the summary is what a user of the saved weights gets
    model = load_model(checkpoint=run / "last.safetensors", device="cpu")
    data = load_prepared(dataset)
    test_x, test_y = data.subset("test")
    probs = model.probabilities_of(test_x)
    acc = float((probs.argmax(1) == test_y).mean())
    assert acc == pytest.approx(summary["test"]["accuracy"])
    assert "accuracy" in summary["test_adapted_bn"]


@pytest.mark.slow
def test_the_numpy_engine_reads_the_weights_to_use_of_a_robust_checkpoint(dataset, tmp_path):
    from threengan_cli.infer import numpy_engine

    run = tmp_path / "run"
    training.train(dataset, _settings(recipe="robust", size=8, epochs=1), run)
    torch_model = load_model(checkpoint=run / "last.safetensors", device="cpu")
    numpy_model = numpy_engine.load(checkpoint=run / "last.safetensors")
    images = load_prepared(dataset).subset("test")[0]
    assert np.allclose(
        torch_model.probabilities_of(images), numpy_model.probabilities_of(images), atol=1e-5
    )


@pytest.mark.slow
def test_a_method_registered_by_a_plugin_trains_benchmarks_and_classifies(dataset, tmp_path):
    @methods.register
    class Toy(methods.Vanilla):
        name = "toy"
        step_ms = 10.0

    try:
        run = tmp_path / "run"
        training.train(dataset, _settings(method="toy", recipe="paper"), run)
        model = load_model(runs.model_file(run=str(run)), device="cpu")
        assert model.probabilities_of(load_prepared(dataset).subset("test")[0]).shape == (8, 2)
        cfg = grid.resolve_settings("smoke", methods=("toy",), sizes=(8,), device="cpu")
        results = benchmark.run(dataset, cfg, tmp_path / "bench")
        assert results["results"][0]["method"] == "toy" and results["counts"]["finished"] == 1
    finally:
        methods.METHODS.pop("toy")
        names.METHOD_NAMES.remove("toy")


# ---------------------------------------------------------------------------- adapt-bn
def test_classify_adapt_bn_refuses_too_few_images_and_says_when_it_adapted(tmp_path, ckpt):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    runner = CliRunner()
    few = runner.invoke(
        app, ["classify", str(tmp_path / "1.png"), "--checkpoint", str(ckpt), "--adapt", "bn"]
    )
    assert few.exit_code == 2 and "at least 32" in few.output
    result = runner.invoke(
        app, ["classify", str(tmp_path), "--checkpoint", str(ckpt), "--adapt", "bn", "-f", "csv"]
    )
    assert result.exit_code == 0, result.output
    assert "adapted: BatchNorm statistics recomputed on 40" in result.output


def test_classify_adapt_bn_counts_only_the_images_that_decode(tmp_path, ckpt):
    """Unreadable files are not images: they neither count towards the 32 needed nor enter
    the BatchNorm statistics (rows equal those of the readable images alone)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    clean, mixed = tmp_path / "clean", tmp_path / "mixed"
    for folder in (clean, mixed):
        folder.mkdir()
    for i in range(40):
        pixels = rng.integers(0, 255, (32, 32), dtype=np.uint8)
        for folder in (clean, mixed):
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    for i in range(30):
        (mixed / f"bad{i:02d}.png").write_bytes(b"not an image")
    runner = CliRunner()
    m = ["--checkpoint", str(ckpt), "--adapt", "bn", "-f", "jsonl", "--workers", "1"]
    alone = runner.invoke(app, ["classify", str(clean), *m])
    beside = runner.invoke(app, ["classify", str(mixed), *m])
    assert beside.exit_code == 3 and "recomputed on 40 of these images" in beside.stderr
    rows = [json.loads(line) for line in beside.stdout.splitlines()]
    good = {Path(r["path"]).name: r["p_normal"] for r in rows if r["error"] is None}
    want = {Path(r["path"]).name: r["p_normal"] for r in map(json.loads, alone.stdout.splitlines())}
    assert good == want
    for i in range(12, 40):
        (mixed / f"{i:02d}.png").unlink()  # 12 readable images and 30 unreadable files
    few = runner.invoke(app, ["classify", str(mixed), *m])
    assert few.exit_code == 2 and "at least 32 readable images" in few.stderr
    assert "(got 12)" in few.stderr


# ------------------------------------------------------------------------------ real data
@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_dir(), reason="the real chest X-ray data is not here")
def test_a_short_vanilla_run_on_real_xrays_does_not_collapse_to_one_class(tmp_path):
    """`train kermany --method vanilla --size 100 --epochs 5` once called every val image
    pneumonia in eval mode. Width 16 keeps it quick; the collapse came from the BatchNorm
    statistics, not from the width."""
    from threengan_cli.core.settings import PrepareSettings
    from threengan_cli.data.prepare import prepare

    prepared = tmp_path / "kermany"
    prepare(REAL, prepared, PrepareSettings(workers=min(2, os.cpu_count() or 1)))
    settings = TrainSettings(method="vanilla", size=100, epochs=5, width=16, device="cpu")
    training.train(prepared, settings, tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert 0.2 < record["val"]["specificity"] and 0.2 < record["val"]["sensitivity"], record


# ------------------------------------------------------------------------- paper recipe
@pytest.mark.slow
@pytest.mark.parametrize("method", ["vanilla", "3ngan"])
def test_the_paper_recipe_is_the_bare_method_steps_and_nothing_more(dataset, tmp_path, method):
    """Replay the paper's protocol by hand (seed, init, batch order, one method step per
    batch, no averaging, augmentation or extra data) and get the loop's weights to the bit.
    (`benchmarks/hash_runs.py --set recipe=paper` shows the same against the code of 8c54e5c.)"""
    from threengan_cli.core import system
    from threengan_cli.data.training_data import batch_order, batches
    from threengan_cli.train import accel

    settings = _settings(method=method, recipe="paper", size=8, epochs=2)
    training.train(dataset, settings, tmp_path / "run")

    data = load_run_data(load_prepared(dataset), settings, torch.device("cpu"))
    cls = methods.METHODS[method]
    system.seed_everything(settings.seed)
    nets = cls.networks(settings, 2, data.image_size)
    rng = accel.run_generator(settings.seed, torch.device("cpu"))
    nets = accel.place(nets, torch.device("cpu"))
    opts = cls.optimizers(nets, settings)
    spans = batches(len(data.train_y), settings.batch_size)
    for epoch in range(settings.epochs):
        order = batch_order(settings.seed, epoch, len(data.train_y), torch.device("cpu"))
        for lo, hi in spans:
            idx = order[lo:hi]
            real = to_model_range(data.train_x[idx])
            cls.step(nets, opts, real, data.train_y[idx], settings, rng=rng)
    saved = checkpoints.load(tmp_path / "run" / "last.safetensors")
    for name, net in nets.items():
        mine = net.state_dict()
        theirs = saved.group(f"net/{name}")
        assert all(torch.equal(mine[k].contiguous(), theirs[k]) for k in mine), name


def test_adapt_bn_reads_stdin_s_paths_once_and_gives_them_back_as_inputs(tmp_path, ckpt):
    import io

    from PIL import Image

    from threengan_cli.infer.classify import adapt_bn
    from threengan_cli.infer.torch_engine import load_model

    rng = np.random.default_rng(2)
    listed = []
    for i in range(34):
        listed.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(listed[-1])
    stdin = io.StringIO("".join(f"{p}\n" for p in listed[2:]) + "\n")
    adapted, inputs = adapt_bn(["-", *listed[:2]], load_model(ckpt, "cpu"), 1, stdin=stdin)
    assert (adapted, inputs) == (34, [*listed[:2], *listed[2:]])
