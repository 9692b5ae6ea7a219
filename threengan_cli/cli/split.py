"""The split command: a site's X-rays -> labelled, unlabelled and held-out images, by patient.

Registered on the app by ``app``; the engine is :mod:`threengan_cli.data.split`; exit codes
in ``core/errors``.
"""

# No ``from __future__ import annotations``: typer reads the annotations (see app.py).

from pathlib import Path
from typing import Annotated

import typer

from threengan_cli.cli.common import JsonOpt, QuietOpt, ends_cleanly, fail
from threengan_cli.cli.views import note, print_json
from threengan_cli.core.errors import EXIT_USAGE


def split(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="SOURCE",
            help="A folder of class folders (NORMAL/, PNEUMONIA/) of one site's labelled X-rays.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Argument(metavar="OUT", help="A new folder for the split.", show_default=False),
    ],
    labelled: Annotated[
        int, typer.Option(help="Labelled images per class, to train on (1 or more).")
    ] = 20,
    unlabelled: Annotated[
        int,
        typer.Option(help="Images per class for the unlabelled pool, labels dropped (0 or more)."),
    ] = 35,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle of the patients.")] = 0,
    patient_pattern: Annotated[
        str | None,
        typer.Option(
            help="Regex whose first group is the patient id, matched at the start of file "
            "names \\[default: NIH's PPPPPPPP_FFF.png, Kermany's IM-<id>-, NORMAL2-IM-<id>-, "
            "person<id>_].",
        ),
    ] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Split a site's labelled X-rays by patient: labelled, unlabelled pool, held out.

    What adapting a model to your X-rays needs (docs/guide.md): a few
    labelled images per class to train on, a pool of unlabelled ones,
    and a held-out set to tell whether the adapted model works; no
    patient in two of them. Patients are shuffled by --seed; each goes
    whole to the first group whose quota (images per class) it fits,
    else to the held-out set. A split that leaves a class without
    held-out (or labelled) images is refused.

    OUT gets dataset/train/<class>/ (the labelled images),
    dataset/test/<class>/ (held out), unlabelled/ (the pool, in one
    folder) and split.csv (file, patient, class, group), complete or not
    at all: `threengan prepare OUT/dataset` makes the dataset to train
    and evaluate on, and `train --unlabelled OUT/unlabelled` uses the
    pool.

    [bold]Examples[/]

      threengan split site-xrays/ site/ --labelled 20 --unlabelled 35 --seed 0

      threengan split scans/ site/ --patient-pattern '(\\d+)-'
    """
    from threengan_cli.data import split as engine

    if out.exists() or out.is_symlink():
        fail(f"{out} exists already: give a new folder", EXIT_USAGE)
    with ends_cleanly(f"writing {out}", f"interrupted; {out} was not written"):
        made = engine.plan(source, labelled, unlabelled, seed, patient_pattern)
        engine.write(out, made)
    counts = made.per_group()
    if as_json:
        print_json({"out": str(out), "patients": len(made.patients), "seed": seed, **counts})
    elif not quiet:
        for group, per_class in counts.items():
            note(f"{group:10s} " + ", ".join(f"{label} {n}" for label, n in per_class.items()))
        note(f"{len(made.patients)} patients, seed {seed}: wrote {out}")
