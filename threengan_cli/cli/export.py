"""The export command: a trained classifier as a file other runtimes load (ONNX).

Registered on the app by ``app``; exit codes in ``core/errors``.
"""

# No ``from __future__ import annotations``: typer reads the annotations (see app.py).

from pathlib import Path
from typing import Annotated

import typer

from threengan_cli.cli.common import CheckpointOpt, QuietOpt, RunOpt, fail
from threengan_cli.cli.views import note
from threengan_cli.core.errors import EXIT_USAGE

FORMATS = ("onnx",)


def export(
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The file to write (complete or not at all).", dir_okay=False
        ),
    ],
    run: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="onnx (the only one so far).")
    ] = "onnx",
    quiet: QuietOpt = False,
) -> None:
    """Export a trained classifier to run without threengan (onnxruntime).

    Without --run or --checkpoint the bundled default model is exported.
    The graph takes uint8 images (N, S, S), decoded and resized as
    threengan classify does (recorded in the file's metadata and in
    docs/visual.md), and gives probabilities (N, K) calibrated by the
    model's temperature, ood_score (N,) for models with out-of-distribution
    statistics, and evidence (N, K, 4, 4), the heatmaps' values.
    `threengan classify --checkpoint model.onnx` runs it with onnxruntime
    (pip install 'threengan[onnx]'). Needs the onnx package.

    Exit codes: 0 written, 1 the model cannot be read or exported,
    2 usage error (unknown format, missing model).

    [bold]Examples[/]

      threengan export -o model.onnx

      threengan export --run my-run --format onnx -o my-run.onnx
    """
    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})", EXIT_USAGE)
    from threengan_cli.infer import numpy_engine, onnx_export
    from threengan_cli.train import runs

    if onnx_export.is_onnx(checkpoint):
        fail(f"{checkpoint} is already an ONNX model", EXIT_USAGE)
    model = numpy_engine.load(runs.model_file(checkpoint, run))
    size = onnx_export.export(model, output)
    if not quiet:
        note(
            f"exported {model.model_id} ({model.method}, {model.image_size}px, classes "
            f"{', '.join(model.classes)}) -> {output} ({size / 1e6:.1f} MB, ONNX opset "
            f"{onnx_export.OPSET})"
        )
