"""classify: the streaming engine (inputs, order, bad files, decisions) and the CLI command."""

from __future__ import annotations

import builtins
import csv
import io
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fresh_process import run_without_torch
from model_factory import make_checkpoint, make_run, write_image
from PIL import Image
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.data import images
from threengan_cli.infer import numpy_engine
from threengan_cli.infer.classify import Decision, classify, decide, expand
from threengan_cli.infer.torch_engine import load_model
from threengan_cli.model.modelfile import ModelError, ModelNotFound
from threengan_cli.train import runs

runner = CliRunner()


def _tree(root: Path) -> Path:
    """root/b.png root/a.jpg root/notes.txt root/.hidden.png root/sub/c.png root/sub/deep/d.png"""
    write_image(root / "b.png", seed=1)
    write_image(root / "a.jpg", seed=2)
    (root / "notes.txt").write_text("not an image")
    write_image(root / ".hidden.png", seed=3)
    write_image(root / "sub" / "c.png", seed=4)
    write_image(root / "sub" / "deep" / "d.png", seed=5)
    return root


def _paths(rows) -> list[str]:
    return [Path(r.path).name for r in rows]


# ------------------------------------------------------------------------------ inputs
def test_rows_follow_input_order_with_folder_contents_sorted(tmp_path, model):
    root = _tree(tmp_path / "data")
    single = write_image(tmp_path / "z.png", seed=9)
    rows = list(classify([str(single), str(root), str(single)], model, batch_size=2, workers=1))
    assert _paths(rows) == ["z.png", "a.jpg", "b.png", "z.png"]
    assert all(r.ok for r in rows)


def test_recursive_walks_sub_folders_files_first(tmp_path, model):
    root = _tree(tmp_path / "data")
    rows = list(classify([str(root)], model, recursive=True, batch_size=3, workers=1))
    assert _paths(rows) == ["a.jpg", "b.png", "c.png", "d.png"]


def test_folder_without_images_is_an_error_row_with_a_hint(tmp_path, model):
    write_image(tmp_path / "only" / "sub" / "x.png")
    rows = list(classify([str(tmp_path / "only")], model, workers=1))
    assert len(rows) == 1 and "--recursive" in rows[0].error


def test_glob_patterns_are_expanded_sorted_and_an_empty_match_is_an_error(tmp_path, model):
    root = _tree(tmp_path / "data")
    rows = list(
        classify(
            [str(root / "*.png"), str(root / "**" / "*.png"), str(root / "*.bmp")], model, workers=1
        )
    )
    assert _paths(rows) == ["b.png", "b.png", "c.png", "d.png", "*.bmp"]
    assert rows[-1].error == "no file matches this pattern"


def test_paths_are_read_lazily_from_stdin_with_dash(tmp_path, model):
    a = write_image(tmp_path / "a.png", seed=1)
    b = write_image(tmp_path / "b.png", seed=2)
    stream = io.StringIO(f"{b}\n\n{a}\n{tmp_path / 'missing.png'}\n")
    rows = list(classify(["-"], model, stdin=stream, workers=1))
    assert _paths(rows) == ["b.png", "a.png", "missing.png"]
    assert rows[2].error == "file not found"


def test_inputs_are_streamed_not_collected_first(tmp_path, model):
    """An endless input stream still yields rows: nothing waits for the end of the input."""
    path = str(write_image(tmp_path / "a.png"))
    rows = list(
        itertools.islice(classify(itertools.repeat(path), model, batch_size=4, workers=2), 10)
    )
    assert len(rows) == 10 and all(r.ok for r in rows)


def test_expand_yields_lazily(tmp_path):
    endless = expand(itertools.repeat(str(tmp_path / "nope.png")))
    assert next(endless) == (str(tmp_path / "nope.png"), "file not found")


