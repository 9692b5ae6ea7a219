"""Out-of-distribution scores and calibration: the statistics fitted at the end of training,
stored with checksums, computed alike by both engines, reported by classify in every format,
and a model without them still classifying."""

from __future__ import annotations

import csv
import importlib.util
import io
import json

import numpy as np
import pytest
import torch
from model_factory import familiar_images, make_checkpoint
from typer.testing import CliRunner

from threengan_cli import metrics
from threengan_cli.cli.app import app
from threengan_cli.core.errors import EXIT_OOD
from threengan_cli.infer import blas, numpy_engine, ood
from threengan_cli.infer.torch_engine import load_model
from threengan_cli.model.modelfile import ModelError

runner = CliRunner()


@pytest.fixture(scope="module")
def stats_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("m") / "stats.safetensors", stats=True)


def _write_pngs(folder, pixels):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image, "L").save(folder / f"{i:03d}.png")
    return folder


# ------------------------------------------------------------------------------ the maths
def test_the_score_is_the_squared_mahalanobis_distance_per_direction():
    rng = np.random.default_rng(0)
    scales = np.array([1.0, 2.0, 4.0, 0.5])
    train = rng.standard_normal((4000, 4)) * scales + 10.0
    tensors, info = ood.fit_ood(train, train[:400])
    stats = ood.ModelStats(tensors["ood_mean"], tensors["ood_projection"], 1.0, 1.0, info)
    assert info["dims"] == 4
    variance = scales**2
    added = ood.SHRINK * variance.mean()  # the shrinkage, added to every direction's variance
    point = np.array([[10.0 + 2.0, 10.0, 10.0, 10.0]])  # two standard deviations along axis 0
    np.testing.assert_allclose(stats.scores(point), [2.0**2 / (1.0 + added) / 4], rtol=0.05)
    # training images score about 1 on average (a little less, for the shrinkage)
    expected_mean = np.mean(variance / (variance + added))
    assert stats.scores(train).mean() == pytest.approx(expected_mean, rel=0.03)
    val = rng.standard_normal((2000, 4)) * scales + 10.0
    tensors, _ = ood.fit_ood(train, val)
    flagged = (stats.scores(val) > float(tensors["ood_threshold"])).mean()
    assert flagged == pytest.approx(0.05, abs=0.005)


def test_few_training_images_keep_at_most_half_as_many_directions():
    train = np.random.default_rng(1).standard_normal((40, 64))
    _, info = ood.fit_ood(train, train)
    assert info["dims"] == 20
    with pytest.raises(ood.StatsError):
        ood.fit_ood(train[:3], train[:3])


def test_a_score_does_not_depend_on_the_other_images_in_its_batch():
    rng = np.random.default_rng(2)
    train = rng.standard_normal((600, 128)).astype(np.float32)
    tensors, info = ood.fit_ood(train, train)
    stats = ood.ModelStats(tensors["ood_mean"], tensors["ood_projection"], 1.0, 1.0, info)
    x = rng.standard_normal((50, 128)).astype(np.float32)
    whole = stats.scores(x)
    np.testing.assert_array_equal(stats.scores(x[::-1])[::-1], whole)
    one_by_one = np.concatenate([stats.scores(x[i : i + 1]) for i in range(50)])
    np.testing.assert_array_equal(one_by_one, whole)


def test_pixel_features_are_the_means_of_4x4_blocks_and_independent_of_the_batch():
    image = np.zeros((8, 8), np.uint8)
    image[:2, :2] = 255  # the top-left block of 2x2 pixels, white
    image[6:, 6:] = 51  # the bottom-right one at a fifth
    found = ood.pixel_features(image[None])
    expected = np.zeros(16, np.float32)
    expected[0], expected[15] = 1.0, 0.2
    np.testing.assert_allclose(found[0], expected, atol=1e-7)
    many = np.random.default_rng(0).integers(0, 256, (9, 32, 32), dtype=np.uint8)
    one_by_one = np.concatenate([ood.pixel_features(many[i : i + 1]) for i in range(9)])
    np.testing.assert_array_equal(ood.pixel_features(many), one_by_one)


