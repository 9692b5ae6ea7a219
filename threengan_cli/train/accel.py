"""Where and how a run computes: device precision, memory layout, CUDA graphs, GPU turns.

Device and seed are chosen in :mod:`system`; this module holds what follows from the device:
the autocast dtype a precision means there, the networks' placement (channels-last on a CPU),
replaying a step from CUDA graphs, and the turns that runs trained in parallel threads take at
launching GPU work; and the run's own random generator (how it starts, saves and resumes).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from threengan_cli.core import system
from threengan_cli.train.events import TrainingError

# Network initialisation draws from torch's global RNG; runs started in parallel threads
# (the benchmark's repeats on a GPU) take turns, so each gets exactly its seed's weights.
INIT_LOCK = threading.Lock()


def run_generator(seed: int, device: torch.device) -> torch.Generator:
    """The run's own generator for z, continuing the stream a run on the global RNG had.

    Called right after the networks are built: on the CPU it takes over the global RNG's state
    at that point, on CUDA it is seeded like the CUDA default generator. A run therefore draws
    the same z as before runs had generators of their own (the shipped model reproduces).
    """
    gen = torch.Generator(device)
    if device.type == "cpu":
        gen.set_state(torch.get_rng_state())
    else:
        gen.manual_seed(seed)
    return gen


def get_rng_state(rng: torch.Generator) -> dict[str, torch.Tensor]:
    return {"run": rng.get_state()}


def set_rng_state(state: dict[str, torch.Tensor], rng: torch.Generator, reseed: int) -> None:
    """Restore the run's generator; where the saved state is from another kind of device (or
    an older checkpoint has none), the stream goes on from ``reseed`` instead."""
    legacy = "cuda" if rng.device.type == "cuda" else "torch"  # before runs had generators
    saved = state.get("run", state.get(legacy))
    if saved is not None:
        try:
            rng.set_state(saved.to(torch.uint8))
            return
        except RuntimeError:
            pass
    rng.manual_seed(reseed)


class PrecisionError(TrainingError):
    """A precision this device cannot use; the message is one line meant for the user."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision on a device; unsupported pairs are an error."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise PrecisionError("bf16 asked for, but this GPU does not support it")
        if device.type == "cpu" and not system.cpu_bf16():
            # Measured on an AVX2-only EPYC: an emulated bf16 step is 13-20x slower than fp32.
            raise PrecisionError(
                "bf16 asked for, but this CPU has no native bf16 (AVX512-BF16 or AMX), where "
                "it runs 13-20x slower than fp32: use --precision fp32"
            )
        return torch.bfloat16
    # fp16 needs a loss scaler to keep small gradients from flushing to zero; the steps do
    # not carry one yet, so refuse rather than train silently worse.
    raise PrecisionError("fp16 training is not supported yet (it needs a loss scaler): use bf16")


def measure_cpu_bf16(budget_s: float = 6.0, width: int = 64, batch: int = 10) -> dict[str, Any]:
    """Time the 3ngan training step on this CPU in fp32 and in bf16 (autocast), as training
    runs it (batch 10, width 64, 64 px, channels-last): one warm-up step each (fp32 only where
    bf16 is emulated), then steps in turn (so that a busy moment of a shared machine slows
    both alike) until ``budget_s`` is spent, at least one and at most 9 of each. Returns the
    medians in ms and the step count.

    This is the verdict's source: tables of CPU kinds have been wrong both ways (bf16 1.28x
    faster on one AVX512-BF16 CPU, 0.78x on another). Where bf16 is emulated a step takes
    seconds, so the measurement does too.
    """
    import statistics
    import time

    from threengan_cli.core.settings import TrainSettings
    from threengan_cli.model.methods import METHODS

    device, size = torch.device("cpu"), 64
    steps: dict[str, Callable[[], Any]] = {}
    for precision in ("fp32", "bf16"):
        settings = TrainSettings(
            method="3ngan", recipe="paper", batch_size=batch, width=width, precision=precision
        )
        method = METHODS["3ngan"]
        torch.manual_seed(0)
        nets = place(method.networks(settings, 2, size), device)
        opts = method.optimizers(nets, settings)
        real = torch.rand(batch, 1, size, size) * 2 - 1
        labels = torch.arange(batch) % 2
        dtype = torch.bfloat16 if precision == "bf16" else None
        steps[precision] = functools.partial(
            method.step, nets, opts, real, labels, settings, autocast=dtype
        )
    native = system.cpu_bf16()
    for precision, step in steps.items():
        # allocator and kernel choice, outside the timing; an emulated bf16 step takes
        # seconds and is 10x or more slower either way, so it gets no warm-up of its own
        if precision == "fp32" or native:
            step()
    times: dict[str, list[float]] = {p: [] for p in steps}
    end = time.perf_counter() + budget_s
    while not times["fp32"] or (time.perf_counter() < end and len(times["fp32"]) < 9):
        for precision, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[precision].append(time.perf_counter() - t0)
    fp32, bf16 = (1e3 * statistics.median(times[p]) for p in ("fp32", "bf16"))
    return {
        "fp32_ms": round(fp32, 1),
        "bf16_ms": round(bf16, 1),
        "bf16_speedup": round(fp32 / bf16, 3),
        "steps": len(times["fp32"]),
        "native": native,
    }


