"""The app: it builds the typer application, holds the short commands (info, prepare,
datasets, generate) and registers the long ones, in pipeline order.

``cli_train`` (train, benchmark), ``cli_classify`` and ``cli_evaluate`` (evaluate, runs) hold
the long commands; exit codes, shared options and the error-to-exit helpers live in
``cli_common`` (see there for the exit codes). Rendering lives in ``views``; heavy libraries
(torch, numpy, PIL, pydantic) are imported inside the commands so that ``threengan --help``
stays instant. Help defaults are read from the settings models (``helptext``), never written
here.
"""

# No ``from __future__ import annotations`` here, unlike the other modules: typer would then
# evaluate every option's annotation from its string each time it builds the commands,
# 26 ms of every command against 6.5 ms (``benchmarks/bench_startup.py --phases``).

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from threengan_cli import __version__, cli_classify, cli_evaluate, cli_export, cli_train, views
from threengan_cli.cli_common import (
    EXIT_FAIL,
    EXIT_INTERRUPT,
    EXIT_USAGE,
    MAX_LISTED,
    CheckpointOpt,
    JsonOpt,
    QuietOpt,
    RunOpt,
    config_opt,
    device_opt,
    fail,
    flag,
    interrupt_code,
    load_model_or_exit,
    settings_or_exit,
)
from threengan_cli.helptext import shown
from threengan_cli.views import err, note, print_json, warn


def _plain_flags(params: list) -> list:
    """Flags (``--json``, ``--help``...) take no value: show none (typer shows ``<bool>``)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    """Usage lines as man pages write them: ``SOURCE``, ``[PATH]...`` (typer writes
    ``{source}`` for a required argument); flags without a value type; examples never
    wrapped."""

    def format_help(self, ctx, formatter) -> None:
        with views.unwrapped_examples(self.help or ""):
            super().format_help(ctx, formatter)

    def get_params(self, ctx) -> list:
        return _plain_flags(super().get_params(ctx))

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


class Group(TyperGroup):
    def get_params(self, ctx) -> list:
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    name="threengan",
    cls=Group,
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="3N-GAN: semi-supervised X-ray classification with a generator, a discriminator "
    "and a classifier trained together.\n\n"
    "Typical use: [bold]threengan prepare[/] a folder of X-rays, [bold]threengan train[/] "
    "a model on it, then [bold]threengan classify[/] new images.",
    epilog="Exit codes: 0 ok, 1 failure, 2 usage error, 3 some inputs unreadable, "
    "130 interrupted (Ctrl+C), 143 terminated (SIGTERM).",
)


def command(**options: Any):
    return app.command(cls=Command, **options)

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
@command()
def info(
    measure: Annotated[
        bool,
        flag(
            "--measure",
            help="Also time a 3ngan training step in fp32 and in bf16 on this CPU (a few "
            "seconds where bf16 is native, up to a minute where it is emulated) and say "
            "which is faster here.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """What a bug report needs: versions, devices, CPU features, the data directory.

    Whether bf16 pays on this CPU is measured (--measure), never read from a table of CPU
    kinds: without --measure it says "unmeasured".

    [bold]Examples[/]

      threengan info

      threengan info --measure --json > info.json
    """
    from threengan_cli.system import bf16_fact, describe

    facts = describe()
    if measure:
        from threengan_cli.accel import measure_cpu_bf16

        note("timing a 3ngan training step in fp32 and in bf16 on this CPU ...")
        measured = measure_cpu_bf16()
        facts["bf16 on cpu"] = bf16_fact(measured)
        if as_json:
            facts["bf16 on cpu, measured"] = measured
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
    for path, reason in report.label_conflicts[:MAX_LISTED]:
        warn(f"label conflict {path}: {reason}")
    if report.label_conflicts:
        warn(
            f"{len(report.label_conflicts)} images carry two labels (label conflicts); "
            "their train/val copies were removed"
        )
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


# Long only by its declared options and help text (what typer reads); the body is a few calls.
@command()
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
    class_names: Annotated[
        str | None,
        typer.Option(
            help="Name the classes, comma-separated, in the source's order (a MedMNIST .npz: "
            "label 0 first; folders: sorted names), e.g. NORMAL,PNEUMONIA for an .npz whose "
            "classes are 0 and 1. \\[default: the source's names]"
        ),
    ] = None,
    strict: Annotated[
        bool | None,
        flag(
            "--strict",
            help="Fail (exit 1, nothing written) if any image file "
            "cannot be read. Non-image names such as .DS_Store never count.",
        ),
    ] = None,
    force: Annotated[bool, flag("--force", help="Replace an existing prepared dataset.")] = False,
    config: config_opt("prepare") = None,
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

    Preparing the same source (same files, sizes and times) with the
    same settings again says "up to date" and exits 0 without work; a
    different source or settings needs --force.

    [bold]Examples[/]

      threengan prepare ~/data/chest_xray --name kermany

      threengan prepare pneumoniamnist.npz --class-names NORMAL,PNEUMONIA

      threengan prepare labels.csv --out ./prepared/xr --force
    """
    from threengan_cli.datasets import prepare as run_prepare
    from threengan_cli.sources import DatasetError

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
        class_names=class_names,
    )
    target = _prepare_target(source, name, out_dir)
    try:
        with views.BarView(not quiet and err.is_terminal, "decoding", counted=True) as view:
            report = run_prepare(source, target, cfg, force=force, on_progress=view.update)
    except DatasetError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(views.os_failure(exc, f"preparing {target}"))

    if report.up_to_date:
        if as_json:
            print_json(report.to_dict())
        if not quiet:
            note(
                f"{target} is up to date: prepared from the same source with the same "
                "settings (--force prepares it again)"
            )
        return
    if report.repaired:
        warn(f"{target}/data.safetensors was damaged (not the file prepare wrote): prepared again")
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



