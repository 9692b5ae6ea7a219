"""The benchmark commands: ``benchmark run`` trains the grid (the default: ``benchmark DATASET``
is ``benchmark run DATASET``), ``benchmark merge`` joins the folders of its shards.

Registered on the app by ``app``, as a group of two commands.
"""

# No ``from __future__ import annotations``: typer reads the annotations (see app.py).

import contextlib
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
    fail,
    flags_of,
    lock_or_exit,
    setting,
    warn_bf16_unmeasured,
)
from threengan_cli.cli.views import note, print_json, warn
from threengan_cli.core.errors import EXIT_PARTIAL, interrupt_code, os_message
from threengan_cli.core.names import BUILT_IN


def _bench_run(dataset: str, cfg, shard: str | None, out_dir, parallel, quiet: bool):
    from threengan_cli.bench import benchmark as bench
    from threengan_cli.core import paths
    from threengan_cli.train import events

    shard_ij = bench.shard_given(shard)
    dataset_dir = paths.prepared_dataset(dataset)
    target = bench.folder_for(dataset_dir, cfg.profile, out_dir)
    warn_bf16_unmeasured(cfg.precision, cfg.device, quiet)
    hint = f"finished runs are kept in {target}; run the same command again to resume"
    held = contextlib.ExitStack()
    lock_or_exit(held, target, "benchmark folder")
    try:
        with held, progress.BenchView(quiet) as view:
            results = bench.run(
                dataset_dir, cfg, target, shard=shard_ij, on_event=view, parallel=parallel
            )
    except (events.Interrupted, KeyboardInterrupt) as exc:
        note(f"interrupted: {hint}")
        raise typer.Exit(interrupt_code(getattr(exc, "signum", None))) from None
    except OSError as exc:
        fail(os_message(exc, f"writing {target}") + f" ({hint})")
    if shard_ij[1] > 1 and not quiet:
        note(f"shard {shard}: join the shards with: threengan benchmark merge DIR... --out DIR")
    return results, target


# Long only by its declared options and help text (what typer reads); the body is a few calls.
def run(
    dataset: Annotated[
        str,
        typer.Argument(
            metavar="DATASET",
            help="A prepared dataset (name or folder) to benchmark on.",
            show_default=False,
        ),
    ],
    profile: Annotated[str | None, setting("benchmark", "profile")] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help=f"Comma-separated: {', '.join(BUILT_IN)}, or a variant: the ablations "
            "3ngan-nokl, 3ngan-nogc, 3ngan-pairkl and the study's ladder "
            "(docs/benchmark-protocol.md). \\[default: the profile's]"
        ),
    ] = None,
    sizes: Annotated[str | None, setting("benchmark", "sizes")] = None,
    repeats: Annotated[int | None, setting("benchmark", "repeats")] = None,
    epochs: Annotated[int | None, setting("benchmark", "epochs")] = None,
    batch_size: Annotated[int | None, setting("benchmark", "batch_size")] = None,
    width: Annotated[int | None, setting("benchmark", "width")] = None,
    seed: Annotated[int | None, setting("benchmark", "seed")] = None,
    device: Annotated[str | None, setting("benchmark", "device")] = None,
    precision: Annotated[str | None, setting("benchmark", "precision")] = None,
    recipe: Annotated[str | None, setting("benchmark", "recipes", "--recipe")] = None,
    ablate: Annotated[bool | None, setting("benchmark", "ablate", "--ablate")] = None,
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
            help="Benchmark folder \\[default: <data dir>/benchmarks/<dataset>-<profile>].",
            file_okay=False,
        ),
    ] = None,
    config: config_opt("benchmark") = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the grid: methods x training sizes x repeats, compared with the paper's Table 1.

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

      threengan benchmark kermany --methods 3ngan --sizes 200 --ablate --epochs 20
    """
    from threengan_cli.bench import grid

    flags = flags_of(grid.BenchmarkSettings, locals())
    flags.update(
        methods=grid.comma_list(methods, "--methods"),
        sizes=grid.comma_list(sizes, "--sizes", int),
        recipes=grid.comma_list(recipe, "--recipe"),
    )
    flags.pop("profile")
    cfg = grid.resolve_config(config, profile, **flags)
    results, target = _bench_run(dataset, cfg, shard, out_dir, parallel, quiet)
    _report(results, target, as_json, quiet)


def merge(
    dirs: Annotated[
        list[Path],
        typer.Argument(
            metavar="DIR",
            help="Benchmark folders (shards of one grid) to join.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option("--out", help="Folder of the joined report.", file_okay=False),
    ],
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Join benchmark folders (the shards of one grid) into one report.

    The same aggregation as an unsharded run: results.json, results.csv,
    report.md and the plot in --out. Runs of the grid that none of the
    folders holds are listed as missing (exit 3), never left out silently.

    [bold]Examples[/]

      threengan benchmark merge bench/s* --out bench/all
    """
    from threengan_cli.bench.merge import merge as join

    with contextlib.ExitStack() as held, ends_cleanly(f"writing {out_dir}"):
        lock_or_exit(held, out_dir, "benchmark folder")
        results = join(dirs, out_dir)
    _report(results, out_dir, as_json, quiet, results.get("missing") or [])


def _report(results: dict, target: Path, as_json: bool, quiet: bool, missing=()) -> None:
    """The tables (or JSON), what was written where, and exit 3 when runs failed or are
    missing."""
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
    if missing and not quiet:
        shown_ = ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
        warn(
            f"{len(missing)} run(s) of the grid are in none of the merged folders: {shown_}; "
            f"the report covers the other {results['counts'].get('finished', 0)} finished"
        )
    if failed or missing:
        raise typer.Exit(EXIT_PARTIAL)
