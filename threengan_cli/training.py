"""The training loop: a plain function that iterates, evaluates, checkpoints and reports.

One epoch is one pass over the N labelled training images, in batches drawn by index from
one in-memory tensor (no per-step file I/O). After each epoch the model is evaluated on the
prepared val split, one line goes to ``metrics.jsonl``, a grid of images generated from a
fixed latent batch is saved, the latest checkpoint is written and, when val accuracy
improved, the best-on-val one. The test split is evaluated once at the end (and, for the
benchmark's clearly labelled "optimistic" column only, after every epoch); it never
influences training or which checkpoint is kept.

What is evaluated and saved for use is :func:`_prediction_nets`: under the paper's recipe the
live networks as they are; with ``ema`` or ``precise_bn`` (the robust recipe) copies with
averaged weights and BatchNorm statistics recomputed for them (:mod:`averaging`).

Exact resume: batch order (and the unlabelled batches) come from generators seeded by (seed,
epoch), so they need no saved state; the run's RNG (latent samples, augmentation) is saved in
every checkpoint together with the position (epoch, step), the epoch's running sums and the
averaged weights. A run resumed from a checkpoint therefore reproduces the uninterrupted run
step for step.

The loop reads top to bottom: :func:`_open` builds a :class:`Loop`, :func:`_restore` or
:func:`_create` sets up its folder, then ``_train`` steps through the epochs, calling
:func:`_one_step` and :func:`_epoch_done`, and :func:`finish` writes the summary.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from threengan_cli import augment, checkpoints, fileio, modelfile, pseudolabels, runs, system
from threengan_cli import settings as settings_mod
from threengan_cli.accel import (
    GPU_TURNS,
    INIT_LOCK,
    GpuTurns,
    StepRunner,
    autocast_dtype,
    get_rng_state,
    place,
    run_generator,
    set_rng_state,
)
from threengan_cli.averaging import Averager, prediction_copies, recompute_bn
from threengan_cli.datasets import load_prepared
from threengan_cli.images import NORMALISATION, grid_png
from threengan_cli.methods import METHODS, StepOutput
from threengan_cli.networks import from_model_range, to_model_range
from threengan_cli.rundata import DataError, RunData, batch_order, batches, load_run_data
from threengan_cli.scoring import (
    SplitOutputs,
    flagged_share,
    metrics_of_logits,
    model_statistics,
    score_split,
    split_outputs,
)
from threengan_cli.settings import TrainSettings
from threengan_cli.train_events import (
    EpochDone,
    Event,
    InitNotFound,
    Interrupted,
    NonFiniteLoss,
    RunFinished,
    RunStarted,
    StepDone,
    TrainingError,
)

RUN_FORMAT_VERSION = 1
SAMPLE_GRID = 64


# ----------------------------------------------------------------------------- helpers
def _finite_or_raise(losses: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    for name, value in losses.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLoss(
                f"{name} became {value.item()} at epoch {epoch + 1} step {step + 1}; "
                "stopped, the last good checkpoint is kept (try a lower --lr)"
            )


class StopFlag(threading.Event):
    """A stop request: set by the first Ctrl+C or SIGTERM, whose number is ``signum`` (the
    command's exit code says which: 130 or 143)."""

    signum: int | None = None


@contextlib.contextmanager
def stop_requests():
    """Turn the first Ctrl+C (or SIGTERM) into a flag checked between steps.

    Stopping between steps keeps networks, optimizers and RNG consistent, so the saved
    checkpoint resumes exactly. A second one stops at once, as users expect: through the
    handler that was there before (the CLI's records a SIGTERM), else as a Ctrl+C.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            before = previous.get(signum)
            if callable(before) and before is not handler:
                before(signum, frame)
            raise KeyboardInterrupt
        flag.signum = signum
        flag.set()

    previous: dict[int, Any] = {}
    previous.update({sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)})
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------ loop state
@dataclass
class Loop:
    """What the loop carries from step to step, read and written by the functions below in
    the order a run goes through them; a checkpoint saves exactly what resume needs of it."""

    settings: TrainSettings
    device: torch.device
    run_dir: Path
    method: Any
    data: RunData
    nets: dict[str, torch.nn.Module]
    opts: dict[str, torch.optim.Optimizer]
    rng: torch.Generator
    meta: dict[str, Any]
    amp: torch.dtype | None
    turns: GpuTurns | None
    averager: Averager | None
    augment: Any
    pseudo: pseudolabels.PseudoLabels
    fixed_z: torch.Tensor
    spans: list[tuple[int, int]]
    # Running loss sums of the epoch: one slot per StepOutput field in the order the step
    # returns its present losses, then the step count.
    sums: torch.Tensor
    epoch: int = 0  # next epoch to train (0-based)
    step: int = 0  # next step of that epoch
    best_acc: float = -1.0
    best_epoch: int | None = None
    best_pending: tuple[int, dict[str, dict[str, torch.Tensor]]] | None = None
    elapsed_before: float = 0.0
    finished_before: bool = False
    extended: bool = False
    loss_names: list[str] = field(default_factory=list)
    t0: float = 0.0
    last_write: float = 0.0

    @property
    def n(self) -> int:
        return int(self.data.train_y.numel())

    @property
    def plain(self) -> bool:
        """The paper's evaluation: the live networks with their own BatchNorm buffers."""
        return self.averager is None and not self.settings.precise_bn

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def host_work(self):
        return self.turns.lent() if self.turns is not None else None


SUM_SLOTS = len(fields(StepOutput)) + 1


def _open(
    device: torch.device,
    dataset_path: Path,
    settings: TrainSettings,
    run_dir: Path,
    turns: GpuTurns | None,
    fresh: bool = True,
) -> Loop:
    """Data, freshly initialised networks (or, for a ``fresh`` run with ``init``, those of
    the model it starts from) and optimizers, and the run's metadata."""
    amp = autocast_dtype(settings.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    method = METHODS[settings.method]()
    dataset = load_prepared(Path(dataset_path))
    data = load_run_data(dataset, settings, device)
    if data.train_y.numel() < 2:
        raise TrainingError("the training split has fewer than 2 images")
    num_classes = len(data.classes)
    with INIT_LOCK:
        system.seed_everything(settings.seed)
        nets = method.networks(settings, num_classes, data.image_size)
        rng = run_generator(settings.seed, device)
    started_from = None
    if settings.init is not None and fresh:
        started_from = _start_from(settings, nets, data, method)
    nets = place(nets, device)
    opts = method.optimizers(nets, settings)
    averager = None
    if settings.ema > 0:
        averager = Averager(nets, _used_networks(method, nets), settings.ema)
    spans = batches(int(data.train_y.numel()), settings.batch_size)
    if (settings.unlabelled_teacher or settings.generated_teacher) and "C" not in nets:
        raise TrainingError(f"teacher pseudo-labels need a classifier C; {method.name} has none")
    pseudo = pseudolabels.build(
        settings,
        num_classes,
        device,
        label_shares=torch.bincount(data.train_y, minlength=num_classes) / data.train_y.numel(),
        steps_per_epoch=len(spans),
        teacher=averager.copies.get("C") if averager is not None else None,
    )
    # A fixed latent batch from its own generator: sample grids are comparable across epochs
    # and drawing them never moves the training RNG.
    fixed_z = torch.randn(
        SAMPLE_GRID, settings.latent, generator=torch.Generator().manual_seed(settings.seed)
    ).to(device)
    meta = {
        "kind": "threengan-run",
        "method": settings.method,
        "settings": settings.model_dump(mode="json"),
        "classes": data.classes,
        "num_classes": num_classes,
        "classifier": method.classifier.as_meta(num_classes),
        "image_size": data.image_size,
        "channels": 1,
        "fit": dataset.manifest.get("settings", {}).get("fit", "squash"),
        "normalisation": NORMALISATION,
        "dataset": str(dataset.path),
        "unlabelled_images": int(len(data.unlabelled)) if data.unlabelled is not None else 0,
        "versions": system.library_versions(),
        "seed": settings.seed,
    }
    if started_from is not None:
        meta["init"] = started_from
    return Loop(
        settings=settings,
        device=device,
        run_dir=run_dir,
        method=method,
        data=data,
        nets=nets,
        opts=opts,
        rng=rng,
        meta=meta,
        amp=amp,
        turns=turns,
        averager=averager,
        augment=augment.policy(settings.augments, rng),
        pseudo=pseudo,
        fixed_z=fixed_z,
        spans=spans,
        sums=torch.zeros(SUM_SLOTS, device=device),
    )


def _start_from(
    settings: TrainSettings, nets: dict[str, torch.nn.Module], data: RunData, method
) -> dict[str, Any]:
    """Load into ``nets`` the networks of the model ``source`` names (``train --init``):
    each from the model's weights to use (averaged, BatchNorm statistics recomputed) where it
    holds them, else from its live weights; networks it lacks (the bundled model has no D)
    keep their fresh initialisation. Returns what the run's metadata records of it. A model
    of other classes, image size, width or latent size is a one-line TrainingError."""
    source = str(settings.init)
    try:
        path = modelfile.resolve_init(source)
    except modelfile.ModelNotFound as exc:
        raise InitNotFound(f"--init {source}: {exc}") from None
    except modelfile.ModelError as exc:
        raise TrainingError(f"--init {source}: {exc}") from None
    try:
        ckpt = checkpoints.load(path)  # safetensors and JSON: never unpickles
        info = modelfile.check_meta(ckpt.meta, path)
    except (modelfile.CheckpointError, modelfile.ModelError) as exc:
        raise TrainingError(f"--init {source}: {exc}") from None
    stored: TrainSettings = info["settings"]
    theirs_by, _, _ = modelfile.classifier_spec(ckpt.meta, path)
    if theirs_by != method.classifier.network:  # sgan's D classifies; elsewhere C does
        raise TrainingError(
            f"--init {source}: a {info['method']} model (classified by {theirs_by}) cannot start "
            f"a {method.name} run (classified by {method.classifier.network})"
        )
    mismatch = [
        (what, theirs, mine)
        for what, theirs, mine in (
            ("classes", info["classes"], list(data.classes)),
            ("image size", info["image_size"], data.image_size),
            ("width", stored.width, settings.width),
            ("latent size", stored.latent, settings.latent),
        )
        if theirs != mine and (what != "latent size" or "G" in nets)
    ]
    if mismatch:
        what, theirs, mine = mismatch[0]
        verb = "are" if what == "classes" else "is"
        if what == "classes":
            theirs, mine = ", ".join(theirs), ", ".join(mine)
        raise TrainingError(
            f"--init {source}: the model's {what} {verb} {theirs}, this run's {verb} {mine} "
            f"({path}); train at the model's {what} or start from scratch"
        )
    loaded = []
    for name, net in nets.items():
        prefix = next((p for p in (ckpt.weights_prefix, "net") if ckpt.group(f"{p}/{name}")), None)
        if prefix is None:
            continue
        try:
            checkpoints.restore_networks(ckpt, {name: net}, prefix=prefix)
        except modelfile.CheckpointError as exc:
            raise TrainingError(f"--init {source}: {exc}") from None
        loaded.append(name)
    if method.classifier.network not in loaded:
        raise TrainingError(
            f"--init {source}: {path} holds no {method.classifier.network} for "
            f"{method.name} to start from"
        )
    return {
        "source": source,
        "path": str(path),
        "file": modelfile.file_id(path),
        "method": info["method"],
        "networks": loaded,
    }


def _used_networks(method, nets: dict[str, torch.nn.Module]) -> list[str]:
    """The networks a saved model is used through: the classifier, and G for samples."""
    return [n for n in (method.classifier.network, "G") if n in nets]


def _restore(loop: Loop) -> None:
    """Continue from the last checkpoint: weights, optimizers, RNG, position, sums."""
    ckpt = checkpoints.load(loop.run_dir / runs.LAST, map_location=loop.device)
    checkpoints.restore_networks(ckpt, loop.nets)
    checkpoints.restore_optimizers(ckpt, loop.opts)
    pos = ckpt.meta["position"]
    loop.epoch, loop.step = pos["epoch"], pos["step"]
    reseed = loop.settings.seed + 1_000_003 * loop.epoch + loop.step
    set_rng_state(ckpt.group("rng"), loop.rng, reseed)
    if "init" in ckpt.meta:
        loop.meta["init"] = ckpt.meta["init"]
    state = ckpt.group("state")
    loop.pseudo.restore(state)
    if "sums" in state:  # older files kept 8 slots, the step count in the last
        saved = state["sums"].to(loop.device)
        loop.sums[:-1] = saved[: SUM_SLOTS - 1]
        loop.sums[-1] = saved[-1]
    if loop.averager is not None:
        averaged = {n: ckpt.group(f"avg/{n}") for n in loop.averager.names}
        if not all(averaged.values()):
            raise TrainingError(f"{ckpt.path} holds no averaged weights; cannot resume with ema")
        loop.averager.restore(averaged, float(state["ema_steps"]))
    loop.best_acc = ckpt.meta.get("best_val_accuracy", -1.0)
    loop.best_epoch = ckpt.meta.get("best_epoch")
    loop.elapsed_before = ckpt.meta.get("elapsed_s", 0.0)
    loop.finished_before = ckpt.meta.get("finished", False)
    loop.extended = loop.finished_before and loop.epoch < loop.settings.epochs
    metrics_path = loop.run_dir / runs.METRICS
    history = runs.read_metrics(metrics_path, loop.epoch)  # damage: a RunError naming it
    fileio.write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))


