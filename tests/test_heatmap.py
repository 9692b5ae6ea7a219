"""classify --heatmaps: the positional evidence adds up to the model's output, follows each
image through batches and unreadable files, changes when the weights are randomised (the
sanity check of Adebayo et al. 2018), and never changes the rows it is added to."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from model_factory import make_checkpoint, write_image
from PIL import Image
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.core.paths import example_images
from threengan_cli.data import images
from threengan_cli.infer import numpy_engine
from threengan_cli.infer.heatmap import Capture, numpy_explained, png, render

runner = CliRunner()


def _cli(*args: str):
    return runner.invoke(app, ["classify", *args])


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.parametrize("classes, stats", [(("a", "b"), True), (("a", "b", "c"), False)])
def test_evidence_adds_up_to_the_centred_log_probabilities(tmp_path, classes, stats):
    model = numpy_engine.load(
        make_checkpoint(tmp_path / "m.safetensors", classes=classes, stats=stats)
    )
    pixels = np.random.default_rng(3).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    probs, _, maps = numpy_explained(model, pixels)
    assert maps.shape == (5, len(classes), 4, 4)
    log_p = np.log(probs.astype(np.float64))
    bias = model.head[1][: len(classes)].astype(np.float64)
    temperature = model.stats.temperature if stats else 1.0
    centred_bias = (bias - bias.mean()) / temperature
    np.testing.assert_allclose(
        maps.sum(axis=(2, 3)) + centred_bias, log_p - log_p.mean(axis=1, keepdims=True), atol=1e-4
    )


def test_capture_gives_the_probabilities_and_scores_of_the_plain_model(tmp_path):
    model = numpy_engine.load(make_checkpoint(tmp_path / "m.safetensors", stats=True))
    pixels = np.random.default_rng(4).integers(0, 256, (9, 32, 32), dtype=np.uint8)
    plain = model.outputs_of(pixels)
    captured = Capture(model, maps=True)
    probs, scores = captured.outputs_of(pixels)
    np.testing.assert_array_equal(probs, plain[0])
    np.testing.assert_array_equal(scores, plain[1])
    image, maps = captured.take()
    np.testing.assert_array_equal(image, pixels[0])
    assert maps.shape == (2, 4, 4)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort(), b.argsort().argsort()
    return float(np.corrcoef(ra, rb)[0, 1])


def test_maps_change_when_the_weights_are_randomised():
    """Adebayo et al.'s model-randomisation test on the bundled (trained) model and the
    shipped X-rays: randomising the head, then every layer, must change the maps of the
    labels the trained model gave. A map that mostly showed the image (edges, brightness)
    would stay correlated with the trained one."""
    model = numpy_engine.load()
    pixels = np.stack([images.load_image(p, model.image_size, model.fit) for p in example_images()])
    probs, _, maps = numpy_explained(model, pixels)
    label = probs.argmax(axis=1)
    trained = maps[np.arange(len(pixels)), label].reshape(len(pixels), -1)
    rng = np.random.default_rng(0)

    def shuffled(kernel):  # the same values (so the same scale) at random places
        return rng.permutation(kernel.reshape(-1)).reshape(kernel.shape)

    head_only = replace(model, head=(shuffled(model.head[0]), model.head[1]))
    every_layer = replace(head_only, layers=[(shuffled(k), shift) for k, shift in model.layers])
    for randomised in (head_only, every_layer):
        _, _, other = numpy_explained(randomised, pixels)
        other = other[np.arange(len(pixels)), label].reshape(len(pixels), -1)
        correlations = [_spearman(a, b) for a, b in zip(trained, other, strict=True)]
        assert abs(float(np.mean(correlations))) < 0.3, correlations


def test_visuals_are_made_from_the_settings_and_an_engine_without_maps_is_a_usage_error(
    tmp_path,
):
    from types import SimpleNamespace

    from threengan_cli.core.errors import UsageError
    from threengan_cli.core.use_settings import ClassifySettings
    from threengan_cli.infer.heatmap import visuals_for

    no_maps = SimpleNamespace(model_id="m", method="3ngan", device="cpu (torch)")
    assert visuals_for(no_maps, ClassifySettings(), {}) is None
    cfg = ClassifySettings(heatmaps=tmp_path / "maps")
    with pytest.raises(UsageError, match="--heatmaps needs the numpy or onnx engine"):
        visuals_for(no_maps, cfg, {})


def test_heatmaps_add_a_column_and_leave_the_rows_as_they_were(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.safetensors", stats=True)
    folder = tmp_path / "in"
    for i in range(5):
        write_image(folder / f"{i:02d}.png", seed=i)
    (folder / "03.png").write_bytes(b"not an image")
    plain = _cli(str(folder), "--checkpoint", str(ckpt), "-f", "csv", "--batch-size", "2")
    made = _cli(
        str(folder), "--checkpoint", str(ckpt), "-f", "csv", "--batch-size", "2",
        "--heatmaps", str(tmp_path / "maps"),
    )  # fmt: skip
    assert plain.exit_code == made.exit_code == 3  # one unreadable file
    rows = _rows(made.stdout)
    assert list(rows[0])[-1] == "heatmap"
    assert [{k: v for k, v in r.items() if k != "heatmap"} for r in rows] == _rows(plain.stdout)
    assert rows[3]["heatmap"] == ""  # the unreadable one
    written = sorted((tmp_path / "maps").iterdir())
    assert sorted(Path(r["heatmap"]) for r in rows if r["heatmap"]) == written
    assert len(written) == 4
    with Image.open(written[0]) as picture:
        assert picture.format == "PNG" and picture.size[0] >= 128


def test_each_heatmap_is_the_one_of_its_own_image(tmp_path):
    """Across batches and around an unreadable file, a row's heatmap is the one its image
    gets when classified alone."""
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    folder = tmp_path / "in"
    for i in range(6):
        write_image(folder / f"{i:02d}.png", seed=10 + i)
    (folder / "02.png").write_bytes(b"")
    batch = _cli(
        str(folder), "--checkpoint", str(ckpt), "-f", "jsonl", "--batch-size", "4",
        "--heatmaps", str(tmp_path / "all"),
    )  # fmt: skip
    records = [json.loads(line) for line in batch.stdout.splitlines()]
    for record in records:
        if record["error"]:
            assert record["heatmap"] is None
            continue
        alone = _cli(
            record["path"], "--checkpoint", str(ckpt), "-f", "json",
            "--heatmaps", str(tmp_path / "one"),
        )  # fmt: skip
        single = json.loads(alone.stdout)["rows"][0]["heatmap"]
        assert Path(record["heatmap"]).read_bytes() == Path(single).read_bytes()


def test_table_and_json_name_the_heatmap(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the folder is given relative to it
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    image = write_image(tmp_path / "x.png")
    table = _cli(str(image), "--checkpoint", str(ckpt), "-f", "table", "--heatmaps", "maps")
    assert table.exit_code == 0
    header, line = table.stdout.splitlines()
    assert header.endswith("heatmap") and line.rstrip().endswith(".png")
    assert Path(line.split()[-1]).is_file()


def test_heatmaps_need_an_engine_that_can_split_the_logits(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    image = write_image(tmp_path / "x.png")
    result = _cli(
        str(image), "--checkpoint", str(ckpt), "--engine", "torch", "--heatmaps", str(tmp_path)
    )
    assert result.exit_code == 2
    assert "--heatmaps needs the numpy or onnx engine" in result.stderr
    assert "Traceback" not in result.output


def test_an_unwritable_heatmap_folder_fails_without_results(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    image = write_image(tmp_path / "x.png")
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = tmp_path / "out.csv"
    result = _cli(
        str(image), "--checkpoint", str(ckpt), "-o", str(out), "--heatmaps", str(blocker / "d")
    )
    assert result.exit_code == 2
    assert "cannot make" in result.stderr and not out.exists()


def test_render_is_a_picture_of_the_image_with_the_evidence_in_colour():
    xray = np.full((64, 64), 128, np.uint8)
    evidence = np.zeros((4, 4), np.float32)
    evidence[0, 0], evidence[3, 3] = 1.0, -1.0  # for, top left; against, bottom right
    pixels = render(xray, evidence, "a 0.9")
    top_left, bottom_right, middle = pixels[3, 3], pixels[124, 124], pixels[64, 64]
    assert top_left[0] > 180 and top_left[2] < 100  # red
    assert bottom_right[2] > 180 and bottom_right[0] < 100  # blue
    assert abs(int(middle[0]) - 128) < 40 and abs(int(middle[2]) - 128) < 40  # gray shows


def test_png_reads_back_as_the_same_pixels():
    pixels = np.random.default_rng(7).integers(0, 256, (30, 17, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(png(pixels))) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(picture), pixels)


def test_a_heatmap_folder_inside_the_inputs_is_never_classified(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    folder = tmp_path / "in"
    for i in range(3):
        write_image(folder / f"{i}.png", seed=i)
    for _ in range(2):  # the second run finds the first run's heatmaps there
        result = _cli(
            str(folder), "-r", "--checkpoint", str(ckpt), "-f", "csv",
            "--heatmaps", str(folder / "maps"),
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert len(_rows(result.stdout)) == 3
    assert len(list((folder / "maps").iterdir())) == 3
