"""The command line as a user meets it: escaping, help defaults, quiet, config sections, and
`train`'s refusals, resume and Ctrl+C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from image_factory import class_tree
from typer.testing import CliRunner

from threengan_cli.bench.grid import BenchmarkSettings
from threengan_cli.cli.app import app
from threengan_cli.cli.common import default_of, description_of
from threengan_cli.core import config, paths

runner = CliRunner()
TINY = ["--epochs", "1", "--width", "4", "--batch-size", "4", "--device", "cpu"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------- escaping
def test_a_source_name_with_markup_prints_as_written(tmp_path):
    src = class_tree(tmp_path / "sq[bold]d", {"a": 2, "b": 2})
    result = run("prepare", src, "--workers", "1")  # its name is not a valid dataset name
    assert result.exit_code == 2
    assert "sq[bold]d" in result.stderr


def test_a_path_with_a_closing_tag_is_reported_without_markup_error(ckpt):
    result = run("classify", "x[/].png", "--checkpoint", ckpt, "--format", "csv")
    assert result.exit_code == 1, result.output  # the only input does not exist
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "x[/].png" in result.stderr


def test_an_unknown_config_section_is_named(tmp_path):
    (tmp_path / "c.toml").write_text("[trian]\nepochs = 1\n")
    result = run("train", "somewhere", "--config", tmp_path / "c.toml")
    assert result.exit_code == 2
    assert "unknown section [trian] (known: prepare, train, classify" in result.stderr


# --------------------------------------------------------------------------- help defaults
@pytest.mark.parametrize(
    "section, model",
    [*config.SECTIONS.items(), ("benchmark", BenchmarkSettings)],
)
def test_help_defaults_equal_the_settings_models_defaults(section, model):
    for name, field in model.model_fields.items():
        if field.is_required():
            continue
        assert default_of(section, name) == field.default, f"{section}.{name}"


@pytest.mark.parametrize(
    "section, model",
    [*config.SECTIONS.items(), ("benchmark", BenchmarkSettings)],
)
def test_option_help_is_the_settings_fields_description(section, model):
    """Options are declared once: the help ``--help`` shows is the field's description, read
    from the source without importing pydantic; it must be what pydantic reads."""
    described = [name for name, field in model.model_fields.items() if field.description]
    assert described
    for name in described:
        field = model.model_fields[name]
        assert description_of(section, name) == field.description, f"{section}.{name}"


def test_no_command_s_help_imports_numpy_or_the_settings_models():
    """--help reads each option's help from the settings source (core/settings_source),
    never from the models: an import of numpy or of the settings modules there costs every
    --help."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from threengan_cli.cli.app import app\n"
        "import typer\n"
        "names = list(typer.main.get_command(app).commands)\n"
        "for name in names:\n"
        "    assert CliRunner().invoke(app, [name, '--help']).exit_code == 0, name\n"
        "loaded = [m for m in ('numpy', 'threengan_cli.core.settings',\n"
        "          'threengan_cli.core.use_settings') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_help_shows_the_models_default():
    result = run("train", "--help")
    assert "[default: 100]" in result.stdout  # --epochs, from TrainSettings


def test_help_examples_are_never_wrapped_when_stdout_is_not_a_terminal():
    """Each example stays one line (to paste into a shell), however long; CliRunner's
    stdout is no terminal, where rich would wrap at 80 columns."""
    import inspect

    import typer
    from rich.text import Text

    group = typer.main.get_command(app)
    longest = 0
    for name, command in group.commands.items():
        output = run(name, "--help").stdout.splitlines()
        for line in inspect.cleandoc(command.help or "").splitlines():
            if line.startswith("  ") and line.strip():
                example = Text.from_markup(line.strip()).plain
                longest = max(longest, len(example))
                assert any(example in shown for shown in output), f"{name}: {example}"
    assert longest > 76  # one example at least would not fit rich's 80 columns otherwise


def test_flags_take_no_value():
    assert run("info", "--json", "true").exit_code == 2
    assert "<bool>" not in run("info", "--help").stdout
    assert "<bool>" not in run("--help").stdout and "<bool>" not in run("train", "--help").stdout


def test_usage_lines_name_arguments_plainly():
    assert "prepare [OPTIONS] SOURCE" in run("prepare", "--help").stdout
    assert "classify [OPTIONS] [PATH]..." in run("classify", "--help").stdout


# ---------------------------------------------------------------------------- precision
def test_fp16_is_not_a_precision_choice(dataset, tmp_path):
    result = run("train", dataset, "--precision", "fp16", "--out", tmp_path / "r", *TINY)
    assert result.exit_code == 2
    assert "train.precision: must be one of 'fp32' or 'bf16'" in result.stderr


