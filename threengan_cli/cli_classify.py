"""The classify command: input paths -> one row per file, streamed to stdout or a file.

Registered on the app by ``cli``; exit codes in ``cli_common``.
"""

# No ``from __future__ import annotations``: typer reads the annotations (see cli.py).

import sys
from pathlib import Path
from typing import Annotated

import typer

from threengan_cli import views
from threengan_cli.cli_common import (
    EXIT_INTERRUPT,
    EXIT_OOD,
    EXIT_PARTIAL,
    EXIT_USAGE,
    MAX_LISTED,
    CheckpointOpt,
    QuietOpt,
    RunOpt,
    config_opt,
    fail,
    flag,
    load_classifier_or_exit,
    ood_threshold_of,
    settings_or_exit,
    threshold_of,
)
from threengan_cli.helptext import shown
from threengan_cli.views import err, note, warn


def _classify_format(given: str | None, configured: str | None, output: Path | None) -> str:
    """The output format: ``--format``; else --output's suffix; else the config file's
    ``format``; else table on a terminal, csv otherwise. An explicit flag or file name wins
    over the config file, which holds defaults. An --output that is not a regular file
    (``/dev/stdout``, a FIFO, a device) needs no suffix: it gets csv, as a pipe does."""
    from threengan_cli import fileio
    from threengan_cli.classify_output import FORMATS, SUFFIX_FORMATS

    fmt = given
    if fmt is None and output is not None:
        fmt = SUFFIX_FORMATS.get(output.suffix.lower()) or configured
        if fmt is None and fileio.writes_in_place(output):
            fmt = "csv"
        if fmt is None:
            known = ", ".join(SUFFIX_FORMATS)
            fail(
                f"cannot tell the format of {output} from its suffix (known: {known}); "
                "give --format csv, json or jsonl",
                EXIT_USAGE,
            )
    if fmt is None:
        fmt = configured or ("table" if sys.stdout.isatty() else "csv")
    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})", EXIT_USAGE)
    return fmt


def _stdin_paths(inputs: list[str]):
    """stdin's lines, when ``-`` is among the inputs, read up to the first path before any
    model is loaded: ``-`` alone with nothing on stdin is a usage error, like no PATH."""
    import itertools

    if "-" not in inputs:
        return None
    for line in sys.stdin:
        if line.strip() and line.rstrip("\r\n") != "-":
            return itertools.chain([line], sys.stdin)
    if inputs == ["-"]:
        fail("no paths were given on stdin (one per line)", EXIT_USAGE)
    return iter(())


class _ClassifyTally:
    """Counts rows as they stream past, lists the first unreadable inputs on stderr, and
    counts the files folder scans passed over (names that are not image names)."""

    def __init__(self, listing: bool, classes: list[str]):
        self.counts = {"inputs": 0, "classified": 0, "errors": 0, "skipped": 0, "ood": 0}
        self.per_label = dict.fromkeys(classes, 0)
        self.listing, self.listed = listing, 0
        self.first_error: str | None = None
        self.first_skipped: str | None = None

    def add(self, row) -> None:
        self.counts["inputs"] += 1
        if row.ok:
            self.counts["classified"] += 1
            self.per_label[row.label] += 1
            self.counts["ood"] += bool(row.ood)
            return
        self.counts["errors"] += 1
        if self.first_error is None:
            self.first_error = f"{row.path}: {row.error}"
        if self.listing and self.listed < MAX_LISTED:
            warn(f"{row.path}: {row.error}")
            self.listed += 1

    def skip(self, path: str) -> None:
        self.counts["skipped"] += 1
        self.first_skipped = self.first_skipped or path


def _classify_stream(inputs, model, cfg, fmt: str, output: Path | None, tally, view, extra) -> None:
    """Classify ``inputs`` into ``output`` (complete or not at all) or stdout."""
    from threengan_cli import fileio
    from threengan_cli.classify import Decision
    from threengan_cli.classify import classify as run_classify
    from threengan_cli.classify_output import RowWriter

    sorter, visuals = extra["sorter"], extra["visuals"]

    def consume(stream) -> None:
        columns = visuals.columns if visuals is not None else ()
        writer = RowWriter(fmt, stream, model, extra["header"], columns)
        writer.begin()
        rows = run_classify(
            inputs,
            visuals.model if visuals is not None else model,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            decision=Decision(cfg.threshold, extra["header"]["ood_threshold"]),
            recursive=cfg.recursive,
            stdin=extra["stdin"],
            shard=extra["shard"],
            # what this run writes into is never classified: --sort-into's and --heatmaps' folders
            exclude=[f for f in (sorter and sorter.folder, visuals and visuals.folder) if f],
            on_skip=tally.skip,
        )
        for row in rows:
            writer.write(row, **(visuals.add(row) if visuals is not None else {}))
            tally.add(row)
            if row.ok and sorter is not None:
                try:
                    sorter(row)
                except OSError as exc:
                    fail(f"cannot sort {row.path} into {sorter.folder}: {exc}")
            view.update(tally.counts["inputs"])
        writer.end({**tally.counts, "labels": tally.per_label})
        if visuals is not None:
            visuals.finish()  # before the results are renamed into place: both or neither

    if output is not None:
        with fileio.atomic_file(output, "w") as fh:
            consume(fh)
    else:
        consume(sys.stdout)
        sys.stdout.flush()


