"""The commands: options -> settings -> one engine call -> exit code.

Rendering lives in ``views`` (the only other module that talks to the terminal); heavy
libraries (torch, numpy, PIL, pydantic) are imported inside the commands so that
``threengan --help`` stays instant. Help defaults are read from the settings models
(``helptext``), never written here.

Exit codes (the same for every command):
  0  success
  1  failure (nothing usable was produced)
  2  usage error (bad flag, bad setting, missing input path)
  3  partial success (some inputs could not be read; the rest were processed)
  130 interrupted (Ctrl+C); what was finished is kept
"""

# No ``from __future__ import annotations`` here, unlike the other modules: typer would then
# evaluate every option's annotation from its string each time it builds the commands,
# 26 ms of every command against 6.5 ms (``benchmarks/bench_startup.py --phases``).

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

from threengan_cli import views

# Before typer's help renderer can import them (see views.defer_import for the measurement).
views.defer_import("rich.markdown", "Markdown")
views.defer_import("rich.traceback", "Traceback")

import typer  # noqa: E402  (after the placeholders above)
from typer.core import TyperArgument, TyperCommand  # noqa: E402

from threengan_cli import __version__  # noqa: E402
from threengan_cli.helptext import shown  # noqa: E402
from threengan_cli.views import err, note, print_json, warn  # noqa: E402

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPT = 0, 1, 2, 3, 130
MAX_LISTED = 20  # skipped files / unreadable inputs listed one by one, then a count


