"""Everything rich but progress: the consoles, escaped messages and result tables.

Messages and progress go to stderr; stdout carries only data (JSON, CSV, tables asked for).
Text that comes from the user or the file system (paths, names, error messages) is escaped
before it reaches rich's markup parser, so ``a[bold]b`` prints as written. rich itself is
imported on first use: ``rich.console`` alone costs about 40 ms of every start.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import sys
import types
from typing import Any, NoReturn

from threengan_cli.core.errors import os_message


def defer_import(module: str, *names: str) -> None:
    """Keep ``module`` from loading until one of ``names`` from it is used.

    typer's help renderer imports ``rich.markdown`` (and markdown-it with it), for a markup
    mode threengan does not use, and ``rich.traceback`` (and pygments with it), for crashes
    only. Measured with ``benchmarks/bench_startup.py`` on wheel installs (docs/performance.md),
    ``threengan --help`` takes 0.18 s without this and 0.13 s with it. Each name is a
    stand-in class: calling it, or reading an attribute of it (``Traceback.from_exception``),
    loads the real module and hands over.
    """
    if module in sys.modules:
        return

    def real() -> types.ModuleType:
        if sys.modules.get(module) is placeholder:
            del sys.modules[module]
        return importlib.import_module(module)

    class Forward(type):
        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            return getattr(real(), cls.__name__)(*args, **kwargs)

        def __getattr__(cls, attr: str) -> Any:
            return getattr(getattr(real(), cls.__name__), attr)

    def attribute(name: str) -> Any:
        if name.startswith("__"):  # the import system probing (__path__, __file__...)
            raise AttributeError(name)
        return getattr(real(), name)

    placeholder = types.ModuleType(module)
    for name in names:
        setattr(placeholder, name, Forward(name, (), {}))
    placeholder.__getattr__ = attribute  # type: ignore[method-assign]
    sys.modules[module] = placeholder


class _LazyConsole:
    """A rich Console made on first use."""

    def __init__(self, **options: Any):
        self._options, self._console = options, None

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


err = _LazyConsole(stderr=True, highlight=False)
out = _LazyConsole(highlight=False, soft_wrap=True)


def esc(text: Any) -> str:
    """``text`` as rich markup that prints exactly as written."""
    from rich.markup import escape

    return escape(str(text))


# ----------------------------------------------------------------------------------- help
def _example_width(help_text: str) -> int:
    """Columns the widest example of a help text needs: its indented lines, with rich's
    one-column padding on each side."""
    from rich.text import Text

    lines = inspect.cleandoc(help_text).splitlines()
    examples = [line for line in lines if line.startswith("  ") and line.strip()]
    return max((Text.from_markup(line).cell_len for line in examples), default=0) + 2


@contextlib.contextmanager
def unwrapped_examples(help_text: str):
    """Examples are meant to be pasted into a shell. Where stdout is not a terminal (help
    piped into a file or a pager) rich wraps the help at 80 columns, which cuts a long
    example in two; there the help is made as wide as its widest example instead."""
    from rich.console import Console

    need = _example_width(help_text)
    if sys.stdout.isatty() or need <= Console().width:
        yield
        return
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(need)  # the width rich's consoles take when not on a terminal
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


# ------------------------------------------------------------------------------- messages
def error(message: str) -> None:
    """One line on stderr: ``error: message``."""
    err.print(f"[bold red]error:[/] {esc(message)}", soft_wrap=True)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {esc(message)}", soft_wrap=True)


def note(message: str) -> None:
    err.print(esc(message), soft_wrap=True)


def stdout_gone() -> None:
    """Point stdout at /dev/null, so that nothing more (not even the flush at exit) is
    written to a pipe whose reader has gone or to a full disk."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (a test runner's)
        pass


def reader_gone() -> NoReturn:
    """stdout's reader has gone (``threengan classify ... | head -1``): stop quietly with
    exit 0, as Python's own tools do, rather than report a failure."""
    import typer

    stdout_gone()
    raise typer.Exit(0)