def _adapt_bn(inputs: list[str], model, cfg, quiet: bool, stdin, exclude) -> list[str]:
    """Recompute the classifier's BatchNorm statistics on the inputs; the inputs, with
    stdin's paths read once (both passes need them)."""
    from threengan_cli.classify import AdaptError, adapt_bn

    if stdin is not None:
        inputs = [p for p in inputs if p != "-"] + [line.strip() for line in stdin if line.strip()]
    try:
        adapted = adapt_bn(
            inputs, model, workers=cfg.workers, recursive=cfg.recursive, exclude=exclude
        )
    except AdaptError as exc:
        fail(str(exc), EXIT_USAGE)
    if not quiet:
        note(
            f"adapted: BatchNorm statistics recomputed on {adapted} of these images "
            "(transductive, no labels used)"
        )
    return inputs


def _inputs_or_exit(inputs: list[str] | None, examples: bool) -> list[str]:
    """The PATHs given, with the shipped example X-rays under --examples; none is a usage
    error."""
    if examples:
        from threengan_cli.paths import example_images

        shipped = [str(p) for p in example_images()]
        if not shipped:
            fail("this installation has no example X-rays (threengan_cli/examples)")
        inputs = [*(inputs or []), *shipped]
    if not inputs:
        fail(
            "give at least one PATH (a file, folder or glob), --examples, or - to read paths "
            "from stdin",
            EXIT_USAGE,
        )
    return inputs


def _check_flags(inputs: list[str], link: bool, sort_into, shard: str | None, adapt: str):
    """Usage errors of the options, before stdin or the model is read; the shard (i, n) or
    ``None``."""
    if inputs.count("-") > 1:
        fail("- (paths from stdin) may be given once", EXIT_USAGE)
    if link and sort_into is None:
        fail("--link goes with --sort-into DIR", EXIT_USAGE)

    from threengan_cli.classify import parse_shard

    try:
        shard_ij = parse_shard(shard) if shard is not None else None
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    if adapt not in ("none", "bn"):
        fail(f"--adapt must be none or bn (got {adapt!r})", EXIT_USAGE)
    return shard_ij


def _model_and_sorter(checkpoint, run, cfg, adapt: str, sort_into, link: bool):
    """The classifier (torch's for --adapt bn, which recomputes its statistics) and the
    --sort-into folders, or ``None``."""
    from threengan_cli.classify import Sorter
    from threengan_cli.modelfile import ModelError

    engine_name = "torch" if adapt == "bn" else cfg.engine
    model = load_classifier_or_exit(checkpoint, run, cfg.device, engine_name)
    try:
        model.require_classifier()
    except ModelError as exc:
        fail(str(exc))
    sorter = None
    if sort_into is not None:
        try:
            sorter = Sorter(sort_into, model.classes, link=link)
        except ValueError as exc:
            fail(f"--sort-into makes a folder per class: {exc}", EXIT_USAGE)
    return model, sorter


def _visuals_or_exit(model, heatmaps: Path | None, report: Path | None, header: dict):
    """What --heatmaps and --report add to the run, or ``None`` without either."""
    if heatmaps is None and report is None:
        return None
    from threengan_cli.infer.heatmap import Visuals, VisualsError

    info = {"model": model.model_id, "method": model.method, "engine": model.device, **header}
    try:
        return Visuals(model, heatmaps, report, info)
    except VisualsError as exc:
        fail(str(exc), EXIT_USAGE)


def _decision_thresholds(model, cfg, quiet: bool):
    """The settings with the threshold to use, and the output's header: both thresholds and
    where they come from (said on stderr with the model)."""
    given = cfg.threshold if "threshold" in cfg.model_fields_set else None
    threshold_value, threshold_source, source_note = threshold_of(model, given)
    cfg = cfg.model_copy(update={"threshold": threshold_value})
    ood_value, ood_source, ood_note = ood_threshold_of(model, cfg.ood_threshold)
    if not quiet:
        ood_said = f", ood threshold {ood_value}" if ood_value is not None else ""
        note(
            f"model {model.model_id} ({model.method}, {model.image_size}px, classes "
            f"{', '.join(model.classes)}), threshold {cfg.threshold}{source_note}"
            f"{ood_said}{ood_note}, device {model.device}"
        )
    header = {
        "threshold": cfg.threshold,
        "threshold_source": threshold_source,
        "ood_threshold": ood_value,
        "ood_threshold_source": ood_source,
    }
    return cfg, header