class _Command(TyperCommand):
    """Usage lines as man pages write them: ``SOURCE``, ``[PATH]...`` (typer writes
    ``{source}`` for a required argument)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or param.name.upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


app = typer.Typer(
    name="threengan",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="3N-GAN: semi-supervised X-ray classification with a generator, a discriminator "
    "and a classifier trained together.\n\n"
    "Typical use: [bold]threengan prepare[/] a folder of X-rays, [bold]threengan train[/] "
    "a model on it, then [bold]threengan classify[/] new images.",
    epilog="Exit codes: 0 ok, 1 failure, 2 usage error, 3 some inputs unreadable, 130 interrupted.",
)
command = app.command  # commands with arguments use cls=_Command


def _flag(*names: str, help: str) -> Any:
    """A plain on/off flag: no ``<bool>`` value shown (``--json true`` is a usage error)."""
    return typer.Option(*names, help=help, metavar="")


def _config_opt(section: str) -> Any:
    return Annotated[
        Path | None,
        typer.Option(
            "--config",
            help=f"TOML file whose \\[{section}] table holds this command's settings (keys: the "
            "long option names with _ for -); flags override it.",
            dir_okay=False,
        ),
    ]


JsonOpt = Annotated[
    bool, _flag("--json", help="Print the result as JSON on stdout (messages on stderr).")
]
QuietOpt = Annotated[
    bool, _flag("--quiet", "-q", help="Errors only: no progress, notes or warnings.")
]


def _device_opt(section: str) -> Any:
    return Annotated[
        str | None, typer.Option(help=f"auto, cpu, cuda, cuda:N or mps. {shown(section, 'device')}")
    ]


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    """One clear line on stderr, then a documented exit code; never a traceback."""
    views.error(message)
    raise typer.Exit(code)


def settings_or_exit(section: str, config: Path | None, **flags: Any):
    from threengan_cli.settings import SettingsError, resolve

    try:
        return resolve(section, config, **flags)
    except SettingsError as exc:
        fail(str(exc), EXIT_USAGE)


def _version_callback(value: bool) -> None:
    if value:
        print(f"threengan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Show the version and exit.",
            callback=_version_callback,
            is_eager=True,
            metavar="",
        ),
    ] = False,
) -> None:
    """3N-GAN: semi-supervised X-ray classification from the command line."""


# --------------------------------------------------------------------------------------- info
@command()
def info(as_json: JsonOpt = False) -> None:
    """What a bug report needs: versions, devices, CPU features, the data directory.

    [bold]Examples[/]

      threengan info

      threengan info --json > info.json
    """
    from threengan_cli.system import describe

    facts = describe()
    if as_json:
        print_json(facts)
    else:
        views.info_table(facts)


# ------------------------------------------------------------------------------------ prepare
def _prepare_target(source: Path, name: str | None, out_dir: Path | None) -> Path:
    from threengan_cli import paths

    if out_dir is not None:
        return out_dir
    try:
        return paths.datasets_dir() / paths.check_name(name or source.stem)
    except ValueError as exc:
        fail(f"{exc} (choose one with --name)", EXIT_USAGE)


def _prepare_notes(report, quiet: bool) -> None:
    """What prepare did besides the table: skipped files, empty splits, val, duplicates."""
    if quiet:
        return
    for path, reason in report.skipped[:MAX_LISTED]:
        warn(f"skipped {path}: {reason}")
    if len(report.skipped) > MAX_LISTED:
        warn(f"... and {len(report.skipped) - MAX_LISTED} more skipped files")
    for split, row in report.counts.items():
        if not sum(row.values()):
            warn(f"the {split} split is empty")
    note(f"val: {report.val_note}")
    note(
        f"duplicates dropped from train/val: {len(report.duplicates_dropped)}; "
        f"duplicates inside test (kept): {len(report.test_duplicates)}; "
        f"train/val images also in test (removed): {len(report.leakage_removed)}"
    )
    note(f"wrote {report.path} in {report.seconds:.1f} s")
    if report.skipped:
        warn(f"{len(report.skipped)} files skipped ({len(report.unreadable)} unreadable images)")


@command(cls=_Command)
def prepare(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="SOURCE",
            help="A folder of class folders, a folder of train/ val/ test/ class folders, "
            "a MedMNIST .npz, or a CSV of path,label[,split].",
            exists=True,
            show_default=False,
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option(help="Dataset name under the data dir \\[default: the source's name]."),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Write the dataset to this folder instead (overrides --name).",
            file_okay=False,
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Side of the square images, px: a power of two (8, 16, 32, 64, ...), the "
            f"sizes train builds networks for. {shown('prepare', 'image_size')}"
        ),
    ] = None,
    fit: Annotated[
        str | None,
        typer.Option(
            help="Non-square images: squash (resize, as the paper), crop (centre "
            f"square) or pad (black borders). {shown('prepare', 'fit')}"
        ),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(
            help="Share of train carved as a patient-grouped val split when the "
            f"source has none, or one smaller than --min-val. {shown('prepare', 'val_fraction')}"
        ),
    ] = None,
    min_val: Annotated[
        int | None,
        typer.Option(
            help="A source val split with fewer images is replaced by a carved one. "
            f"{shown('prepare', 'min_val')}"
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=f"Seed of the val carve. {shown('prepare', 'seed')}")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help=f"Decoding processes; 0 = all cores. {shown('prepare', 'workers')}"),
    ] = None,
    patient_pattern: Annotated[
        str | None,
        typer.Option(
            help="Regex whose first group is the patient id, searched in file names "
            "\\[default: Kermany's person<id>_ / IM-<id>-]."
        ),
    ] = None,
    strict: Annotated[
        bool | None,
        _flag(
            "--strict",
            help="Fail (exit 1, nothing written) if any image file "
            "cannot be read. Non-image names such as .DS_Store never count.",
        ),
    ] = None,
    force: Annotated[bool, _flag("--force", help="Replace an existing prepared dataset.")] = False,
    config: _config_opt("prepare") = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Read a source of X-rays once into a dataset that training loads whole.

    Every image becomes 8-bit grayscale at the model size: PNG, JPEG,
    BMP, TIFF, 16-bit, and DICOM with the [bold]dicom[/] extra.

    Exact duplicates are dropped from train/val; duplicates inside test/
    are reported and kept; images in both train and test leave train.
    A val split is carved from train, grouped by patient, when the
    source has none or a tiny one (Kermany's public val/ has 16 images).

    Unreadable files are skipped and listed: exit 0 with a warning,
    or exit 1 (nothing written) under --strict.

    [bold]Examples[/]

      threengan prepare ~/data/chest_xray --name kermany

      threengan prepare chestmnist.npz --image-size 32 --json > report.json

      threengan prepare labels.csv --out ./prepared/xr --force
    """
    from threengan_cli.datasets import DatasetError
    from threengan_cli.datasets import prepare as run_prepare

    cfg = settings_or_exit(
        "prepare",
        config,
        image_size=image_size,
        fit=fit,
        val_fraction=val_fraction,
        min_val=min_val,
        seed=seed,
        workers=workers,
        patient_pattern=patient_pattern,
        strict=strict,
    )
    target = _prepare_target(source, name, out_dir)
    view = views.BarView(not quiet and err.is_terminal, "decoding", counted=True)
    try:
        report = run_prepare(source, target, cfg, force=force, on_progress=view.update)
    except DatasetError as exc:
        view.close()
        fail(str(exc))
    finally:
        view.close()

    if as_json:
        print_json(report.to_dict())
    elif not quiet:
        views.prepare_table(target.name, report, cfg.image_size)
    _prepare_notes(report, quiet)


