"""classify with users' files: it writes only where it was told (never outside --sort-into,
never over a device, a FIFO or /dev/stdout), keeps every row writable (non-UTF-8 names,
spreadsheet formulas), reruns cleanly, and says what went wrong in one line."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from model_factory import make_checkpoint, write_image
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.core import fileio
from threengan_cli.infer.classify import classify, expand
from threengan_cli.model import modelfile

runner = CliRunner()


def _cli(*args: str, input: str | None = None):
    return runner.invoke(app, ["classify", *args], input=input)


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# ------------------------------------------------------------------------ class names
@pytest.mark.parametrize("bad", ["../../escaped", "/tmp/absolute", "..", "a/b", ".hidden"])
def test_sort_into_refuses_class_names_that_are_not_folder_names(tmp_path, bad):
    model = make_checkpoint(tmp_path / "m.safetensors", classes=(bad, "fine"))
    image = str(write_image(tmp_path / "in" / "x.png"))
    out = tmp_path / "deep" / "er" / "sorted"
    result = _cli(image, "--checkpoint", str(model), "--sort-into", str(out), "-f", "csv")
    assert result.exit_code == 2
    assert "cannot be a folder name" in result.stderr and len(result.stderr.splitlines()) == 1
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name == "x.png"]
    assert written == [tmp_path / "in" / "x.png"]  # nothing sorted, inside or outside


def test_sort_into_s_folders_are_made_from_the_settings_or_refused_as_a_usage_error(tmp_path):
    from threengan_cli.core.errors import UsageError
    from threengan_cli.core.use_settings import ClassifySettings
    from threengan_cli.infer.sorting import sorter_for

    assert sorter_for(ClassifySettings(), ["a", "b"]) is None
    cfg = ClassifySettings(sort_into=tmp_path / "s", link=True)
    made = sorter_for(cfg, ["a", "b"])
    assert (made.folder, made.link, made.classes) == (tmp_path / "s", True, ["a", "b"])
    with pytest.raises(UsageError, match="--sort-into makes a folder per class: .*ood"):
        sorter_for(cfg, ["a", "OOD"])


def test_the_class_folder_rule_is_one_function_shared_by_classify_and_generate(tmp_path):
    from threengan_cli.core import paths
    from threengan_cli.infer import generate
    from threengan_cli.infer.sorting import Sorter

    with pytest.raises(ValueError, match="cannot be a folder name"):
        Sorter(tmp_path, ["normal", "../x"])
    with pytest.raises(generate.GenerateError, match="cannot be a folder name"):
        generate._check_classes(["normal", "../x"])
    assert Sorter(tmp_path, ["NORMAL", "Pneumonía", "viral pneumonia"]).classes[1] == "Pneumonía"
    for bad in ("x\n", "x.", " x", "C:x", "a" * 101):
        with pytest.raises(ValueError):
            paths.check_class_folder(bad)


# --------------------------------------------------------------- -o that is not a file
def test_output_to_a_fifo_reaches_its_reader_and_the_fifo_stays(tmp_path, ckpt):
    image = str(write_image(tmp_path / "x.png"))
    fifo = tmp_path / "results.pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        result = _cli(image, "--checkpoint", str(ckpt), "-o", str(fifo))  # no suffix: csv
        assert result.exit_code == 0, result.stderr
        assert _rows(reader.communicate(timeout=30)[0].decode())[0]["path"] == image
    finally:
        reader.kill()
        reader.wait()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_output_to_a_device_with_sort_into_is_allowed_and_keeps_the_device(tmp_path, ckpt):
    if os.geteuid() == 0:  # root could replace the real /dev/null: use a copy of it
        device = tmp_path / "null"
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    else:
        device = Path(os.devnull)
    image = str(write_image(tmp_path / "x.png"))
    sorted_dir = tmp_path / "d"
    m = ["--checkpoint", str(ckpt), "--sort-into", str(sorted_dir)]
    result = _cli(image, *m, "-o", str(device))
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    assert [p.name for p in sorted_dir.rglob("*.png")] == ["x.png"]


@pytest.mark.slow
def test_output_to_dev_stdout_reaches_stdout(tmp_path, ckpt):
    """In a real process (CliRunner's stdout is no file descriptor), through a link made as
    /dev/stdout is made (-> /proc/self/fd/1): a broken build run as root must not be able to
    replace the machine's own /dev/stdout."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    stdout = tmp_path / "stdout"
    stdout.symlink_to("/proc/self/fd/1")
    image = str(write_image(tmp_path / "x.png"))
    code = "from threengan_cli.cli.app import main; main()"
    args = ["classify", image, "--checkpoint", str(ckpt), "-o", str(stdout), "-q"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _rows(done.stdout)[0]["path"] == image
    assert stdout.is_symlink()


# ---------------------------------------------------------------- format precedence
def test_an_explicit_output_suffix_wins_over_the_config_files_format(tmp_path, ckpt):
    image = str(write_image(tmp_path / "x.png"))
    config = tmp_path / "threengan.toml"
    config.write_text('[classify]\nformat = "json"\n')
    m = ["--checkpoint", str(ckpt), "--config", str(config)]
    assert _cli(image, *m, "-o", str(tmp_path / "res.csv")).exit_code == 0
    assert _rows((tmp_path / "res.csv").read_text())[0]["path"] == image
    flag = _cli(image, *m, "-o", str(tmp_path / "res.csv"), "--format", "jsonl")
    assert flag.exit_code == 0  # the flag wins over the suffix
    assert json.loads((tmp_path / "res.csv").read_text())["path"] == image
    plain = _cli(image, *m, "-o", str(tmp_path / "res.out"))  # no known suffix: the file's
    assert plain.exit_code == 0 and json.loads((tmp_path / "res.out").read_text())["rows"]
    assert json.loads(_cli(image, *m).stdout)["rows"][0]["path"] == image


# ------------------------------------------------------------------ what cells hold
def test_csv_cells_never_start_a_spreadsheet_formula_and_json_stays_exact(tmp_path, monkeypatch):
    names = ["=cmd|' -C calc'!A0.png", "+1.png", "-2.png", "@SUM(1).png", "\tx.png", "ok.png"]
    model = make_checkpoint(tmp_path / "m.safetensors", classes=("=HYPERLINK(1)", "normal"))
    monkeypatch.chdir(tmp_path)  # relative paths: the cell starts with the file's own name
    for i, name in enumerate(names):
        write_image(tmp_path / name, seed=i, fmt="PNG")
    m = ["--checkpoint", str(model), "--threshold", "0.0001", "--workers", "1"]
    out = _cli(*m, "-f", "csv", "--", *names).stdout
    cells = [cell for line in csv.reader(io.StringIO(out)) for cell in line]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    rows = _rows(out)
    assert [r["path"] for r in rows] == ["'" + n for n in names[:5]] + ["ok.png"]
    assert {r["label"] for r in rows} == {"normal"}
    assert "'=HYPERLINK(1)" not in out.splitlines()[0]  # the header's p_=... is safe as is
    jsonl = _cli(*m, "-f", "jsonl", "--", *names).stdout
    exact = [json.loads(line) for line in jsonl.splitlines()]
    assert [r["path"] for r in exact] == names


def test_a_file_name_that_is_not_utf8_is_written_escaped_and_the_other_rows_kept(tmp_path, ckpt):
    folder = tmp_path / "in"
    write_image(folder / "ok.png", seed=1)
    raw = os.fsencode(folder) + b"/bad\xff.png"
    with open(raw, "wb") as fh:
        fh.write((folder / "ok.png").read_bytes())
    out = tmp_path / "out.csv"
    result = _cli(str(folder), "--checkpoint", str(ckpt), "-o", str(out), "--workers", "1")
    assert result.exit_code == 0, result.stderr
    rows = _rows(out.read_text(encoding="utf-8"))
    assert [Path(r["path"]).name for r in rows] == ["bad\\xff.png", "ok.png"]
    assert all(r["label"] for r in rows)
    line = _cli(str(folder), "--checkpoint", str(ckpt), "-f", "jsonl").stdout.splitlines()[0]
    assert os.fsencode(json.loads(line)["path"]) == raw  # JSON keeps the bytes exactly


# ---------------------------------------------------------------------- sorting
def test_a_rerun_with_another_threshold_moves_the_sorted_copy(tmp_path, ckpt):
    inbox = tmp_path / "inbox"
    write_image(inbox / "a.png", seed=1)
    m = ["--checkpoint", str(ckpt), "--sort-into", str(tmp_path / "sorted"), "-f", "csv"]
    for threshold in ("0.000001", "0.999999"):
        result = _cli(str(inbox), *m, "--threshold", threshold)
        assert result.exit_code == 0, result.stderr
        label = _rows(result.stdout)[0]["label"]
        placed = sorted(p.relative_to(tmp_path / "sorted").as_posix()
                        for p in (tmp_path / "sorted").rglob("*.png"))
        assert placed == [f"{label}/a.png"]


def test_a_rerun_never_removes_an_input_that_lies_in_the_sort_folder(tmp_path, ckpt):
    sorted_dir = tmp_path / "sorted"
    image = write_image(sorted_dir / "normal" / "a.png", seed=1)
    m = ["--checkpoint", str(ckpt), "--sort-into", str(sorted_dir), "-f", "csv"]
    assert _cli(str(image), *m, "--threshold", "0.000001").exit_code == 0  # -> pneumonia
    assert image.is_file() and (sorted_dir / "pneumonia" / "a.png").is_file()


def test_link_on_a_relative_symlink_input_makes_a_link_that_resolves(tmp_path, ckpt):
    write_image(tmp_path / "store" / "x.png", seed=3)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").symlink_to("../store/x.png")
    out = tmp_path / "out"
    result = _cli(str(tmp_path / "in"), "--checkpoint", str(ckpt), "--sort-into", str(out),
                  "--link", "-f", "csv")
    assert result.exit_code == 0, result.stderr
    [placed] = list(out.rglob("x.png"))
    assert placed.read_bytes() == (tmp_path / "store" / "x.png").read_bytes()


def test_recursive_scans_leave_the_sort_folder_out(tmp_path, ckpt):
    inbox = tmp_path / "inbox"
    for i in range(4):
        write_image(inbox / f"{i}.png", seed=i)
    m = ["--checkpoint", str(ckpt), "-r", "--sort-into", str(inbox / "sorted"), "-f", "csv"]
    for _ in range(2):
        result = _cli(str(inbox), *m)
        assert result.exit_code == 0 and len(_rows(result.stdout)) == 4
    glob = _cli(str(inbox / "**" / "*.png"), *m)
    assert len(_rows(glob.stdout)) == 4
    assert len(list((inbox / "sorted").rglob("*.png"))) == 4


def test_a_copy_killed_mid_way_is_removed_by_the_next_sort(tmp_path, ckpt):
    image = str(write_image(tmp_path / "x.png"))
    sorted_dir = tmp_path / "sorted"
    m = ["--checkpoint", str(ckpt), "--sort-into", str(sorted_dir), "-f", "csv"]
    label = _rows(_cli(image, *m).stdout)[0]["label"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = fileio._prefix("x.png").split("-")[-1].rstrip(".")
    left = sorted_dir / label / f".x.png.{fileio.MARK}-{dead.pid}-{host}.abcd1234.tmp"
    left.write_bytes(b"half a copy")
    left.chmod(0o600)
    assert _cli(image, *m).exit_code == 0
    assert [p.name for p in (sorted_dir / label).iterdir()] == ["x.png"]


# ------------------------------------------------------------------------- walking
@pytest.fixture
def deep_tree(tmp_path):
    """tmp_path/deep/d/d/.../d/x.png, 1,000 folders deep. Made and removed one level at a
    time: pathlib's mkdir(parents=True) and shutil.rmtree (so pytest's own clean-up of old
    temporary folders) recurse once per level and would fail on it."""
    top = bottom = tmp_path / "deep"
    try:
        top.mkdir()
        for _ in range(1000):
            bottom = bottom / "d"
            bottom.mkdir()
        write_image(bottom / "x.png")
        yield top
    finally:
        (bottom / "x.png").unlink(missing_ok=True)
        while bottom != tmp_path:
            bottom.rmdir()
            bottom = bottom.parent


def test_a_folder_tree_a_thousand_levels_deep_is_walked(deep_tree, ckpt):
    [(path, error)] = list(expand([str(deep_tree)], recursive=True))
    assert error is None and path.split(os.sep).count("d") == 1000
    result = _cli(str(deep_tree), "-r", "--checkpoint", str(ckpt), "-f", "csv", "-q")
    assert result.exit_code == 0 and len(_rows(result.stdout)) == 1


def test_folder_scans_count_the_files_they_pass_over(tmp_path, ckpt):
    folder = tmp_path / "in"
    write_image(folder / "a.png", seed=1)
    write_image(folder / "scan001", seed=2, fmt="PNG")  # an image without an image name
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "Thumbs.db").write_bytes(b"\0")
    skipped: list[str] = []
    rows = list(classify([str(folder)], _model(ckpt), workers=1, on_skip=skipped.append))
    assert [Path(r.path).name for r in rows] == ["a.png"]
    assert [Path(p).name for p in skipped] == ["scan001"]  # system files pass without a word
    result = _cli(str(folder), "--checkpoint", str(ckpt), "-f", "json")
    assert json.loads(result.stdout)["summary"]["skipped"] == 1
    assert "skipped 1 file in the folders" in result.stderr and "scan001" in result.stderr
    assert _cli(str(folder / "scan001"), "--checkpoint", str(ckpt)).exit_code == 0


def _model(ckpt):
    from threengan_cli.infer import numpy_engine

    return numpy_engine.load(ckpt)


# ------------------------------------------------------------------ messages, order
def test_quiet_still_says_which_input_failed_and_why(tmp_path, ckpt):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    result = _cli(str(bad), "--checkpoint", str(ckpt), "-q", "-f", "csv")
    assert result.exit_code == 1
    assert f"{bad}: not an image" in result.stderr and len(result.stderr.splitlines()) == 1


def test_nothing_on_stdin_is_a_usage_error_before_any_model_is_loaded(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    from threengan_cli.cli import classify as classify_command

    monkeypatch.setattr(classify_command, "classifier_of", no_model)
    for given in ([], ["-"]):
        result = _cli(*given, input="\n  \n")
        assert result.exit_code == 2, result.output
        assert "PATH" in result.stderr or "stdin" in result.stderr


# --------------------------------------------------------------- the stored threshold
@pytest.mark.parametrize("value", [float("nan"), 2.0, "0.3", True])
def test_a_damaged_stored_threshold_is_an_error_not_a_silent_default(tmp_path, value):
    model = make_checkpoint(tmp_path / "m.safetensors")
    modelfile.update_meta(model, {"threshold": {"value": value, "rule": "youden"}})
    image = str(write_image(tmp_path / "x.png"))
    for engine in ("numpy", "torch"):
        result = _cli(image, "--checkpoint", str(model), "--engine", engine, "-f", "csv")
        assert result.exit_code == 1 and "stored threshold" in result.stderr
        assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
    given = _cli(image, "--checkpoint", str(model), "--threshold", "0.4", "-f", "csv", "-q")
    assert given.exit_code == 0  # --threshold overrides the damaged one