@pytest.mark.parametrize("combine", ["sum", "max"])
def test_the_score_joins_the_scaled_feature_and_pixel_scores(combine):
    rng = np.random.default_rng(6)
    features, pixels = rng.standard_normal((600, 8)), rng.random((600, 16))
    fit = ood.fit_ood(
        features[:500], features[500:], pixels=(pixels[:500], pixels[500:]), combine=combine
    )
    tensors, info = fit
    assert info["detector"] == "mahalanobis-pca+pixels" and info["pixels"]["dims"] == 16
    assert info["combine"] == combine and info["layer"] == "first"
    stats = ood.from_arrays(
        {**tensors, "temperature": np.float32(1.0)}, {ood.META_KEY: {"ood": info}}
    )
    f_score = ood.gaussian_scores(tensors["ood_mean"], tensors["ood_projection"], features)
    p_score = ood.gaussian_scores(
        tensors["ood_pixel_mean"], tensors["ood_pixel_projection"], pixels
    )
    scales = tensors["ood_scales"]
    join = np.add if combine == "sum" else np.maximum
    expected = join(f_score / scales[0], p_score / scales[1])
    np.testing.assert_allclose(stats.scores(features, pixels), expected, rtol=1e-6)
    # each scale is the 95th percentile of its val scores: the combined score flags about
    # 5% of val, and an image unlike the training ones in its pixels alone is flagged
    assert np.mean(stats.scores(features[500:], pixels[500:]) > stats.threshold) <= 0.06
    odd = pixels[500:510] + 2.0
    assert (stats.scores(features[500:510], odd) > stats.threshold).all()