# ----------------------------------------------------------------------------------- datasets
@command()
def datasets(as_json: JsonOpt = False) -> None:
    """List the prepared datasets in the data dir.

    [bold]Examples[/]

      threengan datasets

      threengan datasets --json
    """
    from threengan_cli.datasets import list_prepared

    found = list_prepared()
    if as_json:
        print_json(found)
    elif not found:
        note("no prepared datasets yet: run `threengan prepare SOURCE`")
    else:
        views.datasets_table(found)


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


def _prepared_or_exit(dataset: str) -> Path:
    from threengan_cli import paths

    dataset_dir = paths.resolve_dataset(dataset)
    if not (dataset_dir / "manifest.json").is_file():
        fail(
            f"no prepared dataset {dataset!r} (looked in {dataset_dir}); "
            "run `threengan prepare SOURCE --name NAME` first",
            EXIT_USAGE,
        )
    return dataset_dir


def _resume_plan(resume: str, flags: dict[str, Any], given_other: bool):
    """(settings, dataset folder, run folder) of the run to continue; only --epochs may
    change."""
    import json

    from threengan_cli import paths

    run_dir = paths.resolve_run(resume)
    if not (run_dir / "settings.json").is_file():
        fail(f"no run to resume at {run_dir}", EXIT_USAGE)
    changed = sorted(k for k, v in flags.items() if v is not None and k != "epochs")
    if changed or given_other:
        fail(
            "--resume continues a run with its own data and settings; only --epochs may "
            f"be given (got {', '.join(changed) or 'a dataset or --config'})",
            EXIT_USAGE,
        )
    try:
        saved = json.loads((run_dir / "settings.json").read_text())
        run_meta = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError) as exc:
        fail(f"cannot resume {run_dir}: {exc}")
    if flags["epochs"] is not None:
        saved["epochs"] = flags["epochs"]
    return settings_or_exit("train", None, **saved), Path(run_meta["dataset"]), run_dir


