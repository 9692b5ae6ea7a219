"""The command line: parse, resolve settings, call one engine function, render the result.

This is the only module that imports typer or rich. Heavy libraries (torch, numpy, PIL)
are imported inside the commands so that ``threengan --help`` stays instant.

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

import importlib
import json
import sys
import types
from pathlib import Path
from typing import Annotated, Any, NoReturn


def _defer_import(module: str, *names: str) -> None:
    """Keep ``module`` from loading until one of ``names`` from it is used.

    typer's help renderer imports ``rich.markdown`` (and markdown-it with it), for a markup
    mode threengan does not use, and ``rich.traceback`` (and pygments with it), for crashes
    only. Measured with ``python -X importtime -m threengan_cli --help``, the two are about
    40% of ``threengan --help``. Each name is a stand-in class: calling it, or reading an
    attribute of it (``Traceback.from_exception``), loads the real module and hands over.
    """
    if module in sys.modules:
        return

    def real() -> types.ModuleType:
        if sys.modules.get(module) is placeholder:
            del sys.modules[module]
        return importlib.import_module(module)

    class Forward(type):
        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            return getattr(real(), cls.__name__)(*args, **kwargs)

        def __getattr__(cls, attr: str) -> Any:
            return getattr(getattr(real(), cls.__name__), attr)

    def attribute(name: str) -> Any:
        if name.startswith("__"):  # the import system probing (__path__, __file__...)
            raise AttributeError(name)
        return getattr(real(), name)

    placeholder = types.ModuleType(module)
    for name in names:
        setattr(placeholder, name, Forward(name, (), {}))
    placeholder.__getattr__ = attribute  # type: ignore[method-assign]
    sys.modules[module] = placeholder


_defer_import("rich.markdown", "Markdown")
_defer_import("rich.traceback", "Traceback")

import typer  # noqa: E402  (after the placeholder above)

from threengan_cli import __version__  # noqa: E402

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPT = 0, 1, 2, 3, 130

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


# Messages and progress go to stderr; stdout carries only data (JSON, CSV, tables asked for).
class _LazyConsole:
    """A rich Console made on first use: importing rich.console costs ~40 ms of every start."""

    def __init__(self, **options: Any):
        self._options, self._console = options, None

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


err = _LazyConsole(stderr=True, highlight=False)
out = _LazyConsole(highlight=False, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML file with settings (\\[prepare], \\[train], ... tables); flags override it.",
        dir_okay=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout (messages on stderr).")
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps. \\[default: auto]")
]


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    """One clear line on stderr, then a documented exit code; never a traceback."""
    from rich.markup import escape  # a path like a[b] must print as written

    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def note(message: str) -> None:
    err.print(message, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


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
        ),
    ] = False,
) -> None:
    """3N-GAN: semi-supervised X-ray classification from the command line."""


# --------------------------------------------------------------------------------------- info
@app.command()
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
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        shown = ", ".join(value) if isinstance(value, list) else str(value)
        table.add_row(f"[bold]{key}[/]", shown)
    out.print(table)


# ------------------------------------------------------------------------------------ prepare
MAX_LISTED = 20


@app.command()
def prepare(
    source: Annotated[
        Path,
        typer.Argument(
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
        int | None, typer.Option(help="Side of the square images, px \\[default: 64].")
    ] = None,
    fit: Annotated[
        str | None,
        typer.Option(
            help="Non-square images: squash (resize, as the paper), crop (centre "
            "square) or pad (black borders) \\[default: squash]."
        ),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(
            help="Share of train carved as a patient-grouped val split when the "
            "source has none, or one smaller than min_val \\[default: 0.1]."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the val carve \\[default: 0].")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Decoding processes; 0 = all cores \\[default: 0].")
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
        typer.Option(
            "--strict",
            help="Fail (exit 1, nothing written) if any image file "
            "cannot be read. Non-image names such as .DS_Store never count.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing prepared dataset.")
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or notes; warnings only.")
    ] = False,
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

    Preparing the same source (same files, sizes and times) with the
    same settings again says "up to date" and exits 0 without work; a
    different source or settings needs --force.

    [bold]Examples[/]

      threengan prepare ~/data/chest_xray --name kermany

      threengan prepare chestmnist.npz --image-size 28 --json > report.json

      threengan prepare labels.csv --out ./prepared/xr --force
    """
    from threengan_cli import paths
    from threengan_cli.datasets import DatasetError
    from threengan_cli.datasets import prepare as run_prepare

    cfg = settings_or_exit(
        "prepare",
        config,
        image_size=image_size,
        fit=fit,
        val_fraction=val_fraction,
        seed=seed,
        workers=workers,
        patient_pattern=patient_pattern,
        strict=strict,
    )
    if out_dir is not None:
        target = out_dir
    else:
        try:
            target = paths.datasets_dir() / paths.check_name(name or source.stem)
        except ValueError as exc:
            fail(f"{exc} (choose one with --name)", EXIT_USAGE)

    progress = None
    if not quiet and err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err.console,
            transient=True,
        )
    task_id = None

    def on_progress(done: int, total: int) -> None:
        nonlocal task_id
        if progress is None:
            return
        if task_id is None:
            task_id = progress.add_task("decoding", total=total)
        progress.update(task_id, completed=done)

    try:
        if progress is not None:
            with progress:
                report = run_prepare(source, target, cfg, force=force, on_progress=on_progress)
        else:
            report = run_prepare(source, target, cfg, force=force)
    except DatasetError as exc:
        fail(str(exc))

    if report.up_to_date:
        if as_json:
            print_json(report.to_dict())
        if not quiet:
            note(
                f"{target} is up to date: prepared from the same source with the same "
                "settings (--force prepares it again)"
            )
        return
    for path, reason in report.skipped[:MAX_LISTED]:
        warn(f"skipped {path}: {reason}")
    if len(report.skipped) > MAX_LISTED:
        warn(f"... and {len(report.skipped) - MAX_LISTED} more skipped files")
    if as_json:
        print_json(report.to_dict())
    else:
        from rich.table import Table

        table = Table(title=f"{target.name}: {report.total} images, {cfg.image_size}px")
        table.add_column("split")
        for cls in report.classes:
            table.add_column(cls, justify="right")
        table.add_column("total", justify="right")
        table.add_column("patients", justify="right")
        for split, row in report.counts.items():
            table.add_row(
                split,
                *(str(row[c]) for c in report.classes),
                str(sum(row.values())),
                str(report.patients.get(split, 0)),
            )
        out.print(table)
    if not quiet:
        note(f"val: {report.val_note}")
        note(
            f"duplicates dropped from train/val: {len(report.duplicates_dropped)}; "
            f"duplicates inside test (kept): {len(report.test_duplicates)}; "
            f"train/val images also in test (removed): {len(report.leakage_removed)}"
        )
        note(f"wrote {report.path} in {report.seconds:.1f} s")
    if report.skipped:
        warn(f"{len(report.skipped)} files skipped ({len(report.unreadable)} unreadable images)")