def _create(loop: Loop) -> None:
    """A new run folder: settings, run metadata, an empty metrics file."""
    run_dir = loop.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "samples").mkdir(exist_ok=True)
    fileio.write_text(run_dir / runs.SETTINGS, settings_mod.dump(loop.settings))
    run_meta = {
        **loop.meta,
        "format_version": RUN_FORMAT_VERSION,
        "train_images": loop.n,
        "train_sources": loop.data.subset_paths,
    }
    fileio.write_text(run_dir / runs.RUN, json.dumps(run_meta, indent=2) + "\n")
    fileio.write_text(run_dir / runs.METRICS, "")  # replaces what is there, never writes through it


# ------------------------------------------------------------------- prediction weights
def _prediction_nets(loop: Loop) -> dict[str, torch.nn.Module]:
    """The networks evaluation and saved models use: the live ones under the paper's recipe;
    otherwise copies with averaged weights and/or recomputed BatchNorm statistics."""
    if loop.plain:
        return loop.nets
    names = _used_networks(loop.method, loop.nets)
    used = prediction_copies(loop.nets, names, loop.averager)
    if loop.settings.precise_bn:
        for name, net in used.items():
            recompute_bn(net, _bn_batches(loop, name))
    return used


def _bn_batches(loop: Loop, name: str) -> Iterator[torch.Tensor]:
    """Inputs for recomputing a network's BatchNorm statistics: the labelled training images
    (no augmentation) for a classifier; for G, latent batches from a fixed generator."""
    size = 64  # a larger batch than training's gives the same averages with fewer passes
    if name == "G":
        gen = torch.Generator().manual_seed(loop.settings.seed + 17)
        for _ in range(max(1, min(20, loop.n // size))):
            yield torch.randn(size, loop.settings.latent, generator=gen).to(loop.device)
        return
    for chunk in loop.data.train_x.split(size):
        if len(chunk) >= 2:
            yield to_model_range(chunk)


def _weights(nets: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: v.detach().clone() for k, v in net.state_dict().items()}
        for name, net in nets.items()
    }


def evaluate_adapted(loop: Loop, nets: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Test metrics after recomputing the classifier's BatchNorm statistics on the test
    images themselves (labels unused): transductive, reported apart from the rest."""
    data = loop.data
    if len(data.test_y) < 2:
        return {}
    name = loop.method.classifier.network
    adapted = dict(nets)
    adapted[name] = copy.deepcopy(nets[name])
    recompute_bn(adapted[name], (to_model_range(x) for x in data.test_x.split(64) if len(x) > 1))
    k = len(data.classes)
    return score_split(loop.method, adapted, data.test_x, data.test_y, k, amp=loop.amp)


# --------------------------------------------------------------------------- checkpoints
def _run_meta(loop: Loop, epoch: int, step: int, **extra: Any) -> dict[str, Any]:
    return {
        **loop.meta,
        "position": {"epoch": epoch, "step": step},
        "best_val_accuracy": loop.best_acc,
        "best_epoch": loop.best_epoch,
        **extra,
    }


Stats = tuple[dict[str, torch.Tensor], dict[str, Any]] | None  # scoring.model_statistics


def _save_last(
    loop: Loop, epoch: int, step: int, used=None, stats: Stats = None, **extra: Any
) -> None:
    """The last checkpoint: everything a resume needs (the averaged weights under ``avg/``),
    and under ``use/`` the weights to use where they differ from the live ones
    (``meta["weights"]`` then names that group); at the end of a run, the statistics of
    those weights (``stats``)."""
    groups: dict[str, dict[str, Any]] = {}
    state = {"sums": loop.sums, **loop.pseudo.state()}
    if loop.averager is not None:
        groups["avg"] = loop.averager.state()
        state["ema_steps"] = loop.averager.steps
    if not loop.plain:
        groups["use"] = used if used is not None else _prediction_nets(loop)
        extra["weights"] = "use"
    if stats is not None:
        extra["stats"] = stats[1]
    checkpoints.save(
        loop.run_dir / runs.LAST,
        _run_meta(loop, epoch, step, elapsed_s=loop.elapsed(), **extra),
        loop.nets,
        optimizers=loop.opts,
        rng=get_rng_state(loop.rng),
        state=state,
        groups=groups,
        host_work=loop.host_work(),
        stats=stats[0] if stats is not None else None,
    )


def _write_pending_best(loop: Loop) -> None:
    if loop.best_pending is not None:
        position, weights = loop.best_pending
        checkpoints.save(
            loop.run_dir / runs.BEST,
            _run_meta(loop, position, 0, weights="best-on-val"),
            weights,
            host_work=loop.host_work(),
        )
        loop.best_pending = None


# -------------------------------------------------------------------------------- epochs
def _one_step(loop: Loop, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gather the batch (labelled indices, then unlabelled ones when there is a pool), update
    the networks and the averages, add the losses to the epoch's sums."""
    data, settings = loop.data, loop.settings
    unlabelled = None
    if data.unlabelled is not None:
        cut = idx.shape[0] - settings.unlabelled_ratio * settings.batch_size
        idx, u_idx = idx[:cut], idx[cut:]
        unlabelled = to_model_range(data.unlabelled[u_idx])
    real = to_model_range(data.train_x[idx])
    out = loop.method.step(
        loop.nets,
        loop.opts,
        real,
        data.train_y[idx],
        settings,
        autocast=loop.amp,
        rng=loop.rng,
        aug=loop.augment,
        unlabelled=unlabelled,
        pseudo=loop.pseudo,
    )
    if loop.averager is not None:
        loop.averager.update()
    losses = out.as_dict()
    values = torch.stack([v.detach().float() for v in losses.values()])
    loop.sums[: len(values)] += values
    loop.sums[-1] += 1
    return losses


def _epoch_indices(loop: Loop, epoch: int) -> torch.Tensor | None:
    """Unlabelled indices for each step of the epoch, (steps, batch): a pure function of
    (seed, epoch) like the batch order, so resume is exact. ``None`` without a pool."""
    pool = loop.data.unlabelled
    if pool is None:
        return None
    gen = torch.Generator().manual_seed(system.stream_seed(loop.settings.seed, epoch, 500_009))
    shape = (len(loop.spans), loop.settings.unlabelled_ratio * loop.settings.batch_size)
    return torch.randint(0, len(pool), shape, generator=gen).to(loop.device)


def _epoch_done(
    loop: Loop, epoch: int, first: int, epoch_t0: float, test_every_epoch: bool, every_s
) -> EpochDone:
    """Evaluate, log one line, save samples and checkpoints as due; the epoch's event."""
    settings, data = loop.settings, loop.data
    steps_done = max(loop.sums[-1].item(), 1.0)
    means = {name: loop.sums[i].item() / steps_done for i, name in enumerate(loop.loss_names)}
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteLoss(
            f"{bad[0]} became non-finite during epoch {epoch + 1}; stopped, the last good "
            "checkpoint is kept (try a lower --lr)"
        )
    seconds = time.perf_counter() - epoch_t0
    used = _prediction_nets(loop)
    k = len(data.classes)
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "train": means,
        "val": score_split(loop.method, used, data.val_x, data.val_y, k, amp=loop.amp),
        "seconds": round(seconds, 3),
        "images_per_s": round((loop.spans[-1][1] - loop.spans[first][0]) / max(seconds, 1e-9), 2),
    }
    pseudo = loop.pseudo.summary(data.classes)
    if pseudo:
        record["pseudo"] = pseudo
    if test_every_epoch:
        record["test_optimistic"] = score_split(
            loop.method, used, data.test_x, data.test_y, k, amp=loop.amp
        )
    runs.append_line(loop.run_dir / runs.METRICS, json.dumps(record))
    due = (
        every_s is None
        or epoch + 1 >= settings.epochs
        or time.perf_counter() - loop.last_write >= every_s
    )
    if "G" in used and due:
        grid = loop.run_dir / "samples" / f"epoch_{epoch + 1:04d}.png"
        _save_samples(used["G"], loop.fixed_z, grid)
    val_acc = record["val"].get("accuracy", 0.0) if record["val"] else 0.0
    # Without a val split (a few labels, all trained on) nothing tells epochs apart: the best
    # checkpoint follows the last epoch, so a run's model is its final one, not its first.
    if not record["val"] or val_acc > loop.best_acc or loop.best_epoch is None:
        loop.best_acc, loop.best_epoch = val_acc, epoch + 1
        loop.best_pending = (epoch + 1, _weights(used))
    if due:
        _write_pending_best(loop)
        _save_last(loop, epoch + 1, 0, used=used)
        loop.last_write = time.perf_counter()
    return EpochDone(epoch, settings.epochs, record)


def _save_samples(g: torch.nn.Module, z: torch.Tensor, path: Path) -> None:
    g.eval()
    with torch.no_grad():
        pixels = from_model_range(g(z)).cpu().numpy()
    g.train()
    fileio.write_bytes(path, grid_png(pixels))


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
    emit = on_event or (lambda event: None)
    options = (test_every_epoch, checkpoint_every_s, stop_flag)
    if device.type != "cuda":
        return _train(device, Path(dataset_path), settings, Path(run_dir), resume, emit, options)
    GPU_TURNS.acquire()
    try:
        with torch.cuda.stream(torch.cuda.Stream(device)):
            loop_args = (device, Path(dataset_path), settings, Path(run_dir), resume, emit)
            return _train(*loop_args, options, GPU_TURNS)
    finally:
        GPU_TURNS.release()


def _train(
    device: torch.device,
    dataset_path: Path,
    settings: TrainSettings,
    run_dir: Path,
    resume: bool,
    emit: Callable[[Event], None],
    options: tuple[bool, float | None, threading.Event | None],
    turns: GpuTurns | None = None,
) -> dict[str, Any]:
    test_every_epoch, checkpoint_every_s, stop_flag = options
    # Killed before the first checkpoint: nothing was kept, so start over from scratch, which
    # is exactly what the uninterrupted run did.
    resume = resume and (run_dir / runs.LAST).exists()
    try:
        loop = _open(device, dataset_path, settings, run_dir, turns, fresh=not resume)
    except DataError as exc:
        raise TrainingError(str(exc)) from None
    if resume:
        _restore(loop)
    else:
        _create(loop)
    # A run stopped after its last epoch but before its summary just runs the final
    # evaluation, and so does a finished run whose summary was lost or damaged (the
    # evaluation of saved weights is the same again); only a finished run needs a larger
    # --epochs to go on.
    if resume and loop.epoch > settings.epochs:
        raise TrainingError(
            f"the run already has {loop.epoch} epochs; --epochs {settings.epochs} cannot shorten it"
        )
    if resume and loop.finished_before and loop.epoch >= settings.epochs and _summary_ok(run_dir):
        raise TrainingError(
            f"the run already has {loop.epoch} epochs; pass --epochs larger than that to extend it"
        )
    emit(
        RunStarted(
            run_dir,
            settings.method,
            str(device),
            loop.n,
            len(loop.spans),
            loop.epoch,
            settings.epochs,
            resume,
            loop.extended,
        )
    )

    graphs = device.type == "cuda" and settings.cuda_graphs
    run_step = StepRunner(lambda idx: _one_step(loop, idx), graphs=graphs, generators=(loop.rng,))
    loop.t0 = loop.last_write = time.perf_counter()
    check_every_step = device.type == "cpu"  # a host sync is free on CPU, costly on a GPU
    with nullcontext(stop_flag) if stop_flag is not None else stop_requests() as stop:
        for epoch in range(loop.epoch, settings.epochs):
            epoch_t0 = time.perf_counter()
            order = batch_order(settings.seed, epoch, loop.n, device)
            unlabelled = _epoch_indices(loop, epoch)
            first = loop.step if epoch == loop.epoch else 0
            if first == 0:
                loop.sums.zero_()  # in place: a captured step holds this tensor's address
                loop.pseudo.zero_counts()
            for step in range(first, len(loop.spans)):
                if stop.is_set():
                    _write_pending_best(loop)
                    _save_last(loop, epoch, step)
                    signum = getattr(stop, "signum", None)
                    raise Interrupted(run_dir / runs.LAST, epoch, step, signum)
                lo, hi = loop.spans[step]
                idx = order[lo:hi]
                if unlabelled is not None:
                    idx = torch.cat([idx, unlabelled[step]])
                losses = run_step(idx)
                if turns is not None:
                    turns.pass_on()
                if not loop.loss_names:
                    loop.loss_names = list(losses)
                if check_every_step:
                    _finite_or_raise(losses, epoch, step)
                emit(StepDone(epoch, step + 1, len(loop.spans)))
            emit(_epoch_done(loop, epoch, first, epoch_t0, test_every_epoch, checkpoint_every_s))

    used = _prediction_nets(loop)  # once, for the final evaluation and the last checkpoint
    outputs = _final_outputs(loop, used)
    stats = model_statistics(loop.method, used, loop.data, val=outputs["val"])
    summary = finish(loop, used, stats, outputs)
    _save_last(loop, settings.epochs, 0, used=used, stats=stats, finished=True)
    emit(RunFinished(summary))
    return summary


def _summary_ok(run_dir: Path) -> bool:
    try:
        return runs.read_summary(run_dir) is not None
    except runs.RunError:
        return False


def _final_outputs(loop: Loop, used: dict[str, torch.nn.Module]) -> dict[str, SplitOutputs]:
    """val and test through the classifier once each: their logits (metrics) and features
    (statistics, flagged shares)."""
    k = len(loop.data.classes)
    return {
        split: split_outputs(loop.method, used, getattr(loop.data, f"{split}_x"), k, amp=loop.amp)
        for split in ("val", "test")
    }


def finish(
    loop: Loop, used: dict[str, torch.nn.Module], stats: Stats, outputs: dict[str, SplitOutputs]
) -> dict:
    """Evaluate on test once (final model, best-on-val model, and the transductive BN-adapted
    final model in a column of its own) and write summary.json. The best-on-val checkpoint
    is written again with the statistics of its own weights. ``outputs``: the final model's
    pass over val and test (:func:`_final_outputs`)."""
    settings, data = loop.settings, loop.data
    temperature = _how(loop, stats)["temperature"]
    final_test = metrics_of_logits(outputs["test"].logits, data.test_y, temperature)
    final_val = metrics_of_logits(outputs["val"].logits, data.val_y, temperature)
    adapted = evaluate_adapted(loop, used)
    best_test, best_stats = final_test, stats
    best = checkpoints.load(loop.run_dir / runs.BEST, map_location=data.train_x.device)
    if loop.best_epoch is not None and loop.best_epoch != settings.epochs:
        saved = _weights(used)
        checkpoints.restore_networks(best, used)
        best_outputs = _final_outputs(loop, used)
        best_stats = model_statistics(loop.method, used, data, val=best_outputs["val"])
        best_temperature = _how(loop, best_stats)["temperature"]
        best_test = metrics_of_logits(best_outputs["test"].logits, data.test_y, best_temperature)
        for name, net in used.items():
            net.load_state_dict(saved[name])
    if best_stats is not None:
        nets = {name: best.group(f"net/{name}") for name in best.network_names}
        meta = {**best.meta, "stats": best_stats[1]}
        checkpoints.save(loop.run_dir / runs.BEST, meta, nets, stats=best_stats[0])
    flagged = {}
    if stats is not None:
        for split in ("val", "test"):
            flagged[split] = flagged_share(outputs[split], stats)
    summary = {
        "run": str(loop.run_dir),
        "method": settings.method,
        "recipe": settings.recipe,
        "epochs": settings.epochs,
        "train_images": loop.n,
        "unlabelled_images": loop.meta["unlabelled_images"],
        "classes": data.classes,
        "val": final_val,
        "test": final_test,
        "best_epoch_on_val": loop.best_epoch,
        "test_of_best_on_val": best_test,
        "test_adapted_bn": adapted,
        "stats": {
            "temperature": _how(loop, stats)["temperature"],
            "ood_threshold": float(stats[0]["ood_threshold"]) if stats is not None else None,
            "ood_flagged": flagged,
            "ood_fit": stats[1]["ood"] if stats is not None else None,
            "temperature_split": stats[1]["temperature"]["split"] if stats is not None else None,
        },
        "elapsed_s": round(loop.elapsed(), 2),
        "extended": loop.extended,
        "settings": settings.model_dump(mode="json"),
    }
    fileio.write_text(loop.run_dir / runs.SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def _how(loop: Loop, stats: Stats) -> dict[str, Any]:
    """How a finished model is evaluated: its precision, and the temperature of its stats."""
    temperature = float(stats[0]["temperature"]) if stats is not None else 1.0
    return {"amp": loop.amp, "temperature": temperature}