def test_statistics_of_threengan_0_2_keep_their_score(stats_ckpt, tmp_path):
    """Checkpoints fitted before the first-stage detector: the last map's 2x2 blocks and the pixel
    Gaussian joined by the larger score, with metadata that names neither; both engines and
    the ONNX graph score them as they did."""
    from threengan_cli.model import checkpoints

    ckpt = checkpoints.load(stats_ckpt)
    stats = dict(ckpt.group("stats"))
    reference = numpy_engine.load(stats_ckpt)
    fit, val = familiar_images(48, 32, seed=0), familiar_images(24, 32, seed=1)
    feats = [ood.pooled_features(reference.last_map(x)) for x in (fit, val)]
    pixels = (ood.pixel_features(fit), ood.pixel_features(val))
    tensors, fitted = ood.fit_ood(*feats, pixels=pixels, combine="max", layer="last")
    info = json.loads(json.dumps(ckpt.meta["stats"]))
    info["ood"] = {k: v for k, v in fitted.items() if k not in ("combine", "layer")}
    stats.update({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
    nets = {name: ckpt.group(f"net/{name}") for name in ckpt.network_names}
    old = tmp_path / "old.safetensors"
    checkpoints.save(old, {**ckpt.meta, "stats": info}, nets, stats=stats)
    images = np.random.default_rng(9).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    model = numpy_engine.load(old)
    assert model.stats.pixels.combine == "max" and model.stats.layer == "last"
    f_score = ood.gaussian_scores(
        tensors["ood_mean"], tensors["ood_projection"], ood.pooled_features(model.last_map(images))
    )
    p_score = ood.gaussian_scores(
        tensors["ood_pixel_mean"], tensors["ood_pixel_projection"], ood.pixel_features(images)
    )
    scales = tensors["ood_scales"]
    expected = np.maximum(f_score / scales[0], p_score / scales[1])
    engines = [model, load_model(old, device="cpu")]
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        from threengan_cli.infer import onnx_export

        onnx_export.export(model, tmp_path / "old.onnx")
        engines.append(onnx_export.load(tmp_path / "old.onnx"))
    for engine in engines:
        np.testing.assert_allclose(engine.outputs_of(images)[1], expected, rtol=1e-5)


def test_new_statistics_read_the_first_stage_and_sum_the_scaled_scores(stats_ckpt):
    model = numpy_engine.load(stats_ckpt)
    assert model.stats.layer == "first" and model.stats.pixels.combine == "sum"
    assert model.stats.mean.shape == (16 * 8,)  # 4x4 blocks of a width-4 model's 8 channels
    images = np.random.default_rng(10).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    first, _ = model.body_maps(images)
    assert first.shape == (5, 16, 16, 8)
    blocks = first.reshape(5, 4, 4, 4, 4, 8).mean(axis=(2, 4)).reshape(5, -1)
    stats, pixels = model.stats, model.stats.pixels
    f_score = ood.gaussian_scores(stats.mean, stats.projection, blocks)
    p_score = ood.gaussian_scores(pixels.mean, pixels.projection, ood.pixel_features(images))
    expected = f_score / pixels.scales[0] + p_score / pixels.scales[1]
    np.testing.assert_allclose(model.outputs_of(images)[1], expected, rtol=1e-5)


def test_statistics_without_the_pixel_gaussian_still_load_and_score(stats_ckpt, tmp_path):
    """Checkpoints fitted before the pixel Gaussian existed: the features' score alone."""
    from threengan_cli.model import checkpoints

    ckpt = checkpoints.load(stats_ckpt)
    info = json.loads(json.dumps(ckpt.meta["stats"]))
    info["ood"].pop("pixels")
    info["ood"]["detector"] = "mahalanobis-pca"
    stats = {k: v for k, v in ckpt.group("stats").items() if "pixel" not in k and k != "ood_scales"}
    nets = {name: ckpt.group(f"net/{name}") for name in ckpt.network_names}
    old = tmp_path / "old.safetensors"
    checkpoints.save(old, {**ckpt.meta, "stats": info}, nets, stats=stats)
    images = familiar_images(6, 32, seed=8)
    for load in (numpy_engine.load, lambda p: load_model(p, device="cpu")):
        model = load(old)
        assert model.stats.pixels is None
        _, scores = model.outputs_of(images)
        assert scores.shape == (6,) and np.isfinite(scores).all()


def test_ece_and_brier_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    # confidences 0.9, 0.8, 0.7, 0.6 in bins 13, 11, 10, 8 (of 15): one image each
    # |acc - conf| = 0.1, 0.8, 0.3, 0.4 -> mean 0.4
    assert metrics.expected_calibration_error(labels, probs) == pytest.approx(0.4)
    # binary Brier of p(class 1): (0.1-0)^2 + (0.2-1)^2 + (0.7-1)^2 + (0.6-1)^2, over 4
    assert metrics.brier_score(labels, probs) == pytest.approx((0.01 + 0.64 + 0.09 + 0.16) / 4)


def test_the_fitted_temperature_recovers_the_one_the_labels_were_drawn_with():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((20000, 2)) * 4
    truth = 2.5
    p = metrics.softmax(logits, truth)
    labels = (rng.random(20000) < p[:, 1]).astype(int)
    assert metrics.fit_temperature(logits, labels) == pytest.approx(truth, rel=0.05)
    before = metrics.expected_calibration_error(labels, metrics.softmax(logits))
    after = metrics.expected_calibration_error(labels, metrics.softmax(logits, truth))
    assert after < before / 3


# ------------------------------------------------------------------------ the checkpoint
def test_both_engines_give_the_same_scores_and_flags(stats_ckpt):
    a = numpy_engine.load(stats_ckpt)
    b = load_model(stats_ckpt, device="cpu")
    assert a.stats.temperature == b.stats.temperature != 1.0
    familiar = familiar_images(16, 32, seed=7)
    bright = np.clip(familiar.astype(int) + 150, 0, 255).astype(np.uint8)
    images = np.concatenate([familiar, bright])
    (pa, sa), (pb, sb) = a.outputs_of(images), b.outputs_of(images)
    np.testing.assert_allclose(sa, sb, rtol=1e-4)
    np.testing.assert_allclose(pa, pb, atol=1e-5)
    flags = sa > a.stats.threshold
    assert flags[16:].all() and flags[:16].mean() < 0.5  # bright images look unlike the rest
    assert np.array_equal(flags, sb > b.stats.threshold)


def test_the_temperature_divides_the_logits(stats_ckpt):
    model = numpy_engine.load(stats_ckpt)
    images = familiar_images(4, 32, seed=9)
    logits, _ = blas.per_image(model._forward, images)
    t = np.float32(model.stats.temperature)
    np.testing.assert_allclose(model.probabilities_of(images), metrics.softmax(logits / t), 1e-6)


def test_tampered_statistics_fail_their_checksum_in_both_engines(stats_ckpt, tmp_path):
    raw = bytearray(stats_ckpt.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + header])
    begin, _ = meta["stats/ood_threshold"]["data_offsets"]
    raw[8 + header + begin] ^= 0x40  # one bit of the stored threshold
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="checksum"):
        numpy_engine.load(bad)
    with pytest.raises(ModelError, match="checksum"):
        load_model(bad, device="cpu")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("dims", 10**9, "dims"), ("combine", "mean", "combine"), ("layer", "middle", "layer")],
)
def test_damaged_statistics_metadata_is_one_line(stats_ckpt, tmp_path, key, value, message):
    from threengan_cli.model.modelfile import update_meta

    bad = tmp_path / "dims.safetensors"
    bad.write_bytes(stats_ckpt.read_bytes())
    meta_stats = json.loads(json.dumps(numpy_engine.load(stats_ckpt).stats.info))
    meta_stats["ood"][key] = value
    update_meta(bad, {"stats": meta_stats})
    for load in (numpy_engine.load, lambda p: load_model(p, device="cpu")):
        with pytest.raises(ModelError, match=message):
            load(bad)


