"""generate: files, formats, determinism, labelling by the classifier, and the CLI command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from model_factory import make_checkpoint
from PIL import Image
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.infer.generate import GenerateError, generate, latents
from threengan_cli.infer.torch_engine import load_model
from threengan_cli.model.modelfile import ModelError

runner = CliRunner()


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.rglob("gen_*.png"))}


def test_writes_count_8bit_grayscale_pngs_at_model_size(tmp_path, model):
    result = generate(model, 7, seed=0, out_dir=tmp_path / "out", batch_size=3)
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == [f"gen_{i:05d}.png" for i in range(7)]
    made = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert made == {"model": model.model_id, "count": 7, "seed": 0, "label": False, "labels": None}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        *(f.name for f in files),
        "generate.json",
    ]
    for f in files:
        with Image.open(f) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "L", (32, 32))
    assert result.count == 7 and result.labels == {}
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left behind


def test_same_seed_gives_the_same_images_whatever_the_batch_size(tmp_path, model):
    generate(model, 6, seed=3, out_dir=tmp_path / "a", batch_size=6)
    generate(model, 6, seed=3, out_dir=tmp_path / "b", batch_size=4)
    generate(model, 6, seed=4, out_dir=tmp_path / "c")
    a, b, c = (_pixels(tmp_path / n) for n in "abc")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_latents_depend_only_on_seed_and_index():
    whole = latents(5, 0, 600, 8)
    assert whole.shape == (600, 8)
    assert np.array_equal(whole[250:520].numpy(), latents(5, 250, 520, 8).numpy())


def test_grid_alone_or_beside_the_folder(tmp_path, model):
    generate(model, 10, out_dir=None, grid=tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as img:
        assert img.mode == "L" and img.width > 3 * 32  # 4 per row for 10 images
    generate(model, 3, out_dir=tmp_path / "o", grid=tmp_path / "g2.png")
    assert (tmp_path / "g2.png").is_file() and len(_pixels(tmp_path / "o")) == 3


def test_label_sorts_into_class_folders_and_uncertain_with_a_csv(tmp_path, model):
    # The tiny random model is about 50/50 on everything: tau 0 labels all, tau 1 none.
    sure = generate(model, 5, out_dir=tmp_path / "sure", label=True, tau=0.0)
    assert sum(sure.labels.values()) == 5 and sure.labels["uncertain"] == 0
    unsure = generate(model, 5, out_dir=tmp_path / "unsure", label=True, tau=1.0)
    assert unsure.labels == {"normal": 0, "pneumonia": 0, "uncertain": 5}
    assert len(list((tmp_path / "unsure" / "uncertain").glob("gen_*.png"))) == 5

    rows = list(csv.DictReader((tmp_path / "sure" / "labels.csv").open()))
    assert list(rows[0]) == ["file", "label", "p_normal", "p_pneumonia"]
    for row in rows:
        assert (tmp_path / "sure" / row["file"]).is_file()
        assert row["file"].split("/")[0] == row["label"]
        probs = {c: float(row[f"p_{c}"]) for c in model.classes}
        assert row["label"] == max(probs, key=probs.get)
        assert sum(probs.values()) == pytest.approx(1, abs=1e-5)


def test_labelled_images_match_their_unlabelled_twins(tmp_path, model):
    generate(model, 4, seed=1, out_dir=tmp_path / "plain")
    generate(model, 4, seed=1, out_dir=tmp_path / "lab", label=True, tau=0.5)
    plain, lab = _pixels(tmp_path / "plain"), _pixels(tmp_path / "lab")
    assert plain.keys() == lab.keys()
    assert all(np.array_equal(plain[k], lab[k]) for k in plain)


def test_refuses_a_non_empty_output_folder(tmp_path, model):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(GenerateError, match="not an empty folder"):
        generate(model, 2, out_dir=tmp_path / "busy")
    (tmp_path / "empty").mkdir()
    generate(model, 2, out_dir=tmp_path / "empty")
    assert len(_pixels(tmp_path / "empty")) == 2


def test_needs_g_and_for_labels_a_classifier(tmp_path):
    only_c = load_model(make_checkpoint(tmp_path / "c.safetensors", keep=("C",)), device="cpu")
    with pytest.raises(ModelError, match="no weights for G"):
        generate(only_c, 2, out_dir=tmp_path / "x")
    only_g = load_model(make_checkpoint(tmp_path / "g.safetensors", keep=("G",)), device="cpu")
    generate(only_g, 2, out_dir=tmp_path / "y")
    with pytest.raises(ModelError, match="no weights for C"):
        generate(only_g, 2, out_dir=tmp_path / "z", label=True)


# --------------------------------------------------------------------------------- CLI
def test_cli_generate_json_and_files(tmp_path, ckpt):
    out = tmp_path / "synth"
    result = runner.invoke(
        app,
        [
            "generate",
            "--checkpoint",
            str(ckpt),
            "--count",
            "5",
            "--out",
            str(out),
            "--grid",
            str(tmp_path / "g.png"),
            "--label",
            "--tau",
            "0",
            "--seed",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["count"] == 5 and doc["seed"] == 2 and sum(doc["labels"].values()) == 5
    assert (out / "labels.csv").is_file() and (tmp_path / "g.png").is_file()


def test_cli_generate_takes_out_grid_and_label_from_the_config(tmp_path, ckpt):
    toml = tmp_path / "g.toml"
    toml.write_text(
        f'[generate]\ncount = 3\nout = "{tmp_path / "synth"}"\nlabel = true\n'
        f'grid = "{tmp_path / "g.png"}"\ntau = 0.0\n'
    )
    m = ["generate", "--checkpoint", str(ckpt), "--config", str(toml), "--json"]
    result = runner.invoke(app, m)
    assert result.exit_code == 0, result.stderr
    assert sum(json.loads(result.stdout)["labels"].values()) == 3
    assert (tmp_path / "synth" / "labels.csv").is_file() and (tmp_path / "g.png").is_file()
    other = runner.invoke(app, [*m, "--out", str(tmp_path / "other")])  # the flag wins
    assert other.exit_code == 0 and (tmp_path / "other" / "labels.csv").is_file()


def test_cli_generate_exit_codes(tmp_path, ckpt, monkeypatch):
    def run(*args: str):
        return runner.invoke(app, ["generate", "--checkpoint", str(ckpt), *args])

    assert run("--count", "2", "--out", str(tmp_path / "a")).exit_code == 0
    assert run("--count", "2", "--out", str(tmp_path / "a")).exit_code == 0  # its own: a no-op
    assert run("--count", "3", "--out", str(tmp_path / "a")).exit_code == 2  # other settings
    assert run("--grid", str(tmp_path / "g.png"), "--label").exit_code == 2
    assert run("--count", "0").exit_code == 2
    monkeypatch.setattr("threengan_cli.core.paths.DEFAULT_MODEL", "absent.safetensors")
    missing = runner.invoke(app, ["generate", "--count", "2", "--out", str(tmp_path / "b")])
    assert missing.exit_code == 1 and "pass --run or --checkpoint" in missing.stderr


def test_the_bundled_default_model_generates_a_grid_right_after_install(tmp_path):
    grid = tmp_path / "g.png"
    result = runner.invoke(app, ["generate", "--count", "16", "--grid", str(grid)])
    assert result.exit_code == 0, result.stderr
    from PIL import Image

    with Image.open(grid) as img:
        assert img.mode == "L" and img.width > 64 * 4


def test_labels_csv_writes_the_probabilities_classify_writes(tmp_path, model):
    """The exact float32 digits of classify (6 fixed decimals lose the ranking near 0 and 1)."""
    from threengan_cli.infer.engine import exact

    generate(model, 4, out_dir=tmp_path / "lab", label=True, tau=0.0)
    rows = list(csv.DictReader((tmp_path / "lab" / "labels.csv").open()))
    pixels = np.stack([np.array(Image.open(tmp_path / "lab" / row["file"])) for row in rows])
    probs = model.probabilities_of(pixels)  # the one batch generate classified, in order
    for row, p in zip(rows, probs.tolist(), strict=True):
        assert [row[f"p_{c}"] for c in model.classes] == [repr(exact(v)) for v in p]
