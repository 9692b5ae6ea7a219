"""The train and benchmark commands: the two that write run folders and run for hours.

Registered on the app by ``cli``; exit codes in ``cli_common``.
"""

# No ``from __future__ import annotations``: typer reads the annotations (see cli.py).

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer

from threengan_cli import views
from threengan_cli.cli_common import (
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    MAX_LISTED,
    JsonOpt,
    QuietOpt,
    config_opt,
    device_opt,
    fail,
    flag,
    interrupt_code,
    lock_or_exit,
    prepared_or_exit,
    settings_or_exit,
)
from threengan_cli.helptext import method_names, shown
from threengan_cli.views import note, print_json, warn

# train writes its resumable checkpoint at most this often, as the benchmark does: a width-64
# robust run with an unlabelled pool writes 160 MB each time, and writing it after every
# epoch cost the time in docs/performance.md ("Checkpoints on a time basis"). A kill -9 then
# loses at most this much training; Ctrl+C and SIGTERM still save where they stop.
DEFAULT_CHECKPOINT_EVERY_S = 60.0


# -------------------------------------------------------------------------------------- train
def _run_dir_for(dataset: str, cfg, name: str | None, out_dir: Path | None) -> Path:
    from threengan_cli import paths

    if out_dir is not None:
        return out_dir
    if name is not None:
        try:
            return paths.runs_dir() / paths.check_name(name)
        except ValueError as exc:
            fail(str(exc), EXIT_USAGE)
    base = f"{Path(dataset).name}-{cfg.method}-n{cfg.size or 'all'}-s{cfg.seed}"
    candidate, i = paths.runs_dir() / base, 2
    while candidate.exists():
        candidate, i = paths.runs_dir() / f"{base}-{i}", i + 1
    return candidate


def _resume_plan(resume: str, flags: dict[str, Any], given_other: bool, held):
    """(settings, dataset folder, run folder) of the run to continue, its folder locked into
    ``held`` before it is read; only --epochs may change."""
    from threengan_cli import paths, runs
    from threengan_cli.settings import with_stored_recipe

    run_dir = paths.resolve_run(resume)
    changed = sorted(k for k, v in flags.items() if v is not None and k != "epochs")
    if changed or given_other:
        fail(
            "--resume continues a run with its own data and settings; only --epochs may "
            f"be given (got {', '.join(changed) or 'a dataset or --config'})",
            EXIT_USAGE,
        )
    state = runs.state(run_dir)
    if state == "unstarted":
        fail(
            f"the run at {run_dir} was stopped before it had started (no {runs.RUN}); "
            f"start it again in place: threengan train DATASET --out {run_dir}",
            EXIT_USAGE,
        )
    if state not in ("started", "resumable", "finished", "failed"):
        fail(f"no run to resume at {run_dir}", EXIT_USAGE)
    lock_or_exit(held, run_dir)
    try:
        saved = runs.read_json(run_dir / runs.SETTINGS)
        run_meta = runs.read_json(run_dir / runs.RUN)
    except runs.RunError as exc:
        fail(str(exc))
    if not isinstance(saved, dict) or not isinstance(run_meta, dict):
        fail(f"{run_dir}: {runs.SETTINGS} and {runs.RUN} must hold JSON objects")
    if not isinstance(run_meta.get("dataset"), str):
        fail(f"{run_dir / runs.RUN} does not name the run's dataset")
    saved = with_stored_recipe(saved)
    if flags["epochs"] is not None:
        saved["epochs"] = flags["epochs"]
    return settings_or_exit("train", None, **saved), Path(run_meta["dataset"]), run_dir


