"""Finding and reading model files without importing torch.

Importing torch takes 3 to 4 seconds on a small CPU, longer than classifying a few images.
This module knows where a model comes from (``--checkpoint FILE``, ``--run NAME|DIR``, or
the default bundled with the package), how to check a checkpoint file before trusting it
(never a pickle, not truncated, not from a newer format) and how to read its metadata and
weights as NumPy arrays. :mod:`checkpoints` (torch) uses the same checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from threengan_cli import paths

FORMAT_VERSION = 1  # of checkpoint files; a newer one is refused
META_KEY = "threengan"
BEST, LAST = "best.safetensors", "last.safetensors"
FINAL = "final.safetensors"  # the final epoch's weights alone, once ``runs --prune-last`` ran
DEFAULT_MODEL = "default.safetensors"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


class ModelError(Exception):
    """A model that cannot be loaded or lacks a network the job needs; one line for the user."""


class ModelNotFound(ModelError):
    """The checkpoint or run the user named does not exist (a usage error, not a failure)."""


# ------------------------------------------------------------------------ checking a file
def check_file(path: Path) -> None:
    """Refuse a missing file, a folder and a pickle before any parser sees the file.

    safetensors starts with an 8-byte header length, then the JSON header's "{"; a pickle
    starts with the PROTO opcode 0x80, a torch.save file is a zip ("PK").
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror}") from None
    if head[8:9] == b"{":
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{path} is a pickle/torch.save file; threengan loads only its own safetensors "
            "checkpoints, never pickles (they can run code)"
        )


def parse_meta(raw: str | None, path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, refused when missing, damaged or of a newer format."""
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file without threengan metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has damaged metadata") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer threengan (format {version}, this one reads "
            f"<= {FORMAT_VERSION}): upgrade with pip install -U threengan"
        )
    return meta


def read_arrays(
    path: Path, prefix: Callable[[dict[str, Any]], str]
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    """Metadata, the float32 arrays under ``prefix(metadata)`` (e.g. ``net/C/``, prefix
    removed; nothing else is read) and the names of all the file's tensors."""
    from safetensors import safe_open

    check_file(path)
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = parse_meta((fh.metadata() or {}).get(META_KEY), path)
            keys = list(fh.keys())
            cut = prefix(meta)
            arrays = {k[len(cut) :]: fh.get_tensor(k) for k in keys if k.startswith(cut)}
    except (CheckpointError, ModelError):
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or damaged: {exc})"
        ) from None
    floats = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in arrays.items()}
    return meta, floats, keys


# ----------------------------------------------------------------------- where it comes from
def bundled_model() -> Path | None:
    """The default model shipped inside the package, or ``None`` where it is not installed."""
    try:
        candidate = resources.files("threengan_cli") / "models" / DEFAULT_MODEL
    except (ModuleNotFoundError, FileNotFoundError):  # pragma: no cover - broken install
        return None
    if not candidate.is_file():
        return None
    return Path(str(candidate))


def resolve_checkpoint(checkpoint: Path | None = None, run: str | None = None) -> Path:
    """The checkpoint file to load from ``--checkpoint``, ``--run`` or the bundled default."""
    if checkpoint is not None and run is not None:
        raise ModelNotFound("give either --checkpoint or --run, not both")
    if checkpoint is not None:
        checkpoint = Path(checkpoint).expanduser()
        if checkpoint.is_dir():  # a run folder passed as a checkpoint: take its best
            return resolve_checkpoint(run=str(checkpoint))
        if not checkpoint.is_file():
            raise ModelNotFound(f"checkpoint not found: {checkpoint}")
        return checkpoint
    if run is not None:
        run_dir = paths.resolve_run(run)
        if not run_dir.is_dir():
            raise ModelNotFound(f"no run {run!r} (looked in {run_dir})")
        for name in (BEST, LAST, FINAL):
            if (run_dir / name).is_file():
                return run_dir / name
        raise ModelNotFound(f"run {run_dir} holds no checkpoint ({BEST} or {LAST})")
    found = bundled_model()
    if found is None:
        raise ModelError(
            "no model given and no bundled default model found: pass --run or --checkpoint"
        )
    return found


