"""What every command shares: exit codes, the shared options, and the helpers that turn an
engine's error into one line on stderr and a documented exit code.

``cli`` builds the app and registers the commands; ``cli_classify``, ``cli_evaluate`` and
``cli_train`` hold the long ones. All of them import these pieces from here, never from
``cli``, so no command module imports the app that registers it.

Exit codes (the same for every command):
  0  success
  1  failure (nothing usable was produced)
  2  usage error (bad flag, bad setting, missing input path)
  3  partial success (some inputs could not be read; the rest were processed)
  4  classify --fail-on-ood: some images look unlike the model's training X-rays
  130 interrupted (Ctrl+C, SIGINT); what was finished is kept
  143 terminated (SIGTERM, as CI runners cancel a job); what was finished is kept
"""

# No ``from __future__ import annotations``: typer reads the annotations (see cli.py).

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from threengan_cli import views
from threengan_cli.helptext import shown

# Before typer's help renderer can import them (see views.defer_import for the measurement):
# importing typer does not load rich; every command module imports this one first.
views.defer_import("rich.markdown", "Markdown")
views.defer_import("rich.traceback", "Traceback")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPT = 0, 1, 2, 3, 130
EXIT_OOD = 4  # classify --fail-on-ood: some images look unlike the model's training X-rays
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended
MAX_LISTED = 20  # skipped files / unreadable inputs listed one by one, then a count


def flag(*names: str, help: str) -> Any:
    """An on/off flag: ``--json``, never ``--json true`` (a usage error)."""
    return typer.Option(*names, help=help)


def config_opt(section: str) -> Any:
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
    bool, flag("--json", help="Print the result as JSON on stdout (messages on stderr).")
]
QuietOpt = Annotated[
    bool, flag("--quiet", "-q", help="Errors only: no progress, notes or warnings.")
]


def device_opt(section: str) -> Any:
    return Annotated[
        str | None, typer.Option(help=f"auto, cpu, cuda, cuda:N or mps. {shown(section, 'device')}")
    ]


def interrupt_code(signum: int | None) -> int:
    """The exit code of a command stopped by signal ``signum``: 128 + its number, as shells
    report it (SIGINT 130, SIGTERM 143); Ctrl+C's where it is not known."""
    return 128 + int(signum) if signum else EXIT_INTERRUPT


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    """One clear line on stderr, then a documented exit code; never a traceback."""
    views.error(message)
    raise typer.Exit(code)


def lock_or_exit(holder, folder: Path, what: str = "run") -> None:
    """Take ``folder``'s writer lock into ``holder`` (an ExitStack, or the click context: held
    until the command ends), or exit 1 saying who holds it."""
    from threengan_cli import runs

    enter = getattr(holder, "enter_context", None) or holder.with_resource
    try:
        enter(runs.lock(folder, what))
    except runs.RunError as exc:  # in use, or a .lock that is not a lock file
        fail(str(exc))
    except OSError as exc:
        fail(views.os_failure(exc, f"creating {folder}"))


def settings_or_exit(section: str, config: Path | None, **flags: Any):
    from threengan_cli.settings import SettingsError, resolve

    try:
        return resolve(section, config, **flags)
    except SettingsError as exc:
        fail(str(exc), EXIT_USAGE)


RunOpt = Annotated[
    str | None,
    typer.Option("--run", help="Use the best checkpoint of this training run (name or folder)."),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Use this .safetensors checkpoint file.", dir_okay=True),
]


def loaded_or_exit(load: Any) -> Any:
    """``load()``, with a missing model as a usage error (2) and a bad one as a failure (1)."""
    from threengan_cli.modelfile import ModelError, ModelNotFound

    try:
        return load()
    except ModelNotFound as exc:
        fail(str(exc), EXIT_USAGE)
    except ModelError as exc:
        fail(str(exc))


def load_model_or_exit(checkpoint: Path | None, run: str | None, device: str):
    from threengan_cli.classify_torch import load_model

    return loaded_or_exit(lambda: load_model(checkpoint, run, device))


def load_classifier_or_exit(checkpoint: Path | None, run: str | None, device: str, engine: str):
    """On the CPU (``auto`` or ``cpu``) the NumPy classifier unless ``engine`` is torch: it
    never imports torch (3-4 s of start-up on a small CPU). On ``cuda``/``mps`` torch's.
    A ``.onnx`` file (``threengan export``) runs on onnxruntime, whatever the engine."""
    from threengan_cli.infer import onnx_export

    if onnx_export.is_onnx(checkpoint):
        return loaded_or_exit(lambda: onnx_export.load(checkpoint))
    if device not in ("auto", "cpu") or engine == "torch":
        return load_model_or_exit(checkpoint, run, "cpu" if device == "auto" else device)
    from threengan_cli import classify_numpy

    return loaded_or_exit(lambda: classify_numpy.load(checkpoint, run))


def threshold_of(model, given: float | None) -> tuple[float, str, str]:
    """The decision threshold classify and evaluate use, where it comes from (given, model
    or default) and a note for stderr: a given one (flag or --config) wins; else the one
    ``evaluate --threshold-from`` stored in the model; else classify's default. A damaged
    stored one is an error (exit 1), unless a given one overrides it."""
    from threengan_cli.modelfile import ModelError
    from threengan_cli.settings import ClassifySettings

    if given is not None:
        return given, "given", ""
    try:
        stored = model.stored_threshold
    except ModelError as exc:
        fail(str(exc))
    if stored is None:
        return ClassifySettings.model_fields["threshold"].default, "default", ""
    how = f"chosen on {stored.get('split', 'val')} by {stored.get('rule', '?')}"
    note = f" (the model's: {how}; --threshold overrides it)"
    return float(stored["value"]), "model", note


def ood_threshold_of(model, given: float | None) -> tuple[float | None, str | None, str]:
    """The out-of-distribution threshold classify and evaluate flag above, where it comes
    from (given or model) and a note for stderr: a given one (flag or --config) wins; else
    the model's own. ``None`` for a model without statistics, whose note says so."""
    if getattr(model, "stats", None) is None:
        note = (
            "; this model has no out-of-distribution statistics (trained before threengan "
            "0.2): the ood columns are empty"
        )
        return None, None, note
    if given is not None:
        return given, "given", ""
    split = model.stats.info.get("ood", {}).get("threshold", {}).get("split", "val")
    from threengan_cli.classify import exact  # the float32's shortest digits, as in the rows

    return exact(model.stats.threshold), "model", f" (flags 5% of the model's {split} split)"


def prepared_or_exit(dataset: str) -> Path:
    from threengan_cli import paths

    dataset_dir = paths.resolve_dataset(dataset)
    if not (dataset_dir / "manifest.json").is_file():
        fail(
            f"no prepared dataset {dataset!r} (looked in {dataset_dir}); "
            "run `threengan prepare SOURCE --name NAME` first",
            EXIT_USAGE,
        )
    return dataset_dir
