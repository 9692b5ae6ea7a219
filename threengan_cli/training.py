"""The training loop: a plain function that iterates, evaluates, checkpoints and reports.

One epoch is one pass over the N labelled training images, in batches drawn by index from
one in-memory tensor (no per-step file I/O). After each epoch the model is evaluated on the
prepared val split, one line goes to ``metrics.jsonl``, a grid of images generated from a
fixed latent batch is saved, the latest checkpoint is written and, when val accuracy
improved, the best-on-val one. The test split is evaluated once at the end (and, for the
benchmark's clearly labelled "optimistic" column only, after every epoch); it never
influences training or which checkpoint is kept.

Exact resume: batch order comes from a generator seeded by (seed, epoch), so it needs no
saved state; the global RNG (latent samples) is saved in every checkpoint together with the
position (epoch, step) and the epoch's running sums. A run resumed from a checkpoint
therefore reproduces the uninterrupted run step for step.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from threengan_cli import checkpoints, fileio, runs, system
from threengan_cli import settings as settings_mod
from threengan_cli.datasets import PreparedDataset, balanced_subset, load_prepared
from threengan_cli.methods import METHODS
from threengan_cli.metrics import classification_metrics
from threengan_cli.settings import TrainSettings

RUN_FORMAT_VERSION = 1
LAST, BEST = runs.LAST, runs.BEST
NORMALISATION = {"scale": 1 / 127.5, "offset": -1.0, "range": [-1.0, 1.0]}
SAMPLE_GRID = 64


class TrainingError(Exception):
    """A run that cannot start or continue; the message is one line meant for the user."""


class NonFiniteLoss(TrainingError):
    """A loss became NaN or inf; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Ctrl+C: a resumable checkpoint was saved at ``path``."""

    def __init__(self, path: Path, epoch: int, step: int):
        super().__init__(f"stopped at epoch {epoch + 1} step {step}; resumable from {path}")
        self.path, self.epoch, self.step = path, epoch, step


# ------------------------------------------------------------------------------ events
@dataclass(frozen=True)
class RunStarted:
    run_dir: Path
    method: str
    device: str
    train_images: int
    steps_per_epoch: int
    start_epoch: int
    epochs: int
    resumed: bool
    extended: bool


@dataclass(frozen=True)
class StepDone:
    epoch: int
    step: int
    steps: int


@dataclass(frozen=True)
class EpochDone:
    epoch: int
    epochs: int
    record: dict[str, Any]


@dataclass(frozen=True)
class RunFinished:
    summary: dict[str, Any]


Event = RunStarted | StepDone | EpochDone | RunFinished


# ----------------------------------------------------------------------------- helpers
def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision on a device; unsupported pairs are an error."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainingError("bf16 asked for, but this GPU does not support it")
        if device.type == "cpu" and not system.cpu_bf16():
            # Measured on an AVX2-only EPYC: an emulated bf16 step is 13-20x slower than fp32.
            raise TrainingError(
                "bf16 asked for, but this CPU has no native bf16 (AVX512-BF16 or AMX), where "
                "it runs 13-20x slower than fp32: use --precision fp32"
            )
        return torch.bfloat16
    # fp16 needs a loss scaler to keep small gradients from flushing to zero; the steps do
    # not carry one yet, so refuse rather than train silently worse.
    raise TrainingError("fp16 training is not supported yet (it needs a loss scaler): use bf16")


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H, W) in [-1, 1], the range tanh generates."""
    return images_u8.unsqueeze(1).float() * NORMALISATION["scale"] + NORMALISATION["offset"]