# --------------------------------------------------------------------------- bad files
def _bad_files(root: Path) -> dict[str, str]:
    """Each kind of unusable input and the reason its row must carry."""
    root.mkdir(parents=True, exist_ok=True)
    good = write_image(root / "good.jpg", size=(64, 80), seed=1, fmt="JPEG")
    data = good.read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not a PNG")
    write_image(root / "huge.png", size=(300, 300))
    (root / "scan.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    write_image(root / "locked.png")
    return {
        "truncated.jpg": "truncated image",
        "empty.png": "zero-byte file",
        "text.png": "not an image",
        "huge.png": "over the pixel limit",
        "scan.dcm": "pip install 'threengan[dicom]'",
        "locked.png": "permission denied",
        "missing.png": "file not found",
    }


@pytest.fixture
def hostile(monkeypatch):
    """Pixel limit lowered, pydicom not importable, locked.png unreadable (tests run as root,
    so permissions cannot do it)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("locked.png") and "r" in mode:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    real_os_open = os.open

    def guarded_os_open(file, flags, *args, **kwargs):
        if str(file).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_os_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_os_open)


def test_every_kind_of_bad_file_gives_an_error_row_and_the_rest_are_classified(
    tmp_path, model, hostile
):
    expected = _bad_files(tmp_path / "in")
    write_image(tmp_path / "in" / "ok.png", seed=7)
    inputs = [str(tmp_path / "in"), str(tmp_path / "in" / "missing.png")]
    rows = {Path(r.path).name: r for r in classify(inputs, model, batch_size=3, workers=1)}
    for name, reason in expected.items():
        assert rows[name].label is None and rows[name].probabilities is None
        assert reason in rows[name].error, (name, rows[name].error)
    for name in ("good.jpg", "ok.png"):
        assert rows[name].ok and rows[name].label in model.classes


def test_pixel_limit_reaches_decoding_processes(tmp_path, model, monkeypatch):
    write_image(tmp_path / "huge.png", size=(300, 300))
    write_image(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    rows = list(classify([str(tmp_path)], model, workers=2))
    assert "over the pixel limit" in rows[0].error and rows[1].ok


# --------------------------------------------------------------------------- decisions
def test_probabilities_equal_the_model_on_the_shared_preprocessing(tmp_path, model):
    """No drift: classify sees exactly what images.load_image (prepare's decoder) makes."""
    paths = [
        write_image(tmp_path / "wide.jpg", size=(90, 50), seed=3, fmt="JPEG"),
        write_image(tmp_path / "tall.png", size=(40, 70), seed=4),
    ]
    rows = list(classify([str(p) for p in paths], model, workers=2))
    for path, row in zip(paths, rows, strict=True):
        pixels = images.load_image(path, model.image_size, model.fit)
        expected = model.predict_proba(torch.from_numpy(pixels[None]))[0]
        got = torch.tensor([row.probabilities[c] for c in model.classes])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_threshold_decides_between_the_two_classes(tmp_path, model):
    path = str(write_image(tmp_path / "a.png"))
    p1 = next(classify([path], model, workers=1)).probabilities[model.classes[1]]
    above = next(classify([path], model, decision=Decision(p1 - 1e-4), workers=1))
    below = next(classify([path], model, decision=Decision(p1 + 1e-4), workers=1))
    assert above.label == model.classes[1] and below.label == model.classes[0]


def test_more_than_two_classes_take_the_most_probable():
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    assert decide(probs, threshold=0.9).tolist() == [1, 0]


def test_three_class_model_labels_by_argmax(tmp_path):
    three = load_model(
        make_checkpoint(tmp_path / "k3.safetensors", classes=("a", "b", "c")), device="cpu"
    )
    row = next(classify([str(write_image(tmp_path / "x.png"))], three, workers=1))
    best = max(row.probabilities, key=row.probabilities.get)
    assert row.label == best and set(row.probabilities) == {"a", "b", "c"}


# ------------------------------------------------------------------------------ models
def test_checkpoint_without_the_classifier_is_a_clear_error(tmp_path):
    only_g = load_model(make_checkpoint(tmp_path / "g.safetensors", keep=("G",)), device="cpu")
    assert set(only_g.nets) == {"G"}
    with pytest.raises(ModelError, match="no weights for C"):
        list(classify([str(tmp_path)], only_g))


def test_default_shape_checkpoint_with_g_and_c_classifies(tmp_path):
    small = load_model(make_checkpoint(tmp_path / "gc.safetensors", keep=("G", "C")), device="cpu")
    row = next(classify([str(write_image(tmp_path / "x.png"))], small, workers=1))
    assert row.ok


def test_sgan_classifies_with_its_discriminator(tmp_path):
    sgan = load_model(make_checkpoint(tmp_path / "s.safetensors", method="sgan"), device="cpu")
    assert sgan.classifier == "D"
    row = next(classify([str(write_image(tmp_path / "x.png"))], sgan, workers=1))
    assert row.ok and len(row.probabilities) == 2


def test_run_name_loads_the_final_model_and_model_best_the_best_on_val(threengan_home):
    run = make_run(threengan_home / "runs" / "r1")
    last = load_model(runs.model_file(run="r1"), device="cpu")
    assert last.model_id.startswith("r1/last.safetensors@")
    best = load_model(runs.model_file(run="r1", which="best"), device="cpu")
    assert best.model_id.startswith("r1/best.safetensors@")
    assert numpy_engine.load(runs.model_file(run="r1", which="best")).model_id == best.model_id
    (run / "last.safetensors").rename(run / "final.safetensors")  # as runs --prune-last leaves it
    final = numpy_engine.load(runs.model_file(run="r1"))
    assert final.model_id.startswith("r1/final.safetensors@")
    with pytest.raises(ModelNotFound, match="no run"):
        load_model(runs.model_file(run="nope"), device="cpu")
    with pytest.raises(ModelNotFound, match="picks a model of a --run"):
        runs.model_file(run=None, which="best")


def test_without_a_model_the_missing_default_is_named(monkeypatch):
    monkeypatch.setattr("threengan_cli.core.paths.DEFAULT_MODEL", "absent.safetensors")
    with pytest.raises(ModelError, match="no bundled default model found"):
        load_model(device="cpu")


def test_the_bundled_default_model_loads_and_classifies_without_any_data(tmp_path):
    model = load_model(device="cpu")
    assert (model.method, model.classes, model.image_size) == ("3ngan", ["NORMAL", "PNEUMONIA"], 64)
    probs = model.predict_proba(torch.zeros(2, 64, 64, dtype=torch.uint8))
    assert probs.shape == (2, 2)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2))


