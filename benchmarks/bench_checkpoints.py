"""Wall time of `threengan train` with its resumable checkpoint written after every epoch
(`--checkpoint-every 0`, what train did before) against on a time basis (the default, 60 s).

    python benchmarks/bench_checkpoints.py kermany [--rounds 2] \
        [--args "--size 200 --epochs 5 --unlabelled rest"]

Each round runs both modes, one after the other, as fresh `threengan train ... --force`
processes in the data dir ($THREENGAN_HOME), so that a busy minute of a shared machine slows
both alike. For each run: the wall time of the whole command; the time of the training steps
(the sum of metrics.jsonl's per-epoch ``seconds``, measured before each epoch's evaluation);
and, counted inside the process (``checkpoints.save`` wrapped, nothing else changed), how many
checkpoints it wrote, their bytes and the seconds spent writing them: that is what the time
basis changes. Prints a Markdown table and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"every epoch": ["--checkpoint-every", "0"], "time basis (60 s)": []}

# `threengan` itself, with checkpoints.save timed; the counts go to the file $BENCH_WRITES.
_COUNTED = """
import atexit, json, os, sys, time
from threengan_cli.model import checkpoints
from threengan_cli.cli.app import main

real, seen = checkpoints.save, {"writes": 0, "bytes": 0, "seconds": 0.0}

def save(path, *args, **kwargs):
    t0 = time.perf_counter()
    real(path, *args, **kwargs)
    seen["seconds"] += time.perf_counter() - t0
    seen["writes"] += 1
    seen["bytes"] += os.path.getsize(path)

checkpoints.save = save
atexit.register(lambda: open(os.environ["BENCH_WRITES"], "w").write(json.dumps(seen)))
sys.argv = ["threengan", *sys.argv[1:]]
main()
"""


def one_run(dataset: str, name: str, args: list[str], extra: list[str]) -> dict:
    command = [sys.executable, "-c", _COUNTED, "train", dataset, "--name", name]
    command += [*args, *extra, "--force", "-q", "--json"]
    with tempfile.NamedTemporaryFile(suffix=".json") as counts:
        t0 = time.perf_counter()
        done = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "BENCH_WRITES": counts.name}
        )
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(command[3:])} failed ({done.returncode}): {done.stderr}")
        writes = json.loads(Path(counts.name).read_text())
    run = Path(json.loads(done.stdout)["run"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = sum(r["seconds"] for r in records)
    return {"wall": wall, "steps": steps, **writes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--args", default="--size 200 --epochs 5 --unlabelled rest")
    args = parser.parse_args()
    extra = shlex.split(args.args)
    home = os.environ.get("THREENGAN_HOME", "(the user data dir)")
    print(f"threengan train {args.dataset} {args.args}; THREENGAN_HOME={home}")
    print(f"load average at the start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)\n")
    print("| round | checkpoints | wall s | steps s | writes | MB written | writing s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    found: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for r in range(1, args.rounds + 1):
        for mode, flags in MODES.items():
            name = f"bench-checkpoints-{'epoch' if flags else 'time'}-{r}"
            res = one_run(args.dataset, name, extra, flags)
            found[mode].append(res)
            print(
                f"| {r} | {mode} | {res['wall']:.1f} | {res['steps']:.1f} | {res['writes']} | "
                f"{res['bytes'] / 1e6:.0f} | {res['seconds']:.1f} |",
                flush=True,
            )
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    for mode, results in found.items():
        med = {k: statistics.median(x[k] for x in results) for k in ("wall", "steps", "seconds")}
        print(
            f"- {mode}: median wall {med['wall']:.1f} s (steps {med['steps']:.1f} s, "
            f"writing checkpoints {med['seconds']:.1f} s)"
        )


if __name__ == "__main__":
    main()
