"""The classify command: input paths -> one row per file, streamed to stdout or a file.

Registered on the app by ``app``; exit codes in ``core/errors``.
"""

# No ``from __future__ import annotations``: typer reads the annotations (see app.py).

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from threengan_cli.cli import progress, views
from threengan_cli.cli.common import (
    CheckpointOpt,
    ModelOpt,
    QuietOpt,
    RunOpt,
    classifier_of,
    config_opt,
    default_of,
    fail,
    flags_of,
    setting,
    settings_of,
)
from threengan_cli.cli.tally import Listing, report_or_exit
from threengan_cli.cli.views import err, note
from threengan_cli.core.errors import EXIT_INTERRUPT, os_message
from threengan_cli.infer.gate import check_judged
from threengan_cli.infer.output import choose_format


def _classify_or_exit(inputs, model, cfg, fmt: str, header, tally, quiet: bool, **outputs):
    """Stream the rows behind a progress bar into --output (complete or not at all) or
    stdout, and to ``outputs`` (the sorter, visuals, stdin's paths); an interrupt, a damaged
    model, a reader that went away or a full disk ends the command with its exit code."""
    from threengan_cli.core.fileio import atomic_file, writes_in_place
    from threengan_cli.infer.batch import classify_into
    from threengan_cli.infer.heatmap import VisualsError

    output = cfg.output
    whole = output is not None and not writes_in_place(output)  # a device or FIFO keeps it
    kept = f"; nothing written to {output}" if whole else ""
    live = not quiet and err.is_terminal
    # Counted up front only for a bar (a terminal), and never stdin's stream of paths.
    counted = live and ("-" not in inputs or cfg.shard is not None)
    try:
        with progress.BarView(live, "classifying", counted=counted) as view, ExitStack() as out:
            stream = sys.stdout if output is None else out.enter_context(atomic_file(output, "w"))
            on_total = (lambda n: view.update(0, n)) if counted else None
            args = (stream, inputs, model, cfg, fmt, header, tally)
            classify_into(*args, **outputs, on_total=on_total, on_progress=view.update)
            sys.stdout.flush()
    except KeyboardInterrupt:
        note(f"interrupted after {tally.counts['inputs']} inputs{kept}")
        raise typer.Exit(EXIT_INTERRUPT) from None
    except VisualsError as exc:
        fail(str(exc) + kept)
    except BrokenPipeError:
        views.reader_gone()
    except OSError as exc:  # a full disk under -o or under a redirected stdout
        if output is None:
            views.stdout_gone()
        where = output if output is not None else "stdout"
        fail(os_message(exc, f"writing the results to {where}") + kept)


