"""The prepare and datasets commands: a source of X-rays read once into a dataset, and the
list of the prepared ones."""

# No ``from __future__ import annotations``: typer reads the annotations (see app.py).

from pathlib import Path
from typing import Annotated

import typer

from threengan_cli.cli import progress, views
from threengan_cli.cli.common import (
    MAX_LISTED,
    JsonOpt,
    QuietOpt,
    config_opt,
    ends_cleanly,
    flag,
    flags_of,
    setting,
    settings_of,
)
from threengan_cli.cli.views import err, note, print_json, warn


# ------------------------------------------------------------------------------------ prepare
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
    image_size: Annotated[int | None, setting("prepare", "image_size")] = None,
    fit: Annotated[str | None, setting("prepare", "fit")] = None,
    val_fraction: Annotated[float | None, setting("prepare", "val_fraction")] = None,
    min_val: Annotated[int | None, setting("prepare", "min_val")] = None,
    seed: Annotated[int | None, setting("prepare", "seed")] = None,
    workers: Annotated[int | None, setting("prepare", "workers")] = None,
    patient_pattern: Annotated[str | None, setting("prepare", "patient_pattern")] = None,
    class_names: Annotated[str | None, setting("prepare", "class_names")] = None,
    strict: Annotated[bool | None, setting("prepare", "strict", "--strict")] = None,
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
    from threengan_cli.core import paths
    from threengan_cli.core.settings import PrepareSettings
    from threengan_cli.data.prepare import prepare as run_prepare

    cfg = settings_of("prepare", config, **flags_of(PrepareSettings, locals()))
    target = paths.dataset_dir_for(source, name, out_dir)
    live = not quiet and err.is_terminal
    with ends_cleanly(f"preparing {target}"), progress.BarView(live, "decoding", counted=True) as v:
        report = run_prepare(source, target, cfg, force=force, on_progress=v.update)

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
def datasets(as_json: JsonOpt = False) -> None:
    """List the prepared datasets in the data dir.

    [bold]Examples[/]

      threengan datasets

      threengan datasets --json
    """
    from threengan_cli.data.datasets import list_prepared

    found = list_prepared()
    if as_json:
        print_json(found)
    elif not found:
        note("no prepared datasets yet: run `threengan prepare SOURCE`")
    else:
        views.datasets_table(found)