# --------------------------------------------------------------------------------- CLI
def _cli(*args: str, input: str | None = None):
    return runner.invoke(app, ["classify", *args], input=input)


def test_cli_csv_is_the_default_when_piped_with_one_column_per_class(tmp_path, ckpt):
    _tree(tmp_path / "d")
    result = _cli(str(tmp_path / "d"), "--checkpoint", str(ckpt), "--workers", "1")
    assert result.exit_code == 0, result.stderr
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    probabilities = ["p_normal", "p_pneumonia"]
    assert list(table[0]) == ["path", "label", *probabilities, "ood_score", "ood", "error"]
    assert [Path(r["path"]).name for r in table] == ["a.jpg", "b.png"]
    assert float(table[0]["p_normal"]) + float(table[0]["p_pneumonia"]) == pytest.approx(1, 1e-5)
    assert "m.safetensors@" in result.stderr and "threshold 0.5" in result.stderr


def test_cli_json_has_a_header_with_model_and_threshold(tmp_path, ckpt):
    write_image(tmp_path / "a.png")
    result = _cli(
        str(tmp_path / "a.png"),
        str(tmp_path / "gone.png"),
        "--checkpoint",
        str(ckpt),
        "-f",
        "json",
        "--threshold",
        "0.7",
        "--workers",
        "1",
    )
    assert result.exit_code == 3, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"].startswith("m.safetensors@") and doc["threshold"] == 0.7
    assert doc["classes"] == ["normal", "pneumonia"]
    assert [r["error"] for r in doc["rows"]] == [None, "file not found"]
    assert doc["summary"]["inputs"] == 2 and doc["summary"]["errors"] == 1
    assert sum(doc["summary"]["labels"].values()) == doc["summary"]["classified"] == 1


def test_cli_jsonl_and_table_formats(tmp_path, ckpt):
    write_image(tmp_path / "a.png")
    lines = _cli(
        str(tmp_path / "a.png"), "--checkpoint", str(ckpt), "-f", "jsonl", "--workers", "1"
    ).stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["label"] in ("normal", "pneumonia")
    table = _cli(
        str(tmp_path / "a.png"), "--checkpoint", str(ckpt), "-f", "table", "--workers", "1"
    ).stdout.splitlines()
    assert table[0].split() == ["label", "p_normal", "p_pneumonia", "ood_score", "path"]
    assert table[1].endswith("a.png")