# ----------------------------------------------------------------------------------- datasets
@app.command()
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
        return
    if not found:
        note("no prepared datasets yet: run `threengan prepare SOURCE`")
        return
    from rich.table import Table

    table = Table()
    for column in ("name", "images", "train", "val", "test", "size", "classes", "path"):
        table.add_column(column, justify="right" if column in ("images", "size") else "left")
    for d in found:
        if "error" in d:
            table.add_row(d["name"], "", "", "", "", "", f"[red]{d['error']}[/]", d["path"])
            continue
        s = d["splits"]
        table.add_row(
            d["name"],
            str(d["images"]),
            str(s.get("train", 0)),
            str(s.get("val", 0)),
            str(s.get("test", 0)),
            str(d["image_size"]),
            ", ".join(d["classes"]),
            d["path"],
        )
    out.print(table)


# --------------------------------------------------------------------------------------- runs
@app.command()
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
        typer.Option(
            "--prune-last",
            help="Delete the resumable last.safetensors of finished runs, keeping their "
            "final weights in final.safetensors (--run keeps working; only extending the run "
            "needs what is deleted).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors only.")] = False,
) -> None:
    """List the training runs in the data dir: name, method, N, epochs done/planned,
    state (finished, running, stopped), val and test accuracy, size on disk.

    Runs of benchmarks are listed as BENCHMARK/RUN. A run counts as
    running when it wrote to its folder in the last 10 minutes.

    [bold]Examples[/]

      threengan runs

      threengan runs --json

      threengan runs --prune-last   [dim]# free ~100 MB per finished 3ngan run[/]
    """
    from threengan_cli import runlist
    from threengan_cli.modelfile import CheckpointError

    found = runlist.list_runs()
    if names:
        known = {r.name for r in found}
        missing = [n for n in names if n not in known]
        if missing:
            fail(f"no run named {missing[0]} (see `threengan runs`)", EXIT_USAGE)
        found = [r for r in found if r.name in names]
    pruned = []
    if prune_last:
        for run in found:
            try:
                done = runlist.prune_last(run)
            except (OSError, CheckpointError) as exc:
                fail(f"cannot prune {run.name}: {exc}")
            if done is not None:
                pruned.append(done)
        found = [runlist.read_run(Path(r.path), r.name) for r in found]
    if as_json:
        rows = [r.to_dict() for r in found]
        print_json({"runs": rows, "pruned": [vars(p) for p in pruned]} if prune_last else rows)
    elif found:
        from rich import box
        from rich.markup import escape
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD)
        for column in ("name", "method", "N", "epochs", "state", "val acc", "test acc", "size"):
            right = column in ("N", "epochs", "val acc", "test acc", "size")
            table.add_column(column, justify="right" if right else "left")

        def acc(value) -> str:
            return "–" if value is None else f"{value:.4f}"

        for r in found:
            table.add_row(
                escape(r.name),
                r.method or "?",
                str(r.size or "all"),
                f"{r.epochs_done}/{r.epochs_planned or '?'}",
                r.state,
                acc(r.val_accuracy),
                acc(r.test_accuracy),
                runlist.human_bytes(r.bytes),
            )
        out.print(table)
    elif not quiet:
        note("no runs yet: run `threengan train DATASET`")
    if prune_last and not quiet:
        freed = sum(p.freed_bytes for p in pruned)
        note(
            f"pruned {len(pruned)} finished run(s), freed {runlist.human_bytes(freed)}"
            if pruned
            else "nothing to prune: no finished run keeps a last.safetensors"
        )


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


