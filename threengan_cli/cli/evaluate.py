"""The evaluate and runs commands: scoring a model on labelled X-rays, and listing (and
pruning) training runs. Registered on the app by ``app``; exit codes in ``core/errors``.
"""

# No ``from __future__ import annotations``: typer reads the annotations (see app.py).

from pathlib import Path
from typing import Annotated

import typer

from threengan_cli.cli import views
from threengan_cli.cli.common import (
    MAX_LISTED,
    CheckpointOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    RunOpt,
    classifier_of,
    config_opt,
    default_of,
    ends_cleanly,
    flag,
    flags_of,
    lock_or_exit,
    setting,
    settings_of,
)
from threengan_cli.cli.views import note, print_json, warn
from threengan_cli.core.errors import EXIT_FAIL, EXIT_PARTIAL


# ----------------------------------------------------------------------------------- evaluate
def _model_or_exit(ctx, checkpoint, run, which, cfg):
    """The classifier to score; under --threshold-from its run locked (until the command
    ends: ``ctx`` releases it) and its file checked writable before any work, since the
    chosen threshold is stored in it: a training run that rewrote that file meanwhile would
    lose the threshold, or the threshold would be of other weights."""
    from threengan_cli.model.modelfile import check_writable
    from threengan_cli.train import runs

    if cfg.threshold_from is not None:  # it writes the checkpoint: one writer per run
        folder = runs.run_of_model(checkpoint, run, which)
        if folder is not None:
            lock_or_exit(ctx, folder)
    model = classifier_of(checkpoint, run, cfg.device, cfg.engine, which)
    if cfg.threshold_from is not None:  # before the work: the threshold is stored in it
        check_writable(model.path)
    return model


def _show_or_exit(result, model, ood_threshold, plot, as_json: bool, quiet: bool) -> None:
    """The scores (tables or JSON) and plots; exit 3 when some images could not be read."""
    from threengan_cli.infer.ood import describe_fit
    from threengan_cli.infer.plots import write_plots

    made = []
    if plot is not None:
        made = write_plots(result, plot)

    if as_json:
        print_json({**result.to_dict(), "plots": [str(p) for p in made]})
    else:
        views.evaluation_tables(result)
    if not quiet:
        where = {"given": "given", "model": "stored in the model", "chosen": "chosen on val"}
        which = f"{result.which_model}; " if result.which_model else ""
        fitted = ""
        if result.ood_fit is not None:
            fitted = f"; ood detector fitted on {describe_fit(result.ood_fit, short=False)}"
        note(
            f"model {result.model_id} ({which}{result.method}), threshold {result.threshold} "
            f"({where.get(result.threshold_source, 'default')}), {result.metrics['n']} images"
            + model.ood_threshold(ood_threshold)[2]
            + fitted
        )
        if made:
            note("wrote " + ", ".join(str(p) for p in made))
    bad = result.unreadable
    if bad:
        for p in bad[:MAX_LISTED]:
            warn(f"{p.path}: {p.error}")
        warn(f"{len(bad)} images could not be read and were left out of the scores")
        raise typer.Exit(EXIT_PARTIAL)


