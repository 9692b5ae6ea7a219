"""Time one training step per method at the paper's settings and compare with a matmul.

    python benchmarks/bench_step.py [--repeats 20] [--methods 3ngan,ecgan] [--precisions fp32,bf16]

For each method and precision: warm-up steps, then the median wall time of ``--repeats``
steps; the FLOPs of one step (forward + backward, counted by torch's FlopCounterMode; the
optimizer update is not counted) and the rate they imply. A large matmul measured in the same
run gives the machine's practical FLOP rate in each precision, so "% of matmul" says how close
the step runs to what this CPU can do. Prints a Markdown table.

Without native bf16 (no AVX512-BF16/AMX) torch emulates bf16 convolutions and a bf16 step is
10-20x slower than fp32: there use ``--precisions fp32`` or ``--repeats 1`` for bf16.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from threengan_cli.methods import METHODS
from threengan_cli.settings import TrainSettings

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _median_seconds(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(largest: int, dtype: torch.dtype, repeats: int) -> tuple[int, float]:
    """(side, GFLOP/s) of a square matmul, growing the side up to ``largest`` while one call
    stays under a second: without native bf16 a 2048 bf16 matmul takes about a minute."""
    n = 256
    while True:
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        t0 = time.perf_counter()
        torch.mm(a, b)
        once = time.perf_counter() - t0
        if n >= largest or once * 8 > 1.0:
            break
        n *= 2
    seconds = _median_seconds(lambda: torch.mm(a, b), repeats, warmup=1)
    return n, 2 * n**3 / seconds / 1e9


def bench_method(name: str, precision: str, args) -> dict:
    settings = TrainSettings(
        method=name, batch_size=args.batch, width=args.width, seed=0, precision=precision
    )
    method = METHODS[name]
    torch.manual_seed(0)
    nets = method.networks(settings, num_classes=2, image_size=args.image_size)
    opts = method.optimizers(nets, settings)
    real = torch.rand(args.batch, 1, args.image_size, args.image_size) * 2 - 1
    labels = torch.arange(args.batch) % 2
    dtype = DTYPES[precision]

    def step():
        return method.step(nets, opts, real, labels, settings, autocast=dtype)

    step()  # first call: allocator and kernel selection, outside both measurements
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    seconds = _median_seconds(step, args.repeats, args.warmup)
    return {"method": name, "precision": precision, "ms": seconds * 1e3, "gflop": flops / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--methods", default="vanilla,sgan,ecgan,3ngan")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--matmul", type=int, default=2048, help="side of the reference matmul")
    args = parser.parse_args()
    precisions = args.precisions.split(",")

    peak = {p: matmul_gflops(args.matmul, DTYPES[p] or torch.float32, 3) for p in precisions}
    rows = [bench_method(m, p, args) for p in precisions for m in args.methods.split(",")]

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"batch {args.batch}, width {args.width}, image {args.image_size}, "
        f"median of {args.repeats} steps after {args.warmup} warm-up"
    )
    print()
    for p in precisions:
        side, rate = peak[p]
        print(f"- {side}x{side} matmul, {p}: {rate:.1f} GFLOP/s")
    print()
    print("| method | precision | ms/step | GFLOP/step | GFLOP/s | % of matmul |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        rate = r["gflop"] / (r["ms"] / 1e3)
        share = 100 * rate / peak[r["precision"]][1]
        print(
            f"| {r['method']} | {r['precision']} | {r['ms']:.1f} | {r['gflop']:.2f} "
            f"| {rate:.1f} | {share:.0f}% |"
        )


if __name__ == "__main__":
    main()
