"""Start-up time of the command line, as a user feels it: a fresh process each time.

    python benchmarks/bench_startup.py [--repeats 10]

Prints the median wall time of ``threengan --version``, ``threengan --help`` and
``threengan classify ONE.png`` (the bundled model, one 1500x1300 JPEG made here, CSV to
stdout), each in a new process, next to ``python -c pass`` measured in the same run (the
interpreter's own start-up, the floor no command can go under).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def median_wall(cmd: list[str], repeats: int) -> float:
    subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache once
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    exe = shutil.which("threengan") or sys.exit("threengan is not on PATH: pip install -e .")

    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "xray.jpg"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (1300, 1500), dtype=np.uint8)).save(image)
        rows = [
            ("python -c pass (floor)", [sys.executable, "-c", "pass"]),
            ("threengan --version", [exe, "--version"]),
            ("threengan --help", [exe, "--help"]),
            ("threengan classify ONE.jpg", [exe, "classify", str(image), "-f", "csv"]),
        ]
        print(f"median of {args.repeats} fresh processes each\n")
        print("| command | median s |")
        print("| --- | ---: |")
        for label, cmd in rows:
            print(f"| `{label}` | {median_wall(cmd, args.repeats):.3f} |")


if __name__ == "__main__":
    main()