def _with_stats(source, path, **changed):
    """A copy of ``source`` whose ``stats/`` tensors are ``changed``, saved with valid
    checksums: wrong values, not a damaged file."""
    import torch

    from threengan_cli.model import checkpoints

    ckpt = checkpoints.load(source)
    nets = {name: ckpt.group(f"net/{name}") for name in ckpt.network_names}
    stats = {**ckpt.group("stats"), **{k: torch.tensor(v) for k, v in changed.items()}}
    checkpoints.save(path, ckpt.meta, nets, stats=stats)
    return path


@pytest.mark.parametrize(
    "changed",
    [{"ood_threshold": -1.0}, {"ood_threshold": 0.0}, {"ood_threshold": 1e30}],
)
def test_stored_statistics_that_make_no_sense_are_refused_by_both_engines(
    stats_ckpt, tmp_path, changed
):
    bad = _with_stats(stats_ckpt, tmp_path / "bad.safetensors", **changed)
    for load in (numpy_engine.load, lambda p: load_model(p, device="cpu")):
        with pytest.raises(ModelError, match="out-of-distribution threshold"):
            load(bad)
    assert _classify("--checkpoint", str(bad), str(tmp_path)).exit_code == 1


def test_a_projection_with_a_direction_of_zeros_is_refused(stats_ckpt, tmp_path):
    projection = numpy_engine.load(stats_ckpt).stats.projection.copy()
    projection[:, 0] = 0
    bad = _with_stats(stats_ckpt, tmp_path / "bad.safetensors", ood_projection=projection)
    with pytest.raises(ModelError, match="projection"):
        numpy_engine.load(bad)
    good = _with_stats(stats_ckpt, tmp_path / "good.safetensors", ood_threshold=2.5)
    assert numpy_engine.load(good).stats.threshold == 2.5


def test_pruned_final_weights_keep_their_statistics(stats_ckpt, tmp_path):
    from threengan_cli.model.modelfile import copy_weights

    copy_weights(stats_ckpt, tmp_path / "final.safetensors", {})
    kept = numpy_engine.load(tmp_path / "final.safetensors")
    assert kept.stats is not None
    assert kept.stats.threshold == numpy_engine.load(stats_ckpt).stats.threshold


# ----------------------------------------------------------------------------- classify
def _classify(*args):
    return runner.invoke(app, ["classify", *args])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """8 images like the model's training ones, 4 bright ones unlike them."""
    root = tmp_path_factory.mktemp("mixed")
    familiar = familiar_images(8, 32, seed=11)
    _write_pngs(root / "a-familiar", familiar)
    _write_pngs(root / "b-bright", np.clip(familiar[:4].astype(int) + 150, 0, 255).astype(np.uint8))
    return root


def test_every_format_carries_the_score_and_the_flag(stats_ckpt, mixed):
    m = ["--checkpoint", str(stats_ckpt), "-r", str(mixed)]
    rows = list(csv.DictReader(io.StringIO(_classify(*m, "-f", "csv", "-q").stdout)))
    assert [r["ood"] for r in rows[8:]] == ["true"] * 4
    assert all(float(r["ood_score"]) > 0 for r in rows)
    doc = json.loads(_classify(*m, "-f", "json", "-q").stdout)
    assert doc["ood_threshold_source"] == "model"
    assert doc["summary"]["ood"] == sum(r["ood"] for r in doc["rows"]) >= 4
    assert [r["ood_score"] for r in doc["rows"]] == [float(r["ood_score"]) for r in rows]
    lines = _classify(*m, "-f", "jsonl", "-q").stdout.splitlines()
    assert [json.loads(line)["ood"] for line in lines] == [r["ood"] == "true" for r in rows]
    table = _classify(*m, "-f", "table", "-q").stdout
    assert "ood_score" in table.splitlines()[0] and table.count(" ood ") >= 4


