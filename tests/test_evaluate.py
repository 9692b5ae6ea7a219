"""evaluate: labelled data from folders, CSVs and prepared splits; scores that agree with
classify image by image; a threshold chosen on val, stored in the model and used by classify."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from image_factory import kermany_like
from model_factory import make_checkpoint, write_image
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.core import paths
from threengan_cli.core.settings import PrepareSettings
from threengan_cli.data.prepare import prepare
from threengan_cli.infer import engine, numpy_engine
from threengan_cli.infer import evaluate as ev
from threengan_cli.infer.classify import classify
from threengan_cli.infer.torch_engine import load_model
from threengan_cli.metrics import classification_metrics
from threengan_cli.model import modelfile

runner = CliRunner()
CLASSES = ("NORMAL", "PNEUMONIA")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return kermany_like(tmp_path_factory.mktemp("src") / "xr", train=16, val=4, test=6)


@pytest.fixture
def model_file(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "m.safetensors", classes=CLASSES)


@pytest.fixture
def prepared(tree, threengan_home) -> str:
    prepare(tree, threengan_home / "datasets" / "xr", PrepareSettings(image_size=32, workers=1))
    return "xr"


def _eval(*args: str):
    return runner.invoke(app, ["evaluate", *args])


def test_evaluate_and_classify_agree_on_every_image(tree, model_file):
    for model in (numpy_engine.load(model_file), load_model(model_file, device="cpu")):
        data = ev.read_labelled(str(tree / "test"), None, model)
        result = ev.evaluate(data, model, 0.5, "default", batch_size=5, workers=1)
        rows = list(classify(data.names, model, batch_size=64, workers=2))
        assert len(rows) == len(result.predictions) == 12
        for row, pred in zip(rows, result.predictions, strict=True):
            assert (pred.path, pred.label, pred.probabilities) == (
                row.path,
                row.label,
                row.probabilities,
            )


def test_cli_scores_equal_the_metrics_of_classify_s_own_output(tree, model_file):
    m = ["--checkpoint", str(model_file), "--workers", "1"]
    done = _eval(str(tree / "test"), *m, "--json")
    assert done.exit_code == 0, done.stderr
    scores = json.loads(done.stdout)
    rows = list(
        csv.DictReader(
            io.StringIO(
                runner.invoke(app, ["classify", str(tree / "test"), "-r", *m, "-f", "csv"]).stdout
            )
        )
    )
    labels = np.array([1 if "/PNEUMONIA/" in r["path"] else 0 for r in rows])
    probs = np.array([[float(r["p_NORMAL"]), float(r["p_PNEUMONIA"])] for r in rows])
    expected = classification_metrics(labels, probs)
    for key in ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "f1"):
        assert scores[key] == expected[key], key
    assert scores["confusion"] == expected["confusion"]
    assert scores["per_class"]["PNEUMONIA"]["images"] == 6
    assert sum(c["predicted"] for c in scores["per_class"].values()) == 12
    assert scores["threshold_source"] == "default" and scores["split"] is None


def test_a_prepared_split_scores_as_its_source_folder(tree, model_file, prepared):
    m = ["--checkpoint", str(model_file), "--workers", "1", "--json"]
    from_split = json.loads(_eval(prepared, "--split", "test", *m).stdout)
    from_tree = json.loads(_eval(str(tree), *m).stdout)  # train/ val/ test/: test by default
    assert from_split["data_kind"] == "prepared" and from_tree["data_kind"] == "split-folders"
    for key in ("n", "accuracy", "auc", "confusion"):
        assert from_split[key] == from_tree[key], key


def test_a_csv_of_path_and_label_is_scored(tmp_path, tree, model_file):
    files = sorted((tree / "test").rglob("*.jpeg"))
    table = tmp_path / "labels.csv"
    table.write_text(
        "path,label\n" + "".join(f"{f},{f.parent.name.lower()}\n" for f in files)
    )  # labels match the model's classes whatever their case
    done = _eval(str(table), "--checkpoint", str(model_file), "--workers", "1", "--json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["n"] == len(files) == 12


def test_a_csv_whose_rows_are_all_test_rows_is_scored(tmp_path, tree, model_file):
    files = sorted((tree / "test").rglob("*.jpeg"))
    table = tmp_path / "test_only.csv"
    table.write_text("path,label,split\n" + "".join(f"{f},{f.parent.name},test\n" for f in files))
    done = _eval(str(table), "--checkpoint", str(model_file), "--workers", "1", "--json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["n"] == len(files) == 12


def test_a_tree_with_only_a_test_folder_is_scored(tmp_path, tree, model_file):
    for f in (tree / "test").rglob("*.jpeg"):
        target = tmp_path / "d" / "test" / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())
    done = _eval(str(tmp_path / "d"), "--checkpoint", str(model_file), "--workers", "1", "--json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["n"] == 12


def test_unreadable_images_are_left_out_and_exit_3(tmp_path, model_file):
    for c in CLASSES:
        write_image(tmp_path / "d" / c / "a.png", seed=len(c))
    (tmp_path / "d" / "NORMAL" / "broken.png").write_bytes(b"nope")
    done = _eval(str(tmp_path / "d"), "--checkpoint", str(model_file), "--json")
    assert done.exit_code == 3
    doc = json.loads(done.stdout)
    assert doc["n"] == 2 and doc["unreadable"][0][0].endswith("broken.png")


def test_classes_the_model_does_not_know_are_a_usage_error(tmp_path, model_file):
    for c in ("cat", "dog"):
        write_image(tmp_path / "d" / c / "a.png")
    done = _eval(str(tmp_path / "d"), "--checkpoint", str(model_file))
    assert done.exit_code == 2 and "not one of the model's classes" in done.stderr
    assert _eval(str(tmp_path / "nothing-here"), "--checkpoint", str(model_file)).exit_code == 1


def test_choose_threshold_maximises_youden_s_j_on_the_scores():
    labels = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.3, 0.62, 0.55, 0.7, 0.9], dtype=np.float32)
    probs = np.stack([1 - p1, p1], axis=1)
    chosen = ev.choose_threshold(labels, probs, "youden")
    # >= 0.7: sens 2/3, spec 1 (J 0.667); >= 0.55: sens 1, spec 2/3 (J 0.667): a tie, and
    # 0.55 is nearer the default 0.5
    assert chosen["value"] == pytest.approx(0.55) and chosen["rule_value"] == pytest.approx(2 / 3)
    assert np.float32(chosen["value"]) == p1[3]
    balanced = ev.choose_threshold(labels, probs, "balanced-accuracy")
    assert balanced["value"] == chosen["value"]
    assert balanced["rule_value"] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ev.EvaluateError, match="both classes"):
        ev.choose_threshold(np.zeros(6, dtype=int), probs)


def test_threshold_from_val_is_stored_and_classify_uses_it(tmp_path, tree, model_file, prepared):
    before = numpy_engine.load(model_file).layers
    done = _eval(prepared, "--checkpoint", str(model_file), "--threshold-from", "val", "--json")
    assert done.exit_code == 0, done.stderr
    doc = json.loads(done.stdout)
    chosen = doc["threshold_chosen"]
    assert doc["threshold_source"] == "chosen" and doc["threshold"] == chosen["value"]
    assert chosen["split"] == "val" and chosen["rule"] == "youden"
    stored = engine.stored_threshold(load_model(model_file, device="cpu").meta, model_file)
    assert stored["value"] == chosen["value"]
    after = numpy_engine.load(model_file)  # the weights are untouched
    for (k1, _), (k2, _) in zip(before, after.layers, strict=True):
        np.testing.assert_array_equal(k1, k2)
    assert after.stored_threshold["value"] == chosen["value"]

    image = str(next((tree / "test" / "NORMAL").iterdir()))
    used = runner.invoke(app, ["classify", image, "--checkpoint", str(model_file), "-f", "json"])
    header = json.loads(used.stdout)
    assert header["threshold"] == chosen["value"] and header["threshold_source"] == "model"
    assert "the model's: chosen on val by youden" in used.stderr
    m = ["--checkpoint", str(model_file), "-f", "json"]
    given = runner.invoke(app, ["classify", image, *m, "--threshold", "0.4"])
    assert json.loads(given.stdout)["threshold"] == 0.4
    assert json.loads(given.stdout)["threshold_source"] == "given"
    again = json.loads(_eval(prepared, "--checkpoint", str(model_file), "--json").stdout)
    assert again["threshold"] == chosen["value"] and again["threshold_source"] == "model"


def test_evaluate_reads_its_config_table_and_flags_override_it(tmp_path, tree, model_file):
    toml = tmp_path / "e.toml"
    toml.write_text('[evaluate]\nsplit = "val"\nthreshold = 0.3\nworkers = 1\n')
    m = ["--checkpoint", str(model_file), "--config", str(toml), "--json"]
    from_file = json.loads(_eval(str(tree), *m).stdout)
    assert from_file["threshold"] == 0.3 and from_file["threshold_source"] == "given"
    assert from_file["n"] == 2 * 4  # the val split's images (4 a class), not test's
    flagged = json.loads(_eval(str(tree), *m, "--split", "test", "--threshold", "0.6").stdout)
    assert flagged["threshold"] == 0.6 and flagged["n"] == 2 * 6
    toml.write_text('[evaluate]\nthreshold_rule = "median"\n')
    refused = _eval(str(tree), *m)
    assert refused.exit_code == 2 and "evaluate.threshold_rule: must be one of" in refused.stderr


def test_threshold_from_val_refuses_the_bundled_model_and_non_prepared_data(tree, model_file):
    bundled = _eval(str(tree), "--threshold-from", "val")
    assert bundled.exit_code == 2 and "--checkpoint" in bundled.stderr
    folder = _eval(str(tree), "--checkpoint", str(model_file), "--threshold-from", "val")
    assert folder.exit_code == 2 and "prepared dataset" in folder.stderr
    assert "threshold" not in load_model(model_file, device="cpu").meta  # nothing stored
    both = _eval(str(tree), "--checkpoint", str(model_file), "--threshold", "0.3",
                 "--threshold-from", "val")
    assert both.exit_code == 2


def test_the_bundled_model_is_never_rewritten_however_it_is_named(tmp_path, prepared, monkeypatch):
    """Given by its own path, a link to it or a run whose checkpoint is a hard link to it,
    the bundled default model is refused before any work, with how to make a copy."""
    bundled = make_checkpoint(tmp_path / "package" / "default.safetensors", classes=CLASSES)
    monkeypatch.setattr(paths, "bundled_model", lambda: bundled)
    before = bundled.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(bundled)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "final.safetensors").hardlink_to(bundled)  # the model --run loads
    (run / "best.safetensors").hardlink_to(bundled)
    runs = (["--run", str(run)], ["--run", str(run), "--model", "best"])
    for given in (["--checkpoint", str(bundled)], ["--checkpoint", str(link)], *runs):
        result = _eval(prepared, *given, "--threshold-from", "val")
        assert result.exit_code == 2, result.output
        assert "bundled default model" in result.stderr and "cp " in result.stderr
    default = _eval(prepared, "--threshold-from", "val")  # no model named: the bundled one
    assert default.exit_code == 2 and "bundled default model" in default.stderr
    with pytest.raises(modelfile.ReadOnlyModel):
        modelfile.update_meta(bundled, {"threshold": {"value": 0.3}})
    assert bundled.read_bytes() == before
    copy = tmp_path / "my-model.safetensors"
    copy.write_bytes(before)
    assert _eval(prepared, "--checkpoint", str(copy), "--threshold-from", "val").exit_code == 0


def test_update_meta_rewrites_only_the_metadata_and_keeps_the_file_loadable(model_file):
    size = model_file.stat().st_size
    modelfile.update_meta(model_file, {"threshold": {"value": 0.25, "rule": "youden"}})
    model = load_model(model_file, device="cpu")
    assert model.stored_threshold["value"] == 0.25
    assert abs(model_file.stat().st_size - size) < 200
    assert not list(model_file.parent.glob(".*.tmp"))


def test_plots_are_written_with_the_plot_extra(tmp_path, tree, model_file):
    pytest.importorskip("matplotlib")
    done = _eval(str(tree / "test"), "--checkpoint", str(model_file), "--plot",
                 str(tmp_path / "plots"), "--json")
    assert done.exit_code == 0, done.stderr
    for name in ("roc.png", "confusion.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_plot_titles_are_wrapped_never_cut_short():
    title = "model-with-a-long-name@0123456789ab on /data/sites/hospital-north/held-out (test)"
    from threengan_cli.infer import plots

    lines = plots._wrapped(title * 2, width=40).split("\n")
    assert len(lines) > 2 and max(map(len, lines)) <= 40
    assert "".join(lines).replace(" ", "") == (title * 2).replace(" ", "")


def test_plot_without_matplotlib_is_a_failure_not_a_usage_error(
    tmp_path, tree, model_file, monkeypatch
):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    done = _eval(str(tree / "test"), "--checkpoint", str(model_file), "--plot", str(tmp_path))
    # the command is right as given; what is missing is an install (exit 1, as a missing
    # torch is), not a usage error (2)
    assert done.exit_code == 1 and "threengan[plot]" in done.stderr


def test_threshold_from_val_refuses_a_run_that_another_process_writes(tree, prepared, tmp_path):
    import subprocess
    import sys

    from threengan_cli.train import runs

    run = tmp_path / "run"
    checkpoint = make_checkpoint(run / runs.LAST, classes=CLASSES)  # what --run loads
    (run / runs.RUN).write_text("{}")
    before = checkpoint.read_bytes()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom threengan_cli.train import runlock\n"
            "with runlock.lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for model in (["--run", str(run)], ["--checkpoint", str(checkpoint)]):
            done = _eval(prepared, *model, "--threshold-from", "val")
            assert done.exit_code == 1, done.output
            assert f"pid {holder.pid}" in done.stderr and "is in use" in done.stderr
        assert checkpoint.read_bytes() == before
        plain = _eval(prepared, "--run", str(run), "--json")  # reading it needs no lock
        assert plain.exit_code == 0, plain.output
    finally:
        holder.kill()
        holder.wait()
    done = _eval(prepared, "--run", str(run), "--threshold-from", "val", "--json")
    assert done.exit_code == 0, done.output
    assert checkpoint.read_bytes() != before and not (run / runs.LOCK).exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["robust", "paper"])
def test_evaluate_run_scores_the_model_whose_figures_the_run_reports(dataset, recipe):
    """summary.json's test figures and `evaluate --run` on the same images: one model."""
    args = ["train", str(dataset), "--name", f"r-{recipe}", "--recipe", recipe, "--method"]
    args += ["vanilla", "--width", "4", "--batch-size", "4", "--epochs", "3", "--device", "cpu"]
    assert runner.invoke(app, [*args, "-q"]).exit_code == 0
    summary = json.loads(
        (paths.runs_dir() / f"r-{recipe}" / "summary.json").read_text()
    )
    done = _eval(str(dataset), "--run", f"r-{recipe}", "--engine", "torch", "--json", "-q")
    assert done.exit_code == 0, done.output
    scored = json.loads(done.stdout)
    assert scored["which_model"] == "final, epoch 3"
    assert scored["n"] == summary["test"]["n"]
    assert scored["accuracy"] == summary["test"]["accuracy"]
    assert scored["auc"] == pytest.approx(summary["test"]["auc"], abs=1e-6)


def test_a_threshold_that_cannot_be_stored_is_a_failure_naming_the_file(tmp_path):
    from types import SimpleNamespace

    from threengan_cli.core.errors import Failure

    missing = SimpleNamespace(path=tmp_path / "gone.safetensors")
    with pytest.raises(Failure, match="cannot store the threshold in .*gone.safetensors"):
        ev.store_threshold(missing, {"value": 0.4})


def test_plots_without_matplotlib_are_a_failure_before_any_work(monkeypatch):
    import sys

    from threengan_cli.core.errors import EXIT_FAIL, Failure
    from threengan_cli.infer.plots import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(Failure, match=r"pip install 'threengan\[plot\]'") as raised:
        require_matplotlib()
    assert raised.value.exit_code == EXIT_FAIL