def _finished_summary(run_dir: Path, quiet: bool) -> dict | None:
    """The summary of a finished run; ``None`` while it is not finished, or when its summary
    is damaged or missing and the last checkpoint lets training recompute it (said on
    stderr). Damage that cannot be recovered is a one-line error."""
    from threengan_cli import modelfile, runs

    meta = None
    if (run_dir / runs.LAST).is_file():
        try:
            meta = modelfile.read_meta(run_dir / runs.LAST)
        except modelfile.CheckpointError as exc:
            fail(str(exc))
        if not meta.get("finished"):
            return None
    try:
        summary = runs.read_summary(run_dir)
    except runs.RunError as exc:
        if meta is None:
            fail(
                f"{exc}; the run's resumable checkpoint was pruned, so it cannot be "
                "recomputed: train it again with --force"
            )
        if not quiet:
            warn(f"{exc}; the final evaluation runs again to rewrite it")
        return None
    return summary


def _finished_run_or_continue(run_dir: Path, epochs: int | None, as_json: bool, quiet: bool):
    """A finished run asked for no more epochs than it has: its summary, exit 0 (so a CI job
    can run the same line twice); a pruned one asked for more: a clear error. Otherwise
    return, and training continues."""
    from threengan_cli import runs

    summary = _finished_summary(run_dir, quiet)
    if summary is None:
        return
    done = summary["epochs"]
    if epochs is None or epochs <= done:
        if not quiet:
            note(
                f"{run_dir} already finished its {done} epochs; pass --epochs larger than "
                f"{done} to extend it (with --resume)"
            )
        if as_json:
            print_json(summary)
        elif not quiet:
            note(_train_done_line(summary, run_dir))
        raise typer.Exit(EXIT_OK)
    if not (run_dir / runs.LAST).is_file():
        fail(
            f"{run_dir} cannot be extended: its resumable checkpoint was pruned "
            "(threengan runs --prune-last); train a new run instead",
            EXIT_USAGE,
        )


def _warn_bf16_unmeasured(precision: str, device: str, quiet: bool) -> None:
    """bf16 on a CPU where it runs natively: a warning that it was not measured faster here
    (``threengan info --measure`` times it). Where it is emulated, training refuses it."""
    if precision != "bf16" or quiet or device not in ("auto", "cpu"):
        return
    from threengan_cli import system

    if system.cpu_bf16() and system.select_device(device).type == "cpu":
        warn(
            "--precision bf16 on a CPU: not known to be faster than fp32 here (it was faster "
            "on one CPU with native bf16, slower on others); `threengan info --measure` times "
            "both on this one"
        )


def _new_run_plan(dataset: str | None, flags: dict[str, Any], config, where, force: bool, held):
    """(settings, dataset folder, run folder, resume) of a new run, its folder locked into
    ``held``. A folder that holds the same run (same dataset and settings) is that run
    again: finished, the caller says so and exits 0; unfinished, it resumes. Another run
    there is refused, naming --resume and --force; --force replaces it."""
    from threengan_cli import runs

    if dataset is None:
        fail("give a prepared DATASET to train on (see `threengan datasets`)", EXIT_USAGE)
    cfg = settings_or_exit("train", config, **flags)
    dataset_dir = prepared_or_exit(dataset)
    run_dir = _run_dir_for(dataset, cfg, *where)
    if run_dir.exists() and not run_dir.is_dir():
        fail(f"{run_dir} is a file, not a run folder", EXIT_USAGE)
    # Locked before it is looked at, so that two commands cannot both find it free.
    lock_or_exit(held, run_dir)
    state = runs.state(run_dir)
    if state in ("absent", "empty", "unstarted"):
        return cfg, dataset_dir, run_dir, False
    if state == "other":
        fail(
            f"{run_dir} holds files that are not a run's; choose another --name or --out "
            "(--force replaces only a run's own files)",
            EXIT_USAGE,
        )
    if force:
        runs.clear(run_dir)
        return cfg, dataset_dir, run_dir, False
    _same_run_or_exit(run_dir, cfg, dataset_dir)
    return cfg, dataset_dir, run_dir, True


