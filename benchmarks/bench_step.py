"""Time one training step per method at the paper's settings and compare with a matmul.

    python benchmarks/bench_step.py [--repeats 20] [--methods 3ngan,ecgan] [--precisions fp32,bf16]
    python benchmarks/bench_step.py --modes eager,unpaired,nchw
    python benchmarks/bench_step.py --methods 3ngan --precisions fp32 --profile 10
    python benchmarks/bench_step.py --device cuda [--modes eager,graphs]

For each method, precision and mode: warm-up steps, then the median wall time of ``--repeats``
steps, the steps of all of them timed in turn (a slow moment on a shared machine slows all
alike); the FLOPs of one step (forward + backward, counted by torch's FlopCounterMode; the
optimizer update is not counted) and the rate they imply. A large matmul, timed in turn with
the steps, gives the machine's practical FLOP rate in each precision, so "% of matmul" says
how close the step runs to what this CPU can do. Prints a Markdown table.

On CUDA each figure is the median over ``--repeats`` blocks of 20 steps (synchronised at the
end of a block, as the training loop never synchronises inside an epoch), and ``--modes``
compares eager steps with steps replayed from a captured CUDA graph (the training loop's
default there), in the same run.

Without native bf16 (no AVX512-BF16/AMX) torch emulates bf16 convolutions and a bf16 step is
10-20x slower than fp32: there use ``--precisions fp32`` or ``--repeats 1`` for bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from threengan_cli.core.settings import TrainSettings
from threengan_cli.model import networks
from threengan_cli.model.methods import METHODS
from threengan_cli.train.accel import StepRunner, place

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per call of each function, timed in turn (one call, or on CUDA one
    block of 20 calls, of each per round), so that a slow minute on a shared machine slows
    all of them alike and their ratios stay fair."""
    block = 20 if device.type == "cuda" else 1
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            _sync(device)
            times[key].append((time.perf_counter() - t0) / block)
    return {key: statistics.median(t) for key, t in times.items()}


def matmul(largest: int, dtype: torch.dtype, device: torch.device) -> tuple[int, object]:
    """(side, a function running it) of a square matmul, growing the side up to ``largest``
    while one call stays under 1/8 s: without native bf16 a 2048 bf16 matmul takes a minute."""
    n = 256
    while True:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        once = time.perf_counter() - t0
        if n >= largest or once * 8 > 1.0:
            return n, lambda: torch.mm(a, b)  # noqa: B023 (returned at once)
        n *= 2


@contextlib.contextmanager
def _one_call_per_batch():
    """The earlier step, for the ``unpaired`` mode: D and C called once on real and once on
    generated images, instead of once on both (``networks.separately``)."""
    saved = networks.separately
    networks.separately = lambda net, *batches: tuple(net(b) for b in batches)
    try:
        yield
    finally:
        networks.separately = saved


def prepare_step(name: str, precision: str, mode: str, args) -> tuple:
    """(a function running one step, GFLOP per step) for one method, precision and mode."""
    device = torch.device(args.device)
    settings = TrainSettings(
        method=name, batch_size=args.batch, width=args.width, seed=0, precision=precision
    )
    method = METHODS[name]
    torch.manual_seed(0)
    nets = method.networks(settings, num_classes=2, image_size=args.image_size)
    if mode == "nchw":
        nets = {k: v.to(device) for k, v in nets.items()}
    else:
        nets = place(nets, device)  # as training does: channels-last on a CPU
    opts = method.optimizers(nets, settings)
    size = args.image_size
    real = torch.rand(args.batch, 1, size, size, device=device) * 2 - 1
    labels = torch.arange(args.batch, device=device) % 2
    dtype = DTYPES[precision]
    variant = _one_call_per_batch if mode == "unpaired" else contextlib.nullcontext

    def eager_step(idx=None):
        with variant():
            return method.step(nets, opts, real, labels, settings, autocast=dtype).as_dict()

    eager_step()  # first call: allocator and kernel selection, outside both measurements
    with FlopCounterMode(display=False) as counter:
        eager_step()
    step = eager_step
    if mode == "graphs":
        runner = StepRunner(eager_step, graphs=True)
        idx = torch.arange(args.batch, device=device)
        step = lambda: runner(idx)  # noqa: E731
        for _ in range(5):  # the runner captures after its warm-up steps
            step()
    return step, counter.get_total_flops() / 1e9


