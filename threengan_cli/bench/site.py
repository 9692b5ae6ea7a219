"""The site protocol: a folder of labelled X-rays from one site split in two halves by patient,
one half the unlabelled pool a run learns from, the other held out to score it.

A patient's half is a fixed function of the patient's id (the first byte of the id's sha256,
even: half A, odd: half B), so every machine, seed and run splits the same way and no patient
has X-rays in both halves. The id is read from the file's name as ``prepare`` reads it
(:func:`sources.patient_id`: ``person<N>`` for Kermany's pneumonia files, the ``IM-NNNN``
stem for normal ones, ``NORMAL2-IM-NNNN`` being the same patient as ``IM-NNNN``); a file whose
name carries none is its own patient.

The same bytes can sit in a folder under two patient ids (Kermany's test folder holds
``NORMAL2-IM-0095-0001.jpeg`` and ``NORMAL2-IM-0096-0001.jpeg``, identical). A pool file whose
bytes equal a held-out file's is left out of the pool: trained on, even without its label, it
would make the held-out metrics transductive (``train --unlabelled`` refuses the same for a
prepared dataset's own test and val images).

Pure functions over paths; :func:`link_folder` is the one that writes (symbolic links, never
copies of the data).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from threengan_cli.bench.report import mean_std
from threengan_cli.core import fileio
from threengan_cli.data import sources
from threengan_cli.data.walk import image_files

HALVES = ("A", "B")


@dataclass(frozen=True)
class SiteFile:
    path: str  # absolute
    label: str  # the class folder it sits in
    patient: str


@dataclass(frozen=True)
class Split:
    """One direction of the protocol: the pool (unlabelled), the held-out files (labelled),
    and the pool files left out because their bytes equal a held-out file's."""

    pool_half: str
    pool: list[SiteFile]
    held_out: list[SiteFile]
    dropped: list[SiteFile]


def patient_of(path: str, pattern: str | None = None) -> str:
    """The patient id of a file (see the module docstring), or the first group of
    ``pattern`` searched in its name (``prepare --patient-pattern``'s rule, e.g.
    ``^(\\d{8})_`` for NIH's ``PPPPPPPP_FFF.png``); ``file:<name>`` without one."""
    found = sources.patient_id(path, pattern)
    return found if found is not None else f"file:{os.path.basename(path)}"


def half_of(patient: str) -> str:
    """``A`` or ``B``: the parity of the first byte of the id's sha256 (UTF-8)."""
    return HALVES[hashlib.sha256(patient.encode()).digest()[0] & 1]


def other(half: str) -> str:
    return HALVES[1 - HALVES.index(half)]


def site_files(folder: str | os.PathLike, pattern: str | None = None) -> list[SiteFile]:
    """The image files of a folder of class folders (``NORMAL/``, ``PNEUMONIA/``...), sorted
    by class then path; ``pattern``: see :func:`patient_of`."""
    top = Path(folder)
    classes = sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder} holds no class folders")
    return [
        SiteFile(str(Path(path).resolve()), klass.name, patient_of(path, pattern))
        for klass in classes
        for path in image_files(str(klass))
    ]


def halves(files: list[SiteFile]) -> dict[str, list[SiteFile]]:
    """The files of each half, in the given order."""
    out: dict[str, list[SiteFile]] = {h: [] for h in HALVES}
    for f in files:
        out[half_of(f.patient)].append(f)
    return out


def split(files: list[SiteFile], pool_half: str, digest=fileio.sha256_of) -> Split:
    """The pool (``pool_half``'s files without byte copies of a held-out file) and the
    held-out files (the other half's)."""
    by_half = halves(files)
    held_out = by_half[other(pool_half)]
    held_bytes = {digest(f.path) for f in held_out}
    pool, dropped = [], []
    for f in by_half[pool_half]:
        (dropped if digest(f.path) in held_bytes else pool).append(f)
    return Split(pool_half, pool, held_out, dropped)


def link_folder(files: list[SiteFile], dest: str | os.PathLike, *, by_class: bool) -> Path:
    """A folder of symbolic links to ``files``: in class folders (``by_class``, for
    ``evaluate``) or flat, labels dropped (for ``--unlabelled``). Made afresh unless it holds
    exactly these links already, so a second study on the same folder (``--halves B`` beside
    ``--halves A``) leaves the first's links in place while it trains on them."""
    dest = Path(dest)
    wanted = {}
    for i, f in enumerate(files):
        name = os.path.basename(f.path)
        # flat: the class would show in the folder name; a number keeps names unique
        wanted[Path(f.label, name) if by_class else Path(f"{i:05d}-{name}")] = f.path
    if dest.exists():
        found = {
            link.relative_to(dest): os.readlink(link)
            for link in dest.rglob("*")
            if link.is_symlink()
        }
        if found == wanted:
            return dest
        for link in sorted(dest.rglob("*"), reverse=True):
            link.rmdir() if link.is_dir() and not link.is_symlink() else link.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    for relative, path in wanted.items():
        (dest / relative).parent.mkdir(exist_ok=True)
        (dest / relative).symlink_to(path)
    return dest