def test_the_summary_says_how_many_look_unlike_the_training_x_rays(stats_ckpt, mixed):
    result = _classify("--checkpoint", str(stats_ckpt), "-r", str(mixed), "-f", "csv")
    flagged = sum(r["ood"] == "true" for r in csv.DictReader(io.StringIO(result.stdout)))
    assert f"ood: {flagged} of 12 images look unlike the model's training X-rays" in result.stderr


def test_fail_on_ood_exits_4_and_a_threshold_above_every_score_exits_0(stats_ckpt, mixed, tmp_path):
    m = ["--checkpoint", str(stats_ckpt), "-r", str(mixed), "-q", "-f", "csv"]
    assert _classify(*m, "--fail-on-ood").exit_code == EXIT_OOD == 4
    assert _classify(*m).exit_code == 0
    high = _classify(*m, "--fail-on-ood", "--ood-threshold", "1e5")
    assert high.exit_code == 0
    assert {r["ood"] for r in csv.DictReader(io.StringIO(high.stdout))} == {"false"}
    config = tmp_path / "c.toml"
    config.write_text("[classify]\nfail_on_ood = true\nood_threshold = 100000.0\n")
    assert _classify(*m, "--config", str(config)).exit_code == 0
    config.write_text("[classify]\nfail_on_ood = true\n")
    assert _classify(*m, "--config", str(config)).exit_code == 4


