"""The app: it builds the typer application, holds ``info`` and registers the other commands
in pipeline order, each wrapped by ``common.handled`` (engine errors -> one line, exit code).

One module per command (``prepare`` also holds ``datasets``, ``evaluate`` also ``runs``;
``benchmark`` is a group of ``run`` and ``merge``); shared options live in ``common``, the exit
codes in ``core/errors``. Rendering lives in ``views``; heavy libraries
(torch, numpy, PIL, pydantic) are imported inside the commands so that ``threengan --help``
stays instant. Help defaults are read from the settings models' source
(``core/settings_source``), never written here.
"""

# No ``from __future__ import annotations`` here, unlike the other modules: typer would then
# evaluate every option's annotation from its string each time it builds the commands,
# 26 ms of every command against 6.5 ms (``benchmarks/bench_startup.py --phases``).

import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from threengan_cli import __version__
from threengan_cli.cli import (
    benchmark,
    classify,
    evaluate,
    export,
    generate,
    prepare,
    split,
    train,
    views,
)
from threengan_cli.cli.common import (
    JsonOpt,
    flag,
    handled,
)
from threengan_cli.cli.views import note, print_json
from threengan_cli.core.errors import EXIT_FAIL, EXIT_INTERRUPT, interrupt_code, os_message


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


def command(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """Register a command whose engine errors end it with their line and exit code."""

    def register(func: Callable[..., Any]) -> Any:
        return app.command(cls=Command, **options)(handled(func))

    return register


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
    from threengan_cli.core.system import bf16_fact, describe

    facts = describe()
    if measure:
        from threengan_cli.train.accel import measure_cpu_bf16

        note("timing a 3ngan training step in fp32 and in bf16 on this CPU ...")
        measured = measure_cpu_bf16()
        facts["bf16 on cpu"] = bf16_fact(measured)
        if as_json:
            facts["bf16 on cpu, measured"] = measured
    if as_json:
        print_json(facts)
    else:
        views.info_table(facts)


command()(prepare.prepare)
command()(prepare.datasets)
command()(split.split)
command()(train.train)
command()(evaluate.runs)
command()(classify.classify)
command()(evaluate.evaluate)
command()(export.export)
command()(generate.generate)


class DefaultRun(Group):
    """``benchmark DATASET ...`` is ``benchmark run DATASET ...``: run is the default command."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(
    cls=DefaultRun,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Benchmark methods x training sizes x repeats and compare with the paper's Table 1.\n\n"
    "[bold]benchmark DATASET[/] is [bold]benchmark run DATASET[/]; [bold]benchmark merge[/] "
    "joins the folders of its shards into one report.",
)
bench_app.command("run", cls=Command)(handled(benchmark.run))
bench_app.command("merge", cls=Command)(handled(benchmark.merge))
app.add_typer(bench_app, name="benchmark")


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
        from threengan_cli.core.system import NO_TORCH

        views.error(f"this command needs PyTorch. {NO_TORCH}")
        sys.exit(EXIT_FAIL)
    except OSError as exc:  # a last guard: an OS error the command did not expect
        views.stdout_gone()
        sys.stderr.write(f"error: {os_message(exc, 'threengan')}\n")
        sys.exit(EXIT_FAIL)


if __name__ == "__main__":
    main()