def _new_run_plan(dataset: str | None, flags: dict[str, Any], config, name, out_dir):
    """(settings, dataset folder, run folder) of a new run; an existing run is refused."""
    if dataset is None:
        fail("give a prepared DATASET to train on (see `threengan datasets`)", EXIT_USAGE)
    cfg = settings_or_exit("train", config, **flags)
    dataset_dir = _prepared_or_exit(dataset)
    run_dir = _run_dir_for(dataset, cfg, name, out_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        fail(f"{run_dir} already holds a run: use --resume {run_dir} or another --name", EXIT_USAGE)
    return cfg, dataset_dir, run_dir


def _metric(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else f"{value:.4f}"


def _train_done_line(summary: dict, run_dir: Path) -> str:
    test = summary.get("test") or {}
    where = f"summary in {run_dir / 'summary.json'}"
    if not test.get("n"):
        return f"done in {summary['elapsed_s']:.0f}s: no test split ({where})"
    return (
        f"done in {summary['elapsed_s']:.0f}s: test accuracy {_metric(test, 'accuracy')}, "
        f"AUC {_metric(test, 'auc')}, sensitivity {_metric(test, 'sensitivity')}, "
        f"specificity {_metric(test, 'specificity')} (final epoch; {where})"
    )


@command(cls=_Command)
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
        typer.Option(help=f"3ngan, ecgan, sgan or vanilla. {shown('train', 'method')}"),
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
    device: _device_opt("train") = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="fp32 or bf16 (bf16 pays on CPUs with AVX512-BF16/AMX). "
            f"{shown('train', 'precision')}"
        ),
    ] = None,
    cuda_graphs: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            help="On CUDA, replay each step from a captured CUDA graph. "
            f"{shown('train', 'cuda_graphs')}",
            metavar="",
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
    config: _config_opt("train") = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a model on a prepared dataset; each epoch is evaluated on its val split.

    The run folder gets settings.json, metrics.jsonl (one line per epoch), samples/ (images
    from a fixed latent batch), last.safetensors (resumable), best.safetensors (best val
    accuracy) and summary.json (test metrics, computed once at the end). Ctrl+C saves a
    resumable checkpoint and exits 130.

    [bold]Examples[/]

      threengan train kermany --method 3ngan --size 200 --epochs 3

      threengan train kermany --method vanilla --size 1000 --seed 1 --name van-1000-s1

      threengan train --resume van-1000-s1 --epochs 150
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
    }
    if resume is not None:
        given_other = config is not None or dataset is not None
        cfg, dataset_dir, run_dir = _resume_plan(resume, flags, given_other)
    else:
        cfg, dataset_dir, run_dir = _new_run_plan(dataset, flags, config, name, out_dir)

    from threengan_cli import training
    from threengan_cli.checkpoints import CheckpointError
    from threengan_cli.datasets import DatasetError

    view = views.TrainView(quiet)
    try:
        summary = training.train(
            dataset_dir, cfg, run_dir, resume=resume is not None, on_event=view
        )
    except training.Interrupted as exc:
        view.close()
        note(f"interrupted: {exc}. Continue with: threengan train --resume {run_dir}")
        raise typer.Exit(EXIT_INTERRUPT) from None
    except (training.TrainingError, CheckpointError, DatasetError, ValueError) as exc:
        view.close()
        fail(str(exc))
    finally:
        view.close()
    if summary.get("extended") and not quiet:
        note(f"extended the finished run to {cfg.epochs} epochs")
    if as_json:
        print_json(summary)
    elif not quiet:
        note(_train_done_line(summary, run_dir))


# ----------------------------------------------------------------------------------- classify
RunOpt = Annotated[
    str | None,
    typer.Option("--run", help="Use the best checkpoint of this training run (name or folder)."),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Use this .safetensors checkpoint file.", dir_okay=True),
]


def _loaded_or_exit(load: Any) -> Any:
    """``load()``, with a missing model as a usage error (2) and a bad one as a failure (1)."""
    from threengan_cli.modelfile import ModelError, ModelNotFound

    try:
        return load()
    except ModelNotFound as exc:
        fail(str(exc), EXIT_USAGE)
    except ModelError as exc:
        fail(str(exc))


def _load_model_or_exit(checkpoint: Path | None, run: str | None, device: str):
    from threengan_cli.inference import load_model

    return _loaded_or_exit(lambda: load_model(checkpoint, run, device))


def _load_classifier_or_exit(checkpoint: Path | None, run: str | None, device: str, engine: str):
    """On the CPU (``auto`` or ``cpu``) the NumPy classifier unless ``engine`` is torch: it
    never imports torch (3-4 s of start-up on a small CPU). On ``cuda``/``mps`` torch's."""
    if device not in ("auto", "cpu") or engine == "torch":
        return _load_model_or_exit(checkpoint, run, "cpu" if device == "auto" else device)
    from threengan_cli import npclassifier

    return _loaded_or_exit(lambda: npclassifier.load(checkpoint, run))