class _LiveView:
    """Progress of a long command on stderr: a live bar on a terminal (``self.progress``,
    started by the subclass), plain lines otherwise, nothing with ``quiet``."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.live = err.is_terminal and not quiet
        self.progress: Any = None
        self.task: Any = None

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class _TrainView(_LiveView):
    """Renders training events: a live bar on a terminal, one line per epoch otherwise."""

    def __call__(self, event) -> None:
        from threengan_cli import training as t

        if self.quiet:
            return
        if isinstance(event, t.RunStarted):
            what = "extending" if event.extended else "resuming" if event.resumed else "training"
            note(
                f"{what} {event.method} on {event.train_images} images, "
                f"{event.steps_per_epoch} steps/epoch, epochs {event.start_epoch + 1}.."
                f"{event.epochs}, device {event.device} -> {event.run_dir}"
            )
            if self.live:
                self._start(event)
        elif isinstance(event, t.StepDone) and self.progress is not None:
            done = event.epoch * event.steps + event.step
            self.progress.update(self.task, completed=done, epoch=f"{event.epoch + 1}")
        elif isinstance(event, t.EpochDone):
            line = _epoch_line(event)
            if self.progress is not None:
                self.progress.update(self.task, info=line)
            else:
                note(line)
        elif isinstance(event, t.RunFinished):
            self.close()

    def _start(self, event) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=err.console,
            transient=False,
        )
        total = event.steps_per_epoch * event.epochs
        self.task = self.progress.add_task(
            "train",
            total=total,
            completed=event.start_epoch * event.steps_per_epoch,
            epoch=str(event.start_epoch + 1),
            epochs=str(event.epochs),
            rate="",
            info="",
        )
        self.batch = event.train_images / max(event.steps_per_epoch, 1)
        self.progress.start()


def _epoch_line(event) -> str:
    rec = event.record
    losses = " ".join(f"{k}={v:.3f}" for k, v in rec["train"].items())
    val = rec.get("val") or {}
    acc = f" val_acc={val['accuracy']:.4f}" if "accuracy" in val else ""
    auc = f" val_auc={val['auc']:.4f}" if val.get("auc") is not None else ""
    return (
        f"epoch {rec['epoch']}/{event.epochs} {losses}{acc}{auc} "
        f"{rec['images_per_s']:.1f} img/s {rec['seconds']:.1f}s"
    )


@app.command()
def train(
    dataset: Annotated[
        str | None,
        typer.Argument(help="Prepared dataset: a name from `threengan datasets` or a folder."),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="3ngan, ecgan, sgan or vanilla. \\[default: 3ngan]")
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(help="Labelled training images N (N/2 per class, by seed). \\[default: all]"),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Passes over the N images. \\[default: 100]")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Mini-batch size. \\[default: 10]")] = None,
    tau: Annotated[
        float | None, typer.Option(help="Pseudo-label confidence. \\[default: 0.9]")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Weight of the KL term. \\[default: 0.3]")
    ] = None,
    lam: Annotated[
        float | None, typer.Option(help="Weight of the pseudo-label loss. \\[default: 0.01]")
    ] = None,
    kl: Annotated[
        str | None,
        typer.Option(help="KL term: batch-mean, per-pair or none. \\[default: batch-mean]"),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate. \\[default: 2e-4]")] = None,
    width: Annotated[
        int | None, typer.Option(help="Network width ngf = ndf. \\[default: 64]")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of subset, init and batches. \\[default: 0]")
    ] = None,
    device: DeviceOpt = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="fp32 or bf16. On a CPU bf16 was measured slower than fp32 even where it is "
            "native (a warning) and is refused where emulated; `threengan info` says which."
        ),
    ] = None,
    cuda_graphs: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            help="On CUDA, replay each step from a captured CUDA graph. \\[default: on]",
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
    config: ConfigOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
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

      threengan train --resume van-1000-s1 --epochs 150   [dim]# continue or extend a run[/]
    """
    import json as json_mod

    from threengan_cli import paths

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
        run_dir = paths.resolve_run(resume)
        if not (run_dir / "settings.json").is_file():
            fail(f"no run to resume at {run_dir}", EXIT_USAGE)
        changed = sorted(k for k, v in flags.items() if v is not None and k != "epochs")
        if changed or config is not None or dataset is not None:
            fail(
                "--resume continues a run with its own data and settings; only --epochs may "
                f"be given (got {', '.join(changed) or 'a dataset or --config'})",
                EXIT_USAGE,
            )
        saved = json_mod.loads((run_dir / "settings.json").read_text())
        run_meta = json_mod.loads((run_dir / "run.json").read_text())
        _finished_run_or_continue(run_dir, epochs, as_json, quiet)
        if epochs is not None:
            saved["epochs"] = epochs
        cfg = settings_or_exit("train", None, **saved)
        dataset_dir = Path(run_meta["dataset"])
    else:
        if dataset is None:
            fail("give a prepared DATASET to train on (see `threengan datasets`)", EXIT_USAGE)
        cfg = settings_or_exit("train", config, **flags)
        dataset_dir = paths.resolve_dataset(dataset)
        if not (dataset_dir / "manifest.json").is_file():
            fail(
                f"no prepared dataset {dataset!r} (looked in {dataset_dir}); "
                "run `threengan prepare SOURCE --name NAME` first",
                EXIT_USAGE,
            )
        run_dir = _run_dir_for(dataset, cfg, name, out_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            fail(
                f"{run_dir} already holds a run: use --resume {run_dir} or another --name",
                EXIT_USAGE,
            )

    from threengan_cli import training
    from threengan_cli.checkpoints import CheckpointError
    from threengan_cli.datasets import DatasetError

    _warn_if_bf16_is_slower(cfg.precision, cfg.device, quiet)
    view = _TrainView(quiet)
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
    if summary.get("extended"):
        note(f"extended the finished run to {cfg.epochs} epochs")
    if as_json:
        print_json(summary)
    elif not quiet:
        _summary_note(summary, run_dir)


def _warn_if_bf16_is_slower(precision: str, device: str, quiet: bool) -> None:
    """bf16 on a CPU where it runs natively but was not measured faster than fp32 (see
    ``system.cpu_bf16_verdict``): a warning. Where it is emulated, training refuses it."""
    if precision != "bf16" or quiet or device not in ("auto", "cpu"):
        return
    from threengan_cli import system

    verdict, why = system.cpu_bf16_verdict()
    if verdict in ("slower", "unproven") and system.select_device(device).type == "cpu":
        warn(f"--precision bf16 on this CPU is likely slower than fp32: {why}")


def _summary_note(summary: dict, run_dir: Path) -> None:
    test = summary["test"]
    note(
        f"done in {summary['elapsed_s']:.0f}s: test accuracy {test.get('accuracy', 0):.4f}, "
        f"AUC {test.get('auc') or float('nan'):.4f}, sensitivity "
        f"{test.get('sensitivity', 0):.4f}, specificity {test.get('specificity', 0):.4f} "
        f"(final epoch; summary in {run_dir / 'summary.json'})"
    )


def _finished_run_or_continue(run_dir: Path, epochs: int | None, as_json: bool, quiet: bool):
    """``train --resume`` of a finished run without a larger --epochs: its summary, exit 0
    (so a CI script can run the same line twice); of a pruned one with a larger --epochs:
    a clear error. Otherwise return, and training continues."""
    from threengan_cli import runlist

    run = runlist.read_run(run_dir)
    if run.state != "finished":
        return
    if epochs is None or epochs <= run.epochs_done:
        summary = json.loads((run_dir / "summary.json").read_text())
        if as_json:
            print_json(summary)
        elif not quiet:
            note(
                f"{run_dir} already finished its {run.epochs_done} epochs; pass --epochs "
                f"larger than {run.epochs_done} to extend it"
            )
            _summary_note(summary, run_dir)
        raise typer.Exit(EXIT_OK)
    if not run.resumable:
        fail(
            f"{run_dir} cannot be extended: its resumable checkpoint was pruned "
            "(threengan runs --prune-last); train a new run instead",
            EXIT_USAGE,
        )


# ----------------------------------------------------------------------------------- classify
RunOpt = Annotated[
    str | None,
    typer.Option("--run", help="Use the best checkpoint of this training run (name or folder)."),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Use this .safetensors checkpoint file.", dir_okay=True),
]
FORMATS = ("table", "csv", "json", "jsonl")
_SUFFIX_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}


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