# The long commands live in their own modules (each under 600 lines); they are registered
# here, in pipeline order, which is the order of the help.
command()(cli_train.train)
command()(cli_evaluate.runs)
command()(cli_classify.classify)
command()(cli_evaluate.evaluate)
command()(cli_export.export)


# ----------------------------------------------------------------------------------- generate
# Long only by its declared options and help text (what typer reads); the body is a few calls.
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
        flag(
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
    device: device_opt("generate") = None,
    force: Annotated[
        bool,
        flag(
            "--force",
            help="Replace an earlier output of generate in --out made with other settings "
            "(a folder generate did not make is never replaced).",
        ),
    ] = False,
    config: config_opt("generate") = None,
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

    generate.json in the folder records how it was made: the same command
    run again finds its own output, writes nothing and exits 0; other
    settings are refused (exit 2) unless --force replaces the folder.

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
    from threengan_cli.modelfile import ModelError

    model = load_model_or_exit(checkpoint, run, cfg.device)
    total = cfg.count if out_dir is not None else min(cfg.count, 64)
    try:
        with views.BarView(not quiet and err.is_terminal, "generating", total=total) as view:
            result = run_generate(
                model,
                cfg.count,
                cfg.seed,
                out_dir,
                grid,
                label=label,
                tau=cfg.tau,
                on_progress=view.update,
                force=force,
            )
    except KeyboardInterrupt:
        note("interrupted; nothing was written")
        raise typer.Exit(EXIT_INTERRUPT) from None
    except GenerateError as exc:
        fail(str(exc), EXIT_USAGE)
    except ModelError as exc:
        fail(str(exc))
    except OSError as exc:  # a full disk or an unwritable --out: nothing half-written stays
        fail(views.os_failure(exc, f"writing {out_dir or grid}"))
    if as_json:
        print_json(result.as_dict())
    elif not quiet:
        made = f"wrote {result.count} images to {result.out_dir}" if result.out_dir else ""
        if result.unchanged:
            made = f"{result.out_dir} already holds these {result.count} images: kept as they are"
        if result.labels:
            made += " (" + ", ".join(f"{k}: {v}" for k, v in result.labels.items()) + ")"
        if result.grid:
            made += ("; " if made else "wrote ") + f"grid {result.grid}"
        note(f"{made} with {model.model_id}, seed {result.seed}")


command()(cli_train.benchmark)


_TERMINATED: list[int] = []  # the SIGTERM that stopped this process, once one came


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM stops a command the way Ctrl+C does (what is finished is kept, temporaries
    are removed, train saves a resumable checkpoint), and it exits 143, not 130."""
    _TERMINATED.append(signum)
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except SystemExit as exc:  # typer turns an interrupt into exit 130
        if exc.code == EXIT_INTERRUPT and _TERMINATED:
            sys.exit(interrupt_code(_TERMINATED[0]))
        raise
    except KeyboardInterrupt:
        note("interrupted")
        sys.exit(interrupt_code(_TERMINATED[0] if _TERMINATED else None))
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("torch", "torchvision"):
            raise
        from threengan_cli.system import NO_TORCH

        views.error(f"this command needs PyTorch. {NO_TORCH}")
        sys.exit(EXIT_FAIL)
    except OSError as exc:  # a last guard: an OS error the command did not expect
        views.stdout_gone()
        sys.stderr.write(f"error: {views.os_failure(exc, 'threengan')}\n")
        sys.exit(EXIT_FAIL)


if __name__ == "__main__":
    main()