def _classify_or_exit(inputs, model, cfg, fmt: str, output, tally, extra, quiet: bool) -> None:
    """Stream the rows behind a progress bar; an interrupt, a damaged model, a reader that
    went away or a full disk ends the command with its exit code."""
    from threengan_cli.fileio import writes_in_place  # a device or FIFO keeps what it got
    from threengan_cli.infer.heatmap import VisualsError
    from threengan_cli.modelfile import ModelError

    whole = output is not None and not writes_in_place(output)
    kept = f"; nothing written to {output}" if whole else ""
    try:
        with views.BarView(not quiet and err.is_terminal, "classifying") as view:
            _classify_stream(inputs, model, cfg, fmt, output, tally, view, extra)
    except KeyboardInterrupt:
        note(f"interrupted after {tally.counts['inputs']} inputs{kept}")
        raise typer.Exit(EXIT_INTERRUPT) from None
    except (ModelError, VisualsError) as exc:
        fail(str(exc) + (kept if isinstance(exc, VisualsError) else ""))
    except BrokenPipeError:
        views.reader_gone()
    except OSError as exc:  # a full disk under -o or under a redirected stdout
        if output is None:
            views.stdout_gone()
        where = output if output is not None else "stdout"
        fail(views.os_failure(exc, f"writing the results to {where}") + kept)


def _report_or_exit(tally, cfg, inputs, shard_ij, output, sort_into, ood_value, quiet) -> None:
    """What was classified, on stderr, and the exit code: 1 when nothing was, 3 when some
    inputs could not be, 4 under --fail-on-ood when an image was flagged."""
    counts = tally.counts
    if counts["inputs"] == 0:
        if shard_ij is not None:
            fail(
                f"nothing to classify: shard {shard_ij[0]}/{shard_ij[1]} of the input list is "
                "empty (fewer inputs than shards)"
            )
        fail(
            "nothing to classify (no paths were given on stdin)"
            if "-" in inputs
            else "nothing to classify (the inputs named no files)"
        )
    if counts["classified"] == 0:
        fail(f"none of the {counts['inputs']} inputs could be classified ({tally.first_error})")
    if not quiet:
        where = f" -> {output}" if output is not None else ""
        note(f"classified {counts['classified']} of {counts['inputs']} inputs{where}")
        labels = ", ".join(f"{label} {n}" for label, n in tally.per_label.items())
        errors = f", errors {counts['errors']}" if counts["errors"] else ""
        sorted_to = f" (sorted into {sort_into})" if sort_into is not None else ""
        note(f"labels: {labels}{errors}{sorted_to}")
        if ood_value is not None:
            note(
                f"ood: {counts['ood']} of {counts['classified']} images look unlike the "
                "model's training X-rays (score above "
                f"{ood_value}); their labels are not reliable (docs/guide.md, 'Images unlike "
                "the training set')"
            )
        if counts["skipped"]:
            files = f"{counts['skipped']} file" + ("s" if counts["skipped"] != 1 else "")
            warn(
                f"skipped {files} in the folders whose names are not image names (the first: "
                f"{tally.first_skipped}); give them as PATHs to classify them anyway"
            )
    if counts["errors"]:
        if not quiet:
            if tally.listing and tally.listed < counts["errors"]:
                warn(f"... and {counts['errors'] - tally.listed} more")
            warn(f"{counts['errors']} inputs could not be classified (see the error column)")
        raise typer.Exit(EXIT_PARTIAL)
    if cfg.fail_on_ood and counts["ood"]:
        raise typer.Exit(EXIT_OOD)


