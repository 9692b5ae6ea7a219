"""The example X-rays shipped in the package: present with their attribution, classified by
`classify --examples` without any download (and without torch), shown by `info`."""

from __future__ import annotations

import csv
import io
import json

from fresh_process import run_without_torch
from PIL import Image
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.core import paths

runner = CliRunner()


def test_examples_are_small_labelled_x_rays_with_their_attribution():
    images = paths.example_images()
    assert 4 <= len(images) <= 8
    assert {p.parent.name for p in images} == {"NORMAL", "PNEUMONIA"}
    assert sum(p.stat().st_size for p in images) < 400_000
    for p in images:
        with Image.open(p) as img:
            assert img.mode == "L" and max(img.size) <= 256
    attribution = (paths.examples_dir() / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in attribution and "Cell" in attribution and "Mendeley" in attribution
    for p in images:  # every shipped file is named in the attribution
        assert f"{p.parent.name}/{p.name}" in attribution


def test_classify_examples_classifies_them_all_with_the_bundled_model_without_torch():
    done = run_without_torch("classify", "--examples", "-f", "csv", "-q")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert len(rows) == len(paths.example_images())
    assert all(r["label"] in ("NORMAL", "PNEUMONIA") and not r["error"] for r in rows)


def test_classify_examples_adds_to_the_given_paths(tmp_path):
    from model_factory import write_image

    image = str(write_image(tmp_path / "mine.png"))
    result = runner.invoke(app, ["classify", image, "--examples", "-f", "jsonl", "-q"])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["path"] == image and len(rows) == 1 + len(paths.example_images())


def test_info_shows_where_the_examples_and_the_default_model_are():
    facts = json.loads(runner.invoke(app, ["info", "--json"]).stdout)
    assert facts["examples"] == str(paths.examples_dir())
    assert facts["default model"].endswith("default.safetensors")
