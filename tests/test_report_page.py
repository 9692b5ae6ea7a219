"""classify --report: one offline HTML page per batch, with the counts, histograms and a
grid that a real browser (headless Chromium, where installed) renders, filters and sorts."""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from model_factory import make_checkpoint, write_image
from typer.testing import CliRunner

from threengan_cli.cli.app import app

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = "<img src=x onerror=alert(1)>.png"


def _classify(tmp_path: Path, n: int, *extra: str) -> tuple[Path, list[dict[str, str]]]:
    ckpt = make_checkpoint(tmp_path / "m.safetensors", stats=True)
    folder = tmp_path / "in"
    for i in range(n):
        write_image(folder / f"{i:03d}.png", seed=i)
    write_image(folder / HOSTILE, seed=n)
    (folder / "broken.png").write_bytes(b"no image")
    page = tmp_path / "out" / "report.html"
    result = runner.invoke(
        app,
        ["classify", str(folder), "--checkpoint", str(ckpt), "-f", "csv", "--report", str(page)]
        + list(extra),
    )
    assert result.exit_code == 3, result.output  # the broken file
    return page, list(csv.DictReader(io.StringIO(result.stdout)))


def test_the_page_requests_nothing_from_any_server(tmp_path):
    page, rows = _classify(tmp_path, 6, "--heatmaps", str(tmp_path / "out" / "maps"))
    text = page.read_text()
    assert not re.search(r"(?i)(https?:)?//[a-z0-9]", text.split("<script")[0])  # no URL
    assert "http://" not in text and "https://" not in text
    sources = re.findall(r'\bsrc="([^"]*)"', text)
    assert all(s.startswith("data:") for s in sources)  # the rest are set by the script
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    # heatmaps are linked relative to the page, so the page and the folder move together
    assert '"heatmap":"maps/' in text
    assert HOSTILE not in text  # only as JSON data, with "<" escaped


def test_the_page_counts_every_label_the_rows_have(tmp_path):
    page, rows = _classify(tmp_path, 7)
    text = page.read_text()
    labelled = [r for r in rows if r["label"]]
    for label in ("normal", "pneumonia"):
        n = sum(r["label"] == label for r in labelled)
        assert f"<b>{label}</b><span>{n}</span>" in text
    assert "<b>errors</b><span>1</span>" in text
    assert f"p_pneumonia ({len(labelled)} images" in text
    assert f"ood_score ({len(labelled)} images" in text


def _dom(page: Path, tmp_path: Path, fragment: str = "") -> str:
    """The document after its script ran, as headless Chromium renders it."""
    result = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
            "--dump-dom", page.resolve().as_uri() + fragment,
        ],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium)")
def test_chromium_renders_filters_and_sorts_the_grid(tmp_path):
    page, rows = _classify(tmp_path, 300)
    labelled = [r for r in rows if r["label"]]
    dom = _dom(page, tmp_path)
    assert 'data-ready="' in dom  # the script ran to its end
    assert f"{len(labelled)} of {len(labelled)} shown" in dom
    assert dom.count('class="card') == 240  # the first page of cards; the rest on scrolling
    assert "61 more below" in dom
    assert dom.count("<img") == 240  # one per card, none made from a file name

    hostile = next(r for r in labelled if r["path"].endswith(HOSTILE))
    p = hostile["p_pneumonia"]
    dom = _dom(page, tmp_path, f"#pmin={p}&pmax={p}")
    assert "&lt;img src=x onerror=alert(1)&gt;.png</div>" in dom  # shown as text
    assert dom.count("<img") == dom.count('class="card')

    pneumonia = [r for r in labelled if r["label"] == "pneumonia"]
    dom = _dom(page, tmp_path, "#label=pneumonia&sort=-p")
    assert f"{len(pneumonia)} of {len(labelled)} shown" in dom
    shown = [float(p) for p in re.findall(r'data-p="([^"]+)"', dom)]
    assert shown == sorted((float(r["p_pneumonia"]) for r in pneumonia), reverse=True)[:240]
    assert set(re.findall(r'data-label="([^"]+)"', dom)) == {"pneumonia"}