# Long only by its declared options and help text (what typer reads); the body is a few calls.
def classify(
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
    checkpoint: CheckpointOpt = None,
    recursive: Annotated[
        bool | None,
        flag("--recursive", "-r", help="Look in sub-folders of folders too."),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="table, csv, json or jsonl \\[default: from --output's suffix; else the "
            "--config file's format; else table on a terminal, csv when piped or when --output "
            "is a device or FIFO].",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the results to this file (complete or not at all) instead of stdout.",
            dir_okay=False,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help=f"Images per forward pass and per decoding job. {shown('classify', 'batch_size')}"
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help=f"Decoding processes; 0 = all cores. {shown('classify', 'workers')}"),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Two classes: the second (pneumonia) when its probability is at "
            f"least this. {shown('classify', 'threshold')}"
        ),
    ] = None,
    ood_threshold: Annotated[
        float | None,
        typer.Option(
            help="Flag an image (ood = true) when its out-of-distribution score is above "
            "this [default: the model's own, which flags 5% of its val split]."
        ),
    ] = None,
    fail_on_ood: Annotated[
        bool,
        flag(
            "--fail-on-ood",
            help="Exit 4 when any image is flagged as unlike the model's training X-rays.",
        ),
    ] = False,
    device: Annotated[
        str | None,
        typer.Option(
            help="auto or cpu: the CPU (decoding dominates at 64 px); cuda, cuda:N or mps: "
            f"torch on that device. {shown('classify', 'device')}"
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="On the CPU: numpy starts in under a second (no torch import); torch "
            "starts 3-4 s later and classifies long lists about 18% faster. "
            f"{shown('classify', 'engine')}"
        ),
    ] = None,
    adapt: Annotated[
        str,
        typer.Option(
            help="bn: first recompute the classifier's BatchNorm statistics on these images "
            "(no labels used; transductive; needs 32 or more images; uses the torch engine)."
        ),
    ] = "none",
    sort_into: Annotated[
        Path | None,
        typer.Option(
            "--sort-into",
            help="Also copy each classified input into DIR/<label>/; a rerun replaces what it "
            "wrote, and folder scans leave DIR out.",
            file_okay=False,
            metavar="DIR",
        ),
    ] = None,
    link: Annotated[
        bool,
        flag(
            "--link",
            help="With --sort-into: hard-link instead of copying (a symbolic link where the "
            "file system refuses hard links).",
        ),
    ] = False,
    examples: Annotated[
        bool,
        flag(
            "--examples",
            help="Also classify the 8 example X-rays shipped with threengan (Kermany et al., "
            "CC BY 4.0; `threengan info` shows where).",
        ),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            help="I/N: classify only the I-th of N contiguous slices of the expanded input "
            "list (a SLURM array task, a Kubernetes job); the shards' outputs concatenated "
            "in order equal one unsharded run.",
            metavar="I/N",
        ),
    ] = None,
    heatmaps: Annotated[
        Path | None,
        typer.Option(
            "--heatmaps",
            help="Also write, per classified image, a PNG of it with the classifier's evidence "
            "for its label overlaid into DIR, named in a heatmap column (numpy or onnx engine).",
            file_okay=False,
            metavar="DIR",
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Also write one self-contained HTML page for the batch: counts, histograms "
            "and a grid of thumbnails, sortable and filterable (works offline).",
            dir_okay=False,
            metavar="FILE",
        ),
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
    its header: {"model", "method", "threshold", "threshold_source",
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

    Exit codes: 0 every input classified, 3 some could not be read,
    4 (with --fail-on-ood) all were read and some were flagged ood,
    1 none could (or no model), 2 usage error (no PATH, bad option,
    --checkpoint or --run that does not exist, --sort-into with class
    names that cannot be folder names).

    [bold]Examples[/]

      threengan classify --examples   [dim]# the shipped X-rays, no download[/]

      threengan classify scan1.jpg scan2.png --run my-run

      threengan classify ~/xrays -r -o results.csv

      find /data -name '*.dcm' | threengan classify - -f jsonl > out.jsonl

      threengan classify 'batch/*.jpg' --threshold 0.7 --format json

      threengan classify new-site/ -r --fail-on-ood -o results.csv

      threengan classify scans/ -r --shard 3/10 -o part-03.csv

      threengan classify inbox/ --sort-into sorted/ --link
    """
    inputs = _inputs_or_exit(inputs, examples)
    cfg = settings_or_exit(
        "classify",
        config,
        batch_size=batch_size,
        workers=workers,
        threshold=threshold,
        device=device,
        engine=engine,
        recursive=recursive,
        format=fmt,
        ood_threshold=ood_threshold,
        fail_on_ood=fail_on_ood or None,
    )
    fmt = _classify_format(fmt, cfg.format, output)
    shard_ij = _check_flags(inputs, link, sort_into, shard, adapt)
    stdin = _stdin_paths(inputs)
    model, sorter = _model_and_sorter(checkpoint, run, cfg, adapt, sort_into, link)
    if adapt == "bn":
        exclude = [sort_into] if sort_into is not None else []
        inputs = _adapt_bn(inputs, model, cfg, quiet, stdin, exclude)
        stdin = None
    cfg, header = _decision_thresholds(model, cfg, quiet)
    tally = _ClassifyTally(listing=not quiet and fmt != "table", classes=list(model.classes))
    visuals = _visuals_or_exit(model, heatmaps, report, header)
    extra = {"header": header, "shard": shard_ij, "sorter": sorter, "stdin": stdin}
    extra["visuals"] = visuals
    _classify_or_exit(inputs, model, cfg, fmt, output, tally, extra, quiet)
    _report_or_exit(tally, cfg, inputs, shard_ij, output, sort_into, header["ood_threshold"], quiet)
