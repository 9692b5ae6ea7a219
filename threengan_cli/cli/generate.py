"""The generate command: synthetic X-rays from a trained generator."""

# No ``from __future__ import annotations``: typer reads the annotations (see app.py).

from pathlib import Path
from typing import Annotated

from threengan_cli.cli import progress
from threengan_cli.cli.common import (
    CheckpointOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    RunOpt,
    config_opt,
    ends_cleanly,
    flag,
    flags_of,
    model_of,
    setting,
    settings_of,
)
from threengan_cli.cli.views import err, note, print_json


# ----------------------------------------------------------------------------------- generate
# Long only by its declared options and help text (what typer reads); the body is a few calls.
def generate(
    run: RunOpt = None,
    which_model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    count: Annotated[int | None, setting("generate", "count")] = None,
    out: Annotated[Path | None, setting("generate", "out", file_okay=False)] = None,
    grid: Annotated[Path | None, setting("generate", "grid", dir_okay=False)] = None,
    seed: Annotated[int | None, setting("generate", "seed")] = None,
    label: Annotated[bool | None, setting("generate", "label", "--label")] = None,
    tau: Annotated[float | None, setting("generate", "tau")] = None,
    device: Annotated[str | None, setting("generate", "device")] = None,
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
    from threengan_cli.core.use_settings import GenerateSettings
    from threengan_cli.infer.generate import generate as run_generate

    cfg = settings_of("generate", config, **flags_of(GenerateSettings, locals()))
    out_dir = cfg.folder
    model = model_of(checkpoint, run, cfg.device, which_model)
    total = cfg.count if out_dir is not None else min(cfg.count, 64)
    live = not quiet and err.is_terminal
    # a full disk or an unwritable --out: nothing half-written stays
    stopped = ends_cleanly(f"writing {out_dir or cfg.grid}", "interrupted; nothing was written")
    with stopped, progress.BarView(live, "generating", total=total) as view:
        result = run_generate(
            model,
            cfg.count,
            cfg.seed,
            out_dir,
            cfg.grid,
            label=cfg.label,
            tau=cfg.tau,
            on_progress=view.update,
            force=force,
        )
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