# -------------------------------------------------------------------------------- quiet
def test_quiet_classify_prints_no_warning_and_still_exits_3(ckpt, tmp_path):
    from image_factory import save

    good = save(tmp_path / "good.png", seed=1, size=(40, 40))
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    result = run("classify", good, bad, "--checkpoint", ckpt, "-f", "csv", "-q")
    assert result.exit_code == 3
    assert result.stderr == ""


def test_quiet_benchmark_prints_no_tables(dataset, tmp_path):
    args = ["--profile", "smoke", "--methods", "vanilla", "--sizes", "8", "--device", "cpu"]
    result = run("benchmark", dataset, *args, "--out", tmp_path / "b", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and result.stderr == ""


def test_benchmark_reads_its_config_section(dataset, tmp_path):
    (tmp_path / "c.toml").write_text(
        '[benchmark]\nprofile = "smoke"\nmethods = ["vanilla"]\nsizes = [8]\ndevice = "cpu"\n'
    )
    result = run("benchmark", dataset, "--config", tmp_path / "c.toml", "--out", tmp_path / "b",
                 "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["settings"]["methods"] == ["vanilla"] and data["settings"]["sizes"] == [8]
    bad = tmp_path / "bad.toml"
    bad.write_text("[benchmark]\nrepeat = 2\n")
    refused = run("benchmark", dataset, "--config", bad, "--out", tmp_path / "b2")
    assert refused.exit_code == 2 and "repeat" in refused.stderr


def test_classify_reads_its_format_from_the_config(ckpt, tmp_path):
    from image_factory import save

    good = save(tmp_path / "good.png", seed=1, size=(40, 40))
    (tmp_path / "c.toml").write_text('[classify]\nformat = "jsonl"\n')
    result = run("classify", good, "--checkpoint", ckpt, "--config", tmp_path / "c.toml")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["path"] == str(good)


def test_classify_takes_sort_into_and_output_from_the_config_and_flags_override_them(
    ckpt, tmp_path
):
    from image_factory import save

    good = save(tmp_path / "in" / "good.png", seed=1, size=(40, 40))
    toml = tmp_path / "c.toml"
    sorted_dir, results = tmp_path / "sorted", tmp_path / "results.csv"
    toml.write_text(
        f'[classify]\nsort_into = "{sorted_dir}"\noutput = "{results}"\nlink = true\n'
        'adapt = "none"\nshard = "1/1"\nood_folder = false\n'
    )
    m = ["--checkpoint", ckpt, "--config", toml]
    done = run("classify", good, *m)
    assert done.exit_code == 0, done.output
    assert done.stdout == "" and results.read_text().startswith("path,label")
    placed = list(sorted_dir.rglob("*.png"))
    assert len(placed) == 1 and placed[0].parent.parent == sorted_dir
    other_dir, other = tmp_path / "elsewhere", tmp_path / "flag.jsonl"
    flagged = run("classify", good, *m, "--sort-into", other_dir, "-o", other)
    assert flagged.exit_code == 0, flagged.output
    assert len(list(other_dir.rglob("*.png"))) == 1 and json.loads(other.read_text())["path"]
    assert len(list(sorted_dir.rglob("*.png"))) == 1  # left as the first run made it


@pytest.mark.parametrize(
    "line, said",
    [
        ('sort_into = "{file}"', "classify.sort_into: is a file: give a folder"),
        ('output = "{folder}"', "classify.output: is a folder: give a file"),
        ('sort_into = ""', "classify.sort_into: must be a path"),
        ("report = 5", "classify.report: must be a path"),
    ],
)
def test_a_config_path_is_checked_as_its_flag_is(ckpt, tmp_path, line, said):
    """typer refuses a file for --sort-into, a folder for --output; so does the settings
    model for a file's value, before anything is classified or sorted."""
    from image_factory import save

    good = save(tmp_path / "good.png", seed=1, size=(40, 40))
    toml = tmp_path / "c.toml"
    toml.write_text("[classify]\n" + line.format(file=good, folder=tmp_path) + "\n")
    result = run("classify", good, "--checkpoint", ckpt, "--config", toml)
    assert result.exit_code == 2 and said in result.stderr and result.stdout == ""


def test_a_flag_left_at_its_shown_default_does_not_override_the_config(ckpt, tmp_path):
    """--adapt shows its default (none) in --help; not given, the file's bn stands."""
    from image_factory import save

    good = save(tmp_path / "good.png", seed=1, size=(40, 40))
    (tmp_path / "c.toml").write_text('[classify]\nadapt = "bn"\n')
    m = ["--checkpoint", ckpt, "--config", tmp_path / "c.toml", "-f", "csv"]
    adapted = run("classify", good, *m)
    assert adapted.exit_code == 2 and "at least 32" in adapted.stderr  # bn, on one image
    assert run("classify", good, *m, "--adapt", "none").exit_code == 0


def test_a_bad_classify_option_in_the_config_is_a_usage_error_naming_it(ckpt, tmp_path):
    (tmp_path / "c.toml").write_text('[classify]\nshard = "4/3"\n')
    result = run("classify", "x.png", "--checkpoint", ckpt, "--config", tmp_path / "c.toml")
    assert result.exit_code == 2
    assert "classify.shard: must be I/N with 1 <= I <= N" in result.stderr
    (tmp_path / "c.toml").write_text("[classify]\nlink = true\n")
    result = run("classify", "x.png", "--checkpoint", ckpt, "--config", tmp_path / "c.toml")
    assert result.exit_code == 2 and "--link goes with --sort-into" in result.stderr


# ---------------------------------------------------------------------------------- train
@pytest.mark.slow
def test_train_refuses_an_existing_run_name_with_other_settings(dataset):
    first = run("train", dataset, "--name", "r1", *TINY, "-q")
    assert first.exit_code == 0, first.output
    again = run("train", dataset, "--name", "r1", *TINY, "--seed", "9")
    assert again.exit_code == 2
    assert "already holds a run with other settings (seed" in again.stderr
    assert "--resume" in again.stderr and "--force" in again.stderr


def test_train_resume_of_a_missing_run_is_a_usage_error():
    result = run("train", "--resume", "never-trained")
    assert result.exit_code == 2
    assert "no run to resume" in result.stderr


@pytest.mark.slow
def test_train_resume_of_a_finished_run_exits_0_and_trains_nothing(dataset):
    assert run("train", dataset, "--name", "done", *TINY, "-q").exit_code == 0
    run_dir = paths.runs_dir() / "done"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    result = run("train", "--resume", "done")
    assert result.exit_code == 0, result.output
    assert "already finished its 1 epochs; pass --epochs larger than 1" in result.stderr
    assert "Traceback" not in result.output
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before  # no epoch trained, no checkpoint or metrics line rewritten


def test_train_without_a_test_split_says_so(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 6, "b": 6})
    prepared = run("prepare", src, "--out", tmp_path / "ds", "--image-size", "16",
                   "--val-fraction", "0.2", "--workers", "1", "-q")  # fmt: skip
    assert prepared.exit_code == 0, prepared.output
    result = run("train", tmp_path / "ds", "--out", tmp_path / "r", *TINY)
    assert result.exit_code == 0, result.output
    assert "no test split" in result.stderr and "AUC nan" not in result.stderr


def test_a_size_that_does_not_divide_over_the_classes_is_refused(dataset, tmp_path):
    result = run("train", dataset, "--size", "7", "--out", tmp_path / "r", *TINY)
    assert result.exit_code == 1
    assert "does not divide over 2 classes" in result.stderr


@pytest.mark.slow
def test_ctrl_c_exits_130_and_prints_the_resume_hint(dataset, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "threengan_cli", "train", str(dataset), "--out", str(run_dir),
           "--epochs", "100000", "--width", "4", "--batch-size", "4",
           "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env)  # fmt: skip
    seen = []
    for line in proc.stderr:  # the first epoch line: the loop and its handler are running
        seen.append(line)
        if line.startswith("epoch 1/"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    code = proc.wait(timeout=120)
    assert code == 130, "".join(seen) + rest
    assert f"Continue with: threengan train --resume {run_dir}" in rest
    assert (run_dir / "last.safetensors").is_file()


def test_info_says_which_cuda_torch_was_built_with():
    result = run("info")
    assert result.exit_code == 0
    assert "torch built with CUDA" in result.stdout


def test_prepare_warns_when_a_split_comes_out_empty(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 3, "b": 3})
    result = run("prepare", src, "--out", tmp_path / "ds", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "warning: the test split is empty" in result.stderr


def test_the_guides_settings_file_is_valid_for_every_command(tmp_path):
    import re

    from threengan_cli.bench import grid

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    block = re.search(r"## Settings files.*?```toml\n(.*?)```", guide, re.S)[1]
    toml = tmp_path / "c.toml"
    toml.write_text(block)
    for section in config.SECTIONS:
        config.resolve(section, toml)
    values = dict(config.read_config(toml)["benchmark"])
    grid.resolve_settings(values.pop("profile"), **values)


def test_train_view_keeps_epoch_lines_and_a_bar_of_the_epochs_steps(monkeypatch, tmp_path):
    import io

    from rich.console import Console

    from threengan_cli.cli import progress, views
    from threengan_cli.train import events

    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=True, highlight=False)
    monkeypatch.setattr(views.err, "_console", console)
    view = progress.TrainView(quiet=False)
    view(events.RunStarted(tmp_path, "3ngan", "cpu", 24, 6, 0, 2, False, False))
    record = {"epoch": 1, "train": {"loss_c": 0.5}, "val": {"accuracy": 0.75},
              "images_per_s": 10.0, "seconds": 2.4}  # fmt: skip
    view(events.StepDone(0, 6, 6))
    view(events.EpochDone(0, 2, record))
    view(events.StepDone(1, 3, 6))
    bar = Console(file=io.StringIO(), width=80, force_terminal=False, color_system=None)
    with bar.capture() as captured:
        bar.print(view.progress.get_renderable())
    shown = captured.get().strip()
    view.close()
    assert shown.startswith("epoch 2/2") and " 3/6 " in shown and "eta" in shown
    assert max(len(line) for line in shown.splitlines()) <= 80
    assert "epoch 1/2 loss_c=0.500 val_acc=0.7500" in screen.getvalue()  # kept, not overwritten


def test_a_failing_prepare_takes_its_progress_bar_down_before_the_error_line(
    monkeypatch, tmp_path
):
    import io

    from rich.console import Console

    from threengan_cli.cli import progress, views

    src = class_tree(tmp_path / "src", {"a": 2})
    (src / "b").mkdir()
    (src / "b" / "broken.png").write_bytes(b"not an image")
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, color_system=None, highlight=False)
    monkeypatch.setattr(views.err, "_console", console)
    bars = []
    make_bar = progress.BarView.__init__

    def recorded(self, *args, **kwargs):
        make_bar(self, *args, **kwargs)
        bars.append((self, self.progress is not None))

    monkeypatch.setattr(progress.BarView, "__init__", recorded)
    live_at_error = []
    print_error = views.error

    def error(message):
        live_at_error.extend(bar.progress is not None for bar, _ in bars)
        print_error(message)

    monkeypatch.setattr(views, "error", error)
    result = run("prepare", src, "--out", tmp_path / "out", "--workers", "1")
    assert result.exit_code == 1
    assert "at least two are needed" in screen.getvalue()
    assert [started for _, started in bars] == [True]  # the bar was live while decoding
    assert live_at_error == [False]


@pytest.mark.parametrize("every", ["nan", "-1", "inf"])
def test_train_refuses_a_checkpoint_interval_that_is_not_a_number_of_seconds(dataset, every):
    result = run("train", dataset, "--checkpoint-every", every, *TINY)
    assert result.exit_code == 2, result.output
    assert "--checkpoint-every takes seconds" in result.stderr


def test_train_with_an_unlabelled_pool_that_does_not_exist_is_a_usage_error(dataset, tmp_path):
    result = run("train", dataset, "--unlabelled", "no-such-pool", "--out", tmp_path / "r", *TINY)
    assert result.exit_code == 2, result.output
    assert "--unlabelled no-such-pool: not 'rest', a prepared dataset" in result.stderr
    assert "Traceback" not in result.output


def test_no_option_help_loses_bracketed_words_to_markup():
    """rich reads ``[word ...]`` as a style tag and drops it: such text must be escaped."""
    import re

    import typer

    styles = {"bold", "dim", "italic", "red", "green", "yellow", "cyan"}
    lost = []
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            for found in re.finditer(r"(?<!\\)\[([a-z#/@][^\]]*)\]", param.help or ""):
                if found.group(1).lstrip("/").split()[0] not in styles:
                    lost.append(f"{name} --{param.name}: {found.group(0)}")
    assert not lost
    shown_help = run("evaluate", "--help").stdout
    assert "default: the model's own, which flags 5% of its val split" in " ".join(
        shown_help.replace("│", " ").split()
    )


def test_train_with_a_broken_torchvision_stops_before_its_first_epoch(
    dataset, tmp_path, broken_torchvision
):
    result = run("train", dataset, "--out", tmp_path / "r", *TINY)
    assert result.exit_code == 1, result.output
    assert "sample grids need torchvision: torchvision " in result.stderr
    assert "pip install --force-reinstall torch==" in result.stderr
    assert "epoch 1/" not in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "r" / "last.safetensors").exists()


def test_info_shows_torchvision_and_what_is_wrong_with_it(broken_torchvision):
    from threengan_cli.core.system import torchvision_version

    shown_json = json.loads(run("info", "--json").stdout)
    assert shown_json["torchvision"].startswith("broken: torchvision ")
    assert torchvision_version() in shown_json["torchvision"]