def file_id(path: Path) -> str:
    """A short, content-based name of a checkpoint: ``file name@first 12 hex of sha256``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    name = path.name
    if path.name in (BEST, LAST, FINAL):
        name = f"{path.parent.name}/{path.name}"
    return f"{name}@{digest.hexdigest()[:12]}"


def classifier_spec(meta: dict[str, Any], path: Path) -> tuple[str, int]:
    """Which network classifies and how many of its first logits are the classes, from the
    checkpoint's ``classifier`` entry. Files written before that entry existed name only their
    method: sgan's multi-task D classifies (its last logit is "fake"), every other method's C.
    """
    num_classes = len(meta_value(meta, "classes", path))
    spec = meta.get("classifier")
    if spec is None:
        legacy = "D" if meta.get("method") == "sgan" else "C"
        return legacy, num_classes
    if not isinstance(spec, dict) or not isinstance(spec.get("network"), str):
        raise ModelError(f"{path}: damaged metadata (classifier)")
    return spec["network"], int(spec.get("logits", num_classes))


def weights_prefix(meta: dict[str, Any]) -> str:
    """The tensor group holding the weights to use: ``use/`` where a run's last checkpoint
    keeps averaged weights with recomputed BatchNorm statistics apart from the live ones."""
    return "use/" if meta.get("weights") == "use" else "net/"


def normalisation(meta: dict[str, Any], path: Path) -> tuple[float, float]:
    """(scale, offset) mapping uint8 pixels to the model's input range, as recorded."""
    from threengan_cli.images import NORMALISATION

    norm = meta.get("normalisation", NORMALISATION)
    try:
        return float(norm["scale"]), float(norm["offset"])
    except (TypeError, KeyError, ValueError):
        raise ModelError(f"{path}: damaged metadata (normalisation)") from None


def meta_value(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise ModelError(f"{path} is not a threengan model checkpoint (its metadata has no {key})")
    return meta[key]


# ------------------------------------------------------------------- the stored threshold
THRESHOLD_KEY = "threshold"  # in the metadata: {"value", "rule", "split", "dataset", ...}


def stored_threshold(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The decision threshold ``evaluate --threshold-from`` stored in a model's metadata,
    or ``None`` (none stored, or not a usable value: the default 0.5 applies then)."""
    found = meta.get(THRESHOLD_KEY)
    if not isinstance(found, dict):
        return None
    value = found.get("value")
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        return None
    return found


def _read_header(fh: Any, path: Path) -> dict[str, Any]:
    """The JSON header of an open safetensors file (the file positioned at its start)."""
    import struct

    try:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        if not isinstance(header, dict):
            raise ValueError
        return header
    except (ValueError, struct.error):
        raise CheckpointError(f"{path} has a damaged header") from None


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's metadata, reading only its header (not the tensors)."""
    check_file(path)
    with open(path, "rb") as fh:
        header = _read_header(fh, path)
    return parse_meta((header.get("__metadata__") or {}).get(META_KEY), path)


def _header_bytes(header: dict[str, Any]) -> bytes:
    import struct

    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to a multiple of 8
    return struct.pack("<Q", len(raw)) + raw


def copy_weights(source: Path, target: Path, changes: dict[str, Any]) -> None:
    """Write ``target`` (atomically) with ``source``'s weights to use alone (``use/...``
    where the metadata says so, else ``net/...``), byte for byte, stored as ``net/...``,
    and its metadata updated by ``changes`` (a key set to None is dropped)."""
    from threengan_cli import fileio

    check_file(source)
    with open(source, "rb") as src:
        header = _read_header(src, source)
        start = src.tell()
        meta = parse_meta((header.get("__metadata__") or {}).get(META_KEY), source)
        prefix = weights_prefix(meta)
        meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
        kept = sorted(
            (k for k in header if k.startswith(prefix)),
            key=lambda k: header[k]["data_offsets"][0],
        )
        if not kept:
            raise CheckpointError(f"{source} holds no network weights")
        new: dict[str, Any] = {"__metadata__": {META_KEY: json.dumps(meta)}}
        offset = 0
        for key in kept:
            begin, end = header[key]["data_offsets"]
            stored = "net/" + key[len(prefix) :]
            new[stored] = {**header[key], "data_offsets": [offset, offset + end - begin]}
            offset += end - begin
        with fileio.atomic_file(target, "wb") as dst:
            dst.write(_header_bytes(new))
            for key in kept:
                begin, end = header[key]["data_offsets"]
                src.seek(start + begin)
                left = end - begin
                while left:
                    block = src.read(min(left, 1 << 20))
                    if not block:
                        raise CheckpointError(f"{source} is truncated")
                    dst.write(block)
                    left -= len(block)


def update_meta(path: Path, changes: dict[str, Any]) -> None:
    """Merge ``changes`` into a checkpoint's JSON metadata, atomically, tensors untouched.

    A safetensors file is an 8-byte little-endian header length, the JSON header (tensor
    offsets are relative to the end of the header, so it may change length) and the data.
    The new header is padded with spaces to a multiple of 8, as safetensors writes it, and
    the file is written whole under a temporary name, then renamed into place.
    """
    from threengan_cli import fileio

    check_file(path)
    with open(path, "rb") as src:
        header = _read_header(src, path)
        meta = parse_meta((header.get("__metadata__") or {}).get(META_KEY), path)
        meta = {**meta, **changes}
        header["__metadata__"] = {**header["__metadata__"], META_KEY: json.dumps(meta)}
        with fileio.atomic_file(path, "wb") as dst:
            dst.write(_header_bytes(header))
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