def _same_run_or_exit(run_dir: Path, cfg, dataset_dir: Path) -> None:
    """Return when ``run_dir`` holds a run of ``cfg`` on ``dataset_dir``; else a usage
    error that says what differs and what to do."""
    from threengan_cli import runs
    from threengan_cli.settings import with_stored_recipe

    try:
        saved = runs.read_json(run_dir / runs.SETTINGS)
        run_meta = runs.read_json(run_dir / runs.RUN)
    except runs.RunError as exc:
        fail(f"{run_dir} already holds a run, and {exc}; --force replaces it", EXIT_USAGE)
    if not isinstance(saved, dict) or not isinstance(run_meta, dict):
        fail(f"{run_dir} already holds a damaged run; --force replaces it", EXIT_USAGE)
    there = run_meta.get("dataset")
    if not isinstance(there, str) or Path(there).resolve() != dataset_dir.resolve():
        fail(
            f"{run_dir} already holds a run on another dataset ({there}); use another "
            "--name, or --force to replace it",
            EXIT_USAGE,
        )
    saved = with_stored_recipe(saved)
    asked = cfg.model_dump(mode="json")
    differ = runs.settings_differ(saved, asked)
    if differ == ["epochs"] and asked["epochs"] > saved.get("epochs", 0):
        fail(
            f"{run_dir} already holds this run with {saved.get('epochs')} epochs; extend it "
            f"with: threengan train --resume {run_dir} --epochs {asked['epochs']} (or --force "
            "to train it again from scratch)",
            EXIT_USAGE,
        )
    if differ:
        k = differ[0]
        more = f", and {len(differ) - 1} more" if len(differ) > 1 else ""
        fail(
            f"{run_dir} already holds a run with other settings ({k} = {saved.get(k)!r} "
            f"there, {asked.get(k)!r} asked{more}): continue it as it is with --resume "
            f"{run_dir}, use another --name, or --force to replace it",
            EXIT_USAGE,
        )