def batch_order(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """The permutation of epoch ``epoch``: a pure function of (seed, epoch), so resume is exact."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Slices of one epoch; a last batch of one image joins the one before (BatchNorm needs 2)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


# Network initialisation draws from torch's global RNG; runs started in parallel threads
# (the benchmark's repeats on a GPU) take turns, so each gets exactly its seed's weights.
_INIT_LOCK = threading.Lock()


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


@torch.no_grad()
def evaluate(
    method,
    nets,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    batch_size: int = 256,
    amp: torch.dtype | None = None,
) -> dict[str, Any]:
    """Metrics of the method's classifier on one split (eval mode, no gradient)."""
    if len(labels) == 0:
        return {}
    for net in nets.values():
        net.eval()
    logits = []
    device = images_u8.device
    ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    with ctx:
        for start in range(0, len(labels), batch_size):
            x = to_model_range(images_u8[start : start + batch_size])
            logits.append(method.predict(nets, x).float())
    for net in nets.values():
        net.train()
    logits_t = torch.cat(logits)
    loss = torch.nn.functional.cross_entropy(logits_t, labels).item()
    probs = torch.softmax(logits_t, dim=1).cpu().numpy()
    result = classification_metrics(labels.cpu().numpy(), probs)
    result["loss"] = loss
    return result


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, pad: int = 2) -> None:
    """A PNG grid of images in [-1, 1] (B, 1, H, W), ``nrow`` per row, black gutters."""
    import io

    from PIL import Image

    imgs = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    b, _, h, w = imgs.shape
    rows = math.ceil(b / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.uint8)
    for i in range(b):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[top : top + h, left : left + w] = imgs[i, 0]
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    fileio.write_bytes(path, buf.getvalue())


