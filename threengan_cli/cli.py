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

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from threengan_cli import __version__

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
    epilog="Exit codes: 0 ok, 1 failure, 2 usage error, 3 some inputs unreadable, "
    "130 interrupted.",
)

# Messages and progress go to stderr; stdout carries only data (JSON, CSV, tables asked for).
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML file with settings ([prepare], [train], ... tables); flags override it.",
        dir_okay=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout (messages on stderr).")
]


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    """One clear line on stderr, then a documented exit code; never a traceback."""
    err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
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
            "--version", help="Show the version and exit.", callback=_version_callback,
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
        table.add_row(f"[bold]{key}[/]", ", ".join(value) if isinstance(value, list) else str(value))
    out.print(table)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPT)


if __name__ == "__main__":
    main()