def _classify_format(fmt: str | None, output: Path | None) -> str:
    from threengan_cli.rows import FORMATS, SUFFIX_FORMATS

    if fmt is None:
        if output is not None:
            fmt = SUFFIX_FORMATS.get(output.suffix.lower(), "csv")
        else:
            fmt = "table" if sys.stdout.isatty() else "csv"
    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})", EXIT_USAGE)
    return fmt


class _ClassifyTally:
    """Counts rows as they stream past, and lists the first unreadable inputs on stderr."""

    def __init__(self, listing: bool):
        self.counts = {"inputs": 0, "classified": 0, "errors": 0}
        self.listing, self.listed = listing, 0

    def add(self, row) -> None:
        self.counts["inputs"] += 1
        if row.ok:
            self.counts["classified"] += 1
            return
        self.counts["errors"] += 1
        if self.listing and self.listed < MAX_LISTED:
            warn(f"{row.path}: {row.error}")
            self.listed += 1


def _classify_stream(inputs, model, cfg, fmt: str, output: Path | None, tally, view) -> None:
    """Classify ``inputs`` into ``output`` (complete or not at all) or stdout."""
    from threengan_cli import fileio
    from threengan_cli.classify import classify as run_classify
    from threengan_cli.rows import RowWriter

    def consume(stream) -> None:
        writer = RowWriter(fmt, stream, model, cfg.threshold)
        writer.begin()
        rows = run_classify(
            inputs,
            model,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            threshold=cfg.threshold,
            recursive=cfg.recursive,
        )
        for row in rows:
            writer.write(row)
            tally.add(row)
            view.update(tally.counts["inputs"])
        writer.end(tally.counts)

    if output is not None:
        with fileio.atomic_file(output, "w") as fh:
            consume(fh)
    else:
        consume(sys.stdout)


@command(cls=_Command)
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
        _flag("--recursive", "-r", help="Look in sub-folders of folders too."),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="table, csv, json or jsonl \\[default: from --output's suffix; else table "
            "on a terminal, csv when piped].",
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
            help="Images per forward pass and per decoding job. "
            f"{shown('classify', 'batch_size')}"
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
    config: _config_opt("classify") = None,
    quiet: QuietOpt = False,
) -> None:
    """Classify X-ray images with a trained model: one row per input file.

    Without --run or --checkpoint the bundled default model is used.
    Columns: path, label, p_<class> for each class, error. A file that
    cannot be read gets a row with its error and no label. Rows come in
    input order; folder contents sorted by name, files before sub-folders.

    Data goes to stdout (or --output), messages to stderr. The model id
    and threshold are printed on stderr; --format json also puts them in
    its header: {"model", "method", "threshold", "classes", "image_size",
    "rows": [...], "summary"}.

    Exit codes: 0 every input classified, 3 some could not be read,
    1 none could (or no model), 2 usage error (no PATH, bad option,
    --checkpoint or --run that does not exist).

    [bold]Examples[/]

      threengan classify scan1.jpg scan2.png --run my-run

      threengan classify ~/xrays -r -o results.csv

      find /data -name '*.dcm' | threengan classify - -f jsonl > out.jsonl

      threengan classify 'batch/*.jpg' --threshold 0.7 --format json
    """
    if not inputs:
        fail(
            "give at least one PATH (a file, folder or glob), or - to read paths from stdin",
            EXIT_USAGE,
        )
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
    )
    fmt = _classify_format(cfg.format, output)
    if inputs.count("-") > 1:
        fail("- (paths from stdin) may be given once", EXIT_USAGE)

    from threengan_cli.modelfile import ModelError

    model = _load_classifier_or_exit(checkpoint, run, cfg.device, cfg.engine)
    try:
        model.require_classifier()
    except ModelError as exc:
        fail(str(exc))
    if not quiet:
        note(
            f"model {model.model_id} ({model.method}, {model.image_size}px, classes "
            f"{', '.join(model.classes)}), threshold {cfg.threshold}, device {model.device}"
        )

    tally = _ClassifyTally(listing=not quiet and fmt != "table")
    view = views.BarView(not quiet and err.is_terminal, "classifying")
    try:
        _classify_stream(inputs, model, cfg, fmt, output, tally, view)
    except KeyboardInterrupt:
        view.close()
        kept = f"; nothing written to {output}" if output is not None else ""
        note(f"interrupted after {tally.counts['inputs']} inputs{kept}")
        raise typer.Exit(EXIT_INTERRUPT) from None
    except ModelError as exc:
        view.close()
        fail(str(exc))
    finally:
        view.close()

    counts = tally.counts
    if counts["inputs"] == 0:
        fail("nothing to classify (no paths were given on stdin)")
    if counts["classified"] == 0:
        fail(f"none of the {counts['inputs']} inputs could be classified")
    if not quiet:
        where = f" -> {output}" if output is not None else ""
        note(f"classified {counts['classified']} of {counts['inputs']} inputs{where}")
    if counts["errors"]:
        if not quiet:
            if tally.listing and tally.listed < counts["errors"]:
                warn(f"... and {counts['errors'] - tally.listed} more")
            warn(f"{counts['errors']} inputs could not be classified (see the error column)")
        raise typer.Exit(EXIT_PARTIAL)