def _finite_or_raise(losses: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    for name, value in losses.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLoss(
                f"{name} became {value.item()} at epoch {epoch + 1} step {step + 1}; "
                "stopped, the last good checkpoint is kept (try a lower --lr)"
            )


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


@contextlib.contextmanager
def stop_requests():
    """Turn the first Ctrl+C (or SIGTERM) into a flag checked between steps.

    Stopping between steps keeps networks, optimizers and RNG consistent, so the saved
    checkpoint resumes exactly. A second Ctrl+C stops at once, as users expect.
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    return runs.read_metrics(path, upto_epoch)  # a damaged line: a RunError naming it


# ------------------------------------------------------------------------------- data
@dataclass
class RunData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    image_size: int
    subset_paths: list[str] = field(default_factory=list)


def load_run_data(
    dataset: PreparedDataset, size: int | None, seed: int, device: torch.device
) -> RunData:
    """The prepared splits as uint8 tensors on the device; train is a balanced subset of N."""
    train_x, train_y = dataset.subset("train")
    train_index = np.flatnonzero(dataset.split == 0)
    if size is not None:
        pick = balanced_subset(train_y, size, seed)
        train_x, train_y, train_index = train_x[pick], train_y[pick], train_index[pick]
    val_x, val_y = dataset.subset("val")
    test_x, test_y = dataset.subset("test")
    sources = [img.get("source") for img in dataset.manifest.get("images", [])]

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return RunData(
        train_x=t(train_x),
        train_y=t(train_y.astype(np.int64)),
        val_x=t(val_x),
        val_y=t(val_y.astype(np.int64)),
        test_x=t(test_x),
        test_y=t(test_y.astype(np.int64)),
        classes=list(dataset.classes),
        image_size=int(train_x.shape[-1]),
        subset_paths=[sources[i] for i in train_index] if sources else [],
    )


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


# ------------------------------------------------------------------------------- loop
@runs.writes_run
def train(
    dataset_path: Path,
    settings: TrainSettings,
    run_dir: Path,
    *,
    resume: bool = False,
    on_event: Callable[[Event], None] | None = None,
    test_every_epoch: bool = False,
    checkpoint_every_s: float | None = None,
    stop_flag: threading.Event | None = None,
) -> dict[str, Any]:
    """Train one run in ``run_dir`` (new, or continued with ``resume``); return its summary.

    On CUDA the run works on a CUDA stream of its own, so runs in parallel threads overlap on
    the GPU. ``stop_flag`` replaces the Ctrl+C handler (which only the main thread can own):
    the benchmark sets it for all its parallel runs.

    By default the last and best checkpoints and a sample grid are written after every
    epoch. With ``checkpoint_every_s`` they are written once that many seconds have passed
    since the last write, on Ctrl+C and after the last epoch (the benchmark's choice: on a GPU
    an epoch of 200 images takes less time than writing 100 MB of optimizer state); a better
    model on val is kept in memory until then, so last and best on disk always agree.
    """
    device = system.select_device(settings.device)
    args = (
        device,
        dataset_path,
        settings,
        Path(run_dir),
        resume,
        on_event or (lambda event: None),
        test_every_epoch,
        checkpoint_every_s,
        stop_flag,
    )
    if device.type != "cuda":
        return _train(*args, None)
    GPU_TURNS.acquire()
    try:
        with torch.cuda.stream(torch.cuda.Stream(device)):
            return _train(*args, GPU_TURNS)
    finally:
        GPU_TURNS.release()


def _train(
    device: torch.device,
    dataset_path: Path,
    settings: TrainSettings,
    run_dir: Path,
    resume: bool,
    emit: Callable[[Event], None],
    test_every_epoch: bool,
    checkpoint_every_s: float | None,
    stop_flag: threading.Event | None,
    turns: GpuTurns | None,
) -> dict[str, Any]:
    amp = autocast_dtype(settings.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    method = METHODS[settings.method]()
    metrics_path = run_dir / "metrics.jsonl"

    dataset = load_prepared(Path(dataset_path))
    data = load_run_data(dataset, settings.size, settings.seed, device)
    if data.train_y.numel() < 2:
        raise TrainingError("the training split has fewer than 2 images")
    num_classes = len(data.classes)
    with _INIT_LOCK:
        system.seed_everything(settings.seed)
        nets = method.networks(settings, num_classes, data.image_size)
        rng = run_generator(settings.seed, device)
    nets = place(nets, device)
    opts = method.optimizers(nets, settings)
    # A fixed latent batch from its own generator: sample grids are comparable across epochs
    # and drawing them never moves the training RNG.
    fixed_z = torch.randn(
        SAMPLE_GRID, settings.latent, generator=torch.Generator().manual_seed(settings.seed)
    ).to(device)

    n = int(data.train_y.numel())
    spans = batches(n, settings.batch_size)
    start_epoch, start_step = 0, 0
    sums = torch.zeros(8, device=device)  # running loss sums of the epoch; last slot: steps
    best_acc, best_epoch = -1.0, None
    extended = finished_before = False
    elapsed_before = 0.0
    meta = {
        "kind": "threengan-run",
        "method": settings.method,
        "settings": settings.model_dump(mode="json"),
        "classes": data.classes,
        "num_classes": num_classes,
        "image_size": data.image_size,
        "channels": 1,
        "fit": dataset.manifest.get("settings", {}).get("fit", "squash"),
        "normalisation": NORMALISATION,
        "dataset": str(dataset.path),
        "versions": system.library_versions(),
        "seed": settings.seed,
    }

    if resume and not (run_dir / LAST).exists():
        # Killed before the first checkpoint: nothing was kept, so start over from scratch,
        # which is exactly what the uninterrupted run did.
        resume = False
    if resume:
        ckpt = checkpoints.load(run_dir / LAST, map_location=device)
        checkpoints.restore_networks(ckpt, nets)
        checkpoints.restore_optimizers(ckpt, opts)
        pos = ckpt.meta["position"]
        start_epoch, start_step = pos["epoch"], pos["step"]
        set_rng_state(ckpt.group("rng"), rng, settings.seed + 1_000_003 * start_epoch + start_step)
        state = ckpt.group("state")
        if "sums" in state:
            sums = state["sums"].to(device)
        best_acc = ckpt.meta.get("best_val_accuracy", -1.0)
        best_epoch = ckpt.meta.get("best_epoch")
        elapsed_before = ckpt.meta.get("elapsed_s", 0.0)
        finished_before = ckpt.meta.get("finished", False)
        extended = finished_before and start_epoch < settings.epochs
        history = _read_metrics(metrics_path, start_epoch)
        fileio.write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
        fileio.write_text(run_dir / "settings.json", settings_mod.dump(settings))
        fileio.write_text(
            run_dir / "run.json",
            json.dumps(
                {
                    **meta,
                    "format_version": RUN_FORMAT_VERSION,
                    "train_images": n,
                    "train_sources": data.subset_paths,
                },
                indent=2,
            )
            + "\n",
        )
        metrics_path.write_text("")
    # A run stopped after its last epoch but before its summary just runs the final
    # evaluation; only a finished run needs a larger --epochs to go on.
    if resume and finished_before and start_epoch >= settings.epochs:
        raise TrainingError(
            f"the run already has {start_epoch} epochs; pass --epochs larger than that to extend it"
        )

    emit(
        RunStarted(
            run_dir,
            settings.method,
            str(device),
            n,
            len(spans),
            start_epoch,
            settings.epochs,
            resume,
            extended,
        )
    )

    def run_meta(epoch: int, step: int, **extra: Any) -> dict[str, Any]:
        return {
            **meta,
            "position": {"epoch": epoch, "step": step},
            "best_val_accuracy": best_acc,
            "best_epoch": best_epoch,
            **extra,
        }

    def host_work():
        return turns.lent() if turns is not None else None

    def checkpoint(path: Path, epoch: int, step: int, **extra: Any) -> None:
        """The last checkpoint: everything a resume needs."""
        elapsed = elapsed_before + time.perf_counter() - t0
        checkpoints.save(
            path,
            run_meta(epoch, step, elapsed_s=elapsed, **extra),
            nets,
            optimizers=opts,
            rng=get_rng_state(rng),
            state={"sums": sums},
            host_work=host_work(),
        )

    best_pending: tuple[int, dict[str, dict[str, torch.Tensor]]] | None = None
    last_write = time.perf_counter()

    def write_pending_best() -> None:
        nonlocal best_pending
        if best_pending is not None:
            position, weights = best_pending
            checkpoints.save(
                run_dir / BEST,
                run_meta(position, 0, weights="best-on-val"),
                weights,
                host_work=host_work(),
            )
            best_pending = None

    def epoch_done(epoch: int, first: int, epoch_t0: float) -> None:
        nonlocal best_acc, best_epoch, best_pending, last_write
        steps_done = max(sums[-1].item(), 1.0)
        means = {name: sums[i].item() / steps_done for i, name in enumerate(loss_names)}
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLoss(
                f"{bad[0]} became non-finite during epoch {epoch + 1}; stopped, the last good "
                "checkpoint is kept (try a lower --lr)"
            )
        seconds = time.perf_counter() - epoch_t0
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train": means,
            "val": evaluate(method, nets, data.val_x, data.val_y, num_classes, amp=amp),
            "seconds": round(seconds, 3),
            "images_per_s": round((spans[-1][1] - spans[first][0]) / max(seconds, 1e-9), 2),
        }
        if test_every_epoch:
            record["test_optimistic"] = evaluate(
                method, nets, data.test_x, data.test_y, num_classes, amp=amp
            )
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        due = (
            checkpoint_every_s is None
            or epoch + 1 >= settings.epochs
            or time.perf_counter() - last_write >= checkpoint_every_s
        )
        if "G" in nets and due:
            nets["G"].eval()
            with torch.no_grad():
                save_grid(nets["G"](fixed_z), run_dir / "samples" / f"epoch_{epoch + 1:04d}.png")
            nets["G"].train()
        val_acc = record["val"].get("accuracy", 0.0) if record["val"] else 0.0
        if val_acc > best_acc or best_epoch is None:
            best_acc, best_epoch = val_acc, epoch + 1
            weights = {
                name: {k: v.detach().clone() for k, v in net.state_dict().items()}
                for name, net in nets.items()
            }
            best_pending = (epoch + 1, weights)
        if due:
            write_pending_best()
            checkpoint(run_dir / LAST, epoch + 1, 0)
            last_write = time.perf_counter()
        emit(EpochDone(epoch, settings.epochs, record))

    loss_names: list[str] = []

    def one_step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gather the batch, update the networks, add the losses to the epoch's sums."""
        real = to_model_range(data.train_x[idx])
        out = method.step(nets, opts, real, data.train_y[idx], settings, autocast=amp, rng=rng)
        losses = out.as_dict()
        values = torch.stack([v.detach().float() for v in losses.values()])
        sums[: len(values)] += values
        sums[-1] += 1
        return losses

    graphs = device.type == "cuda" and settings.cuda_graphs
    run_step = StepRunner(one_step, graphs=graphs, generators=(rng,))
    t0 = time.perf_counter()
    check_every_step = device.type == "cpu"  # a host sync is free on CPU, costly on a GPU
    with nullcontext(stop_flag) if stop_flag is not None else stop_requests() as stop:
        for epoch in range(start_epoch, settings.epochs):
            epoch_t0 = time.perf_counter()
            order = batch_order(settings.seed, epoch, n, device)
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                sums.zero_()  # in place: a captured step holds this tensor's address
            for step in range(first, len(spans)):
                if stop.is_set():
                    write_pending_best()
                    path = run_dir / LAST
                    checkpoint(path, epoch, step)
                    raise Interrupted(path, epoch, step)
                lo, hi = spans[step]
                losses = run_step(order[lo:hi])
                if turns is not None:
                    turns.pass_on()
                if not loss_names:
                    loss_names = list(losses)
                if check_every_step:
                    _finite_or_raise(losses, epoch, step)
                emit(StepDone(epoch, step + 1, len(spans)))
            epoch_done(epoch, first, epoch_t0)

    summary = finish(
        method,
        nets,
        data,
        num_classes,
        run_dir,
        settings,
        amp,
        elapsed_before + time.perf_counter() - t0,
        best_epoch,
        extended,
    )
    checkpoint(run_dir / LAST, settings.epochs, 0, finished=True)
    emit(RunFinished(summary))
    return summary


def finish(
    method,
    nets,
    data: RunData,
    num_classes: int,
    run_dir: Path,
    settings: TrainSettings,
    amp,
    elapsed: float,
    best_epoch,
    extended: bool,
) -> dict:
    """Evaluate on test once (final model and best-on-val model) and write summary.json."""
    final_test = evaluate(method, nets, data.test_x, data.test_y, num_classes, amp=amp)
    final_val = evaluate(method, nets, data.val_x, data.val_y, num_classes, amp=amp)
    best_test = final_test
    if best_epoch is not None and best_epoch != settings.epochs:
        best = checkpoints.load(run_dir / BEST, map_location=data.train_x.device)
        saved = {k: {p: v.clone() for p, v in net.state_dict().items()} for k, net in nets.items()}
        checkpoints.restore_networks(best, nets)
        best_test = evaluate(method, nets, data.test_x, data.test_y, num_classes, amp=amp)
        for k, net in nets.items():
            net.load_state_dict(saved[k])
    summary = {
        "run": str(run_dir),
        "method": settings.method,
        "epochs": settings.epochs,
        "train_images": int(data.train_y.numel()),
        "classes": data.classes,
        "val": final_val,
        "test": final_test,
        "best_epoch_on_val": best_epoch,
        "test_of_best_on_val": best_test,
        "elapsed_s": round(elapsed, 2),
        "extended": extended,
        "settings": settings.model_dump(mode="json"),
    }
    fileio.write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