def place(nets: dict[str, torch.nn.Module], device: torch.device) -> dict[str, torch.nn.Module]:
    """The networks on ``device``; on a CPU in channels-last layout, where oneDNN runs these
    convolutions faster: 1.05-1.08x per 3N-GAN step (``bench_step.py --modes eager,nchw``).
    Images need no conversion: with one channel both layouts are the same. Checkpoints store
    contiguous tensors either way, and restored optimizer state takes its parameter's layout
    (:func:`checkpoints.restore_optimizers`)."""
    nets = {name: net.to(device) for name, net in nets.items()}
    if device.type == "cpu":
        nets = {name: net.to(memory_format=torch.channels_last) for name, net in nets.items()}
    return nets


class GpuTurns:
    """Runs trained in parallel threads take turns at asking the GPU for work.

    A run holds its turn for everything it asks of CUDA and passes it on after each step,
    first come first served. Some CUDA calls (the allocator's bookkeeping, cuDNN's kernel
    search) are refused in one thread while another captures a graph: measured on an H200,
    parallel runs without turns failed with "operation not permitted when stream is
    capturing". Launches return at once, so the GPU still runs the runs' kernels side by side
    on their own streams; only the launching takes turns.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._holder: int | None = None

    def acquire(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                self._cond.wait()
            self._holder = threading.get_ident()

    def release(self) -> None:
        with self._cond:
            if self._holder != threading.get_ident():
                return  # not ours (e.g. interrupted while waiting in pass_on)
            self._holder = None
            self._serving += 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def lent(self) -> Iterator[None]:
        """Host-only work (serialising, writing files): the other runs use the GPU meanwhile."""
        self.release()
        try:
            yield
        finally:
            self.acquire()

    def pass_on(self) -> None:
        """Let the runs waiting for a turn go first, then take it back."""
        with self._cond:
            if self._next_ticket == self._serving + 1:
                return  # nobody is waiting
        self.release()
        self.acquire()


GPU_TURNS = GpuTurns()


class StepRunner:
    """Runs the loop's step function eagerly, or on CUDA replays it from CUDA graphs.

    At batch 10 a GPU step is a few hundred tiny kernels and launching them costs more than
    running them; a CUDA graph launches them all at once. One graph is captured per batch
    size (an epoch has at most two), after ``warmup`` eager steps of that size on a side
    stream, which also creates the optimizers' state. Capturing records without executing,
    so every step, warm-up or replayed, is a real training step: the run is the same
    sequence of updates as an eager one. The step reads its batch through a static index
    buffer; the loop copies the batch's indices into it (one device copy) and replays.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        graphs: bool,
        warmup: int = 3,
        generators: tuple[torch.Generator, ...] = (),
    ):
        self.fn, self.graphs, self.warmup = fn, graphs, warmup
        self.generators = [g for g in generators if g.device.type == "cuda"]
        self._seen: dict[int, int] = {}
        self._captured: dict[int, tuple[Any, torch.Tensor, dict[str, torch.Tensor]]] = {}

    def __call__(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.graphs:
            return self.fn(idx)
        size = int(idx.shape[0])
        if size not in self._captured:
            if self._seen.get(size, 0) < self.warmup:
                self._seen[size] = self._seen.get(size, 0) + 1
                side = torch.cuda.Stream(idx.device)
                side.wait_stream(torch.cuda.current_stream(idx.device))
                with torch.cuda.stream(side):
                    out = self.fn(idx)
                torch.cuda.current_stream(idx.device).wait_stream(side)
                return out
            static_idx = idx.clone()
            graph = torch.cuda.CUDAGraph()
            for gen in self.generators:  # z drawn inside the graph advances the run's stream
                graph.register_generator_state(gen)
            # A capture stream of its own; the run holds its GPU turn (GpuTurns), so no other
            # thread calls CUDA while this one captures.
            capture = torch.cuda.Stream(idx.device)
            with torch.cuda.graph(graph, stream=capture, capture_error_mode="thread_local"):
                static_out = self.fn(static_idx)
            self._captured[size] = (graph, static_idx, static_out)
        graph, static_idx, static_out = self._captured[size]
        static_idx.copy_(idx)
        graph.replay()
        return static_out