def _threshold_source(model, cfg) -> str:
    """Where the threshold in use comes from: given (flag or --config), model or default."""
    if "threshold" in cfg.model_fields_set:
        return "given"
    return "model" if model.stored_threshold is not None else "default"


def _threshold_of(model, cfg) -> tuple[float, str]:
    """The threshold to use and, for the note on stderr, where it comes from: a given
    --threshold (flag or --config) wins; else the one ``evaluate --threshold-from`` stored
    in the model; else the default."""
    stored = model.stored_threshold
    if "threshold" in cfg.model_fields_set or stored is None:
        return cfg.threshold, ""
    how = f"chosen on {stored.get('split', 'val')} by {stored.get('rule', '?')}"
    return float(stored["value"]), f" (the model's: {how}; --threshold overrides it)"


class _RowWriter:
    """Streams classify rows as table, csv, json or jsonl; one row at a time, never all."""

    def __init__(self, fmt: str, stream, model, threshold: float, threshold_source: str):
        self.fmt, self.stream, self.model, self.threshold = fmt, stream, model, threshold
        self.threshold_source = threshold_source
        self.classes = list(model.classes)
        self.columns = ["path", "label", *(f"p_{c}" for c in self.classes), "error"]
        self.first = True
        if fmt == "csv":
            import csv

            self.csv = csv.writer(stream, lineterminator="\n")

    def begin(self) -> None:
        if self.fmt == "csv":
            self.csv.writerow(self.columns)
        elif self.fmt == "json":
            head = json.dumps(
                {
                    "model": self.model.model_id,
                    "method": self.model.method,
                    "threshold": self.threshold,
                    "threshold_source": self.threshold_source,
                    "classes": self.classes,
                    "image_size": self.model.image_size,
                }
            )
            self.stream.write(head[:-1] + ', "rows": [')
        elif self.fmt == "table":
            self.widths = [max(5, *(len(c) for c in self.classes))] + [
                max(6, len(f"p_{c}")) for c in self.classes
            ]
            heads = ["label", *(f"p_{c}" for c in self.classes)]
            cells = [h.ljust(w) for h, w in zip(heads, self.widths, strict=True)]
            self.stream.write("  ".join([*cells, "path"]) + "\n")

    def record(self, row) -> dict[str, Any]:
        probs = row.probabilities or {}
        values = {f"p_{c}": probs.get(c) for c in self.classes}  # classify.exact's digits
        return {"path": row.path, "label": row.label, **values, "error": row.error}

    def write(self, row) -> None:
        if self.fmt == "csv":
            rec = self.record(row)
            self.csv.writerow(["" if rec[k] is None else rec[k] for k in self.columns])
        elif self.fmt == "jsonl":
            self.stream.write(json.dumps(self.record(row)) + "\n")
        elif self.fmt == "json":
            sep = "\n  " if self.first else ",\n  "
            self.stream.write(sep + json.dumps(self.record(row)))
        else:
            probs = row.probabilities or {}
            cells = [(row.label or "-").ljust(self.widths[0])] + [
                (f"{probs[c]:.4f}" if c in probs else "-").ljust(w)
                for c, w in zip(self.classes, self.widths[1:], strict=True)
            ]
            tail = f"  (error: {row.error})" if row.error else ""
            self.stream.write("  ".join([*cells, row.path]) + tail + "\n")
        self.first = False

    def end(self, summary: dict[str, int]) -> None:
        if self.fmt == "json":
            self.stream.write(
                ("\n" if not self.first else "") + '], "summary": ' + json.dumps(summary) + "}\n"
            )
        self.stream.flush()


class _RateView(_LiveView):
    """A live count with img/s on a terminal (stderr); nothing otherwise."""

    def __init__(self, enabled: bool, total: int | None = None, what: str = "classifying"):
        import time

        super().__init__(quiet=not enabled)
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        columns = [TextColumn(what), BarColumn()]
        columns += [MofNCompleteColumn()] if total else [TextColumn("{task.completed} images")]
        columns += [TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[info]}")]
        self.progress = Progress(*columns, console=err.console, transient=True)
        self.task = self.progress.add_task(what, total=total, rate="", info="")
        self.t0 = time.perf_counter()
        self.progress.start()

    def update(self, done: int, info: str = "") -> None:
        import time

        if self.progress is None:
            return
        elapsed = time.perf_counter() - self.t0
        rate = f"{done / elapsed:.0f} img/s" if elapsed > 0 else ""
        self.progress.update(self.task, completed=done, rate=rate, info=info)