def strict_json(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, infinity) as ``None``: JSON has no
    such numbers, and ``json.dumps`` would write ``NaN`` or ``Infinity``, which strict
    parsers (``jq``, JavaScript's ``JSON.parse``) refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def print_json(data: Any) -> None:
    """``data`` as strict JSON on stdout (:func:`strict_json`)."""
    try:
        text = json.dumps(strict_json(data), indent=2, default=str, allow_nan=False)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        reader_gone()
    except OSError as exc:
        import typer

        stdout_gone()
        error(os_message(exc, "writing to stdout"))
        raise typer.Exit(1) from None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --------------------------------------------------------------------------------- tables
def _table(columns: tuple[str, ...] = (), right: Any = None, **options: Any):
    """A rich table with ``columns`` (markup: escape what comes from the user): the first
    left-aligned and the others (numbers) right-aligned, or, where ``right`` names them,
    those right-aligned."""
    from rich.table import Table

    table = Table(**options)
    for i, column in enumerate(columns):
        at_right = i > 0 if right is None else column in right
        table.add_column(column, justify="right" if at_right else "left")
    return table


def print_whole(table: Any) -> None:
    """Print ``table`` on stdout at the width its cells need, when that is more than the
    console's (80 columns when stdout is not a terminal): rich would otherwise cut cells
    short with "…", and run names and paths in them are what users type next. A terminal
    narrower than the table wraps its lines; nothing is lost."""
    from rich.measure import Measurement

    console = out.console
    needed = Measurement.get(console, console.options.update_width(1 << 16), table).maximum
    if needed <= console.width:
        console.print(table)
        return
    width = console.width
    console.width = needed
    try:
        console.print(table)
    finally:
        console.width = width


def info_table(facts: dict[str, Any]) -> None:
    table = _table(show_header=False, box=None)
    for key, value in facts.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        table.add_row(f"[bold]{esc(key)}[/]", esc(shown))
    print_whole(table)


def prepare_table(name: str, report, image_size: int) -> None:
    """One row per split, one column per class, with totals and patients."""
    columns = ("split", *map(esc, report.classes), "total", "patients")
    title = esc(f"{name}: {report.total} images, {image_size}px")
    table = _table(columns, title=title)
    for split, row in report.counts.items():
        table.add_row(
            esc(split),
            *(str(row[c]) for c in report.classes),
            str(sum(row.values())),
            str(report.patients.get(split, 0)),
        )
    out.print(table)


def datasets_table(found: list[dict[str, Any]]) -> None:
    columns = ("name", "images", "train", "val", "test", "size", "classes", "path")
    table = _table(columns, ("images", "size"))
    for d in found:
        if "error" in d:
            row = [esc(d["name"]), "", "", "", "", "", f"[red]{esc(d['error'])}[/]"]
            table.add_row(*row, esc(d["path"]))
            continue
        s = d["splits"]
        table.add_row(
            esc(d["name"]),
            str(d["images"]),
            str(s.get("train", 0)),
            str(s.get("val", 0)),
            str(s.get("test", 0)),
            str(d["image_size"]),
            esc(", ".join(d["classes"])),
            esc(d["path"]),
        )
    print_whole(table)


def bench_tables(results: dict) -> None:
    """Two tables that fit 80 columns: accuracy beside the paper, then the other metrics."""
    from rich import box

    from threengan_cli.bench import report as b

    cfg = results["settings"]

    def short(stat: dict) -> str:
        if stat["mean"] is None:
            return "–"
        std = f"±{100 * stat['std']:.1f}" if stat["std"] is not None else ""
        return f"{100 * stat['mean']:.1f}{std}"

    columns = ("method", "N", "runs", "ours", "paper", "Δ pts", "best ep. on test", "Δ pts")
    first = _table(
        columns,
        title=f"{esc(cfg['profile'])} profile: test accuracy %, final-epoch model, mean ± std",
        caption="best epoch on test selects on test: optimistic, shown for comparison only",
        box=box.SIMPLE_HEAD,
    )
    columns = ("method", "N", "bal. acc", "AUC", "sens.", "spec.", "F1", "wall s", "img/s")
    title = "other test metrics %, final-epoch model"
    second = _table(columns, title=title, box=box.SIMPLE_HEAD)
    for r in results["results"]:
        paper = f"{100 * r['paper_accuracy']:.2f}" if r["paper_accuracy"] is not None else "–"
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        first.add_row(
            esc(r["method"]),
            str(r["size"]),
            f"{r['runs']}{failed}",
            b.percent(r["accuracy"]),
            paper,
            b.points(r["accuracy_diff_points"]),
            b.percent(r["optimistic_best_epoch_accuracy"]),
            b.points(r["optimistic_diff_points"]),
        )
        second.add_row(
            esc(r["method"]),
            str(r["size"]),
            *(short(r[m]) for m in b.METRICS[1:]),
            b.plain(r["wall_s"], 0),
            b.plain(r["images_per_s"]),
        )
    out.print(first)
    out.print(second)


def evaluation_tables(result) -> None:
    """The scores, the confusion matrix and per-class counts as tables on stdout."""
    from pathlib import Path

    from rich import box

    m = result.metrics
    split = f" ({result.data.split})" if result.data.split else ""
    which = f" ({result.which_model})" if result.which_model else ""
    title = f"{Path(result.data.source).name}{split}: {m['n']} images, {result.model_id}{which}"
    unflagged = result.unflagged
    columns = ("metric", f"all (n={m['n']})")
    if unflagged is not None:
        columns += (f"not flagged (n={unflagged['n']})",)
    scores = _table(
        columns,
        title=esc(title),
        caption=esc(
            "[brackets]: 95% interval (Wilson for proportions, DeLong for the AUC, "
            "a seeded bootstrap for the others)"
        ),
        box=box.SIMPLE_HEAD,
    )
    keys = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "f1")
    for key in (*keys, "ece", "brier"):
        found = [m] + ([unflagged] if unflagged is not None else [])
        shown = [_with_interval(f.get(key), f.get(f"{key}_ci")) for f in found]
        scores.add_row(key.replace("_", " ").replace("ece", "ECE (15 bins)"), *shown)
    if result.flagged is not None:
        lo, hi = result.flagged_ci
        share = f"{result.flagged:.1%} [{lo:.1%}, {hi:.1%}] (score above {result.ood_threshold:g})"
        scores.add_row("flagged as unlike the training X-rays", share, *([""] if unflagged else []))
    out.print(scores)
    columns = ("true \\ predicted", *map(esc, result.classes), "images", "correct")
    title = "confusion (rows true, columns predicted)"
    matrix = _table(columns, title=title, box=box.SIMPLE_HEAD)
    for c, row in zip(result.classes, m["confusion"], strict=True):
        counts = result.per_class[c]
        matrix.add_row(
            esc(c), *(str(n) for n in row), str(counts["images"]), str(counts["correct"])
        )
    out.print(matrix)


