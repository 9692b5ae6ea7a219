"""classify's output is exact and reproducible: float32-exact digits, the same rows for every
batch size and shard split, a strict --output suffix, --sort-into and the per-label counts."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from model_factory import make_checkpoint, write_image
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.core.use_settings import parse_shard
from threengan_cli.infer import numpy_engine
from threengan_cli.infer.classify import Decision, classify
from threengan_cli.infer.engine import exact
from threengan_cli.infer.torch_engine import load_model

runner = CliRunner()


def _cli(*args: str, input: str | None = None):
    return runner.invoke(app, ["classify", *args], input=input)


def _images(folder: Path, n: int) -> Path:
    for i in range(n):
        write_image(folder / f"{i:03d}.png", size=(37 + i % 5, 41), seed=i)
    return folder


def test_exact_digits_read_back_as_the_same_float32():
    values = np.array([0.7571609616279602, 0.99999994, 1e-7, 0.5, 3.4e-12], dtype=np.float32)
    for v in values:
        written = repr(exact(float(v)))
        assert np.float32(float(written)) == v
        assert len(written) <= 16  # not float64's 17 digits of a widened float32
    assert exact(float(np.float32(0.99999994))) != 1.0


@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("model_path", ["bundled", "tiny"])
def test_probabilities_are_identical_for_every_batch_size(tmp_path, engine, model_path):
    path = None if model_path == "bundled" else make_checkpoint(tmp_path / "m.safetensors")
    model = numpy_engine.load(path) if engine == "numpy" else load_model(path, device="cpu")
    size = model.image_size
    pixels = np.random.default_rng(1).integers(0, 256, (64, size, size), dtype=np.uint8)
    whole = model.probabilities_of(pixels)
    for batch in (1, 3):
        parts = [model.probabilities_of(pixels[i : i + batch]) for i in range(0, 64, batch)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    # every image in another position, beside other neighbours
    np.testing.assert_array_equal(model.probabilities_of(pixels[::-1])[::-1], whole)
    np.testing.assert_array_equal(model.probabilities_of(pixels[5:])[:7], whole[5:12])


def test_cli_rows_are_identical_for_batch_sizes_1_3_and_64(tmp_path):
    folder = _images(tmp_path / "in", 7)
    outs = {
        b: _cli(str(folder), "-f", "csv", "--batch-size", str(b), "--workers", "2", "-q").stdout
        for b in (1, 3, 64)
    }
    assert outs[1] == outs[3] == outs[64]
    rows = list(csv.DictReader(io.StringIO(outs[1])))
    assert len(rows) == 7
    for r in rows:  # written with the shortest digits of its float32, nothing more
        assert float(r["p_PNEUMONIA"]) == exact(float(np.float32(r["p_PNEUMONIA"])))


def test_shards_concatenated_in_order_equal_one_unsharded_run(tmp_path, ckpt):
    folder = _images(tmp_path / "in", 10)
    m = ["--checkpoint", str(ckpt), "-f", "jsonl", "--workers", "1", "-q"]
    whole = _cli(str(folder), str(tmp_path / "missing.png"), *m).stdout
    parts = [
        _cli(str(folder), str(tmp_path / "missing.png"), *m, "--shard", f"{i}/3").stdout
        for i in (1, 2, 3)
    ]
    assert "".join(parts) == whole and all(parts)
    assert len(whole.splitlines()) == 11
    # more shards than inputs: the extra shards are empty, the rest still add up
    many = [_cli(str(folder), *m, "--shard", f"{i}/12").stdout for i in range(1, 13)]
    assert "".join(many) == _cli(str(folder), *m).stdout


def test_bad_shard_is_a_usage_error(tmp_path, ckpt):
    image = str(write_image(tmp_path / "a.png"))
    for bad in ("0/3", "4/3", "x", "1/0", "2", "a/b"):
        assert _cli(image, "--checkpoint", str(ckpt), "--shard", bad).exit_code == 2
        with pytest.raises(ValueError, match="must be I/N with 1 <= I <= N"):
            parse_shard(bad)
    assert parse_shard(" 2 / 5 ") == (2, 5)


def test_unknown_output_suffix_is_a_usage_error_unless_a_format_is_given(tmp_path, ckpt):
    image = str(write_image(tmp_path / "a.png"))
    m = ["--checkpoint", str(ckpt), "--workers", "1"]
    refused = _cli(image, *m, "-o", str(tmp_path / "res.parquet"))
    assert refused.exit_code == 2 and "--format" in refused.stderr
    assert not (tmp_path / "res.parquet").exists()
    given = _cli(image, *m, "-o", str(tmp_path / "res.parquet"), "--format", "jsonl")
    assert given.exit_code == 0
    assert json.loads((tmp_path / "res.parquet").read_text())["path"] == image


@pytest.mark.parametrize("link", [False, True])
def test_sort_into_puts_each_input_in_its_label_folder(tmp_path, ckpt, link):
    folder = _images(tmp_path / "in", 4)
    write_image(tmp_path / "other" / "000.png", seed=77)  # same name, other content
    (folder / "broken.png").write_bytes(b"nope")
    out = tmp_path / "sorted"
    args = [str(folder), str(tmp_path / "other"), "--checkpoint", str(ckpt), "-f", "jsonl"]
    args += ["--sort-into", str(out), "--workers", "1", *(["--link"] if link else [])]
    result = _cli(*args)
    assert result.exit_code == 3  # the broken file
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    placed = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(placed) == 5 and not any("broken" in p for p in placed)
    for row in rows:
        if row["error"] is None:
            names = [p for p in placed if p.startswith(row["label"] + "/")]
            assert any(Path(row["path"]).stem in n for n in names)
    for p in out.rglob("*.png"):
        assert not p.name.startswith(".")
        if link:
            assert p.is_symlink() or os.stat(p).st_nlink == 2
    again = _cli(*args)  # a rerun replaces its own files, adds none
    assert again.exit_code == 3 and len(list(out.rglob("*.png"))) == 5


@pytest.mark.slow
def test_ctrl_c_while_sort_into_copies_exits_130_and_leaves_no_half_copied_file(tmp_path, ckpt):
    """Ctrl+C reaches the whole process group (the decoding workers too) while a copy is
    half written: the copy's temporary goes, and nothing half-copied stays in DIR."""
    import signal
    import subprocess
    import sys
    import time

    folder, out = _images(tmp_path / "in", 6), tmp_path / "sorted"
    # The copy writes half the file, then waits: the signal lands inside it, as it would
    # inside a long copy. It waits in short steps, as a long copy is many chunked system
    # calls: Linux may deliver the signal to another thread of the process (the decode
    # pool's), and Python runs its handler in the main thread only between two steps.
    # SIGINT is set to Python's handler first, as a terminal's foreground job has it: a job
    # started in the background by a shell without job control (`cmd &` in a script, as a CI
    # runner may start pytest) inherits SIGINT ignored, and Python then installs none.
    driver = (
        "import shutil, signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "def slow(src, dst, *args, **kwargs):\n"
        "    with open(src, 'rb') as f, open(dst, 'wb') as g:\n"
        "        data = f.read()\n"
        "        g.write(data[: len(data) // 2]); g.flush()\n"
        "        for _ in range(600):\n"
        "            time.sleep(0.1)\n"
        "        g.write(data[len(data) // 2 :])\n"
        "    return dst\n"
        "shutil.copyfile = slow\n"
        "from threengan_cli.cli.app import main\n"
        f"sys.argv = ['threengan', 'classify', {str(folder)!r}, '--checkpoint', {str(ckpt)!r},\n"
        f"            '--sort-into', {str(out)!r}, '-f', 'csv', '--workers', '2']\n"
        "main()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(p.is_file() and p.stat().st_size for p in out.rglob("*")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl+C on a terminal
    code = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert code == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    left = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in left if p.name.startswith(".")], left  # no temporary stays
    assert all((folder / p.name).read_bytes() == p.read_bytes() for p in left), left