def _metric(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else f"{value:.4f}"


def _train_done_line(summary: dict, run_dir: Path) -> str:
    """The test metrics of the model ``--run`` uses (best.safetensors: the best epoch on val),
    and the final epoch's accuracy beside them where that is another epoch."""
    from threengan_cli import runs

    test = summary.get("test") or {}
    where = f"summary in {run_dir / runs.SUMMARY}"
    if not test.get("n"):
        return f"done in {summary['elapsed_s']:.0f}s: no test split ({where})"
    best_epoch, epochs = summary.get("best_epoch_on_val"), summary["epochs"]
    used = summary.get("test_of_best_on_val") or test
    if not (summary.get("val") or {}).get("n"):
        whose, final = (
            f"final epoch {epochs}; no val split: no epoch chosen on val, probabilities "
            "uncalibrated (temperature 1), ood threshold from images held out of its fit",
            "",
        )
    elif best_epoch is None or best_epoch == epochs:
        whose, final = f"final epoch {epochs}, also the best on val", ""
    else:
        whose = f"epoch {best_epoch}, the best on val"
        final = f"; the final epoch {epochs}: test accuracy {_metric(test, 'accuracy')}"
    return (
        f"done in {summary['elapsed_s']:.0f}s: test accuracy {_metric(used, 'accuracy')}, "
        f"AUC {_metric(used, 'auc')}, sensitivity {_metric(used, 'sensitivity')}, "
        f"specificity {_metric(used, 'specificity')} of the model --run uses "
        f"(best.safetensors: {whose}){final} ({where})"
    )


# Long only by its declared options and help text (what typer reads); the body is a few calls.
def train(
    dataset: Annotated[
        str | None,
        typer.Argument(
            metavar="DATASET",
            help="Prepared dataset: a name from `threengan datasets` or a folder.",
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(help=f"{', '.join(method_names())}. {shown('train', 'method')}"),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(help="Labelled training images N (N/2 per class, by seed). \\[default: all]"),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help=f"Passes over the N images. {shown('train', 'epochs')}")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=f"Mini-batch size. {shown('train', 'batch_size')}")
    ] = None,
    tau: Annotated[
        float | None, typer.Option(help=f"Pseudo-label confidence. {shown('train', 'tau')}")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help=f"Weight of the KL term. {shown('train', 'alpha')}")
    ] = None,
    lam: Annotated[
        float | None,
        typer.Option(help=f"Weight of the pseudo-label loss. {shown('train', 'lam')}"),
    ] = None,
    kl: Annotated[
        str | None,
        typer.Option(help=f"KL term: batch-mean, per-pair or none. {shown('train', 'kl')}"),
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help=f"Adam learning rate. {shown('train', 'lr')}")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help=f"Network width ngf = ndf. {shown('train', 'width')}")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help=f"Seed of subset, init and batches. {shown('train', 'seed')}"),
    ] = None,
    device: device_opt("train") = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="fp32 or bf16. On a CPU bf16 was measured slower than fp32 even where it is "
            "native (a warning) and is refused where emulated; `threengan info` says which. "
            f"{shown('train', 'precision')}"
        ),
    ] = None,
    cuda_graphs: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            help="On CUDA, replay each step from a captured CUDA graph. "
            f"{shown('train', 'cuda_graphs')}",
        ),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            help="paper: the paper's protocol exactly; robust: precise BN, EMA and "
            f"augmentation (docs/method.md). {shown('train', 'recipe')}"
        ),
    ] = None,
    precise_bn: Annotated[
        bool | None,
        typer.Option(
            "--precise-bn/--no-precise-bn",
            help="Recompute BatchNorm statistics for the weights used. \\[default: by recipe]",
        ),
    ] = None,
    ema: Annotated[
        float | None,
        typer.Option(help="Decay of the weights' moving average, 0 = off. \\[default: by recipe]"),
    ] = None,
    augment: Annotated[
        str | None,
        typer.Option(
            help="translation,cutout,color,flip or none, alike for real and generated images. "
            "\\[default: by recipe]"
        ),
    ] = None,
    unlabelled: Annotated[
        str | None,
        typer.Option(
            help="Unlabelled X-rays: rest (train images outside the N), a prepared dataset or "
            "a folder; 'none' for none. \\[default: by recipe]"
        ),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="Start from a trained model's networks to fine-tune them: default (the "
            "bundled model), a run (name or folder) or a checkpoint file. Its classes, image "
            "size and width must be the run's. \\[default: fresh networks]",
            show_default=False,
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run name under the data dir.")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Run folder (instead of a name).", file_okay=False)
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="Continue the run of this name or folder exactly where it stopped."),
    ] = None,
    force: Annotated[
        bool,
        flag(
            "--force",
            help="Replace the run already in --name/--out (its run files are deleted) "
            "instead of refusing a run with other settings.",
        ),
    ] = False,
    checkpoint_every: Annotated[
        float,
        typer.Option(
            help="Seconds: write last.safetensors (and best, and a sample grid) at most this "
            "often, and always after the last epoch and on Ctrl+C or SIGTERM; 0 = after every "
            "epoch.",
        ),
    ] = DEFAULT_CHECKPOINT_EVERY_S,
    config: config_opt("train") = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a model on a prepared dataset; each epoch is evaluated on its val split.

    The run folder gets settings.json, metrics.jsonl (one line per epoch), samples/ (images
    from a fixed latent batch), last.safetensors (resumable), best.safetensors (best val
    accuracy) and summary.json (test metrics, computed once at the end). Ctrl+C saves a
    resumable checkpoint and exits 130 (SIGTERM: 143).

    The same command run again (same --name or --out, dataset and settings) does not train
    twice: a finished run prints its summary and exits 0, an unfinished one resumes. A run
    with other settings in that folder is refused (see --resume, --force).

    [bold]Examples[/]

      threengan train kermany --method 3ngan --size 200 --epochs 3

      threengan train kermany --method vanilla --size 1000 --seed 1 --name van-1000-s1

      threengan train --resume van-1000-s1 --epochs 150

      threengan train mine --init default --unlabelled unlabelled/ --epochs 30
    """
    flags = {
        "method": method,
        "size": size,
        "epochs": epochs,
        "batch_size": batch_size,
        "tau": tau,
        "alpha": alpha,
        "lam": lam,
        "kl": kl,
        "lr": lr,
        "width": width,
        "seed": seed,
        "device": device,
        "precision": precision,
        "cuda_graphs": cuda_graphs,
        "recipe": recipe,
        "precise_bn": precise_bn,
        "ema": ema,
        "augment": augment,
        "unlabelled": unlabelled,
        "init": init,
    }
    if checkpoint_every < 0:
        fail(f"--checkpoint-every takes seconds, 0 or more (got {checkpoint_every})", EXIT_USAGE)
    held = contextlib.ExitStack()  # the run folder's writer lock, taken by the plan
    with held:
        if resume is not None:
            if force:
                fail("--force starts a run over; --resume continues one: give one", EXIT_USAGE)
            given_other = config is not None or dataset is not None
            cfg, dataset_dir, run_dir = _resume_plan(resume, flags, given_other, held)
            again = True
            _finished_run_or_continue(run_dir, flags["epochs"], as_json, quiet)
        else:
            where = (name, out_dir)
            cfg, dataset_dir, run_dir, again = _new_run_plan(
                dataset, flags, config, where, force, held
            )
            if again:  # the same run: finished, say so and exit 0; else it resumes
                _finished_run_or_continue(run_dir, None, as_json, quiet)
                if not quiet:
                    note(f"{run_dir} holds this run (same dataset and settings), unfinished")
        summary = _train_locked(dataset_dir, cfg, run_dir, again, checkpoint_every, quiet)
    if summary.get("extended") and not quiet:
        note(f"extended the finished run to {cfg.epochs} epochs")
    if as_json:
        print_json(summary)
    elif not quiet:
        note(_train_done_line(summary, run_dir))


def _train_locked(dataset_dir: Path, cfg, run_dir: Path, resume: bool, every_s, quiet: bool):
    """Run the engine on a locked run folder; its errors as one line and an exit code."""
    from threengan_cli import runs, train_events, training
    from threengan_cli.modelfile import CheckpointError
    from threengan_cli.sources import DatasetError

    _warn_bf16_unmeasured(cfg.precision, cfg.device, quiet)
    try:
        with views.TrainView(quiet) as view:
            return training.train(
                dataset_dir,
                cfg,
                run_dir,
                resume=resume,
                on_event=view,
                checkpoint_every_s=every_s or None,
            )
    except train_events.Interrupted as exc:
        note(f"interrupted: {exc}. Continue with: threengan train --resume {run_dir}")
        raise typer.Exit(interrupt_code(exc.signum)) from None
    except train_events.InitNotFound as exc:
        fail(str(exc), EXIT_USAGE)
    except (
        train_events.TrainingError,
        CheckpointError,
        DatasetError,
        runs.RunError,
        ValueError,
    ) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(views.os_failure(exc, f"writing the run {run_dir}", resume=run_dir))


# ---------------------------------------------------------------------------------- benchmark
def _comma_list(text: str | None, flag: str, cast=str) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(cast(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        fail(f"{flag} takes a comma-separated list (got {text!r})", EXIT_USAGE)


def _bench_settings(config: Path | None, profile: str | None, flags: dict[str, Any]):
    """The grid: the profile's values, then the file's [benchmark] table, then the flags."""
    from threengan_cli import grid
    from threengan_cli.helptext import default_of
    from threengan_cli.settings import SettingsError, read_config

    try:
        values = dict(read_config(config).get("benchmark", {}))
        values.update({k: v for k, v in flags.items() if v is not None})
        in_file = values.pop("profile", None)
        chosen = profile or in_file or default_of("benchmark", "profile")
        for key in ("methods", "sizes"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return grid.resolve_settings(chosen, **values)
    except (SettingsError, ValueError) as exc:
        fail(str(exc), EXIT_USAGE)


def _bench_merge(args: list[str], out_dir: Path | None, given: dict[str, Any]):
    from threengan_cli import benchmark as bench

    extra = [k for k, v in given.items() if v is not None]
    if extra:
        fail(f"merge takes only DIR... --out DIR (got {', '.join(extra)})", EXIT_USAGE)
    if len(args) < 2 or out_dir is None:
        fail("merge needs the benchmark folders to join and --out DIR", EXIT_USAGE)
    with contextlib.ExitStack() as held:
        lock_or_exit(held, out_dir, "benchmark folder")
        try:
            return bench.merge([Path(a) for a in args[1:]], out_dir), out_dir
        except bench.BenchmarkError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(views.os_failure(exc, f"writing {out_dir}"))


def _bench_run(dataset: str, cfg, shard: str | None, out_dir, parallel, quiet: bool):
    from threengan_cli import benchmark as bench
    from threengan_cli import classify, paths, runs, train_events
    from threengan_cli.modelfile import CheckpointError
    from threengan_cli.sources import DatasetError

    try:
        shard_ij = classify.parse_shard(shard) if shard is not None else (1, 1)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    dataset_dir = prepared_or_exit(dataset)
    target = out_dir or paths.home() / "benchmarks" / f"{dataset_dir.name}-{cfg.profile}"
    _warn_bf16_unmeasured(cfg.precision, cfg.device, quiet)
    hint = f"finished runs are kept in {target}; run the same command again to resume"
    held = contextlib.ExitStack()
    lock_or_exit(held, target, "benchmark folder")
    try:
        with held, views.BenchView(quiet) as view:
            results = bench.run(
                dataset_dir, cfg, target, shard=shard_ij, on_event=view, parallel=parallel
            )
    except (train_events.Interrupted, KeyboardInterrupt) as exc:
        note(f"interrupted: {hint}")
        raise typer.Exit(interrupt_code(getattr(exc, "signum", None))) from None
    except (
        bench.BenchmarkError,
        train_events.TrainingError,
        CheckpointError,
        DatasetError,
        runs.RunError,
    ) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(views.os_failure(exc, f"writing {target}") + f" ({hint})")
    if shard_ij[1] > 1 and not quiet:
        note(f"shard {shard}: join the shards with: threengan benchmark merge DIR... --out DIR")
    return results, target


# Long only by its declared options and help text (what typer reads); the body is a few calls.
def benchmark(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="DATASET | merge DIR...",
            help="A prepared dataset (name or folder) to benchmark on; or the word merge "
            "followed by benchmark folders (shards) to join into one report.",
            show_default=False,
        ),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            help="smoke (seconds; tests), quick (a reduced grid: about 15-20 minutes on a "
            "2-core CPU, see docs/benchmark-protocol.md) or paper (the full protocol). "
            f"{shown('benchmark', 'profile')}"
        ),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help=f"Comma-separated: {', '.join(method_names())}, or a variant: the ablations "
            "3ngan-nokl, 3ngan-nogc, 3ngan-pairkl and the study's ladder "
            "(docs/benchmark-protocol.md). \\[default: the profile's]"
        ),
    ] = None,
    sizes: Annotated[
        str | None,
        typer.Option(help="Comma-separated training sizes N. \\[default: the profile's]"),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(help="Repeats per cell; repeat r uses seed + r. \\[default: the profile's]"),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs per run. \\[default: the profile's]")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Mini-batch size. \\[default: the profile's]")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="Network width ngf = ndf. \\[default: the profile's]")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=f"Base seed. {shown('benchmark', 'seed')}")
    ] = None,
    device: device_opt("benchmark") = None,
    precision: Annotated[
        str | None, typer.Option(help=f"fp32 or bf16. {shown('benchmark', 'precision')}")
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            help="Comma list of recipes, each a cell of its own: paper, robust. "
            "\\[default: the profile's; study: paper,robust; others: paper]"
        ),
    ] = None,
    ablate: Annotated[
        bool | None,
        flag(
            "--ablate",
            help="Add 3N-GAN ablations: 3ngan-nokl (no KL term), 3ngan-nogc (G not trained "
            "against C), 3ngan-pairkl (per-pair KL).",
        ),
    ] = None,
    parallel: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="Runs trained at once, in threads; results are the same as one at a time. "
            "\\[default: the repeats of a cell on a GPU (at most 8), 1 on a CPU]",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="I/N: train only the runs whose grid index is I-1 modulo N (e.g. a SLURM "
            "array task); join the shards with `benchmark merge`."
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Benchmark folder \\[default: <data dir>/benchmarks/<dataset>-<profile>]; "
            "required for merge.",
            file_okay=False,
        ),
    ] = None,
    config: config_opt("benchmark") = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Benchmark methods x training sizes x repeats and compare with the paper's Table 1.

    Every run is an ordinary training run in <out>/runs/<method>-n<N>-r<repeat>/.
    Reported: mean ± std over repeats of accuracy, balanced accuracy, AUC,
    sensitivity, specificity and F1 of the final-epoch model on the test
    split, and, labelled optimistic, the best test accuracy over epochs.
    Writes results.json, results.csv, report.md (beside the paper's Table 1)
    and accuracy_vs_size.png (with the [bold]plot[/] extra).

    Re-running the same command skips finished runs and resumes an
    unfinished one; a run folder written with other settings is refused.
    Ctrl+C keeps what is finished and exits 130. Exit 3 when some runs
    failed (a loss became non-finite); they are counted in the report.

    [bold]Examples[/]

      threengan benchmark kermany --profile quick

      threengan benchmark kermany --profile paper --shard 3/10 --out bench/s3

      threengan benchmark merge bench/s* --out bench/all

      threengan benchmark kermany --methods 3ngan --sizes 200 --ablate --epochs 20
    """
    if not args:
        fail("give a prepared DATASET, or: merge DIR... --out DIR", EXIT_USAGE)
    flags = {
        "methods": _comma_list(methods, "--methods"),
        "sizes": _comma_list(sizes, "--sizes", int),
        "repeats": repeats,
        "epochs": epochs,
        "batch_size": batch_size,
        "width": width,
        "seed": seed,
        "device": device,
        "precision": precision,
        "ablate": ablate,
        "recipes": _comma_list(recipe, "--recipe"),
    }
    if args[0] == "merge":
        given = {f"--{k.replace('_', '-')}": v for k, v in flags.items()}
        given["--recipe"] = given.pop("--recipes")
        given.update({"--profile": profile, "--shard": shard, "--parallel": parallel})
        given["--config"] = config
        results, target = _bench_merge(args, out_dir, given)
    else:
        if len(args) > 1:
            fail(
                f"give one DATASET (got {len(args)} arguments); to join shards use: "
                "benchmark merge DIR... --out DIR",
                EXIT_USAGE,
            )
        cfg = _bench_settings(config, profile, flags)
        results, target = _bench_run(args[0], cfg, shard, out_dir, parallel, quiet)

    if as_json:
        print_json(results)
    elif not quiet:
        views.bench_tables(results)
    if not quiet:
        made = "results.json, results.csv, report.md"
        if results.get("plot"):
            made += ", accuracy_vs_size.png"
        else:
            note(f"no plot: {results.get('plot_note')}")
        note(f"wrote {made} in {target}")
    failed = results["counts"]["failed"]
    if failed and not quiet:
        warn(f"{failed} run(s) failed (a loss became non-finite); see report.md")
    missing = (results.get("missing") or []) if args[0] == "merge" else []
    if missing and not quiet:
        shown_ = ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
        warn(
            f"{len(missing)} run(s) of the grid are in none of the merged folders: {shown_}; "
            f"the report covers the other {results['counts'].get('finished', 0)} finished"
        )
    if failed or missing:
        raise typer.Exit(EXIT_PARTIAL)
