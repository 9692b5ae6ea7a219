"""The benchmark grid end to end on a tiny prepared dataset: outputs, aggregation, skip and
resume, shards and merge, refusal of mixed settings, and the CLI's exit codes."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from threengan_cli.bench import benchmark, grid, report
from threengan_cli.bench.merge import merge
from threengan_cli.cli.app import app
from threengan_cli.core import config
from threengan_cli.model import checkpoints
from threengan_cli.model.methods import METHODS
from threengan_cli.train import events, training

runner = CliRunner()
TIMING = ("wall_s", "images_per_s")


def _smoke(**flags):
    return grid.resolve_settings("smoke", device="cpu", **flags)


@pytest.fixture(scope="module")
def smoke(dataset, tmp_path_factory):
    """The smoke profile (vanilla + 3ngan at N = 8, 16; one repeat), trained once."""
    out = tmp_path_factory.mktemp("bench") / "smoke"
    seen = []
    results = benchmark.run(dataset, _smoke(), out, on_event=seen.append)
    return out, results, seen


def _numbers(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _count_train_calls(monkeypatch):
    calls = []
    real = training.train

    def counting(dataset, settings, run_dir, **kw):
        calls.append((Path(run_dir).name, kw.get("resume", False)))
        return real(dataset, settings, run_dir, **kw)

    monkeypatch.setattr(training, "train", counting)
    return calls


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_smoke_profile_writes_results_csv_and_a_report_beside_the_paper(smoke):
    out, results, seen = smoke
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "3ngan-n16-r0",
        "3ngan-n8-r0",
        "vanilla-n16-r0",
        "vanilla-n8-r0",
    ]
    assert results["counts"] == {"grid": 4, "finished": 4, "failed": 0, "missing": 0}
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["profile"] == "smoke"
    assert {"torch", "numpy", "threengan"} <= set(saved["versions"])
    assert "cpu cores" in saved["machine"]
    run = saved["runs"][0]
    assert run["seed"] == 0 and run["test"]["n"] == 8
    assert [e["epoch"] for e in run["epochs"]] == [1]
    assert run["epochs"][0]["test_optimistic"]["n"] == 8  # every epoch's test metrics kept
    assert run["best_epoch_on_test"]["epoch"] == 1
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["method"], r["size"]) for r in rows] == [
        ("vanilla", "8"),
        ("vanilla", "16"),
        ("3ngan", "8"),
        ("3ngan", "16"),
    ]
    report = (out / "report.md").read_text()
    assert "Profile **smoke**" in report and "beside the paper's Table 1" in report
    assert "## Val (the split carved from train: what to choose on)" in report
    assert rows[0]["val_accuracy_mean"] != ""
    assert "optimistic" in report and "epochs 1 instead of 100" in report
    if importlib.util.find_spec("matplotlib") is None:
        assert "pip install 'threengan[plot]'" in report
    else:
        assert (out / "accuracy_vs_size.png").is_file()
    planned = [e for e in seen if isinstance(e, benchmark.GridPlanned)]
    assert planned[0].total == 4 and len(planned[0].todo) == 4
    ends = [e for e in seen if isinstance(e, benchmark.RunEnds)]
    assert [e.position for e in ends] == [1, 2, 3, 4] and ends[-1].eta_s == pytest.approx(0)


def test_repeat_r_uses_seed_base_plus_r_in_its_own_folder():
    specs = grid.grid(_smoke(repeats=2, seed=10, sizes=(8,), methods=("vanilla",)))
    assert [(s.name, s.settings.seed) for s in specs] == [
        ("vanilla-n8-r0", 10),
        ("vanilla-n8-r1", 11),
    ]


def test_ablate_adds_three_named_3ngan_variants():
    cfg = _smoke(ablate=True)
    assert cfg.methods == ("vanilla", "3ngan", "3ngan-nokl", "3ngan-nogc", "3ngan-pairkl")
    by_name = {s.method: s.settings for s in grid.grid(cfg) if s.size == 8}
    assert by_name["3ngan-nokl"].kl == "none"
    assert by_name["3ngan-nogc"].use_generator_classifier_loss is False
    assert by_name["3ngan-pairkl"].kl == "per-pair"
    assert {by_name[m].method for m in cfg.methods[1:]} == {"3ngan"}


# --------------------------------------------------------------------------- aggregation
def _fake_run(method, size, repeat, acc, auc=0.9, best=None, status="finished"):
    test = dict.fromkeys(report.METRICS, 0.5) | {"accuracy": acc, "auc": auc}
    return {
        "name": grid.run_name(method, size, repeat),
        "method": method,
        "size": size,
        "repeat": repeat,
        "status": status,
        "test": test,
        "best_epoch_on_test": {"epoch": 3, "accuracy": best if best is not None else acc},
        "elapsed_s": 10.0 * (repeat + 1),
        "images_per_s": 100.0,
    }


def test_aggregation_is_mean_and_sample_std_over_finished_repeats():
    runs = [
        _fake_run("3ngan", 200, 0, 0.80, auc=0.9, best=0.85),
        _fake_run("3ngan", 200, 1, 0.90, auc=None, best=0.95),
        _fake_run("3ngan", 200, 2, 1.00, auc=0.7, best=1.00),
        _fake_run("3ngan", 200, 3, 0.0, status="failed"),
        _fake_run("vanilla", 200, 0, 0.75),
    ]
    rows = report.aggregate(runs, ["vanilla", "3ngan"], [200])
    assert [(r["method"], r["runs"], r["failed"]) for r in rows] == [
        ("vanilla", 1, 0),
        ("3ngan", 3, 1),
    ]
    row = rows[1]
    assert row["accuracy"]["mean"] == pytest.approx(0.9)
    assert row["accuracy"]["std"] == pytest.approx(0.1)  # sample std: sqrt(0.02 / 2)
    assert row["auc"]["mean"] == pytest.approx(0.8)
    assert row["auc"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert row["auc"]["n"] == 2
    # 95% t-interval with 2 - 1 degrees of freedom: mean ± 12.706 * std / sqrt(2)
    assert row["auc"]["ci95"] == pytest.approx([0.8 - 1.2706, 0.8 + 1.2706], abs=1e-4)
    assert row["optimistic_best_epoch_accuracy"]["mean"] == pytest.approx(0.9333, abs=1e-4)
    assert row["wall_s"]["mean"] == pytest.approx(20.0)
    assert row["paper_accuracy"] == pytest.approx(0.9152)
    assert row["accuracy_diff_points"] == pytest.approx(90.0 - 91.52)
    assert rows[0]["accuracy"]["std"] is None  # one repeat: no spread to report
    assert report.mean_std([])["mean"] is None and report.mean_std([])["n"] == 0


def test_paired_differences_carry_the_same_difference_on_val():
    def run(method, repeat, test_acc, val_acc):
        return {**_fake_run(method, 200, repeat, test_acc), "val": {"accuracy": val_acc}}

    runs = [
        run("3ngan", 0, 0.80, 0.90),
        run("3ngan", 1, 0.84, 0.92),
        run("vanilla", 0, 0.78, 0.91),
        run("vanilla", 1, 0.80, 0.95),
    ]
    (c,) = report.comparisons(runs, [("3ngan", "vanilla")], [200])
    assert c["mean"] == pytest.approx(0.03) and c["pairs"] == 2
    assert c["val"]["mean"] == pytest.approx(-0.02) and c["val"]["pairs"] == 2
    (row,) = report.aggregate(runs, ["3ngan"], [200])
    assert row["val_accuracy"]["mean"] == pytest.approx(0.91)
    without_val = [{k: v for k, v in r.items() if k != "val"} for r in runs]
    assert report.comparisons(without_val, [("3ngan", "vanilla")], [200])[0]["val"] is None


def test_the_ssl_profile_compares_each_rung_with_the_cell_it_adds_to():
    cfg = grid.resolve_settings("ssl", repeats=2)
    assert cfg.recipes == ("robust",)
    pairs = set(grid.comparison_pairs(cfg))
    assert ("3ngan-unl+robust", "3ngan+robust") in pairs
    assert ("3ngan-unl+robust", "vanilla-unl+robust") in pairs  # the game, with the pool
    assert ("vanilla-unl+robust", "vanilla+robust") in pairs
    for rung in grid.POOL_RUNGS:
        assert (f"{rung}+robust", "3ngan-unl+robust") in pairs
    for rung in grid.GENERATED_RUNGS:
        assert (f"{rung}+robust", "3ngan+robust") in pairs
    by_method = {s.method: s.settings for s in grid.grid(cfg) if s.repeat == 0}
    assert by_method["3ngan-unl-mu7"].unlabelled_ratio == 7
    assert by_method["3ngan-unl-mt"].unlabelled_teacher and by_method["3ngan-unl-mt"].ema > 0
    assert by_method["3ngan-gmt"].generated_teacher and by_method["3ngan-gmt"].unlabelled is None
    assert {s.recipe for s in by_method.values()} == {"robust"}


# ---------------------------------------------------------------------- skip and resume
@pytest.mark.slow
def test_rerunning_skips_finished_runs_and_gives_the_same_report(
    smoke, dataset, tmp_path, monkeypatch
):
    out = tmp_path / "again"
    shutil.copytree(smoke[0], out)
    calls = _count_train_calls(monkeypatch)
    results = benchmark.run(dataset, _smoke(), out)
    assert calls == []
    assert _numbers(results["results"]) == _numbers(smoke[1]["results"])


@pytest.mark.slow
def test_an_unfinished_run_resumes_and_one_without_checkpoint_starts_afresh(
    dataset, tmp_path, monkeypatch
):
    cfg = _smoke(methods=("vanilla",), sizes=(8, 16), epochs=2)
    out = tmp_path / "bench"
    monkeypatch.setattr(events, "CHECKPOINT_EVERY_S", 0.0)  # a checkpoint every epoch

    def stop_after_first_epoch(event):
        inner = getattr(event, "event", None)
        if isinstance(event, benchmark.RunProgress) and isinstance(inner, events.EpochDone):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        benchmark.run(dataset, cfg, out, on_event=stop_after_first_epoch)
    first = out / "runs" / "vanilla-n8-r0"
    assert (first / "last.safetensors").is_file() and not (first / "summary.json").exists()
    # A folder that got its settings but no checkpoint (stopped during start-up).
    second = out / "runs" / "vanilla-n16-r0"
    second.mkdir(parents=True)
    spec = grid.grid(cfg)[1]
    (second / "settings.json").write_text(config.dump(spec.settings))

    calls = _count_train_calls(monkeypatch)
    results = benchmark.run(dataset, cfg, out)
    assert calls == [("vanilla-n8-r0", True), ("vanilla-n16-r0", False)]
    assert results["counts"]["finished"] == 2
    epochs = [json.loads(x)["epoch"] for x in (first / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_a_run_folder_written_with_other_settings_is_refused(smoke, dataset, tmp_path, monkeypatch):
    out = tmp_path / "mixed"
    shutil.copytree(smoke[0], out)
    calls = _count_train_calls(monkeypatch)
    with pytest.raises(benchmark.BenchmarkError, match=r"other settings \(epochs = 1 there, 2"):
        benchmark.run(dataset, _smoke(epochs=2), out)
    assert calls == []


def test_a_diverged_run_is_recorded_as_failed_and_the_grid_goes_on(dataset, tmp_path, monkeypatch):
    real = training.train

    def diverge_3ngan(dataset, settings, run_dir, **kw):
        if settings.method == "3ngan":
            raise events.NonFiniteLoss("loss_c became nan at epoch 1 step 1")
        return real(dataset, settings, run_dir, **kw)

    monkeypatch.setattr(training, "train", diverge_3ngan)
    cfg = _smoke(sizes=(8,))
    results = benchmark.run(dataset, cfg, tmp_path / "b")
    assert results["counts"] == {"grid": 2, "finished": 1, "failed": 1, "missing": 0}
    assert [r["failed"] for r in results["results"]] == [0, 1]
    # Deterministic divergence would recur: a re-run skips it.
    calls = _count_train_calls(monkeypatch)
    benchmark.run(dataset, cfg, tmp_path / "b")
    assert calls == []


# ------------------------------------------------------------------------ shards, merge
@pytest.mark.slow
def test_two_shards_merged_equal_the_unsharded_report(smoke, dataset, tmp_path):
    specs = grid.grid(_smoke())
    one = grid.shard_of(specs, (1, 2))
    two = grid.shard_of(specs, (2, 2))
    assert [s.index for s in one] == [0, 2] and [s.index for s in two] == [1, 3]

    a = benchmark.run(dataset, _smoke(), tmp_path / "s1", shard=(1, 2))
    b = benchmark.run(dataset, _smoke(), tmp_path / "s2", shard=(2, 2))
    assert b["shard"] == "2/2"
    assert a["shard"] == "1/2" and a["counts"]["grid"] == 2
    merged = merge([tmp_path / "s1", tmp_path / "s2"], tmp_path / "all")
    assert merged["counts"] == smoke[1]["counts"]
    assert _numbers(merged["results"]) == _numbers(smoke[1]["results"])
    assert (tmp_path / "all" / "report.md").is_file()

    partial = merge([tmp_path / "s1"], tmp_path / "half")
    assert partial["missing"] == [s.name for s in two]


def test_merging_different_grids_is_refused(smoke, dataset, tmp_path):
    benchmark.run(dataset, _smoke(methods=("vanilla",), sizes=(8,), seed=5), tmp_path / "other")
    with pytest.raises(benchmark.BenchmarkError, match="different benchmark"):
        merge([smoke[0], tmp_path / "other"], tmp_path / "m")


def test_a_bad_grid_setting_is_one_line_like_any_other_section():
    for flags, line in [
        ({"repeats": 0}, "benchmark.repeats: must satisfy 1 <= repeats <= 1000 (got 0)"),
        ({"repeat": 2}, "benchmark.repeat: unknown setting"),
        ({"recipes": ("x",)}, "benchmark.recipes.0: must be one of 'paper' or 'robust' (got 'x')"),
        ({"methods": ("sgan", 3)}, "benchmark.methods.1: input should be a valid string (got 3)"),
        ({"sizes": (8, 8)}, "benchmark.sizes: lists a size twice (got (8, 8))"),
    ]:
        with pytest.raises(config.SettingsError) as refused:
            grid.resolve_settings("smoke", **flags)
        assert str(refused.value) == line


# -------------------------------------------------------------------------------- CLI
def _cli(*args):
    return runner.invoke(app, ["benchmark", *map(str, args)])


def test_cli_runs_a_grid_and_prints_json_on_stdout(dataset, tmp_path):
    result = _cli(
        dataset, "--profile", "smoke", "--methods", "vanilla", "--sizes", "8",
        "--device", "cpu", "--out", tmp_path / "b", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["counts"]["finished"] == 1 and data["results"][0]["method"] == "vanilla"
    table = _cli(
        dataset, "--profile", "smoke", "--methods", "vanilla", "--sizes", "8",
        "--device", "cpu", "--out", tmp_path / "b",
    )  # fmt: skip
    assert table.exit_code == 0 and "best ep. on test" in table.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["{ds}", "--methods", "vanilla,nope"],
        ["{ds}", "--sizes", "8,x"],
        ["{ds}", "--shard", "3/2"],
        ["{ds}", "--profile", "huge"],
        ["{ds}", "--device", "tpu"],
        ["no-such-dataset"],
        ["{ds}", "{ds}"],
        ["merge", "somewhere"],
        ["merge", "a", "--out", "b", "--profile", "quick"],
    ],
)
def test_cli_usage_errors_exit_2(dataset, args):
    result = _cli(*(a.format(ds=dataset) for a in args))
    assert result.exit_code == 2, result.output


def test_cli_merge_and_a_settings_mismatch(smoke, dataset, tmp_path):
    result = _cli("merge", smoke[0], "--out", tmp_path / "m", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["finished"] == 4
    mixed = _cli(
        dataset, "--profile", "smoke", "--epochs", "3", "--device", "cpu", "--out", smoke[0]
    )
    assert mixed.exit_code == 1 and "other settings" in mixed.output


def test_cli_ctrl_c_exits_130_with_a_resume_hint(dataset, tmp_path, monkeypatch):
    def interrupted(dataset, settings, run_dir, **kw):
        raise events.Interrupted(Path(run_dir) / "last.safetensors", 0, 1)

    monkeypatch.setattr(training, "train", interrupted)
    result = _cli(dataset, "--profile", "smoke", "--device", "cpu", "--out", tmp_path / "b")
    assert result.exit_code == 130
    assert "run the same command again to resume" in result.output


def test_cli_exits_3_when_some_runs_failed(dataset, tmp_path, monkeypatch):
    def diverge(dataset, settings, run_dir, **kw):
        raise events.NonFiniteLoss("loss_d became nan at epoch 1 step 1")

    monkeypatch.setattr(training, "train", diverge)
    result = _cli(
        dataset, "--profile", "smoke", "--sizes", "8", "--device", "cpu", "--out", tmp_path / "b"
    )
    assert result.exit_code == 3, result.output
    assert "failed" in result.output


# ---------------------------------------------------------------------- parallel repeats
@pytest.mark.slow
def test_repeats_trained_in_parallel_threads_equal_runs_trained_one_at_a_time(dataset, tmp_path):
    cfg = _smoke(methods=("3ngan", "vanilla"), sizes=(16,), repeats=3)
    alone = benchmark.run(dataset, cfg, tmp_path / "alone", parallel=1)
    together = benchmark.run(dataset, cfg, tmp_path / "together", parallel=3)
    assert together["counts"]["finished"] == 6
    assert _numbers(together["results"]) == _numbers(alone["results"])
    for name in ("3ngan-n16-r0", "3ngan-n16-r2", "vanilla-n16-r1"):
        a = checkpoints.load(tmp_path / "alone" / "runs" / name / "last.safetensors")
        b = checkpoints.load(tmp_path / "together" / "runs" / name / "last.safetensors")
        assert all(torch.equal(a.group("net")[k], b.group("net")[k]) for k in a.group("net"))


@pytest.mark.slow
def test_repeats_in_parallel_are_taken_cell_by_cell(dataset, tmp_path):
    cfg = _smoke(methods=("vanilla", "3ngan"), sizes=(8, 16), repeats=2)
    seen = []
    benchmark.run(dataset, cfg, tmp_path / "b", parallel=2, on_event=seen.append)
    planned = next(e for e in seen if isinstance(e, benchmark.GridPlanned))
    assert planned.todo[:4] == ("vanilla-n8-r0", "vanilla-n8-r1", "3ngan-n8-r0", "3ngan-n8-r1")
    ends = [e.position for e in seen if isinstance(e, benchmark.RunEnds)]
    assert sorted(ends) == list(range(1, 9))


@pytest.mark.slow
def test_a_stop_request_reaches_every_parallel_run_and_they_resume(dataset, tmp_path):
    cfg = _smoke(methods=("3ngan",), sizes=(16,), repeats=2, epochs=3)
    out = tmp_path / "b"

    sent = []

    def stop_on_second_epoch(event):  # one Ctrl+C, as a user would press it
        if (
            not sent
            and isinstance(event, benchmark.RunProgress)
            and isinstance(event.event, events.StepDone)
            and event.event.epoch == 1
        ):
            import os
            import signal

            sent.append(event.spec.name)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises((events.Interrupted, KeyboardInterrupt)):
        benchmark.run(dataset, cfg, out, parallel=2, on_event=stop_on_second_epoch)
    stopped = out / "runs" / sent[0]
    assert (stopped / "last.safetensors").is_file() and not (stopped / "summary.json").exists()
    resumed = benchmark.run(dataset, cfg, out, parallel=2)
    alone = benchmark.run(dataset, cfg, tmp_path / "alone", parallel=1)
    assert _numbers(resumed["results"]) == _numbers(alone["results"])


def test_the_eta_counts_each_epoch_s_evaluation_as_well_as_its_steps():
    quick = {s.name: s for s in grid.grid(grid.resolve_settings("quick"))}
    small, large = quick["vanilla-n200-r0"], quick["3ngan-n1000-r0"]
    assert small.work(0) == 8 * 20 * METHODS["vanilla"].step_ms
    evaluated = 523 + 624
    assert small.work(evaluated) == pytest.approx(
        8 * (20 * METHODS["vanilla"].step_ms + evaluated * grid.EVAL_MS_PER_IMAGE)
    )
    # measured on the 2-core CPU: 13 s and 148 s; counting evaluation brings the estimated
    # ratio from 32x to 14x
    assert 10 < large.work(evaluated) / small.work(evaluated) < 20


def test_cli_merge_with_runs_missing_names_them_writes_the_rest_and_exits_3(smoke, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(smoke[0], partial)
    gone = sorted((partial / "runs").iterdir())[0].name
    shutil.rmtree(partial / "runs" / gone)
    result = _cli("merge", partial, "--out", tmp_path / "m")
    assert result.exit_code == 3
    assert "1 run(s) of the grid are in none of the merged folders" in result.stderr
    assert gone in result.stderr
    assert json.loads((tmp_path / "m" / "results.json").read_text())["missing"] == [gone]


def test_a_benchmark_s_shard_and_folder_come_from_its_options(threengan_home, tmp_path):
    from threengan_cli.core.errors import UsageError

    assert benchmark.shard_given(None) == (1, 1)
    assert benchmark.shard_given(" 3/10 ") == (3, 10)
    for bad in ("3", "0/2", "3/2", "a/b"):
        with pytest.raises(UsageError, match=f"--shard must be I/N .*got '{bad}'"):
            benchmark.shard_given(bad)
    prepared = tmp_path / "kermany"
    assert benchmark.folder_for(prepared, "quick", None) == (
        threengan_home / "benchmarks" / "kermany-quick"
    )
    assert benchmark.folder_for(prepared, "quick", tmp_path / "b") == tmp_path / "b"


def test_grid_flags_take_comma_separated_lists():
    from threengan_cli.core.errors import UsageError

    assert grid.comma_list(None, "--sizes", int) is None
    assert grid.comma_list(" 200, 500,,", "--sizes", int) == (200, 500)
    assert grid.comma_list("3ngan,vanilla", "--methods") == ("3ngan", "vanilla")
    with pytest.raises(UsageError, match=r"--sizes takes a comma-separated list \(got '2x0'\)"):
        grid.comma_list("2x0", "--sizes", int)
