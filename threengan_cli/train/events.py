"""What a training run reports while it runs (events the CLI shows) and how it stops early
(errors with one-line messages, and the resumable interruption)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from threengan_cli.core.errors import EXIT_USAGE, Failure, UsageError

# A run writes its resumable checkpoint at most this often (train and every benchmark run): a
# width-64 robust run with an unlabelled pool writes 160 MB each time, and writing it after
# every epoch cost the time in docs/performance.md ("Checkpoints on a time basis"). A kill -9
# then loses at most this much training; Ctrl+C and SIGTERM still save where they stop.
CHECKPOINT_EVERY_S = 60.0


def checkpoint_interval(seconds: float) -> float | None:
    """``--checkpoint-every`` as training takes it: ``None`` for 0 (after every epoch); a
    negative, infinite or NaN number of seconds is a :class:`UsageError` (NaN compares false:
    it would never checkpoint)."""
    if not 0 <= seconds < math.inf:
        raise UsageError(f"--checkpoint-every takes seconds, a number 0 or more (got {seconds})")
    return seconds or None


class TrainingError(Failure):
    """A run that cannot start or continue; the message is one line meant for the user."""


class InputNotFound(TrainingError):
    """A model or pool a setting names does not exist (a usage error, not a failure)."""

    exit_code = EXIT_USAGE


class InitNotFound(InputNotFound):
    """The model ``train --init`` names does not exist."""


class NonFiniteLoss(TrainingError):
    """A loss became NaN or inf; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Ctrl+C or SIGTERM (``signum``): a resumable checkpoint was saved at ``path``."""

    def __init__(self, path: Path, epoch: int, step: int, signum: int | None = None):
        super().__init__(f"stopped at epoch {epoch + 1} step {step}; resumable from {path}")
        self.path, self.epoch, self.step, self.signum = path, epoch, step, signum


class Stopped(KeyboardInterrupt):
    """A stop request (``signum``: Ctrl+C or SIGTERM) honoured between a benchmark's runs."""

    def __init__(self, signum: int | None = None):
        super().__init__()
        self.signum = signum


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
    fold: tuple[int, int] | None = None  # (k, K): a calibration fold's run (train/crossfit)


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