def test_link_without_sort_into_is_a_usage_error(tmp_path, ckpt):
    image = str(write_image(tmp_path / "a.png"))
    assert _cli(image, "--checkpoint", str(ckpt), "--link").exit_code == 2


def test_a_count_per_label_goes_to_stderr(tmp_path, ckpt):
    folder = _images(tmp_path / "in", 5)
    result = _cli(str(folder), "--checkpoint", str(ckpt), "-f", "csv", "--workers", "1")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    expected = ", ".join(
        f"{c} {sum(r['label'] == c for r in rows)}" for c in ("normal", "pneumonia")
    )
    assert f"labels: {expected}" in result.stderr
    quiet = _cli(str(folder), "--checkpoint", str(ckpt), "-f", "csv", "-q", "--workers", "1")
    assert "labels:" not in quiet.stderr


def test_rows_from_classify_agree_with_the_decision_on_their_written_digits(tmp_path, model):
    folder = _images(tmp_path / "in", 6)
    p1 = [r.probabilities["pneumonia"] for r in classify([str(folder)], model, workers=1)]
    threshold = sorted(p1)[3]  # exactly one of the written values: a tie decides for class 1
    rows = list(classify([str(folder)], model, workers=1, decision=Decision(threshold)))
    for row in rows:
        called = row.probabilities["pneumonia"] >= threshold
        assert row.label == ("pneumonia" if called else "normal")
