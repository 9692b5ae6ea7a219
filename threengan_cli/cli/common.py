"""What every command shares: the shared options, each setting's option built from its field
(help and default read from the settings' source), and the one place that turns an engine's
error into one line on stderr and its exit code (:func:`handled`; the codes are core/errors').

``app`` builds the app and registers the commands; ``classify``, ``evaluate``, ``train`` and
the others hold the long ones. All of them import these pieces from here, never from ``app``,
so no command module imports the app that registers it.
"""

# No ``from __future__ import annotations``: typer reads the annotations (see app.py).

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from threengan_cli.cli import views
from threengan_cli.core.errors import EXIT_FAIL, EXIT_INTERRUPT, Failure, os_message
from threengan_cli.core.settings_source import literal_fields

# Before typer's help renderer can import them (see views.defer_import for the measurement):
# importing typer does not load rich; every command module imports this one first.
views.defer_import("rich.markdown", "Markdown")
views.defer_import("rich.traceback", "Traceback")

MAX_LISTED = 20  # skipped files / unreadable inputs listed one by one, then a count
# Section -> (module file, class name) of its settings model, whose source gives the options'
# help and defaults (core/settings_source: --help never imports pydantic).
_MODELS = {
    "prepare": ("core/settings.py", "PrepareSettings"),
    "train": ("core/settings.py", "TrainSettings"),
    "classify": ("core/use_settings.py", "ClassifySettings"),
    "evaluate": ("core/use_settings.py", "EvaluateSettings"),
    "generate": ("core/use_settings.py", "GenerateSettings"),
    "benchmark": ("bench/grid.py", "BenchmarkSettings"),
}
_MISSING = object()


def default_of(section: str, field: str) -> Any:
    """The default of ``field`` in the settings model of ``section``."""
    value = literal_fields(*_MODELS[section])[0].get(field, _MISSING)
    if value is _MISSING:
        raise KeyError(f"{section}.{field} has no literal default")
    return value


def shown(section: str, field: str) -> str:
    """``\\[default: X]`` for a help string (escaped for rich markup)."""
    value = default_of(section, field)
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif value is None:
        text = "none"
    else:
        text = str(value)
    return f"\\[default: {text}]"


def description_of(section: str, field: str) -> str:
    """The description of ``field`` in the settings model of ``section``: its option's help."""
    return literal_fields(*_MODELS[section])[1][field]


def help_of(section: str, field: str) -> str:
    """The help of the option that sets ``field``: its description, then its default, unless
    the description names its own, or the option is a flag that is off unless given, or one
    that is not set unless given (a default of None)."""
    text = description_of(section, field)
    value = literal_fields(*_MODELS[section])[0].get(field, _MISSING)
    if "\\[default" in text or value is False or value is None or value is _MISSING:
        return text
    return f"{text} {shown(section, field)}"


def flag(*names: str, help: str) -> Any:
    """An on/off flag: ``--json``, never ``--json true`` (a usage error)."""
    return typer.Option(*names, help=help)


def setting(section: str, field: str, *names: str, **options: Any) -> Any:
    """The option that sets ``field`` of the ``section``'s settings: declared once, as that
    field, whose description is its help, with its default (:func:`help_of`) unless
    ``show_default`` is given: then typer shows the parameter's default, or none."""
    text = description_of if "show_default" in options else help_of
    return typer.Option(*names, help=text(section, field), **options)


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


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    """One clear line on stderr, then a documented exit code; never a traceback."""
    views.error(message)
    raise typer.Exit(code)


@contextlib.contextmanager
def ends_cleanly(doing: str | None = None, interrupted: str | None = None) -> Iterator[None]:
    """An OSError while ``doing`` ("writing OUT") ends the command with its one line, exit 1;
    Ctrl+C says ``interrupted`` ("interrupted; OUT was not written"), exit 130. Without
    either, that error goes on to the app's own last guard."""
    try:
        yield
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        views.note(interrupted)
        raise typer.Exit(EXIT_INTERRUPT) from None
    except OSError as exc:
        if doing is None:
            raise
        fail(os_message(exc, doing))