def _with_interval(value: float | None, interval: list[float] | None) -> str:
    """``0.8958 [0.870, 0.918]``; ``undefined`` for a metric that is not defined here."""
    if value is None:
        return "undefined"
    if interval is None:
        return f"{value:.4f}"
    return f"{value:.4f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def runs_table(found) -> None:
    """``threengan runs``: one row per run. The accuracies are of the model ``--run`` loads
    (the final one); ``best on val`` is best.safetensors' test accuracy (its epoch)."""
    from rich import box

    from threengan_cli.infer.ood import describe_fit
    from threengan_cli.train.runlist import human_bytes

    columns = ("name", "method", "N", "epochs", "state", "val acc", "test acc", "best on val")
    table = _table(
        (*columns, "ood fit", "size"),
        ("N", "epochs", "val acc", "test acc", "best on val", "size"),
        box=box.SIMPLE_HEAD,
        caption="val/test acc: of the final model, the one --run loads; best on val: test "
        "acc of best.safetensors (its epoch), --model best; ood fit: images and directions of "
        "its out-of-distribution detector (features + pixels)",
    )

    def acc(value) -> str:
        return "–" if value is None else f"{value:.4f}"

    for r in found:
        epoch = f" ({r.best_epoch})" if r.best_epoch is not None else ""
        table.add_row(
            esc(r.name),
            esc(r.method or "?"),
            esc(r.size or ("?" if r.state == "damaged" else "all")),
            esc(f"{r.epochs_done}/{r.epochs_planned or '?'}"),
            f"[red]{r.state}[/]" if r.state == "damaged" else r.state,
            acc(r.val_accuracy),
            acc(r.test_accuracy),
            acc(r.test_accuracy_best) + (epoch if r.test_accuracy_best is not None else ""),
            describe_fit(r.ood_fit),
            human_bytes(r.bytes),
        )
    print_whole(table)