def test_cli_output_file_takes_its_format_from_the_suffix(tmp_path, ckpt):
    write_image(tmp_path / "a.png")
    out = tmp_path / "res" / "out.json"
    result = _cli(
        str(tmp_path / "a.png"), "--checkpoint", str(ckpt), "-o", str(out), "--workers", "1"
    )
    assert result.exit_code == 0 and result.stdout == ""
    assert json.loads(out.read_text())["rows"][0]["path"].endswith("a.png")


def test_cli_reads_paths_from_stdin(tmp_path, ckpt):
    a = write_image(tmp_path / "a.png")
    result = _cli("-", "--checkpoint", str(ckpt), "-f", "jsonl", input=f"{a}\n{a}\n")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2


def test_cli_exit_codes(tmp_path, ckpt):
    good = str(write_image(tmp_path / "a.png"))
    (tmp_path / "bad.png").write_bytes(b"")
    bad = str(tmp_path / "bad.png")
    m = ["--checkpoint", str(ckpt), "--workers", "1"]
    assert _cli(good, *m).exit_code == 0
    partial = _cli(good, bad, *m)
    assert partial.exit_code == 3 and "1 inputs could not be classified" in partial.stderr
    none = _cli(bad, *m)
    assert none.exit_code == 1 and "none of the 1 inputs" in none.stderr
    assert _cli(*m).exit_code == 2  # no PATH
    assert _cli(good, *m, "-f", "xml").exit_code == 2
    assert _cli(good, *m, "--threshold", "1.5").exit_code == 2
    assert _cli(good, "--checkpoint", str(tmp_path / "none.safetensors")).exit_code == 2
    assert _cli(good, "--checkpoint", str(ckpt), "--run", "x").exit_code == 2
    assert _cli("-", *m, input="").exit_code == 2  # no paths on stdin: as no PATH


def test_cli_without_a_model_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr("threengan_cli.core.paths.DEFAULT_MODEL", "absent.safetensors")
    result = _cli(str(write_image(tmp_path / "a.png")))
    assert result.exit_code == 1
    assert "pass --run or --checkpoint" in result.stderr