@app.command()
def classify(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="PATH...",
            help="Image files, folders, glob patterns ('scans/*.jpg', quoted) or - to read "
            "paths from stdin, one per line.",
            show_default=False,
        ),
    ] = None,
    run: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    recursive: Annotated[
        bool | None,
        typer.Option("--recursive", "-r", help="Look in sub-folders of folders too."),
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
        typer.Option(help="Images per forward pass and per decoding job \\[default: 64]."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Decoding processes; 0 = all cores \\[default: 0].")
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Two classes: the second (pneumonia) when its probability is at "
            "least this \\[default: 0.5]."
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="auto or cpu: the CPU (decoding dominates at 64 px); cuda, cuda:N or mps: "
            "torch on that device \\[default: auto]."
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="On the CPU: numpy starts in under a second (no torch import); torch "
            "starts 3-4 s later and classifies long lists about 18% faster \\[default: numpy]."
        ),
    ] = None,
    sort_into: Annotated[
        Path | None,
        typer.Option(
            "--sort-into",
            help="Also copy each classified input into DIR/<label>/.",
            file_okay=False,
            metavar="DIR",
        ),
    ] = None,
    link: Annotated[
        bool,
        typer.Option(
            "--link",
            help="With --sort-into: hard-link instead of copying (a symbolic link where the "
            "file system refuses hard links).",
        ),
    ] = False,
    examples: Annotated[
        bool,
        typer.Option(
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
    config: ConfigOpt = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress or notes; errors only.")
    ] = False,
) -> None:
    """Classify X-ray images with a trained model: one row per input file.

    Without --run or --checkpoint the bundled default model is used.
    Columns: path, label, p_<class> for each class, error. A file that
    cannot be read gets a row with its error and no label. Rows come in
    input order; folder contents sorted by name, files before sub-folders.

    Data goes to stdout (or --output), messages to stderr. The model id
    and threshold are printed on stderr; --format json also puts them in
    its header: {"model", "method", "threshold", "threshold_source",
    "classes", "image_size", "rows": [...], "summary"}. A threshold that
    `evaluate --threshold-from val` stored in the model is used unless
    --threshold is given (threshold_source: given, model or default).

    Probabilities are written with the fewest digits that read back as
    the model's float32 value, and do not depend on --batch-size. A count
    per label goes to stderr. --output's suffix (.csv, .json, .jsonl,
    .ndjson) sets the format; any other suffix needs --format.

    Exit codes: 0 every input classified, 3 some could not be read,
    1 none could (or no model), 2 usage error (no PATH, bad option,
    --checkpoint or --run that does not exist).

    [bold]Examples[/]

      threengan classify --examples   [dim]# the shipped X-rays, no download[/]

      threengan classify scan1.jpg scan2.png --run my-run

      threengan classify ~/xrays -r -o results.csv

      find /data -name '*.dcm' | threengan classify - -f jsonl > out.jsonl

      threengan classify 'batch/*.jpg' --threshold 0.7 --format json

      threengan classify scans/ -r --shard 3/10 -o part-03.csv

      threengan classify inbox/ --sort-into sorted/ --link
    """
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
    cfg = settings_or_exit(
        "classify",
        config,
        batch_size=batch_size,
        workers=workers,
        threshold=threshold,
        device=device,
        engine=engine,
        recursive=recursive,
    )
    if fmt is None:
        if output is not None:
            fmt = _SUFFIX_FORMATS.get(output.suffix.lower())
            if fmt is None:
                known = ", ".join(_SUFFIX_FORMATS)
                fail(
                    f"cannot tell the format of {output} from its suffix (known: {known}); "
                    "give --format csv, json or jsonl",
                    EXIT_USAGE,
                )
        else:
            fmt = "table" if sys.stdout.isatty() else "csv"
    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})", EXIT_USAGE)
    if inputs.count("-") > 1:
        fail("- (paths from stdin) may be given once", EXIT_USAGE)
    if link and sort_into is None:
        fail("--link goes with --sort-into DIR", EXIT_USAGE)

    from threengan_cli import fileio
    from threengan_cli.classify import classify as run_classify
    from threengan_cli.classify import parse_shard
    from threengan_cli.classify import sort_into as sort_row

    try:
        shard_ij = parse_shard(shard) if shard is not None else None
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    from threengan_cli.modelfile import ModelError

    model = _load_classifier_or_exit(checkpoint, run, cfg.device, cfg.engine)
    try:
        model.require_classifier()
    except ModelError as exc:
        fail(str(exc))
    threshold, source = _threshold_of(model, cfg)
    threshold_source = _threshold_source(model, cfg)
    cfg = cfg.model_copy(update={"threshold": threshold})
    if not quiet:
        note(
            f"model {model.model_id} ({model.method}, {model.image_size}px, classes "
            f"{', '.join(model.classes)}), threshold {cfg.threshold}{source}, "
            f"device {model.device}"
        )

    counts = {"inputs": 0, "classified": 0, "errors": 0}
    per_label = dict.fromkeys(model.classes, 0)
    listed = 0
    view = _RateView(not quiet and err.is_terminal)

    def consume(stream) -> None:
        nonlocal listed
        writer = _RowWriter(fmt, stream, model, cfg.threshold, threshold_source)
        writer.begin()
        rows = run_classify(
            inputs,
            model,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            threshold=cfg.threshold,
            recursive=cfg.recursive,
            shard=shard_ij,
        )
        for row in rows:
            writer.write(row)
            counts["inputs"] += 1
            if row.ok:
                counts["classified"] += 1
                per_label[row.label] += 1
                if sort_into is not None:
                    try:
                        sort_row(row, sort_into, link=link)
                    except OSError as exc:
                        fail(f"cannot sort {row.path} into {sort_into}: {exc}")
            else:
                counts["errors"] += 1
                if not quiet and listed < MAX_LISTED and fmt != "table":
                    warn(f"{row.path}: {row.error}")
                    listed += 1
            view.update(counts["inputs"])
        writer.end({**counts, "labels": per_label})

    try:
        if output is not None:
            with fileio.atomic_file(output, "w") as fh:
                consume(fh)
        else:
            consume(sys.stdout)
    except KeyboardInterrupt:
        view.close()
        kept = f"; nothing written to {output}" if output is not None else ""
        note(f"interrupted after {counts['inputs']} inputs{kept}")
        raise typer.Exit(EXIT_INTERRUPT) from None
    except ModelError as exc:
        view.close()
        fail(str(exc))
    finally:
        view.close()

    if counts["inputs"] == 0:
        fail("nothing to classify (no paths were given on stdin)")
    if counts["classified"] == 0:
        fail(f"none of the {counts['inputs']} inputs could be classified")
    if not quiet:
        where = f" -> {output}" if output is not None else ""
        note(f"classified {counts['classified']} of {counts['inputs']} inputs{where}")
        labels = ", ".join(f"{label} {n}" for label, n in per_label.items())
        errors = f", errors {counts['errors']}" if counts["errors"] else ""
        sorted_to = f" (sorted into {sort_into})" if sort_into is not None else ""
        note(f"labels: {labels}{errors}{sorted_to}")
    if counts["errors"]:
        if not quiet and listed < counts["errors"] and fmt != "table":
            warn(f"... and {counts['errors'] - listed} more")
        warn(f"{counts['errors']} inputs could not be classified (see the error column)")
        raise typer.Exit(EXIT_PARTIAL)