def profile(step, gflop: float, steps: int) -> None:
    """Where a step's time goes: self CPU time per op kind (torch.profiler) over ``steps``
    steps, and the rate of the convolutions alone (the step's FLOPs are nearly all theirs)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ms = {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}
    ms = {k: v for k, v in ms.items() if k.startswith("aten::")}
    total = sum(ms.values())
    conv = sum(v for k, v in ms.items() if "convolution" in k)
    print(f"profile of {steps} steps: {total:.1f} ms/step in aten ops (with profiler overhead)\n")
    print("| op | ms/step | share |")
    print("| --- | ---: | ---: |")
    for key, value in sorted(ms.items(), key=lambda kv: -kv[1])[:12]:
        print(f"| {key} | {value:.2f} | {100 * value / total:.1f}% |")
    rate = gflop / (conv / 1e3)
    print(f"\nconvolutions: {100 * conv / total:.1f}% of the time, {rate:.1f} GFLOP/s")


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
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--modes",
        default="eager",
        help="eager (as training runs it), unpaired (D and C called once per batch, the "
        "earlier step), nchw (networks not channels-last on a CPU), graphs (CUDA only)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        metavar="STEPS",
        help="instead of timing: profile STEPS steps of the first method (its first precision "
        "and mode) and print where the time goes",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    precisions = args.precisions.split(",")
    modes = args.modes.split(",")

    if args.profile:
        config = (args.methods.split(",")[0], precisions[0], modes[0])
        n, mm = matmul(args.matmul, DTYPES[precisions[0]] or torch.float32, device)
        rates = [2 * n**3 / _interleaved({"mm": mm}, 5, 1, device)["mm"] / 1e9]
        profile(*prepare_step(*config, args), args.profile)
        rates.append(2 * n**3 / _interleaved({"mm": mm}, 5, 1, device)["mm"] / 1e9)
        print(f"{n}x{n} matmul, {config[1]}: {rates[0]:.1f} GFLOP/s before, {rates[1]:.1f} after")
        return
    mms = {p: matmul(args.matmul, DTYPES[p] or torch.float32, device) for p in precisions}
    configs = [(m, p, mode) for p in precisions for mode in modes for m in args.methods.split(",")]
    steps = {c: prepare_step(*c, args) for c in configs}
    fns = {("matmul", p): fn for p, (_, fn) in mms.items()} | {c: f for c, (f, _) in steps.items()}
    seconds = _interleaved(fns, args.repeats, args.warmup, device)
    peak = {p: (n, 2 * n**3 / seconds[("matmul", p)] / 1e9) for p, (n, _) in mms.items()}
    rows = [
        {"method": c[0], "precision": c[1], "mode": c[2], "ms": seconds[c] * 1e3, "gflop": g}
        for c, (_, g) in steps.items()
    ]

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"torch {torch.__version__}, {where}; "
        f"batch {args.batch}, width {args.width}, image {args.image_size}, "
        f"median of {args.repeats} {'blocks of 20 steps' if device.type == 'cuda' else 'steps'} "
        f"after {args.warmup} warm-up"
    )
    print()
    for p in precisions:
        side, rate = peak[p]
        print(f"- {side}x{side} matmul, {p}: {rate:.1f} GFLOP/s")
    print()
    print("| method | precision | mode | ms/step | GFLOP/step | GFLOP/s | % of matmul |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        rate = r["gflop"] / (r["ms"] / 1e3)
        share = 100 * rate / peak[r["precision"]][1]
        print(
            f"| {r['method']} | {r['precision']} | {r['mode']} | {r['ms']:.2f} | {r['gflop']:.2f} "
            f"| {rate:.1f} | {share:.1f}% |"
        )


if __name__ == "__main__":
    main()
