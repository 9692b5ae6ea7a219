"""Start-up time of the command line, as a user feels it: a fresh process each time.

    python benchmarks/bench_startup.py [--repeats 10] [--exe PATH/TO/threengan ...]
    python benchmarks/bench_startup.py --phases [--exe PATH/TO/threengan ...]

Prints the median wall time of ``threengan --version``, ``threengan --help``, ``threengan
classify --help`` and ``threengan classify ONE.png`` (the bundled model, one 1500x1300 JPEG
made here, CSV to stdout), each in a new process, next to ``python -c pass`` (the
interpreter's own start-up, the floor no command can go under). The commands are timed in
turn, one run of each per round, so that a slow moment on a shared machine slows all of them
alike.

``--exe`` measures another installation, e.g. one from the wheel in a fresh virtual
environment, which is what users run: an editable install (``pip install -e``) adds a path
finder to every start of its interpreter, about 30 ms here. The floor uses the interpreter
beside the measured ``threengan``. Given several times, it compares installations (two
versions, say) with all their commands timed in turn, and prints each command's median as a
ratio of the first installation's.

``--phases`` splits ``threengan --help`` into its parts instead, timed inside fresh processes
of the same interpreter: importing typer, importing threengan's CLI module, building the
command tree, importing typer's help renderer (rich), rendering.

The runs use Python's bytecode cache, as an installed package does (pip compiles modules at
install time): where ``PYTHONDONTWRITEBYTECODE`` is set (this project's VMs set it), an
editable install would otherwise compile threengan's own modules at every start, about 25 ms
that no user pays. The variable is left out of the commands' environment, so the warm-up run
writes the cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def median_walls(cmds: dict[str, list[str]], repeats: int) -> dict[str, tuple[float, float]]:
    """(median, max) wall seconds per command, timed in turn."""
    for cmd in cmds.values():  # warm the file and bytecode caches once
        subprocess.run(cmd, capture_output=True, check=True, env=ENV)
    times: dict[str, list[float]] = {label: [] for label in cmds}
    for _ in range(repeats):
        for label, cmd in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True, env=ENV)
            times[label].append(time.perf_counter() - t0)
    return {label: (statistics.median(t), max(t)) for label, t in times.items()}


PHASES = """
import contextlib, io, time
t = [time.perf_counter()]
import typer
t.append(time.perf_counter())
from threengan_cli.cli.app import app
t.append(time.perf_counter())
import typer.main
command = typer.main.get_command(app.app)
t.append(time.perf_counter())
import typer.rich_utils
t.append(time.perf_counter())
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    command.main(["--help"], prog_name="threengan")
t.append(time.perf_counter())
print(" ".join(f"{1e3 * (b - a):.1f}" for a, b in zip(t, t[1:])))
"""
PHASE_NAMES = ["import typer", "import CLI module", "build commands", "import rich", "render"]


def phases(pythons: list[str], repeats: int) -> None:
    """Median milliseconds of each part of ``--help`` per interpreter, over ``repeats`` fresh
    processes each, the interpreters taking turns."""
    runs: dict[str, list[list[float]]] = {python: [] for python in pythons}
    # `python -c` puts the working directory first on sys.path: run from the repository it
    # would import the source tree instead of the installation being measured.
    with tempfile.TemporaryDirectory() as empty:
        for _ in range(repeats):
            for python in pythons:
                cmd = [python, "-c", PHASES]
                out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=empty)
                runs[python].append([float(v) for v in out.stdout.split()])
    print(f"parts of `threengan --help`, median ms of {repeats} fresh processes each\n")
    print("| part | " + " | ".join(f"`{p}`" for p in pythons) + " |")
    print("| --- |" + " ---: |" * len(pythons))
    columns = {p: list(zip(*runs[p], strict=True)) for p in pythons}
    for i, name in enumerate(PHASE_NAMES):
        cells = " | ".join(f"{statistics.median(columns[p][i]):.1f}" for p in pythons)
        print(f"| {name} | {cells} |")


def _tag_of(label: str) -> str:
    """`` [exe]`` at the end of a command's label, or nothing."""
    return label[label.rfind(" [") :] if label.endswith("]") else ""


def _python_beside(exe: str) -> str:
    """The interpreter of the environment ``exe`` is installed in (else this one)."""
    python = Path(exe).with_name("python")
    return str(python) if python.exists() else sys.executable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--exe",
        action="append",
        help="a threengan to measure; repeat to compare installations (default: the one on PATH)",
    )
    parser.add_argument("--phases", action="store_true", help="time the parts of --help")
    args = parser.parse_args()
    exes = args.exe or [shutil.which("threengan")]
    if not all(exes):
        sys.exit("threengan is not on PATH: pip install -e .")
    pythons = {exe: _python_beside(exe) for exe in exes}
    if args.phases:
        phases(list(pythons.values()), args.repeats)
        return

    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "xray.jpg"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (1300, 1500), dtype=np.uint8)).save(image)
        cmds = {}
        for exe, python in pythons.items():
            tag = f" [{exe}]" if len(exes) > 1 else ""
            cmds |= {
                f"python -c pass (floor){tag}": [python, "-c", "pass"],
                f"threengan --version{tag}": [exe, "--version"],
                f"threengan --help{tag}": [exe, "--help"],
                f"threengan classify --help{tag}": [exe, "classify", "--help"],
                f"threengan classify ONE.jpg{tag}": [exe, "classify", str(image), "-f", "csv"],
            }
        walls = median_walls(cmds, args.repeats)
        print(f"{', '.join(exes)}: {args.repeats} fresh processes each, output to a pipe\n")
        first = f" [{exes[0]}]" if len(exes) > 1 else ""
        print("| command | median s | slowest s | vs first |")
        print("| --- | ---: | ---: | ---: |")
        for label, (median, slowest) in walls.items():
            base = walls[label.removesuffix(_tag_of(label)) + first][0]
            print(f"| `{label}` | {median:.3f} | {slowest:.3f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