def test_cli_run_option_uses_the_run_folder(tmp_path, threengan_home):
    make_run(threengan_home / "runs" / "r1")
    result = _cli(str(write_image(tmp_path / "a.png")), "--run", "r1", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"].startswith("r1/last.safetensors@")


def test_cli_settings_come_from_a_config_file(tmp_path, ckpt):
    write_image(tmp_path / "d" / "sub" / "a.png")
    config = tmp_path / "c.toml"
    config.write_text("[classify]\nrecursive = true\nthreshold = 0.25\nworkers = 1\n")
    result = _cli(
        str(tmp_path / "d"), "--checkpoint", str(ckpt), "--config", str(config), "-f", "json"
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["threshold"] == 0.25 and len(doc["rows"]) == 1


def test_decoded_arrays_are_uint8_at_model_size(tmp_path):
    from threengan_cli.infer.classify import decode_chunk

    arrays, errors = decode_chunk([str(write_image(tmp_path / "a.png")), "nope"], 32, "squash")
    assert arrays.shape == (2, 32, 32) and arrays.dtype == np.uint8
    assert errors == [None, "file not found"]


# ------------------------------------------------------------------ the NumPy classifier
@pytest.mark.parametrize(
    ("method", "classes", "width"),
    [("3ngan", ("NORMAL", "PNEUMONIA"), 4), ("sgan", ("a", "b"), 4), ("ecgan", ("a", "b", "c"), 8)],
)
def test_the_numpy_classifier_gives_torch_s_probabilities(tmp_path, method, classes, width):
    path = make_checkpoint(tmp_path / "m.safetensors", method=method, classes=classes, width=width)
    torch_model = load_model(path, device="cpu")
    numpy_model = numpy_engine.load(path)
    assert (numpy_model.classes, numpy_model.image_size) == (
        torch_model.classes,
        torch_model.image_size,
    )
    assert numpy_model.model_id == torch_model.model_id
    size = torch_model.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (5, size, size), dtype=np.uint8)
    expected = torch_model.probabilities_of(pixels)
    got = numpy_model.probabilities_of(pixels)
    assert got.shape == (5, len(classes))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_the_numpy_classifier_matches_torch_on_the_bundled_model_and_real_looking_images(tmp_path):
    torch_model, numpy_model = load_model(device="cpu"), numpy_engine.load()
    paths = [str(write_image(tmp_path / f"{i}.png", size=(90, 70), seed=i)) for i in range(6)]
    a = [r.probabilities for r in classify(paths, torch_model, workers=1)]
    b = [r.probabilities for r in classify(paths, numpy_model, workers=1)]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        assert all(abs(x[k] - y[k]) < 1e-5 for k in x)


def test_the_numpy_classifier_refuses_a_checkpoint_without_its_classifier(tmp_path):
    only_g = make_checkpoint(tmp_path / "g.safetensors", keep=("G",))
    with pytest.raises(ModelError, match="no weights for C"):
        numpy_engine.load(only_g)
    (tmp_path / "p.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match="pickle"):
        numpy_engine.load(tmp_path / "p.safetensors")


def test_cli_classify_on_the_cpu_never_imports_torch(tmp_path):
    done = run_without_torch("classify", str(write_image(tmp_path / "a.png")), "-f", "csv", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "path,label,p_NORMAL,p_PNEUMONIA,ood_score,ood,error"


def test_cli_engines_agree_and_a_bad_engine_is_a_usage_error(tmp_path):
    folder = tmp_path / "imgs"
    for i in range(3):
        write_image(folder / f"{i}.png", seed=i)
    rows = {}
    for engine in ("numpy", "torch"):
        result = _cli(str(folder), "-f", "csv", "--engine", engine)
        assert result.exit_code == 0, result.stderr
        rows[engine] = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["label"] for r in rows["numpy"]] == [r["label"] for r in rows["torch"]]
    for a, b in zip(rows["numpy"], rows["torch"], strict=True):
        assert abs(float(a["p_PNEUMONIA"]) - float(b["p_PNEUMONIA"])) < 1e-5
    assert _cli(str(folder), "--engine", "jax").exit_code == 2


# ------------------------------------------------------------------------- empty inputs
def test_an_empty_folder_fails_without_allow_empty_and_gives_a_header_with_it(tmp_path, ckpt):
    (tmp_path / "inbox").mkdir()
    refused = runner.invoke(app, ["classify", str(tmp_path / "inbox"), "--checkpoint", str(ckpt)])
    assert refused.exit_code == 1
    out = tmp_path / "night.csv"
    args = ["classify", str(tmp_path / "inbox"), "--checkpoint", str(ckpt), "-o", str(out)]
    done = runner.invoke(app, [*args, "--allow-empty"])
    assert done.exit_code == 0, done.output
    assert "nothing to classify" in done.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("path,label,")
    as_json = runner.invoke(
        app, ["classify", str(tmp_path / "inbox" / "*.png"), "--checkpoint", str(ckpt),
              "-f", "json", "--allow-empty", "-q"],  # fmt: skip
    )
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["rows"] == []


def test_allow_empty_still_fails_on_a_path_that_does_not_exist(tmp_path, ckpt):
    args = ["classify", str(tmp_path / "inbxo"), "--checkpoint", str(ckpt), "--allow-empty"]
    assert runner.invoke(app, args).exit_code == 1


def test_allow_empty_accepts_nothing_on_stdin(ckpt):
    args = ["classify", "-", "--checkpoint", str(ckpt), "--allow-empty", "-f", "csv"]
    done = runner.invoke(app, args, input="")
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("path,label,") and len(done.stdout.splitlines()) == 1


# ---------------------------------------------------------------------------- progress
def test_the_number_of_rows_is_told_before_the_first_one_when_known(tmp_path, model):
    root = _tree(tmp_path / "data")
    events = []
    told = lambda n: events.append(("total", n))  # noqa: E731
    rows = classify([str(root)], model, recursive=True, workers=1, on_total=told)
    for row in rows:
        events.append(("row", row.path))
    assert events[0] == ("total", 4) and len(events) == 5
    streamed = []
    list(classify(["-"], model, stdin=io.StringIO(f"{root / 'b.png'}\n"), workers=1,
                  on_total=streamed.append))  # fmt: skip
    assert streamed == []  # stdin is a stream: its length is not known first


def test_classify_gives_its_bar_the_total_on_a_terminal(tmp_path, ckpt, monkeypatch):
    from threengan_cli.cli import progress, views

    root = _tree(tmp_path / "data")
    monkeypatch.setattr(views.err, "_console", views.err.console.__class__(force_terminal=True))
    seen = []
    update = progress.BarView.update

    def recorded(self, done, total=None):
        seen.append((done, total))
        update(self, done, total)

    monkeypatch.setattr(progress.BarView, "update", recorded)
    args = ["classify", str(root), "-r", "--checkpoint", str(ckpt), "-f", "csv", "--workers", "1"]
    assert runner.invoke(app, args).exit_code == 0
    assert seen[0] == (0, 4) and seen[-1][0] == 4


# ------------------------------------------------------------ what a classify run is given
def test_inputs_are_the_paths_and_the_examples_and_none_or_two_dashes_are_usage_errors():
    from threengan_cli.core.errors import UsageError
    from threengan_cli.core.paths import example_images
    from threengan_cli.infer.classify import inputs_of

    assert inputs_of(["a.png", "-"], examples=False) == ["a.png", "-"]
    shipped = [str(p) for p in example_images()]
    assert shipped and inputs_of(["a.png"], examples=True) == ["a.png", *shipped]
    for given in (None, [], ["-", "x", "-"]):
        with pytest.raises(UsageError):
            inputs_of(given, examples=False)


def test_stdin_is_read_up_to_its_first_path_before_any_model_is_loaded():
    from threengan_cli.core.errors import UsageError
    from threengan_cli.infer.classify import stdin_paths

    assert stdin_paths(["a.png"], io.StringIO("b.png\n"), allow_empty=False) is None
    stream = io.StringIO("\n  \n-\nb.png\nc.png\n")
    assert list(stdin_paths(["-"], stream, allow_empty=False)) == ["b.png\n", "c.png\n"]
    with pytest.raises(UsageError, match="no paths were given on stdin"):
        stdin_paths(["-"], io.StringIO("\n  \n"), allow_empty=False)
    assert list(stdin_paths(["-"], io.StringIO(""), allow_empty=True)) == []
    assert list(stdin_paths(["-", "a.png"], io.StringIO(""), allow_empty=False)) == []


def test_the_threshold_in_use_and_the_header_say_where_each_threshold_comes_from(model):
    from threengan_cli.core.use_settings import ClassifySettings
    from threengan_cli.infer.batch import thresholds_of

    cfg, header, said = thresholds_of(model, ClassifySettings())
    assert (cfg.threshold, header["threshold_source"]) == (0.5, "default")
    assert said.startswith("threshold 0.5")
    cfg, header, said = thresholds_of(model, ClassifySettings(threshold=0.7))
    assert (cfg.threshold, header["threshold"], header["threshold_source"]) == (0.7, 0.7, "given")


def test_a_batch_with_nothing_classified_is_a_failure_that_says_why():
    from types import SimpleNamespace

    from threengan_cli.core.errors import Failure
    from threengan_cli.infer.batch import Tally

    tally = Tally(["a", "b"])
    with pytest.raises(Failure, match="shard 3/4 of the input list is empty"):
        tally.check_classified(["x"], (3, 4))
    with pytest.raises(Failure, match="no paths were given on stdin"):
        tally.check_classified(["-"], None)
    with pytest.raises(Failure, match="the inputs named no files"):
        tally.check_classified(["x"], None)
    tally.add(SimpleNamespace(ok=False, path="x.png", error="not an image"))
    with pytest.raises(Failure, match=r"none of the 1 inputs .*\(x.png: not an image\)"):
        tally.check_classified(["x.png"], None)
    tally.add(SimpleNamespace(ok=True, label="a", ood=False))
    tally.check_classified(["x.png", "y.png"], None)  # one classified: no failure