# Long only by its declared options and help text (what typer reads); the body is a few calls.
def classify(
    ctx: typer.Context,
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="PATH",
            help="Image files, folders, glob patterns ('scans/*.jpg', quoted) or - to read "
            "paths from stdin, one per line.",
            show_default=False,
        ),
    ] = None,
    run: RunOpt = None,
    which_model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    recursive: Annotated[bool | None, setting("classify", "recursive", "--recursive", "-r")] = None,
    fmt: Annotated[str | None, setting("classify", "format", "--format", "-f")] = None,
    output: Annotated[
        Path | None,
        setting("classify", "output", "--output", "-o", dir_okay=False),
    ] = None,
    batch_size: Annotated[int | None, setting("classify", "batch_size")] = None,
    workers: Annotated[int | None, setting("classify", "workers")] = None,
    threshold: Annotated[float | None, setting("classify", "threshold")] = None,
    ood_threshold: Annotated[float | None, setting("classify", "ood_threshold")] = None,
    fail_on_ood: Annotated[bool | None, setting("classify", "fail_on_ood", "--fail-on-ood")] = None,
    max_ood_share: Annotated[
        float | None, setting("classify", "max_ood_share", metavar="F")
    ] = None,
    device: Annotated[str | None, setting("classify", "device")] = None,
    engine: Annotated[str | None, setting("classify", "engine")] = None,
    adapt: Annotated[str, setting("classify", "adapt", show_default=True)] = default_of(
        "classify", "adapt"
    ),
    sort_into: Annotated[
        Path | None,
        setting(
            "classify",
            "sort_into",
            "--sort-into",
            file_okay=False,
            metavar="DIR",
        ),
    ] = None,
    ood_folder: Annotated[
        bool,
        setting("classify", "ood_folder", "--ood-folder/--no-ood-folder", show_default=True),
    ] = default_of("classify", "ood_folder"),
    link: Annotated[bool | None, setting("classify", "link", "--link")] = None,
    examples: Annotated[bool | None, setting("classify", "examples", "--examples")] = None,
    shard: Annotated[str | None, setting("classify", "shard", metavar="I/N")] = None,
    allow_empty: Annotated[bool | None, setting("classify", "allow_empty", "--allow-empty")] = None,
    heatmaps: Annotated[
        Path | None,
        setting("classify", "heatmaps", "--heatmaps", file_okay=False, metavar="DIR"),
    ] = None,
    report: Annotated[
        Path | None,
        setting("classify", "report", "--report", dir_okay=False, metavar="FILE"),
    ] = None,
    config: config_opt("classify") = None,
    quiet: QuietOpt = False,
) -> None:
    """Classify X-ray images with a trained model: one row per input file.

    Without --run or --checkpoint the bundled default model is used;
    --checkpoint model.onnx (from threengan export) runs on onnxruntime.
    Columns: path, label, p_<class> for each class, ood_score, ood, error
    (and heatmap, the PNG's path, with --heatmaps).
    A file that cannot be read gets a row with its error and no label.
    Rows come in input order; folder contents sorted by name, files
    before sub-folders.

    ood_score says how unlike the model's training X-rays an image is
    (about 1 for a typical training image); ood is true above the
    threshold, by default the model's own, which flags 5% of its val
    split. A flagged image's label is not reliable: the model was not
    trained on X-rays like it. Models trained before threengan 0.2 have
    no such statistics: the two columns stay empty.

    Data goes to stdout (or --output), messages to stderr. The model id
    and thresholds are printed on stderr; --format json also puts them in
    its header: {"model", "which_model", "method", "threshold", "threshold_source",
    "ood_threshold", "ood_threshold_source", "classes", "image_size",
    "rows": [...], "summary"}. A threshold that `evaluate
    --threshold-from val` stored in the model is used unless --threshold
    is given (threshold_source: given, model or default).

    Probabilities are written with the fewest digits that read back as
    the model's float32 value, and do not depend on --batch-size. A count
    per label goes to stderr. --output's suffix (.csv, .json, .jsonl,
    .ndjson) sets the format unless --format is given; any other suffix
    needs --format (or format in --config). In CSV a cell that starts
    with = + - @ gets a leading ' so no spreadsheet runs it as a formula.

    Exit codes: 0 every input classified (or, with --allow-empty, there
    was no image file), 3 some could not be read, 4 all were read and,
    with --fail-on-ood, some were flagged ood (with --max-ood-share F:
    more than the share F of them), 1 none could, or no image file was
    found (or no model), 2 usage error (no PATH, bad option, --checkpoint
    or --run that does not exist, --sort-into with class names that
    cannot be folder names, an ood gate with a model without statistics).

    [bold]Examples[/]

      threengan classify --examples   [dim]# the shipped X-rays, no download[/]

      threengan classify scan1.jpg scan2.png --run my-run

      threengan classify ~/xrays -r -o results.csv

      find /data -name '*.dcm' | threengan classify - -f jsonl > out.jsonl

      threengan classify 'batch/*.jpg' --threshold 0.7 --format json

      threengan classify new-site/ -r --max-ood-share 0.1 -o results.csv

      threengan classify scans/ -r --shard 3/10 -o part-03.csv

      threengan classify inbox/ --sort-into sorted/ --link
    """
    from threengan_cli.core.use_settings import ClassifySettings
    from threengan_cli.infer import batch
    from threengan_cli.infer.classify import adapt_bn, inputs_of, stdin_paths
    from threengan_cli.infer.heatmap import visuals_for
    from threengan_cli.infer.sorting import sorter_for

    flags = flags_of(ClassifySettings, locals(), ctx) | {"format": fmt}
    cfg = settings_of("classify", config, **flags)
    inputs = inputs_of(inputs, cfg.examples)
    fmt = choose_format(fmt, cfg.format, cfg.output, sys.stdout.isatty())
    stdin = stdin_paths(inputs, sys.stdin, cfg.allow_empty)
    engine = "torch" if cfg.adapt == "bn" else cfg.engine  # --adapt bn recomputes torch's
    model = classifier_of(checkpoint, run, cfg.device, engine, which_model)
    check_judged(cfg, model)
    sorter = sorter_for(cfg, model.classes)
    if cfg.adapt == "bn":  # stdin is read here: its paths join the inputs
        exclude = [cfg.sort_into] if cfg.sort_into is not None else []
        adapted, inputs = adapt_bn(inputs, model, cfg.workers, cfg.recursive, exclude, stdin)
        stdin = None
        if not quiet:
            note(
                f"adapted: BatchNorm statistics recomputed on {adapted} of these images "
                "(transductive, no labels used)"
            )
    cfg, header, said = batch.thresholds_of(model, cfg)
    if not quiet:
        which = f"{model.which}; " if model.which else ""
        note(
            f"model {model.model_id} ({which}{model.method}, {model.image_size}px, classes "
            f"{', '.join(model.classes)}), {said}, device {model.device}"
        )
    listing = Listing(on=not quiet and fmt != "table")
    tally = batch.Tally(list(model.classes), on_error=listing)
    visuals = visuals_for(model, cfg, header)
    outputs = {"sorter": sorter, "visuals": visuals, "stdin": stdin}
    _classify_or_exit(inputs, model, cfg, fmt, header, tally, quiet, **outputs)
    report_or_exit(tally, listing, cfg, inputs, header["ood_threshold"], quiet)