# Long only by its declared options and help text (what typer reads); the body is a few calls.
def evaluate(
    ctx: typer.Context,
    data: Annotated[
        str,
        typer.Argument(
            metavar="DATA",
            help="Labelled images: a prepared dataset (name or folder), a folder of class "
            "folders (or of train/ val/ test/ class folders), or a CSV of path,label[,split].",
            show_default=False,
        ),
    ],
    split: Annotated[str | None, setting("evaluate", "split")] = None,
    run: RunOpt = None,
    which_model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    threshold: Annotated[float | None, setting("evaluate", "threshold")] = None,
    threshold_from: Annotated[str | None, setting("evaluate", "threshold_from")] = None,
    threshold_rule: Annotated[
        str, setting("evaluate", "threshold_rule", show_default=True)
    ] = default_of("evaluate", "threshold_rule"),
    batch_size: Annotated[
        int, setting("evaluate", "batch_size", min=1, show_default=True)
    ] = default_of("evaluate", "batch_size"),
    workers: Annotated[int, setting("evaluate", "workers", min=0, show_default=True)] = default_of(
        "evaluate", "workers"
    ),
    device: Annotated[str, setting("evaluate", "device", show_default=True)] = default_of(
        "evaluate", "device"
    ),
    engine: Annotated[str, setting("evaluate", "engine", show_default=True)] = default_of(
        "evaluate", "engine"
    ),
    ood_threshold: Annotated[float | None, setting("evaluate", "ood_threshold", min=0.0)] = None,
    plot: Annotated[
        Path | None,
        setting("evaluate", "plot", file_okay=False, metavar="DIR"),
    ] = None,
    config: config_opt("evaluate") = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score a model on labelled X-rays: accuracy, balanced accuracy, AUC, sensitivity,
    specificity, F1, calibration (ECE over 15 bins, Brier score), the confusion matrix and
    per-class counts.

    Every metric comes with its 95% interval (Wilson for proportions,
    DeLong for the AUC, a seeded bootstrap for the others; in --json as
    "<metric>_ci": [low, high]).

    With a model that has out-of-distribution statistics, also the share
    of images flagged as unlike its training X-rays, and the metrics over
    the images it does not flag (the column "not flagged (n=...)").

    Without --run or --checkpoint the bundled default model is used. Files
    go through classify's own decoding and decision, so evaluate and
    classify give every image the same probabilities and label.

    --threshold-from val chooses the threshold on the val split of the
    prepared dataset DATA and stores it in the checkpoint's metadata
    (--run or --checkpoint; the bundled model is never changed: copy it
    first): classify and evaluate then use it unless --threshold is
    given, and say so.

    Exit codes: 0 ok, 3 some images unreadable (scored without them),
    1 none readable, 2 usage error.

    [bold]Examples[/]

      threengan evaluate kermany --split test --run my-run

      threengan evaluate chest_xray/test --json > scores.json

      threengan evaluate kermany --run my-run --threshold-from val --plot plots/

      threengan evaluate labels.csv --checkpoint model.safetensors --threshold 0.7
    """
    from threengan_cli.core.use_settings import EvaluateSettings
    from threengan_cli.infer import evaluate as ev
    from threengan_cli.infer.plots import require_matplotlib

    cfg = settings_of("evaluate", config, **flags_of(EvaluateSettings, locals(), ctx))
    if cfg.plot is not None:
        require_matplotlib()
    model = _model_or_exit(ctx, checkpoint, run, which_model, cfg)
    with ends_cleanly(interrupted="interrupted; nothing was stored"):
        result = ev.score(data, model, cfg)
    chosen = result.chosen
    if chosen is not None:
        if result.data.split == "val" and not quiet:
            warn("the threshold is chosen and scored on the same val split: optimistic")
        ev.store_threshold(model, chosen)
        if not quiet:
            note(
                f"threshold {chosen['value']} chosen on {chosen['images']} val images by "
                f"{cfg.threshold_rule} ({chosen['rule_value']:.4f}); stored in {model.path}"
            )
    _show_or_exit(result, model, cfg.ood_threshold, cfg.plot, as_json, quiet)


# --------------------------------------------------------------------------------------- runs
def _not_pruned(name: str, why: str) -> None:
    views.error(f"cannot prune {name}: {why}")


def runs(
    names: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="NAME",
            help="Only these runs (names as listed; all by default).",
            show_default=False,
        ),
    ] = None,
    prune_last: Annotated[
        bool,
        flag(
            "--prune-last",
            help="Delete the resumable last.safetensors of finished runs, keeping their "
            "final weights in final.safetensors (--run keeps working; only extending the run "
            "needs what is deleted).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """List the training runs in the data dir: name, method, N, epochs done/planned,
    state (finished, failed, running, stopped), val and test accuracy, size on disk.

    Runs of benchmarks are listed as BENCHMARK/RUN. A run counts as
    running while a live process holds its writer lock.

    [bold]Examples[/]

      threengan runs

      threengan runs --json

      threengan runs --prune-last   [dim]# free ~100 MB per finished 3ngan run[/]
    """
    from threengan_cli.train import runlist

    found = runlist.list_runs(names=names)
    pruned, busy = [], []
    if prune_last:
        found, pruned, busy = runlist.prune_finished(found, on_busy=_not_pruned)
    if as_json:
        rows = [r.to_dict() for r in found]
        print_json({"runs": rows, "pruned": [vars(p) for p in pruned]} if prune_last else rows)
    elif found:
        views.runs_table(found)
    elif not quiet:
        note("no runs yet: run `threengan train DATASET`")
    if not quiet:
        for run in found:
            if run.state == "damaged":
                warn(f"{run.name} is damaged: {run.error}")
    if prune_last and not quiet:
        freed = sum(p.freed_bytes for p in pruned)
        note(
            f"pruned {len(pruned)} finished run(s), freed {runlist.human_bytes(freed)}"
            if pruned
            else "nothing to prune: no finished run keeps a last.safetensors"
        )
    if busy:  # some runs were left alone: all of them (1), or beside pruned ones (3)
        raise typer.Exit(EXIT_PARTIAL if pruned else EXIT_FAIL)
