"""The training loop: a plain function that iterates, evaluates, checkpoints and reports.

One epoch is one pass over the N labelled training images, in batches drawn by index from
one in-memory tensor (no per-step file I/O). After each epoch the model is evaluated on the
prepared val split, one line goes to ``metrics.jsonl``, a grid of images generated from a
fixed latent batch is saved, the latest checkpoint is written and, when val accuracy
improved, the best-on-val one. The test split is evaluated once at the end (and, for the
benchmark's clearly labelled "optimistic" column only, after every epoch); it never
influences training or which checkpoint is kept.

What is evaluated and saved for use is :func:`runstate.prediction_nets`: under the paper's
recipe the live networks as they are; with ``ema`` or ``precise_bn`` (the robust recipe) copies
with averaged weights and BatchNorm statistics recomputed for them (:mod:`averaging`).

Exact resume: batch order (and the unlabelled batches) come from generators seeded by (seed,
epoch), so they need no saved state; the run's RNG (latent samples, augmentation) is saved in
every checkpoint together with the position (epoch, step), the epoch's running sums and the
averaged weights. A run resumed from a checkpoint therefore reproduces the uninterrupted run
step for step.

The loop reads top to bottom: :func:`runstate.open_loop` builds a :class:`Loop`,
:func:`runstate.restore` or :func:`runstate.create` sets up its folder, then ``_train`` steps
through the epochs, calling :func:`_one_step` and :func:`_epoch_done`, and
:func:`finish.finish` writes the summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from threengan_cli.core import fileio, system
from threengan_cli.core.settings import TrainSettings
from threengan_cli.data.images import GridUnavailable, grid_maker, grid_png
from threengan_cli.data.training_data import DataError, PoolNotFound, batch_order
from threengan_cli.model.networks import from_model_range, to_model_range
from threengan_cli.train import crossfit, runlock, runs
from threengan_cli.train.accel import (
    GPU_TURNS,
    GpuTurns,
    StepRunner,
)
from threengan_cli.train.events import (
    EpochDone,
    Event,
    InputNotFound,
    Interrupted,
    NonFiniteLoss,
    RunFinished,
    RunStarted,
    StepDone,
    TrainingError,
)
from threengan_cli.train.finish import final_outputs, finish, summary_ok
from threengan_cli.train.runstate import (
    Loop,
    create,
    open_loop,
    prediction_nets,
    restore,
    save_last,
    weights_of,
    write_pending_best,
)
from threengan_cli.train.scoring import model_statistics, score_split, with_temperature

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
    used = prediction_nets(loop)
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
        loop.best_pending = (epoch + 1, weights_of(used))
    if due:
        write_pending_best(loop)
        save_last(loop, epoch + 1, 0, used=used)
        loop.last_write = time.perf_counter()
    return EpochDone(epoch, settings.epochs, record)


def _save_samples(g: torch.nn.Module, z: torch.Tensor, path: Path) -> None:
    g.eval()
    with torch.no_grad():
        pixels = from_model_range(g(z)).cpu().numpy()
    g.train()
    fileio.write_bytes(path, grid_png(pixels))


# ------------------------------------------------------------------------------- loop
@runlock.writes_run
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
        grid_maker()  # a torchvision that does not import fails the run now, not after epoch 1
    except GridUnavailable as exc:
        raise TrainingError(str(exc)) from None
    try:
        loop = open_loop(device, dataset_path, settings, run_dir, turns, fresh=not resume)
    except PoolNotFound as exc:
        raise InputNotFound(str(exc)) from None
    except DataError as exc:
        raise TrainingError(str(exc)) from None
    if settings.calibration_folds:
        crossfit.check(settings, loop.data)  # before the run folder is touched
    if resume:
        restore(loop)
    else:
        create(loop)
    # A run stopped after its last epoch but before its summary just runs the final
    # evaluation, and so does a finished run whose summary was lost or damaged (the
    # evaluation of saved weights is the same again); only a finished run needs a larger
    # --epochs to go on.
    if resume and loop.epoch > settings.epochs:
        raise TrainingError(
            f"the run already has {loop.epoch} epochs; --epochs {settings.epochs} cannot shorten it"
        )
    if resume and loop.finished_before and loop.epoch >= settings.epochs and summary_ok(run_dir):
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
                    write_pending_best(loop)
                    save_last(loop, epoch, step)
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

    used = prediction_nets(loop)  # once, for the final evaluation and the last checkpoint
    outputs = final_outputs(loop, used)
    stats = model_statistics(loop.method, used, loop.data, val=outputs["val"])
    if settings.calibration_folds and stats is not None:
        # After the final model is complete: the folds change nothing of it but its temperature.
        def train_fold(dataset, cfg, fold_dir, fold_resume, fold_emit):
            return _train(device, dataset, cfg, fold_dir, fold_resume, fold_emit, options, turns)

        fit = loop.meta["fit"]
        temperature, how = crossfit.cross_fit(run_dir, settings, loop.data, train_fold, emit, fit)
        stats = with_temperature(stats, temperature, how)
    summary = finish(loop, used, stats, outputs)
    save_last(loop, settings.epochs, 0, used=used, stats=stats, finished=True)
    if settings.calibration_folds:
        crossfit.remove_folds(run_dir)  # spent: their temperature is in the final model
    emit(RunFinished(summary))
    return summary
