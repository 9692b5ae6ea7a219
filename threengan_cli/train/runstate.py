"""A run's state from step to step (:class:`Loop`): how it is opened (data, networks, optimizers,
``--init``), restored from or created in its folder, which weights it predicts with, and how its
checkpoints are written. :mod:`training` steps it through the epochs.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from threengan_cli.core import config, fileio, system
from threengan_cli.core.settings import TrainSettings
from threengan_cli.data.datasets import load_prepared
from threengan_cli.data.images import NORMALISATION
from threengan_cli.data.training_data import RunData, batches, load_run_data
from threengan_cli.infer import engine
from threengan_cli.model import augment, checkpoints, modelfile, pseudolabels
from threengan_cli.model.averaging import Averager, prediction_copies, recompute_bn
from threengan_cli.model.methods import METHODS, StepOutput
from threengan_cli.model.modelfile import NET, USE
from threengan_cli.model.networks import to_model_range
from threengan_cli.train import runs
from threengan_cli.train.accel import (
    INIT_LOCK,
    GpuTurns,
    autocast_dtype,
    get_rng_state,
    place,
    run_generator,
    set_rng_state,
)
from threengan_cli.train.events import (
    InitNotFound,
    TrainingError,
)
from threengan_cli.train.scoring import score_split

RUN_FORMAT_VERSION = 1
SAMPLE_GRID = 64


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


def open_loop(
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
        started_from = start_from(settings, nets, data, method)
    nets = place(nets, device)
    opts = method.optimizers(nets, settings)
    averager = None
    if settings.ema > 0:
        averager = Averager(nets, used_networks(method, nets), settings.ema)
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


def start_from(
    settings: TrainSettings, nets: dict[str, torch.nn.Module], data: RunData, method
) -> dict[str, Any]:
    """Load into ``nets`` the networks of the model ``source`` names (``train --init``):
    each from the model's weights to use (averaged, BatchNorm statistics recomputed) where it
    holds them, else from its live weights; networks it lacks (the bundled model has no D)
    keep their fresh initialisation. Returns what the run's metadata records of it. A model
    of other classes, image size, width or latent size is a one-line TrainingError."""
    source = str(settings.init)
    try:
        path = runs.init_file(source)
    except modelfile.ModelNotFound as exc:
        raise InitNotFound(f"--init {source}: {exc}") from None
    except modelfile.ModelError as exc:
        raise TrainingError(f"--init {source}: {exc}") from None
    try:
        ckpt = checkpoints.load(path)  # safetensors and JSON: never unpickles
        spec = engine.spec_of(ckpt.meta, path)
    except (modelfile.CheckpointError, modelfile.ModelError) as exc:
        raise TrainingError(f"--init {source}: {exc}") from None
    if spec.classifier != method.classifier.network:  # sgan's D classifies; elsewhere C does
        raise TrainingError(
            f"--init {source}: a {spec.method} model (classified by {spec.classifier}) cannot "
            f"start a {method.name} run (classified by {method.classifier.network})"
        )
    mismatch = [
        (what, theirs, mine)
        for what, theirs, mine in (
            ("classes", spec.classes, list(data.classes)),
            ("image size", spec.image_size, data.image_size),
            ("width", spec.settings.width, settings.width),
            ("latent size", spec.settings.latent, settings.latent),
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
        prefix = next((p for p in (ckpt.weights_prefix, NET) if ckpt.group(f"{p}/{name}")), None)
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
        "file": spec.model_id,
        "method": spec.method,
        "networks": loaded,
    }


def used_networks(method, nets: dict[str, torch.nn.Module]) -> list[str]:
    """The networks a saved model is used through: the classifier, and G for samples."""
    return [n for n in (method.classifier.network, "G") if n in nets]


def restore(loop: Loop) -> None:
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


def create(loop: Loop) -> None:
    """A new run folder: settings, run metadata, an empty metrics file."""
    run_dir = loop.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "samples").mkdir(exist_ok=True)
    fileio.write_text(run_dir / runs.SETTINGS, config.dump(loop.settings))
    run_meta = {
        **loop.meta,
        "format_version": RUN_FORMAT_VERSION,
        "train_images": loop.n,
        "train_sources": loop.data.subset_paths,
    }
    fileio.write_text(run_dir / runs.RUN, json.dumps(run_meta, indent=2) + "\n")
    fileio.write_text(run_dir / runs.METRICS, "")  # replaces what is there, never writes through it


# ------------------------------------------------------------------- prediction weights
def prediction_nets(loop: Loop) -> dict[str, torch.nn.Module]:
    """The networks evaluation and saved models use: the live ones under the paper's recipe;
    otherwise copies with averaged weights and/or recomputed BatchNorm statistics."""
    if loop.plain:
        return loop.nets
    names = used_networks(loop.method, loop.nets)
    used = prediction_copies(loop.nets, names, loop.averager)
    if loop.settings.precise_bn:
        for name, net in used.items():
            recompute_bn(net, bn_batches(loop, name))
    return used


def bn_batches(loop: Loop, name: str) -> Iterator[torch.Tensor]:
    """Inputs for recomputing a network's BatchNorm statistics: the labelled training images
    (no augmentation) for a classifier, or the unlabelled pool under ``precise_bn_images =
    "unlabelled"`` (the statistics of the site the pool comes from: what ``classify --adapt
    bn`` fits at test time, fitted here on the pool instead); for G, latent batches from a
    fixed generator."""
    size = 64  # a larger batch than training's gives the same averages with fewer passes
    if name == "G":
        gen = torch.Generator().manual_seed(loop.settings.seed + 17)
        for _ in range(max(1, min(20, loop.n // size))):
            yield torch.randn(size, loop.settings.latent, generator=gen).to(loop.device)
        return
    images = loop.data.train_x
    if loop.settings.precise_bn_images == "unlabelled" and loop.data.unlabelled is not None:
        images = loop.data.unlabelled
    for chunk in images.split(size):
        if len(chunk) >= 2:
            yield to_model_range(chunk)


def weights_of(nets: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
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
def run_meta(loop: Loop, epoch: int, step: int, **extra: Any) -> dict[str, Any]:
    return {
        **loop.meta,
        "position": {"epoch": epoch, "step": step},
        "best_val_accuracy": loop.best_acc,
        "best_epoch": loop.best_epoch,
        **extra,
    }


Stats = tuple[dict[str, torch.Tensor], dict[str, Any]] | None  # scoring.model_statistics


def save_last(
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
        groups[USE] = used if used is not None else prediction_nets(loop)
        extra["weights"] = USE
    if stats is not None:
        extra["stats"] = stats[1]
    checkpoints.save(
        loop.run_dir / runs.LAST,
        run_meta(loop, epoch, step, elapsed_s=loop.elapsed(), **extra),
        loop.nets,
        optimizers=loop.opts,
        rng=get_rng_state(loop.rng),
        state=state,
        groups=groups,
        host_work=loop.host_work(),
        stats=stats[0] if stats is not None else None,
    )


def write_pending_best(loop: Loop) -> None:
    if loop.best_pending is not None:
        position, weights = loop.best_pending
        checkpoints.save(
            loop.run_dir / runs.BEST,
            run_meta(loop, position, 0, weights="best-on-val"),
            weights,
            host_work=loop.host_work(),
        )
        loop.best_pending = None