# How each run's model is scored on the held-out half: the final model at threshold 0.5, the
# best-on-val checkpoint at 0.5, and the final model at the threshold that evaluate's default
# rule (Youden) chooses on the source's val split: the site is never looked at.
# The fourth, "final_site_prior", is the final model with its probabilities reweighted to the
# site's class shares, which :func:`site_prior` estimates from the pool's images (no labels).
# The fifth, "final_adapted_bn", is the final model with its BatchNorm statistics recomputed on
# the held-out X-rays (``classify --adapt bn``; transductive, labels unused).
MODELS = ("final", "best_on_val", "final_val_threshold", "final_site_prior", "final_adapted_bn")


def interval_text(stat: dict[str, Any], scale: float, digits: int) -> str:
    """A :func:`mean_std` result as ``mean [low, high]``, scaled; differences (``signed``)
    carry their sign; ``-`` for no value."""
    if stat["mean"] is None:
        return "-"
    sign = "+" if stat.get("signed") else ""
    text = f"{stat['mean'] * scale:{sign}.{digits}f}"
    if stat["ci95"] is not None:
        lo, hi = (c * scale for c in stat["ci95"])
        text += f" [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"
    return text


def reweighted(probs: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Probabilities (n, K) of a model trained at class shares ``source`` as they are where
    the shares are ``target``: each column times target / source, rows summed to 1 (Bayes'
    rule under label shift: what an image looks like given its class does not change)."""
    weighted = np.asarray(probs, dtype=np.float64) * (np.asarray(target) / np.asarray(source))
    return weighted / weighted.sum(axis=1, keepdims=True)


def site_prior(
    probs: np.ndarray, source: np.ndarray, tol: float = 1e-8, max_iter: int = 1000
) -> np.ndarray:
    """The class shares of unlabelled images, by EM on a model's probabilities (Saerens,
    Latinne and Decaestecker, Neural Computation 2002): start at ``source``, reweight every
    image's probabilities to the current shares, take their mean as the next shares, until
    they move less than ``tol``."""
    shares = np.asarray(source, dtype=np.float64)
    for _ in range(max_iter):
        new = reweighted(probs, source, shares).mean(axis=0)
        if np.abs(new - shares).max() < tol:
            return new
        shares = new
    return shares


def by_run(records: list[dict[str, Any]], model: str, metric: str) -> dict[tuple, float]:
    """(seed, pool half) -> ``metric`` of ``model`` (a way of scoring), for the records that
    have it: those written before that model was scored are left out."""
    return {
        (r["seed"], r["pool_half"]): r[model][metric]
        for r in records
        if (r.get(model) or {}).get(metric) is not None
    }


def paired(left: dict[tuple, float], right: dict[tuple, float]) -> dict[str, Any]:
    """:func:`mean_std` of ``left - right`` over the runs both have (paired by seed and pool
    half), with the number of pairs; a difference, so signed."""
    common = sorted(set(left) & set(right))
    return {**mean_std(left[k] - right[k] for k in common), "pairs": len(common), "signed": True}


def summarise(
    records: list[dict[str, Any]], variants: list[str], metrics: tuple[str, ...]
) -> dict[str, Any]:
    """Per model (:data:`MODELS`): each variant's mean of each metric over its runs, and each
    variant's paired differences of accuracy and AUC with ``none`` and with ``pool``, paired by
    (seed, pool half), with their 95% t-intervals; and per variant, each other model's accuracy
    less the final model's at 0.5 on the same runs (``views``). A record without a model's
    scores (written before that model was scored) is left out of that model's figures."""
    of = {v: [r for r in records if r["variant"] == v] for v in variants}
    out: dict[str, Any] = {"means": {}, "paired": {}, "views": {}}
    for model in MODELS:
        for v in variants:
            out["means"].setdefault(model, {})[v] = {
                m: mean_std(by_run(of[v], model, m).values()) for m in metrics
            }
        for base in ("none", "pool"):
            for v in variants:
                if v in (base, "none") or base not in variants:
                    continue
                out["paired"].setdefault(model, {})[f"{v} - {base}"] = {
                    m: paired(by_run(of[v], model, m), by_run(of[base], model, m))
                    for m in ("accuracy", "auc")
                }
    for model in MODELS[1:]:  # each other way of scoring against the final model at 0.5
        for v in variants:
            left, right = by_run(of[v], model, "accuracy"), by_run(of[v], "final", "accuracy")
            out["views"].setdefault(model, {})[v] = paired(left, right)
    return out
