"""threengan export --format onnx: the graph gives the NumPy engine's probabilities, ood
scores and evidence, runs in onnxruntime alone, records its preprocessing, and classify
runs it (--checkpoint model.onnx). Skipped where onnx or onnxruntime is not installed."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from model_factory import make_checkpoint, write_image
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.infer import numpy_engine
from threengan_cli.infer.heatmap import numpy_explained

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from threengan_cli.infer import onnx_export  # noqa: E402  (after the skips)

runner = CliRunner()


def _export(tmp_path: Path, **kwargs) -> tuple[Path, Path]:
    ckpt = make_checkpoint(tmp_path / "m.safetensors", **kwargs)
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return ckpt, out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stats": True},
        {"classes": ("a", "b", "c")},
        {"method": "sgan", "stats": True},  # its D's extra "fake" logit is not a class
    ],
)
def test_the_graph_gives_the_numpy_engines_outputs(tmp_path, kwargs):
    ckpt, out = _export(tmp_path, **kwargs)
    reference = numpy_engine.load(ckpt)
    exported = onnx_export.load(out)
    pixels = np.random.default_rng(5).integers(0, 256, (12, 32, 32), dtype=np.uint8)
    probs, scores, maps = numpy_explained(reference, pixels)
    got_probs, got_scores, got_maps = exported.explained_outputs(pixels)
    np.testing.assert_allclose(got_probs, probs, atol=1e-5)
    np.testing.assert_allclose(got_maps, maps, atol=1e-5)
    if scores is None:
        assert got_scores is None and exported.stats is None
    else:
        np.testing.assert_allclose(got_scores, scores, rtol=1e-5, atol=1e-5)
        assert exported.stats.threshold == reference.stats.threshold
    assert exported.classes == reference.classes


def test_the_file_records_its_preprocessing(tmp_path):
    import onnx

    _, out = _export(tmp_path, stats=True, fit="pad")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    meta = json.loads(props["threengan"])
    assert meta["image_size"] == 32 and meta["fit"] == "pad"
    assert meta["classes"] == ["normal", "pneumonia"]
    assert meta["normalisation"] == {"scale": 1 / 127.5, "offset": -1.0}
    assert "load_image" in props["preprocessing"]


def test_the_exported_file_runs_in_onnxruntime_without_threengan(tmp_path):
    ckpt, out = _export(tmp_path, stats=True)
    pixels = np.random.default_rng(6).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    script = f"""
import sys
sys.modules["threengan_cli"] = None  # importing it would now fail
import numpy as np, onnxruntime
session = onnxruntime.InferenceSession({str(out)!r}, providers=["CPUExecutionProvider"])
images = np.load({str(tmp_path / "x.npy")!r})
p, s = session.run(["probabilities", "ood_score"], {{"images": images}})
np.save({str(tmp_path / "p.npy")!r}, p)
np.save({str(tmp_path / "s.npy")!r}, s)
"""
    subprocess.run([sys.executable, "-I", "-c", script], check=True, timeout=60)
    probs, scores = numpy_engine.load(ckpt).outputs_of(pixels)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), probs, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), scores, rtol=1e-5, atol=1e-5)


def test_classify_runs_an_onnx_checkpoint_with_the_same_labels(tmp_path):
    ckpt, out = _export(tmp_path, stats=True)
    folder = tmp_path / "in"
    for i in range(6):
        write_image(folder / f"{i}.png", seed=i)
    rows = {}
    for model in (ckpt, out):
        result = runner.invoke(
            app, ["classify", str(folder), "--checkpoint", str(model), "-f", "csv"]
        )
        assert result.exit_code == 0, result.output
        rows[model] = list(csv.DictReader(io.StringIO(result.stdout)))
    assert "onnxruntime" in result.stderr
    for a, b in zip(rows[ckpt], rows[out], strict=True):
        assert a["label"] == b["label"] and a["ood"] == b["ood"]
        assert abs(float(a["p_pneumonia"]) - float(b["p_pneumonia"])) < 1e-5
        score = float(a["ood_score"])
        assert abs(score - float(b["ood_score"])) < 1e-5 * max(1.0, score)
    made = runner.invoke(
        app,
        ["classify", str(folder), "--checkpoint", str(out), "-f", "csv"]
        + ["--heatmaps", str(tmp_path / "maps")],
    )
    assert made.exit_code == 0
    assert len(list((tmp_path / "maps").glob("*.png"))) == 6


def test_a_damaged_onnx_file_is_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    image = write_image(tmp_path / "x.png")
    result = runner.invoke(app, ["classify", str(image), "--checkpoint", str(bad)])
    assert result.exit_code == 1
    assert "is not a threengan ONNX export" in result.stderr
    assert "Traceback" not in result.output


def test_without_onnxruntime_classify_says_how_to_install_it(tmp_path, monkeypatch):
    _, out = _export(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    image = write_image(tmp_path / "x.png")
    result = runner.invoke(app, ["classify", str(image), "--checkpoint", str(out)])
    assert result.exit_code == 1
    assert "pip install 'threengan[onnx]'" in result.stderr


def test_export_refuses_an_unknown_format(tmp_path):
    result = runner.invoke(app, ["export", "--format", "tflite", "-o", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "--format must be one of onnx" in result.stderr
    assert not (tmp_path / "m").exists()


def test_an_export_without_onnx_or_that_cannot_be_written_is_a_failure(tmp_path, monkeypatch):
    from threengan_cli.core.errors import Failure
    from threengan_cli.infer import onnx_export

    model = numpy_engine.load(make_checkpoint(tmp_path / "m.safetensors"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(Failure, match=r"cannot write .*a-file"):
        onnx_export.export(model, tmp_path / "a-file" / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import raises ImportError
    with pytest.raises(Failure, match=r"needs the onnx package \(pip install"):
        onnx_export.export(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