def handled(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command``, ending on an engine's :class:`Failure` with its one line and its exit
    code: the one place errors become exit codes (the app registers every command so)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Failure as exc:
            fail(str(exc), exc.exit_code)

    return run


def lock_or_exit(holder, folder: Path, what: str = "run") -> None:
    """Take ``folder``'s writer lock into ``holder`` (an ExitStack, or the click context: held
    until the command ends), or exit 1 saying who holds it."""
    from threengan_cli.train import runlock

    enter = getattr(holder, "enter_context", None) or holder.with_resource
    try:
        enter(runlock.lock(folder, what))
    except OSError as exc:
        fail(os_message(exc, f"creating {folder}"))


def flags_of(model: Any, given: dict[str, Any], ctx: typer.Context | None = None) -> dict[str, Any]:
    """The options among a command's parameters (its ``locals()``) that set a field of the
    settings ``model``: an option named as a field is that field's flag, so none is listed
    twice. With ``ctx``, one left at a default that typer shows is left out too: a flag not
    given never overrides the --config file."""
    flags = {k: v for k, v in given.items() if k in model.model_fields}
    if ctx is None:
        return flags
    return {k: v for k, v in flags.items() if ctx.get_parameter_source(k).name != "DEFAULT"}


def settings_of(section: str, config: Path | None, **flags: Any):
    """The resolved settings of ``section`` (a :class:`SettingsError`, exit 2, if unusable)."""
    from threengan_cli.core.config import resolve

    return resolve(section, config, **flags)


RunOpt = Annotated[
    str | None,
    typer.Option(
        "--run",
        help="Use a model of this training run (name or folder): its final one, unless "
        "--model best.",
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Which model of the --run: final (the weights training ended with, whose test "
        "figures its summary.json reports; the latest epoch while it is unfinished) or best "
        "(best.safetensors, the epoch best on val). \\[default: final]",
        metavar="final|best",
        show_default=False,
    ),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Use this .safetensors checkpoint file.", dir_okay=True),
]


def model_of(checkpoint: Path | None, run: str | None, device: str, which: str | None = None):
    """The torch model of ``--checkpoint``, ``--run`` (``which``: ``--model``) or the bundled
    one."""
    from threengan_cli.infer.torch_engine import load_model
    from threengan_cli.train import runs

    return load_model(runs.model_file(checkpoint, run, which), device)


def classifier_of(
    checkpoint: Path | None, run: str | None, device: str, engine: str, which: str | None = None
):
    """The classifier to classify or score with (a model without one is refused). On the CPU
    (``auto`` or ``cpu``) the NumPy one unless ``engine`` is torch: it never imports torch
    (3-4 s of start-up on a small CPU). On ``cuda``/``mps`` torch's. A ``.onnx`` file
    (``threengan export``) runs on onnxruntime, whatever the engine."""
    from threengan_cli.infer import numpy_engine, onnx_export
    from threengan_cli.train import runs

    if onnx_export.is_onnx(checkpoint):
        model = onnx_export.load(checkpoint)
    elif device not in ("auto", "cpu") or engine == "torch":
        model = model_of(checkpoint, run, "cpu" if device == "auto" else device, which)
    else:
        model = numpy_engine.load(runs.model_file(checkpoint, run, which))
    model.require_classifier()
    return model


def warn_bf16_unmeasured(precision: str, device: str, quiet: bool) -> None:
    """bf16 on a CPU where it runs natively (``core/system.bf16_unmeasured``): a warning that
    it was not measured faster here (``threengan info --measure`` times it)."""
    from threengan_cli.core import system

    if not quiet and system.bf16_unmeasured(precision, device):
        views.warn(
            "--precision bf16 on a CPU: not known to be faster than fp32 here (it was faster "
            "on one CPU with native bf16, slower on others); `threengan info --measure` times "
            "both on this one"
        )