# ----------------------------------------------------------------------------------- generate
@command()
def generate(
    run: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    count: Annotated[
        int | None, typer.Option(help=f"Images to make. {shown('generate', 'count')}")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for gen_00000.png ...; must not exist or be empty "
            "\\[default: ./generated, unless only --grid is given].",
            file_okay=False,
        ),
    ] = None,
    grid: Annotated[
        Path | None,
        typer.Option(
            "--grid", help="Also write a PNG grid of the first (up to 64) images.", dir_okay=False
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=f"Same seed, same images. {shown('generate', 'seed')}")
    ] = None,
    label: Annotated[
        bool,
        _flag(
            "--label",
            help="Label each image with the classifier: one sub-folder per "
            "class, uncertain/ below --tau, and labels.csv.",
        ),
    ] = False,
    tau: Annotated[
        float | None,
        typer.Option(
            help="With --label: least top probability to count as labelled. "
            f"{shown('generate', 'tau')}"
        ),
    ] = None,
    device: _device_opt("generate") = None,
    config: _config_opt("generate") = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Make synthetic X-rays with a trained generator (8-bit grayscale PNGs).

    Without --run or --checkpoint the bundled default model is used. The
    output folder appears complete or not at all; the same seed gives the
    same images. With --label the model's classifier sorts the images into
    one sub-folder per class, and into uncertain/ where its top probability
    is below --tau, and writes labels.csv (file, label, p_<class>...): the
    pseudo-labels 3N-GAN trains its classifier on.

    [bold]Examples[/]

      threengan generate --run my-run --count 500 --out synth

      threengan generate --run my-run --grid samples.png --seed 7

      threengan generate --run my-run --count 1000 --label --out labelled
    """
    cfg = settings_or_exit("generate", config, count=count, seed=seed, tau=tau, device=device)
    if out_dir is None and grid is None:
        out_dir = Path("generated")
    if label and out_dir is None:
        fail("--label sorts images into folders: give --out DIR as well", EXIT_USAGE)

    from threengan_cli.generate import GenerateError
    from threengan_cli.generate import generate as run_generate
    from threengan_cli.inference import ModelError

    model = _load_model_or_exit(checkpoint, run, cfg.device)
    total = cfg.count if out_dir is not None else min(cfg.count, 64)
    view = views.BarView(not quiet and err.is_terminal, "generating", total=total)
    try:
        result = run_generate(
            model,
            cfg.count,
            cfg.seed,
            out_dir,
            grid,
            label=label,
            tau=cfg.tau,
            on_progress=view.update,
        )
    except KeyboardInterrupt:
        view.close()
        note("interrupted; nothing was written")
        raise typer.Exit(EXIT_INTERRUPT) from None
    except GenerateError as exc:
        view.close()
        fail(str(exc), EXIT_USAGE)
    except ModelError as exc:
        view.close()
        fail(str(exc))
    finally:
        view.close()
    if as_json:
        print_json(result.as_dict())
    elif not quiet:
        made = f"wrote {result.count} images to {result.out_dir}" if result.out_dir else ""
        if result.labels:
            made += " (" + ", ".join(f"{k}: {v}" for k, v in result.labels.items()) + ")"
        if result.grid:
            made += ("; " if made else "wrote ") + f"grid {result.grid}"
        note(f"{made} with {model.model_id}, seed {result.seed}")


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
    from threengan_cli import benchmark as bench
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
        return bench.resolve_settings(chosen, **values)
    except (SettingsError, ValueError) as exc:
        fail(str(exc), EXIT_USAGE)


def _bench_merge(args: list[str], out_dir: Path | None, given: dict[str, Any]):
    from threengan_cli import benchmark as bench

    extra = [k for k, v in given.items() if v is not None]
    if extra:
        fail(f"merge takes only DIR... --out DIR (got {', '.join(extra)})", EXIT_USAGE)
    if len(args) < 2 or out_dir is None:
        fail("merge needs the benchmark folders to join and --out DIR", EXIT_USAGE)
    try:
        return bench.merge([Path(a) for a in args[1:]], out_dir), out_dir
    except bench.BenchmarkError as exc:
        fail(str(exc))


def _bench_run(dataset: str, cfg, shard: str | None, out_dir, parallel, quiet: bool):
    from threengan_cli import benchmark as bench
    from threengan_cli import paths, training
    from threengan_cli.checkpoints import CheckpointError
    from threengan_cli.datasets import DatasetError

    try:
        shard_ij = bench.parse_shard(shard) if shard is not None else (1, 1)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    dataset_dir = _prepared_or_exit(dataset)
    target = out_dir or paths.home() / "benchmarks" / f"{dataset_dir.name}-{cfg.profile}"
    view = views.BenchView(quiet)
    hint = f"finished runs are kept in {target}; run the same command again to resume"
    try:
        results = bench.run(
            dataset_dir, cfg, target, shard=shard_ij, on_event=view, parallel=parallel
        )
    except (training.Interrupted, KeyboardInterrupt):
        view.close()
        note(f"interrupted: {hint}")
        raise typer.Exit(EXIT_INTERRUPT) from None
    except (bench.BenchmarkError, training.TrainingError, CheckpointError, DatasetError) as exc:
        view.close()
        fail(str(exc))
    finally:
        view.close()
    if shard_ij[1] > 1 and not quiet:
        note(f"shard {shard}: join the shards with: threengan benchmark merge DIR... --out DIR")
    return results, target


@command(cls=_Command)
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
            help="Comma-separated: vanilla, sgan, ecgan, 3ngan, 3ngan-nokl, 3ngan-nogc, "
            "3ngan-pairkl. \\[default: the profile's]"
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
    device: _device_opt("benchmark") = None,
    precision: Annotated[
        str | None, typer.Option(help=f"fp32 or bf16. {shown('benchmark', 'precision')}")
    ] = None,
    ablate: Annotated[
        bool | None,
        _flag(
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
    config: _config_opt("benchmark") = None,
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
    }
    if args[0] == "merge":
        given = {f"--{k.replace('_', '-')}": v for k, v in flags.items()}
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
    if failed:
        if not quiet:
            warn(f"{failed} run(s) failed (a loss became non-finite); see report.md")
        raise typer.Exit(EXIT_PARTIAL)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        note("interrupted")
        sys.exit(EXIT_INTERRUPT)


if __name__ == "__main__":
    main()
