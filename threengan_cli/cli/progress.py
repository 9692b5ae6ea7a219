"""Live progress on stderr: a bar on a terminal, plain lines otherwise, nothing with --quiet.
The training and benchmark views turn the engines' events into it (rich, as views.py is).
"""

from __future__ import annotations

import time
from typing import Any

from threengan_cli.cli.views import duration, err, esc, note


class LiveView:
    """Progress of a long command on stderr: a live bar on a terminal (``self.progress``,
    started by the subclass), plain lines otherwise, nothing with ``quiet``.

    Used as a context manager around the engine call, inside the ``try`` that maps its errors
    to exit codes: the bar is gone before an error line is printed, and closing is
    idempotent, so a view closed early (when its run ends) can be closed again."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.live = err.is_terminal and not quiet
        self.progress: Any = None
        self.task: Any = None

    def print(self, line: str) -> None:
        """A line that stays on screen: above the live bar when there is one."""
        if self.progress is not None:
            self.progress.console.print(esc(line), soft_wrap=True)
        else:
            note(line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class BarView(LiveView):
    """A live bar for a counted job (decoding, classifying, generating); nothing otherwise."""

    def __init__(self, enabled: bool, what: str, total: int | None = None, counted: bool = False):
        """``counted``: the total comes later, with :meth:`update`."""
        super().__init__(quiet=not enabled)
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn(esc(what)), BarColumn(bar_width=30)]
        if total or counted:
            columns += [MofNCompleteColumn(), TimeRemainingColumn(compact=True)]
        else:
            columns.append(TextColumn("{task.completed} images"))
        columns += [TextColumn("{task.fields[rate]}")]
        self.progress = Progress(*columns, console=err.console, transient=True)
        self.task = self.progress.add_task(what, total=total, rate="")
        self.t0 = time.perf_counter()
        self.progress.start()

    def update(self, done: int, total: int | None = None) -> None:
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self.t0
        rate = f"{done / elapsed:.0f} img/s" if elapsed > 0 else ""
        self.progress.update(self.task, completed=done, rate=rate, total=total)


def epoch_line(event) -> str:
    """One line per finished epoch: losses, val metrics, speed (kept on screen)."""
    rec = event.record
    losses = " ".join(f"{k}={v:.3f}" for k, v in rec["train"].items())
    val = rec.get("val") or {}
    acc = f" val_acc={val['accuracy']:.4f}" if "accuracy" in val else ""
    auc = f" val_auc={val['auc']:.4f}" if val.get("auc") is not None else ""
    return (
        f"epoch {rec['epoch']}/{event.epochs} {losses}{acc}{auc} "
        f"{rec['images_per_s']:.1f} img/s {rec['seconds']:.1f}s"
    )


class TrainView(LiveView):
    """Renders training events as timm and yolo do: one line per epoch that stays on screen,
    and on a terminal a bar for the epoch in progress (its steps and ETA; fits 80 columns)."""

    def __call__(self, event) -> None:
        from threengan_cli.train import events

        if self.quiet:
            return
        if isinstance(event, events.RunStarted):
            what = "extending" if event.extended else "resuming" if event.resumed else "training"
            if event.fold is not None:  # the next run of one train command: a bar of its own
                self.close()
                what += " calibration fold {}/{}:".format(*event.fold)
            note(
                f"{what} {event.method} on {event.train_images} images, "
                f"{event.steps_per_epoch} steps/epoch, epochs {event.start_epoch + 1}.."
                f"{event.epochs}, device {event.device} -> {event.run_dir}"
            )
            if self.live:
                self._start(event)
        elif isinstance(event, events.StepDone) and self.progress is not None:
            label = f"epoch {event.epoch + 1}/{self.epochs}"
            self.progress.update(self.task, completed=event.step, total=event.steps, label=label)
        elif isinstance(event, events.EpochDone):
            self.print(epoch_line(event))
            if self.progress is not None and event.epoch + 1 < event.epochs:
                # The next epoch's bar: its own step count and ETA.
                label = f"epoch {event.epoch + 2}/{event.epochs}"
                self.progress.reset(self.task, completed=0, label=label)
        elif isinstance(event, events.RunFinished):
            self.close()

    def _start(self, event) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.epochs = event.epochs
        # "epoch 100/100 ━━━━━━━━━━━━━━━━━━━━ 4450/4450 0:12:34 eta 0:01:02" is 67 columns.
        self.progress = Progress(
            TextColumn("{task.fields[label]}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=err.console,
            transient=True,
        )
        self.task = self.progress.add_task(
            "train",
            total=event.steps_per_epoch,
            completed=0,
            label=f"epoch {event.start_epoch + 1}/{event.epochs}",
        )
        self.progress.start()


class BenchView(LiveView):
    """Renders benchmark events: the grid (run i of n) with an ETA from measured speed.

    A live bar on a terminal; otherwise one line per run and per epoch (cluster logs)."""

    def __call__(self, event) -> None:
        from threengan_cli.bench import benchmark as b
        from threengan_cli.train import events

        if self.quiet:
            return
        if isinstance(event, b.GridPlanned):
            self._planned(event)
        elif isinstance(event, b.RunBegins):
            what = "resuming" if event.resumed else "training"
            line = f"run {event.position}/{event.count} {event.spec.name}"
            if self.progress is not None:
                self.progress.update(self.task, description=esc(line), info=what)
            else:
                note(f"{line}: {what} (seed {event.spec.settings.seed})")
        elif isinstance(event, b.RunProgress):
            if self.progress is not None:
                info = {}
                if isinstance(event.event, events.StepDone):
                    info["info"] = f"epoch {event.event.epoch + 1}/{event.spec.settings.epochs}"
                eta = duration(event.eta_s)
                self.progress.update(self.task, completed=event.fraction, eta=eta, **info)
            elif isinstance(event.event, events.EpochDone):
                rec = event.event.record
                val = (rec.get("val") or {}).get("accuracy")
                shown = f" val_acc={val:.4f}" if val is not None else ""
                note(
                    f"  {event.spec.name} epoch {rec['epoch']}/{event.event.epochs}{shown} "
                    f"{rec['images_per_s']:.1f} img/s; grid {100 * event.fraction:.0f}%, "
                    f"eta {duration(event.eta_s)}"
                )
        elif isinstance(event, b.RunEnds):
            rec = event.record
            if rec["status"] == "failed":
                line = f"{rec['name']} failed: {rec.get('error')}"
            else:
                acc = rec["test"].get("accuracy")
                shown = f"test accuracy {acc:.4f} (final epoch)" if acc is not None else "no test"
                line = (
                    f"{rec['name']} done: {shown}, "
                    f"{rec.get('elapsed_s') or 0:.0f}s; eta {duration(event.eta_s)}"
                )
            self.print(f"run {event.position}/{event.count} {line}")

    def _planned(self, event) -> None:
        shard = f" (shard {event.shard[0]}/{event.shard[1]})" if event.shard[1] > 1 else ""
        note(
            f"benchmark{shard}: {event.slice_runs} of {event.total} runs; "
            f"{len(event.finished)} already finished (skipped), {len(event.todo)} to train "
            f"-> {event.out}"
        )
        if self.live and event.todo:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=20),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("eta {task.fields[eta]}"),
                TextColumn("{task.fields[info]}"),
                console=err.console,
            )
            self.task = self.progress.add_task("grid", total=1.0, eta="?", info="")
            self.progress.start()
