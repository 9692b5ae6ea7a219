"""The train command: it writes a run folder and runs for hours.

Registered on the app by ``app``; exit codes in ``core/errors``.
"""

# No ``from __future__ import annotations``: typer reads the annotations (see app.py).

import contextlib
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from threengan_cli.cli import progress
from threengan_cli.cli.common import (
    JsonOpt,
    QuietOpt,
    config_opt,
    fail,
    flag,
    flags_of,
    lock_or_exit,
    setting,
    shown,
    warn_bf16_unmeasured,
)
from threengan_cli.cli.views import note, print_json, warn
from threengan_cli.core.errors import EXIT_OK, Failure, interrupt_code, os_message
from threengan_cli.core.names import BUILT_IN
from threengan_cli.train.events import CHECKPOINT_EVERY_S


# -------------------------------------------------------------------------------------- train
def _finished_run_or_continue(run_dir: Path, epochs: int | None, as_json: bool, quiet: bool):
    """A finished run asked for no more epochs than it has: its summary, exit 0 (so a CI job
    can run the same line twice). Otherwise return, and training continues."""
    from threengan_cli.train import plan, runs

    summary, problem = plan.finished(run_dir, epochs)
    if problem is not None and not quiet:
        warn(f"{problem}; the final evaluation runs again to rewrite it")
    if summary is None:
        return
    if not quiet:
        done = summary["epochs"]
        note(
            f"{run_dir} already finished its {done} epochs; pass --epochs larger than "
            f"{done} to extend it (with --resume)"
        )
    if as_json:
        print_json(summary)
    elif not quiet:
        note(runs.done_line(summary, run_dir))
    raise typer.Exit(EXIT_OK)


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
        typer.Option(help=f"{', '.join(BUILT_IN)}. {shown('train', 'method')}"),
    ] = None,
    size: Annotated[int | None, setting("train", "size")] = None,
    epochs: Annotated[int | None, setting("train", "epochs")] = None,
    batch_size: Annotated[int | None, setting("train", "batch_size")] = None,
    tau: Annotated[float | None, setting("train", "tau")] = None,
    alpha: Annotated[float | None, setting("train", "alpha")] = None,
    lam: Annotated[float | None, setting("train", "lam")] = None,
    kl: Annotated[str | None, setting("train", "kl")] = None,
    lr: Annotated[float | None, setting("train", "lr")] = None,
    width: Annotated[int | None, setting("train", "width")] = None,
    seed: Annotated[int | None, setting("train", "seed")] = None,
    device: Annotated[str | None, setting("train", "device")] = None,
    precision: Annotated[str | None, setting("train", "precision")] = None,
    cuda_graphs: Annotated[
        bool | None, setting("train", "cuda_graphs", "--cuda-graphs/--no-cuda-graphs")
    ] = None,
    recipe: Annotated[str | None, setting("train", "recipe")] = None,
    precise_bn: Annotated[
        bool | None, setting("train", "precise_bn", "--precise-bn/--no-precise-bn")
    ] = None,
    ema: Annotated[float | None, setting("train", "ema")] = None,
    augment: Annotated[str | None, setting("train", "augment")] = None,
    unlabelled: Annotated[str | None, setting("train", "unlabelled")] = None,
    init: Annotated[str | None, setting("train", "init", show_default=False)] = None,
    calibration_folds: Annotated[int | None, setting("train", "calibration_folds")] = None,
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
    ] = CHECKPOINT_EVERY_S,
    config: config_opt("train") = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a model on a prepared dataset; each epoch is evaluated on its val split.

    The run folder gets settings.json, metrics.jsonl (one line per epoch), samples/ (images
    from a fixed latent batch), last.safetensors (resumable; at the end, the final model),
    best.safetensors (best val accuracy) and summary.json (test metrics, computed once at
    the end, of the final model: the one --run loads; of best.safetensors beside them).
    Ctrl+C saves a resumable checkpoint and exits 130 (SIGTERM: 143).

    The same command run again (same --name or --out, dataset and settings) does not train
    twice: a finished run prints its summary and exits 0, an unfinished one resumes. A run
    with other settings in that folder is refused (see --resume, --force).

    [bold]Examples[/]

      threengan train kermany --method 3ngan --size 200 --epochs 3

      threengan train kermany --method vanilla --size 1000 --seed 1 --name van-1000-s1

      threengan train --resume van-1000-s1 --epochs 150

      threengan train mine --init default --unlabelled unlabelled/ --epochs 30
    """
    from threengan_cli.core.settings import TrainSettings
    from threengan_cli.train import events, plan, runs

    flags = flags_of(TrainSettings, locals())
    every_s = events.checkpoint_interval(checkpoint_every)
    held = contextlib.ExitStack()  # the run folder's writer lock, taken by the plan
    with held:
        cfg, dataset_dir, run_dir, again = plan.open_run(
            dataset, resume, flags, config, (name, out_dir), force, partial(lock_or_exit, held)
        )
        if again:  # the same run: finished, say so and exit 0; else it resumes
            epochs = flags["epochs"] if resume is not None else None
            _finished_run_or_continue(run_dir, epochs, as_json, quiet)
            if resume is None and not quiet:
                note(f"{run_dir} holds this run (same dataset and settings), unfinished")
        summary = _train_locked(dataset_dir, cfg, run_dir, again, every_s, quiet)
    if summary.get("extended") and not quiet:
        note(f"extended the finished run to {cfg.epochs} epochs")
    if as_json:
        print_json(summary)
    elif not quiet:
        note(runs.done_line(summary, run_dir))


def _train_locked(dataset_dir: Path, cfg, run_dir: Path, resume: bool, every_s, quiet: bool):
    """Run the engine on a locked run folder; its errors as one line and an exit code."""
    from threengan_cli.train import events, training

    warn_bf16_unmeasured(cfg.precision, cfg.device, quiet)
    try:
        with progress.TrainView(quiet) as view:
            return training.train(
                dataset_dir,
                cfg,
                run_dir,
                resume=resume,
                on_event=view,
                checkpoint_every_s=every_s,
            )
    except events.Interrupted as exc:
        note(f"interrupted: {exc}. Continue with: threengan train --resume {run_dir}")
        raise typer.Exit(interrupt_code(exc.signum)) from None
    except ValueError as exc:  # an engine's check that is not one of its Failure errors
        if isinstance(exc, Failure):
            raise
        fail(str(exc))
    except OSError as exc:
        fail(os_message(exc, f"writing the run {run_dir}", resume=run_dir))