# ----------------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    data: Annotated[
        str,
        typer.Argument(
            metavar="DATA",
            help="Labelled images: a prepared dataset (name or folder), a folder of class "
            "folders (or of train/ val/ test/ class folders), or a CSV of path,label[,split].",
            show_default=False,
        ),
    ],
    split: Annotated[
        str | None,
        typer.Option(
            help="train, val or test, of a prepared dataset or of split data \\[default: test]."
        ),
    ] = None,
    run: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Two classes: call the second (pneumonia) from this probability on "
            "\\[default: the model's stored threshold, else 0.5].",
        ),
    ] = None,
    threshold_from: Annotated[
        str | None,
        typer.Option(
            help="val: choose the threshold on the prepared dataset's val split by "
            "--threshold-rule, store it in the checkpoint (classify then uses it), and "
            "evaluate with it.",
        ),
    ] = None,
    threshold_rule: Annotated[
        str,
        typer.Option(
            help="youden (sensitivity + specificity - 1) or balanced-accuracy; for two "
            "classes both choose the same threshold.",
        ),
    ] = "youden",
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per forward pass and per decoding job.")
    ] = 64,
    workers: Annotated[
        int, typer.Option(min=0, help="Decoding processes; 0 = all cores.")
    ] = 0,
    device: Annotated[
        str, typer.Option(help="auto or cpu (NumPy engine, as classify), cuda, cuda:N or mps.")
    ] = "auto",
    engine: Annotated[str, typer.Option(help="On the CPU: numpy or torch, as classify.")] = "numpy",
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Write roc.png and confusion.png to this folder (needs the plot extra).",
            file_okay=False,
            metavar="DIR",
        ),
    ] = None,
    as_json: JsonOpt = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No notes; errors only.")
    ] = False,
) -> None:
    """Score a model on labelled X-rays: accuracy, balanced accuracy, AUC, sensitivity,
    specificity, F1, the confusion matrix and per-class counts.

    Without --run or --checkpoint the bundled default model is used. Files
    go through classify's own decoding and decision, so evaluate and
    classify give every image the same probabilities and label.

    --threshold-from val chooses the threshold on the val split of the
    prepared dataset DATA and stores it in the checkpoint's metadata
    (--run or --checkpoint; the bundled model is never changed): classify
    and evaluate then use it unless --threshold is given, and say so.

    Exit codes: 0 ok, 3 some images unreadable (scored without them),
    1 none readable, 2 usage error.

    [bold]Examples[/]

      threengan evaluate kermany --split test --run my-run

      threengan evaluate chest_xray/test --json > scores.json

      threengan evaluate kermany --run my-run --threshold-from val --plot plots/

      threengan evaluate labels.csv --checkpoint model.safetensors --threshold 0.7
    """
    from threengan_cli import evaluate as ev
    from threengan_cli.modelfile import CheckpointError, ModelError, update_meta

    if split is not None and split not in ("train", "val", "test"):
        fail(f"--split must be train, val or test (got {split!r})", EXIT_USAGE)
    if threshold_from not in (None, "val"):
        fail(f"--threshold-from takes val (got {threshold_from!r})", EXIT_USAGE)
    if threshold_rule not in ev.RULES:
        fail(f"--threshold-rule must be one of {', '.join(ev.RULES)}", EXIT_USAGE)
    if threshold_from is not None and threshold is not None:
        fail("give either --threshold or --threshold-from, not both", EXIT_USAGE)
    if threshold is not None and not 0.0 < threshold < 1.0:
        fail(f"--threshold must lie strictly between 0 and 1 (got {threshold})", EXIT_USAGE)
    if threshold_from is not None and checkpoint is None and run is None:
        fail(
            "--threshold-from stores the threshold in the model's checkpoint, and the bundled "
            "default model is part of the installed package: copy it (threengan info shows "
            "where it is) and pass --checkpoint COPY, or use --run",
            EXIT_USAGE,
        )
    if engine not in ("numpy", "torch"):
        fail(f"--engine must be numpy or torch (got {engine!r})", EXIT_USAGE)
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail("--plot needs matplotlib: pip install 'threengan[plot]'", EXIT_USAGE)

    model = _load_classifier_or_exit(checkpoint, run, device, engine)
    try:
        model.require_classifier()
    except ModelError as exc:
        fail(str(exc))
    try:
        data_set = ev.read_labelled(data, split, model)
        chosen = None
        if threshold is not None:
            used, source = threshold, "given"
        elif threshold_from is not None:
            if data_set.kind != "prepared":
                fail(
                    "--threshold-from val needs a prepared dataset as DATA (its val split "
                    "chooses the threshold)",
                    EXIT_USAGE,
                )
            if data_set.split == "val" and not quiet:
                warn("the threshold is chosen and scored on the same val split: optimistic")
            val = ev.read_labelled(data, "val", model)
            probs, _ = ev.probabilities(val, model, batch_size, workers)
            chosen = ev.choose_threshold(val.labels, probs, threshold_rule)
            chosen.update(split="val", dataset=val.source)
            used, source = chosen["value"], "chosen"
        elif model.stored_threshold is not None:
            used, source = float(model.stored_threshold["value"]), "model"
        else:
            used, source = 0.5, "default"
        result = ev.evaluate(
            data_set, model, used, source, batch_size, workers, chosen=chosen
        )
    except ev.EvaluateError as exc:
        fail(str(exc), EXIT_USAGE if "not one of the model's classes" in str(exc) else EXIT_FAIL)
    except KeyboardInterrupt:
        note("interrupted; nothing was stored")
        raise typer.Exit(EXIT_INTERRUPT) from None

    if chosen is not None:
        try:
            update_meta(model.path, {"threshold": chosen})
        except (OSError, CheckpointError) as exc:
            fail(f"cannot store the threshold in {model.path}: {exc}")
        if not quiet:
            note(
                f"threshold {chosen['value']} chosen on {chosen['images']} val images by "
                f"{threshold_rule} ({chosen['rule_value']:.4f}); stored in {model.path}"
            )
    made = []
    if plot is not None:
        made = ev.write_plots(result, plot)

    if as_json:
        print_json({**result.to_dict(), "plots": [str(p) for p in made]})
    else:
        _evaluation_view(result)
    if not quiet:
        where = {"given": "given", "model": "stored in the model", "chosen": "chosen on val"}
        note(
            f"model {result.model_id} ({result.method}), threshold {result.threshold} "
            f"({where.get(result.threshold_source, 'default')}), {result.metrics['n']} images"
        )
        if made:
            note("wrote " + ", ".join(str(p) for p in made))
    bad = result.unreadable
    if bad:
        for p in bad[:MAX_LISTED]:
            warn(f"{p.path}: {p.error}")
        warn(f"{len(bad)} images could not be read and were left out of the scores")
        raise typer.Exit(EXIT_PARTIAL)


