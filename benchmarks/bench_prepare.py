"""Time `prepare` on the shared Kermany download against the floor of just decoding it.

The floor: every image file opened, decoded and resized to the model size with Pillow, in a
process pool of the same size, nothing else (no hashing, checks, or writing). It is timed
twice: with the same reduced-scale JPEG decoding that `prepare` uses ("draft floor", the
fair comparison of overheads) and with a plain full decode ("plain floor").

    python benchmarks/bench_prepare.py [--repeats 3] [--workers 0] [--image-size 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from threengan_cli.core.settings import PrepareSettings
from threengan_cli.data.images import is_image_file
from threengan_cli.data.prepare import prepare

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany-chest-xray"


def _decode(task: tuple[str, int, bool]) -> int:
    path, size, draft = task
    with Image.open(path) as img:
        if draft:
            img.draft("L", (size, size))
        small = img.convert("L").resize((size, size), Image.Resampling.LANCZOS)
    return small.size[0]


def floor(files: list[str], size: int, workers: int, draft: bool) -> float:
    started = time.perf_counter()
    tasks = [(f, size, draft) for f in files]
    with ProcessPoolExecutor(workers) as pool:
        chunksize = max(1, min(64, len(tasks) // (workers * 8)))
        for _ in pool.map(_decode, tasks, chunksize=chunksize):
            pass
    return time.perf_counter() - started


def run_prepare(source: Path, size: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        prepare(source, Path(tmp) / "ds", PrepareSettings(image_size=size, workers=workers))
        return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DATA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    if not args.source.is_dir():
        print(f"no data at {args.source}", file=sys.stderr)
        return 1
    workers = args.workers or os.cpu_count() or 1
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(args.source)
        for name in names
        if is_image_file(os.path.join(root, name))
    )
    times: dict[str, list[float]] = {"prepare": [], "draft floor": [], "plain floor": []}
    for _ in range(args.repeats):
        times["draft floor"].append(floor(files, args.image_size, workers, draft=True))
        times["plain floor"].append(floor(files, args.image_size, workers, draft=False))
        times["prepare"].append(run_prepare(args.source, args.image_size, workers))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{len(files)} images, {workers} workers, size {args.image_size}, median of {args.repeats}"
    )
    for key, value in med.items():
        print(f"  {key:12s} {value:7.2f} s   ({', '.join(f'{t:.2f}' for t in times[key])})")
    print(f"  prepare / draft floor = {med['prepare'] / med['draft floor']:.2f}x")
    print(f"  prepare / plain floor = {med['prepare'] / med['plain floor']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
