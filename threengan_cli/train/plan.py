"""Which run folder a ``train`` command writes, and what it does there: start a new run,
continue the same run (the same command run again), extend it (``--resume --epochs``), or
refuse. The resume policy is here; the CLI says what was decided.

Every refusal is a :class:`UsageError` (exit 2) or a :class:`Failure` (exit 1) whose message
says what to do instead. A folder is locked (``lock(folder)``, the caller's) before it is
looked at, so that two commands cannot both find it free.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from threengan_cli.core import paths
from threengan_cli.core.config import resolve
from threengan_cli.core.errors import Failure, UsageError
from threengan_cli.train import runs


def open_run(
    dataset: str | None,
    resume_from: str | None,
    flags: dict[str, Any],
    config: Path | None,
    where: tuple[str | None, Path | None],
    force: bool,
    lock: Callable[[Path], None],
) -> tuple[Any, Path, Path, bool]:
    """(settings, dataset folder, run folder, again) of a train command: the run ``--resume``
    continues (:func:`resume`), or a new run of ``dataset`` with the ``flags`` over the
    ``config`` file in the folder ``where`` (``--name``, ``--out``) names (:func:`again`).
    ``again``: the folder holds this very run already, which the command continues."""
    if resume_from is not None:
        if force:
            raise UsageError("--force starts a run over; --resume continues one: give one")
        given_other = config is not None or dataset is not None
        saved, dataset_dir, run_dir = resume(resume_from, flags, given_other, lock)
        return resolve("train", None, **saved), dataset_dir, run_dir, True
    if dataset is None:
        raise UsageError("give a prepared DATASET to train on (see `threengan datasets`)")
    cfg = resolve("train", config, **flags)
    dataset_dir = paths.prepared_dataset(dataset)
    run_dir = run_dir_for(dataset, cfg, *where)
    return cfg, dataset_dir, run_dir, again(run_dir, cfg, dataset_dir, force, lock)


def run_dir_for(dataset: str, cfg: Any, name: str | None, out_dir: Path | None) -> Path:
    """``--out``, ``--name`` under the data dir, or a new name made of the dataset, method,
    size and seed (``-2``, ``-3``... where that is taken)."""
    if out_dir is not None:
        return out_dir
    if name is not None:
        try:
            return paths.runs_dir() / paths.check_name(name)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    base = f"{Path(dataset).name}-{cfg.method}-n{cfg.size or 'all'}-s{cfg.seed}"
    candidate, i = paths.runs_dir() / base, 2
    while candidate.exists():
        candidate, i = paths.runs_dir() / f"{base}-{i}", i + 1
    return candidate


def resume(
    given: str, flags: dict[str, Any], given_other: bool, lock: Callable[[Path], None]
) -> tuple[dict[str, Any], Path, Path]:
    """(settings, dataset folder, run folder) of the run ``--resume`` continues, its folder
    locked before it is read; only --epochs may change."""
    run_dir = runs.resolve_run(given)
    changed = sorted(k for k, v in flags.items() if v is not None and k != "epochs")
    if changed or given_other:
        raise UsageError(
            "--resume continues a run with its own data and settings; only --epochs may "
            f"be given (got {', '.join(changed) or 'a dataset or --config'})"
        )
    state = runs.state(run_dir)
    if state == "unstarted":
        raise UsageError(
            f"the run at {run_dir} was stopped before it had started (no {runs.RUN}); "
            f"start it again in place: threengan train DATASET --out {run_dir}"
        )
    if state not in ("started", "resumable", "finished", "failed"):
        raise UsageError(f"no run to resume at {run_dir}")
    lock(run_dir)
    saved, dataset = runs.identity(run_dir)
    if dataset is None:
        raise Failure(f"{run_dir / runs.RUN} does not name the run's dataset")
    if flags["epochs"] is not None:
        saved["epochs"] = flags["epochs"]
    return saved, Path(dataset), run_dir


def again(
    run_dir: Path, cfg: Any, dataset_dir: Path, force: bool, lock: Callable[[Path], None]
) -> bool:
    """Whether a new run's folder holds this very run (same dataset and settings), which the
    command then continues; ``False`` where it starts afresh (an empty folder, or --force,
    which clears a run's own files). Another run there is refused, naming --resume and
    --force."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} is a file, not a run folder")
    lock(run_dir)
    state = runs.state(run_dir)
    if state in ("absent", "empty", "unstarted"):
        return False
    if state == "other":
        raise UsageError(
            f"{run_dir} holds files that are not a run's; choose another --name or --out "
            "(--force replaces only a run's own files)"
        )
    if force:
        runs.clear(run_dir)
        return False
    _same_run(run_dir, cfg, dataset_dir)
    return True


def _same_run(run_dir: Path, cfg: Any, dataset_dir: Path) -> None:
    """Return when ``run_dir`` holds a run of ``cfg`` on ``dataset_dir``; else a usage
    error that says what differs and what to do."""
    asked = cfg.model_dump(mode="json")
    try:
        found = runs.difference(run_dir, asked, dataset_dir)
    except runs.RunError as exc:
        raise UsageError(f"{run_dir} already holds a run, and {exc}; --force replaces it") from None
    if found is None:
        return
    if found.what == "dataset":
        raise UsageError(
            f"{run_dir} already holds a run on another dataset ({found.there}); use another "
            "--name, or --force to replace it"
        )
    if found.key == "epochs" and not found.more and found.asked > (found.there or 0):
        raise UsageError(
            f"{run_dir} already holds this run with {found.there} epochs; extend it "
            f"with: threengan train --resume {run_dir} --epochs {found.asked} (or --force "
            "to train it again from scratch)"
        )
    more = f", and {found.more} more" if found.more else ""
    raise UsageError(
        f"{run_dir} already holds a run with other settings ({found.key} = {found.there!r} "
        f"there, {found.asked!r} asked{more}): continue it as it is with --resume "
        f"{run_dir}, use another --name, or --force to replace it"
    )


def finished(run_dir: Path, epochs: int | None) -> tuple[dict[str, Any] | None, str | None]:
    """(summary, problem) of the run in ``run_dir``: its summary when it is finished and
    ``epochs`` asks for no more than it has (nothing to train); ``None`` when training goes
    on, with the ``problem`` of a damaged summary that the final evaluation will write
    again. A pruned run cannot be extended or have its summary recomputed: a refusal."""
    summary, problem = runs.finished_summary(run_dir)
    kept = (run_dir / runs.LAST).is_file()
    if problem is not None and not kept:
        raise Failure(
            f"{problem}; the run's resumable checkpoint was pruned, so it cannot be "
            "recomputed: train it again with --force"
        )
    if summary is None:
        return None, problem
    if epochs is None or epochs <= summary["epochs"]:
        return summary, None
    if not kept:
        raise UsageError(
            f"{run_dir} cannot be extended: its resumable checkpoint was pruned "
            "(threengan runs --prune-last); train a new run instead"
        )
    return None, None