def _evaluation_view(result) -> None:
    """The scores, the confusion matrix and per-class counts as tables on stdout."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    m = result.metrics
    split = f" ({result.data.split})" if result.data.split else ""
    scores = Table(
        title=escape(f"{Path(result.data.source).name}{split}: {m['n']} images"),
        box=box.SIMPLE_HEAD,
        show_header=False,
    )
    scores.add_column("metric")
    scores.add_column("value", justify="right")
    for key in ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "f1"):
        value = m[key]
        scores.add_row(key.replace("_", " "), "undefined" if value is None else f"{value:.4f}")
    out.print(scores)
    matrix = Table(title="confusion (rows true, columns predicted)", box=box.SIMPLE_HEAD)
    matrix.add_column("true \\ predicted")
    for c in result.classes:
        matrix.add_column(escape(c), justify="right")
    matrix.add_column("images", justify="right")
    matrix.add_column("correct", justify="right")
    for c, row in zip(result.classes, m["confusion"], strict=True):
        counts = result.per_class[c]
        matrix.add_row(
            escape(c), *(str(n) for n in row), str(counts["images"]), str(counts["correct"])
        )
    out.print(matrix)


# ----------------------------------------------------------------------------------- generate
@app.command()
def generate(
    run: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    count: Annotated[int | None, typer.Option(help="Images to make \\[default: 64].")] = None,
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
    seed: Annotated[int | None, typer.Option(help="Same seed, same images \\[default: 0].")] = None,
    label: Annotated[
        bool,
        typer.Option(
            "--label",
            help="Label each image with the classifier: one sub-folder per "
            "class, uncertain/ below --tau, and labels.csv.",
        ),
    ] = False,
    tau: Annotated[
        float | None,
        typer.Option(
            help="With --label: least top probability to count as labelled \\[default: 0.9]."
        ),
    ] = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress or notes; errors only.")
    ] = False,
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
    view = _RateView(not quiet and err.is_terminal, total=total, what="generating")
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
def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _comma_list(text: str | None, flag: str, cast=str) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(cast(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        fail(f"{flag} takes a comma-separated list (got {text!r})", EXIT_USAGE)


class _BenchView(_LiveView):
    """Renders benchmark events: the grid (run i of n) with an ETA from measured speed.

    A live bar on a terminal; otherwise one line per run and per epoch (cluster logs)."""

    def __call__(self, event) -> None:
        from threengan_cli import benchmark as b
        from threengan_cli import training as t

        if self.quiet:
            return
        if isinstance(event, b.GridPlanned):
            shard = f" (shard {event.shard[0]}/{event.shard[1]})" if event.shard[1] > 1 else ""
            note(
                f"benchmark{shard}: {event.slice_runs} of {event.total} runs; "
                f"{len(event.finished)} already finished (skipped), {len(event.todo)} to train "
                f"-> {event.out}"
            )
            if self.live and event.todo:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

                self.progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(),
                    TextColumn("eta {task.fields[eta]}"),
                    TextColumn("{task.fields[info]}"),
                    console=err.console,
                )
                self.task = self.progress.add_task("grid", total=1.0, eta="?", info="")
                self.progress.start()
        elif isinstance(event, b.RunBegins):
            what = "resuming" if event.resumed else "training"
            line = f"run {event.position}/{event.count} {event.spec.name}"
            if self.progress is not None:
                self.progress.update(self.task, description=line, info=what)
            else:
                note(f"{line}: {what} (seed {event.spec.settings.seed})")
        elif isinstance(event, b.RunProgress):
            if self.progress is not None:
                info = ""
                if isinstance(event.event, t.StepDone):
                    info = f"epoch {event.event.epoch + 1}/{event.spec.settings.epochs}"
                self.progress.update(
                    self.task,
                    completed=event.fraction,
                    eta=_duration(event.eta_s),
                    **({"info": info} if info else {}),
                )
            elif isinstance(event.event, t.EpochDone):
                rec = event.event.record
                val = (rec.get("val") or {}).get("accuracy")
                shown = f" val_acc={val:.4f}" if val is not None else ""
                note(
                    f"  {event.spec.name} epoch {rec['epoch']}/{event.event.epochs}{shown} "
                    f"{rec['images_per_s']:.1f} img/s; grid {100 * event.fraction:.0f}%, "
                    f"eta {_duration(event.eta_s)}"
                )
        elif isinstance(event, b.RunEnds):
            rec = event.record
            if rec["status"] == "failed":
                line = f"{rec['name']} failed: {rec.get('error')}"
            else:
                acc = rec["test"].get("accuracy")
                line = (
                    f"{rec['name']} done: test accuracy {acc:.4f} (final epoch), "
                    f"{rec.get('elapsed_s') or 0:.0f}s; eta {_duration(event.eta_s)}"
                )
            prefix = f"run {event.position}/{event.count} "
            if self.progress is not None:
                self.progress.console.print(prefix + line, highlight=False)
            else:
                note(prefix + line)


def _bench_table(results: dict) -> None:
    """Two tables that fit 80 columns: accuracy beside the paper, then the other metrics."""
    from rich import box
    from rich.table import Table

    from threengan_cli import benchmark as b

    cfg = results["settings"]

    def short(stat: dict) -> str:
        if stat["mean"] is None:
            return "–"
        std = f"±{100 * stat['std']:.1f}" if stat["std"] is not None else ""
        return f"{100 * stat['mean']:.1f}{std}"

    first = Table(
        title=f"{cfg['profile']} profile: test accuracy %, final-epoch model, mean ± std",
        caption="best epoch on test selects on test: optimistic, shown for comparison only",
        box=box.SIMPLE_HEAD,
    )
    for column in ("method", "N", "runs", "ours", "paper", "Δ pts", "best ep. on test", "Δ pts"):
        first.add_column(column, justify="left" if column == "method" else "right")
    second = Table(title="other test metrics %, final-epoch model", box=box.SIMPLE_HEAD)
    for column in ("method", "N", "bal. acc", "AUC", "sens.", "spec.", "F1", "wall s", "img/s"):
        second.add_column(column, justify="left" if column == "method" else "right")
    for r in results["results"]:
        paper = f"{100 * r['paper_accuracy']:.2f}" if r["paper_accuracy"] is not None else "–"
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        first.add_row(
            r["method"],
            str(r["size"]),
            f"{r['runs']}{failed}",
            b.percent(r["accuracy"]),
            paper,
            b.points(r["accuracy_diff_points"]),
            b.percent(r["optimistic_best_epoch_accuracy"]),
            b.points(r["optimistic_diff_points"]),
        )
        second.add_row(
            r["method"],
            str(r["size"]),
            *(short(r[m]) for m in b.METRICS[1:]),
            b.plain(r["wall_s"], 0),
            b.plain(r["images_per_s"]),
        )
    out.print(first)
    out.print(second)


@app.command()
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
            help="smoke (seconds; tests), quick (a reduced grid for about 30 minutes on 2 CPU "
            "cores: see docs/benchmark-protocol.md) or paper (the full protocol). "
            "\\[default: quick]"
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
        int | None, typer.Option(help="Repeats per cell; repeat r uses seed + r.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per run.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Mini-batch size.")] = None,
    width: Annotated[int | None, typer.Option(help="Network width ngf = ndf.")] = None,
    seed: Annotated[int | None, typer.Option(help="Base seed. \\[default: 0]")] = None,
    device: DeviceOpt = None,
    precision: Annotated[str | None, typer.Option(help="fp32 or bf16. \\[default: fp32]")] = None,
    ablate: Annotated[
        bool,
        typer.Option(
            "--ablate",
            help="Add 3N-GAN ablations: 3ngan-nokl (no KL term), 3ngan-nogc (G not trained "
            "against C), 3ngan-pairkl (per-pair KL).",
        ),
    ] = False,
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
    as_json: JsonOpt = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress or notes; errors only.")
    ] = False,
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
    merge writes what it finds and exits 3, naming them, when runs of
    the grid are missing from every merged folder.

    [bold]Examples[/]

      threengan benchmark kermany --profile quick

      threengan benchmark kermany --profile paper --shard 3/10 --out bench/s3

      threengan benchmark merge bench/s* --out bench/all

      threengan benchmark kermany --methods 3ngan --sizes 200 --ablate --epochs 20
    """
    from threengan_cli import paths
    from threengan_cli.settings import SettingsError

    if not args:
        fail("give a prepared DATASET, or: merge DIR... --out DIR", EXIT_USAGE)
    from threengan_cli import benchmark as bench

    if args[0] == "merge":
        given = {
            "--profile": profile,
            "--methods": methods,
            "--sizes": sizes,
            "--repeats": repeats,
            "--epochs": epochs,
            "--batch-size": batch_size,
            "--width": width,
            "--seed": seed,
            "--device": device,
            "--precision": precision,
            "--shard": shard,
            "--ablate": ablate or None,
            "--parallel": parallel,
        }
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            fail(f"merge takes only DIR... --out DIR (got {', '.join(extra)})", EXIT_USAGE)
        if len(args) < 2 or out_dir is None:
            fail("merge needs the benchmark folders to join and --out DIR", EXIT_USAGE)
        target = out_dir
        try:
            results = bench.merge([Path(a) for a in args[1:]], target)
        except bench.BenchmarkError as exc:
            fail(str(exc))
    else:
        if len(args) > 1:
            fail(
                f"give one DATASET (got {len(args)} arguments); to join shards use: "
                "benchmark merge DIR... --out DIR",
                EXIT_USAGE,
            )
        dataset = args[0]
        try:
            cfg = bench.resolve_settings(
                profile or "quick",
                methods=_comma_list(methods, "--methods"),
                sizes=_comma_list(sizes, "--sizes", int),
                repeats=repeats,
                epochs=epochs,
                batch_size=batch_size,
                width=width,
                seed=seed,
                device=device,
                precision=precision,
                ablate=ablate,
            )
            shard_ij = bench.parse_shard(shard) if shard is not None else (1, 1)
        except (SettingsError, ValueError) as exc:
            fail(str(exc), EXIT_USAGE)
        dataset_dir = paths.resolve_dataset(dataset)
        if not (dataset_dir / "manifest.json").is_file():
            fail(
                f"no prepared dataset {dataset!r} (looked in {dataset_dir}); "
                "run `threengan prepare SOURCE --name NAME` first",
                EXIT_USAGE,
            )
        target = out_dir or paths.home() / "benchmarks" / f"{dataset_dir.name}-{cfg.profile}"

        from threengan_cli import training
        from threengan_cli.checkpoints import CheckpointError
        from threengan_cli.datasets import DatasetError

        _warn_if_bf16_is_slower(cfg.precision, cfg.device, quiet)
        view = _BenchView(quiet)
        hint = f"finished runs are kept in {target}; run the same command again to resume"
        try:
            results = bench.run(
                dataset_dir, cfg, target, shard=shard_ij, on_event=view, parallel=parallel
            )
        except (training.Interrupted, KeyboardInterrupt):
            view.close()
            note(f"interrupted: {hint}")
            raise typer.Exit(EXIT_INTERRUPT) from None
        except (
            bench.BenchmarkError,
            training.TrainingError,
            CheckpointError,
            DatasetError,
        ) as exc:
            view.close()
            fail(str(exc))
        finally:
            view.close()
        if shard_ij[1] > 1 and not quiet:
            note(f"shard {shard}: join the shards with: threengan benchmark merge DIR... --out DIR")

    if as_json:
        print_json(results)
    else:
        _bench_table(results)
    if not quiet:
        made = "results.json, results.csv, report.md"
        if results.get("plot"):
            made += ", accuracy_vs_size.png"
        else:
            from rich.markup import escape

            note(escape(f"no plot: {results.get('plot_note')}"))
        note(f"wrote {made} in {target}")
    failed = results["counts"]["failed"]
    if failed:
        warn(f"{failed} run(s) failed (a loss became non-finite); see report.md")
    missing = (results.get("missing") or []) if args[0] == "merge" else []
    if missing:
        shown = ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
        warn(
            f"{len(missing)} run(s) of the grid are in none of the merged folders: {shown}; "
            f"the report covers the other {results['counts'].get('finished', 0)} finished"
        )
    if failed or missing:
        raise typer.Exit(EXIT_PARTIAL)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPT)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("torch", "torchvision"):
            raise
        from threengan_cli.system import NO_TORCH

        err.print(f"error: this command needs PyTorch. {NO_TORCH}", markup=False, soft_wrap=True)
        sys.exit(EXIT_FAIL)


if __name__ == "__main__":
    main()