def test_unreadable_files_keep_their_error_rows_beside_the_scores(stats_ckpt, mixed, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    result = _classify("--checkpoint", str(stats_ckpt), str(broken), "-r", str(mixed), "-f", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert result.exit_code == 3
    assert rows[0]["error"] and rows[0]["ood_score"] == "" and rows[0]["ood"] == ""
    assert all(r["ood_score"] for r in rows[1:])


def test_a_model_without_statistics_classifies_with_empty_columns_and_one_note(ckpt, mixed):
    result = _classify("--checkpoint", str(ckpt), "-r", str(mixed), "-f", "csv")
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {r["ood_score"] for r in rows} == {""} and {r["ood"] for r in rows} == {""}
    assert result.stderr.count("no out-of-distribution statistics") == 1


@pytest.mark.parametrize("gate", [["--fail-on-ood"], ["--max-ood-share", "0.5"]])
def test_an_ood_gate_a_model_without_statistics_cannot_judge_is_refused_even_quiet(
    ckpt, mixed, gate
):
    result = _classify("--checkpoint", str(ckpt), "-r", str(mixed), "-f", "csv", "-q", *gate)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "cannot be judged" in result.stderr and "no out-of-distribution" in result.stderr


def test_max_ood_share_exits_4_only_above_the_share(stats_ckpt, mixed, tmp_path):
    m = ["--checkpoint", str(stats_ckpt), "-r", str(mixed), "-q", "-f", "csv"]
    rows = list(csv.DictReader(io.StringIO(_classify(*m).stdout)))
    flagged = sum(r["ood"] == "true" for r in rows)
    assert 4 <= flagged < 12
    share = flagged / 12
    at = _classify(*m, "--max-ood-share", repr(share))
    assert at.exit_code == 0 and at.stderr == ""
    below = _classify(*m, "--max-ood-share", repr(share - 0.01))
    assert below.exit_code == EXIT_OOD
    assert f"{flagged} of 12 images" in below.stderr  # said even under -q: it sets the exit
    config = tmp_path / "c.toml"
    config.write_text("[classify]\nmax_ood_share = 0.0\n")
    assert _classify(*m, "--config", str(config)).exit_code == EXIT_OOD


@pytest.mark.parametrize("bad", ["-0.1", "1.5", "nan", "inf"])
def test_max_ood_share_outside_zero_to_one_is_a_usage_error(stats_ckpt, mixed, bad):
    result = _classify("--checkpoint", str(stats_ckpt), str(mixed), "--max-ood-share", bad)
    assert result.exit_code == 2 and "max_ood_share" in result.stderr.replace("-", "_")
    assert "Traceback" not in result.stderr


def test_sort_into_files_flagged_images_under_ood_unless_told_not_to(stats_ckpt, mixed, tmp_path):
    out = tmp_path / "sorted"
    m = ["--checkpoint", str(stats_ckpt), "-r", str(mixed), "-f", "csv", "--sort-into", str(out)]
    rows = list(csv.DictReader(io.StringIO(_classify(*m).stdout)))
    flagged = [r["path"] for r in rows if r["ood"] == "true"]
    assert flagged  # the bright images at least
    in_ood = sorted(p.name for p in (out / "ood").iterdir())
    assert len(in_ood) == len(flagged)
    assert len(_sorted_files(out)) == 12 - len(flagged)
    # the old behaviour on demand; the rerun moves the flagged copies out of ood/
    assert _classify(*m, "--no-ood-folder").exit_code == 0
    assert list((out / "ood").iterdir()) == []
    assert len(_sorted_files(out)) == 12


def _sorted_files(out):
    """The files --sort-into filed under the model's class folders."""
    return [p for c in ("normal", "pneumonia") if (out / c).is_dir() for p in (out / c).iterdir()]


# ----------------------------------------------------------------------------- training
def test_training_stores_statistics_in_best_and_last_and_the_summary(dataset, tmp_path):
    from threengan_cli.core.settings import TrainSettings
    from threengan_cli.train.training import train

    settings = TrainSettings(method="vanilla", size=12, epochs=2, batch_size=4, width=4)
    summary = train(dataset, settings, tmp_path / "run", checkpoint_every_s=None)
    assert summary["stats"]["temperature"] > 0
    assert set(summary["stats"]["ood_flagged"]) == {"val", "test"}
    for name in ("best.safetensors", "last.safetensors"):
        model = numpy_engine.load(tmp_path / "run" / name)
        assert model.stats is not None
        # the whole train split (24 images), not only the 12 labelled ones: the fit needs
        # no labels
        assert model.stats.info["ood"]["fitted_on"] == {"images": 24}
        assert model.stats.info["ood"]["threshold"]["split"] == "val"
    # the threshold is the 95th percentile of the 8 val images' scores: one at most is above
    assert summary["stats"]["ood_flagged"]["val"] <= 1 / 8


def test_a_run_without_val_says_it_is_uncalibrated_and_holds_out_its_threshold(tmp_path):
    from threengan_cli.core.settings import PrepareSettings
    from threengan_cli.data.prepare import prepare

    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    images = rng.integers(0, 120, (40, 32, 32), dtype=np.uint8)
    np.savez(
        tmp_path / "noval.npz",
        train_images=images,
        train_labels=labels.reshape(-1, 1),
        test_images=images[:8],
        test_labels=labels[:8].reshape(-1, 1),
    )
    settings = PrepareSettings(image_size=32, min_val=0, val_fraction=0.0, workers=1)
    prepare(tmp_path / "noval.npz", tmp_path / "noval", settings)
    args = [
        "train",
        str(tmp_path / "noval"),
        "--out",
        str(tmp_path / "run"),
        "--method",
        "vanilla",
        "--recipe",
        "paper",
        "--width",
        "4",
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--device",
        "cpu",
    ]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    line = done.stderr.splitlines()[-1]
    assert "best on val" not in line and "no val split" in line and "uncalibrated" in line
    model = numpy_engine.load(tmp_path / "run" / "best.safetensors")
    assert model.stats.temperature == 1.0 and model.stats.info["temperature"]["split"] is None
    assert model.stats.info["ood"]["threshold"]["split"].startswith("held out")


def test_the_detector_is_fitted_on_the_whole_train_split_and_an_outside_pool(dataset, tmp_path):
    import torch

    from threengan_cli.core.settings import TrainSettings
    from threengan_cli.data.datasets import load_prepared
    from threengan_cli.data.training_data import load_run_data

    prepared = load_prepared(dataset)
    whole, _ = prepared.subset("train")
    pool = _write_pngs(tmp_path / "pool", familiar_images(5, 32, seed=3))
    cpu = torch.device("cpu")
    for unlabelled, expected in ((None, whole), ("rest", whole)):
        settings = TrainSettings(size=12, unlabelled=unlabelled)
        data = load_run_data(prepared, settings, cpu)
        assert len(data.train_x) == 12
        np.testing.assert_array_equal(data.detector_x.numpy(), expected)
    data = load_run_data(prepared, TrainSettings(size=12, unlabelled=str(pool)), cpu)
    assert len(data.detector_x) == len(whole) + 5
    np.testing.assert_array_equal(data.detector_x[len(whole) :].numpy(), data.unlabelled.numpy())


def test_without_val_the_threshold_comes_from_images_held_out_of_the_fit():
    rng = np.random.default_rng(5)
    scales = np.linspace(0.2, 3.0, 64)
    train = rng.standard_normal((400, 64)) * scales
    fresh = rng.standard_normal((20000, 64)) * scales
    tensors, info = ood.fit_ood(train, train[:0])
    assert info["threshold"]["split"].startswith("held out") and info["threshold"]["images"] == 80
    assert info["fitted_on"] == {"images": 320}
    stats = ood.ModelStats(tensors["ood_mean"], tensors["ood_projection"], 1.0, 1.0, info)
    flagged = (stats.scores(fresh) > float(tensors["ood_threshold"])).mean()
    # about 5% of new images like the training ones (the 95th percentile of 80 scores)...
    assert 0.02 < flagged < 0.10
    # ...where the 95th percentile of the fit images' own scores flags several times as many
    own = np.quantile(stats.scores(train[np.arange(400) % 5 != 4]), 0.95)
    assert (stats.scores(fresh) > own).mean() > 0.15


# ----------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Class folders: 8 familiar and 4 bright images per class."""
    root = tmp_path_factory.mktemp("labelled")
    for k, name in enumerate(("normal", "pneumonia")):
        familiar = familiar_images(8, 32, seed=20 + k)
        _write_pngs(root / name / "familiar", familiar)
        bright = np.clip(familiar[:4].astype(int) + 150, 0, 255).astype(np.uint8)
        _write_pngs(root / name / "bright", bright)
    return root


def test_evaluate_reports_the_flagged_share_and_the_metrics_over_the_unflagged(
    stats_ckpt, labelled, tmp_path
):
    args = ["evaluate", str(labelled), "--checkpoint", str(stats_ckpt), "--json"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    rows = list(
        csv.DictReader(
            io.StringIO(_classify("--checkpoint", str(stats_ckpt), "-r", str(labelled)).stdout)
        )
    )
    flagged = [r["ood"] == "true" for r in rows]
    assert report["ood_flagged"] == pytest.approx(np.mean(flagged)) and 0 < np.mean(flagged) < 1
    assert report["unflagged"]["n"] == flagged.count(False)
    assert report["n"] == 24 and 0 <= report["ece"] <= 1 and 0 <= report["brier"] <= 1
    # a threshold above every score flags nothing: the unflagged metrics are the metrics
    high = json.loads(runner.invoke(app, [*args, "--ood-threshold", "1e5"]).stdout)
    assert high["ood_flagged"] == 0 and high["unflagged"]["accuracy"] == high["accuracy"]


def test_evaluate_gives_a_95_percent_interval_for_every_metric_in_json(stats_ckpt, labelled):
    args = ["evaluate", str(labelled), "--checkpoint", str(stats_ckpt), "--json"]
    report = json.loads(runner.invoke(app, args).stdout)
    keys = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "f1")
    for key in (*keys, "ece", "brier"):
        for found in (report, report["unflagged"]):
            lo, hi = found[f"{key}_ci"]
            assert 0 <= lo <= found[key] <= hi <= 1, key
    correct = round(report["accuracy"] * 24)
    assert report["accuracy_ci"] == pytest.approx(metrics.wilson_interval(correct, 24), abs=1e-6)
    flagged = round(report["ood_flagged"] * 24)
    assert report["ood_flagged_ci"] == pytest.approx(metrics.wilson_interval(flagged, 24), abs=1e-6)
    assert report["ood_fit"]["dims"] >= 1 and report["ood_fit"]["fitted_on"]
    # the temperature the probabilities were divided by, and where it was fitted
    assert report["temperature"]["split"] == "val" and report["temperature"]["images"] == 24
    assert report["temperature"]["value"] > 0
    assert json.loads(runner.invoke(app, args).stdout) == report  # the bootstrap is seeded


def test_evaluate_tables_have_headers_naming_each_column_and_its_images(stats_ckpt, labelled):
    done = runner.invoke(app, ["evaluate", str(labelled), "--checkpoint", str(stats_ckpt)])
    report = json.loads(
        runner.invoke(
            app, ["evaluate", str(labelled), "--checkpoint", str(stats_ckpt), "--json"]
        ).stdout
    )
    header = next(line for line in done.stdout.splitlines() if "metric" in line)
    assert "all (n=24)" in header
    assert f"not flagged (n={report['unflagged']['n']})" in header
    lo, hi = report["accuracy_ci"]
    assert f"{report['accuracy']:.4f} [{lo:.3f}, {hi:.3f}]" in done.stdout
    assert "true \\ predicted" in done.stdout
    assert "[brackets]: 95% interval" in done.stdout


SETTING = "evaluate.ood_threshold: must satisfy"  # the settings' range; nan fails typer's >= 0


@pytest.mark.parametrize(
    "bad, said",
    [("inf", SETTING), ("1e300", SETTING), ("nan", "'--ood-threshold'"), ("0", SETTING)],
)
def test_evaluate_refuses_an_ood_threshold_classify_refuses(stats_ckpt, labelled, bad, said):
    args = ["evaluate", str(labelled), "--checkpoint", str(stats_ckpt), "--json"]
    done = runner.invoke(app, [*args, "--ood-threshold", bad])
    assert done.exit_code == 2 and done.stdout == ""
    assert said in done.stderr and "Traceback" not in done.stderr
    assert (
        _classify(
            str(labelled), "--checkpoint", str(stats_ckpt), "--ood-threshold", bad, "-r"
        ).exit_code
        == 2
    )


def test_json_output_never_holds_nan_or_infinity():
    import math

    from threengan_cli.cli.views import strict_json

    data = {"a": math.inf, "b": [1.5, -math.inf, {"c": math.nan}], "d": (2.0, "x"), "e": None}
    assert strict_json(data) == {
        "a": None,
        "b": [1.5, None, {"c": None}],
        "d": [2.0, "x"],
        "e": None,
    }
    json.dumps(strict_json(data), allow_nan=False)  # strict: raises on any left


def test_a_detector_s_fit_is_described_from_its_metadata():
    fit = {"dims": 256, "fitted_on": {"images": 4683}, "threshold": {"split": "val"}}
    assert ood.describe_fit(fit) == "4683 img, 256 dir"
    fit["pixels"] = {"dims": 16}
    assert ood.describe_fit(fit) == "4683 img, 256+16 dir"
    assert ood.describe_fit(fit, short=False) == (
        "4683 images, 256+16 directions (features + pixels), threshold on val"
    )
    assert ood.describe_fit(None) == ood.describe_fit({}) == "–"


def test_evaluate_plots_a_reliability_diagram_and_the_scores(stats_ckpt, labelled, tmp_path):
    pytest.importorskip("matplotlib")
    args = ["evaluate", str(labelled), "--checkpoint", str(stats_ckpt), "--plot", str(tmp_path)]
    assert runner.invoke(app, [*args, "--json"]).exit_code == 0
    for name in ("reliability.png", "ood_scores.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_scores_and_flags_are_the_same_for_every_batch_size(stats_ckpt, engine):
    model = numpy_engine.load(stats_ckpt) if engine == "numpy" else load_model(stats_ckpt)
    pixels = np.random.default_rng(4).integers(0, 256, (40, 32, 32), dtype=np.uint8)
    whole = model.outputs_of(pixels)[1]
    for batch in (1, 3):
        parts = [model.outputs_of(pixels[i : i + batch])[1] for i in range(0, 40, batch)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    np.testing.assert_array_equal(model.outputs_of(pixels[::-1])[1][::-1], whole)


def test_the_share_gate_trips_only_above_its_share_and_the_any_gate_on_one_image():
    from types import SimpleNamespace

    from threengan_cli.infer import gate

    share = SimpleNamespace(fail_on_ood=False, max_ood_share=0.1)
    assert gate.breach(share, 10, 100) is None  # exactly the share: passes
    assert "11 of 100 images (11.0%)" in gate.breach(share, 11, 100)
    assert "--max-ood-share 0.1 allows at most 10.0%" in gate.breach(share, 11, 100)
    assert gate.breach(share, 0, 0) is None  # nothing classified: another exit code says so
    anything = SimpleNamespace(fail_on_ood=True, max_ood_share=None)
    assert gate.breach(anything, 0, 624) is None
    assert "--fail-on-ood allows none" in gate.breach(anything, 1, 624)
    assert gate.breach(SimpleNamespace(fail_on_ood=False, max_ood_share=None), 624, 624) is None
