"""Finding and reading model files without importing torch.

Importing torch takes 3 to 4 seconds on a small CPU, longer than classifying a few images.
This module knows where a model comes from (``--checkpoint FILE``, ``--run NAME|DIR``, or
the default bundled with the package), how to check a checkpoint file before trusting it
(never a pickle, not truncated, not from a newer format) and how to read its metadata and
weights as NumPy arrays. :mod:`checkpoints` (torch) uses the same checks.

Before any network is built or any weight is read, the metadata is checked against limits
(:func:`check_meta`: 2 to :data:`MAX_CLASSES` distinct class names, a power-of-two image
side from 8 to 1024, one channel, valid train settings) and each tensor's shape, read from
the file's header, against what the network of that metadata holds: a damaged or hostile
file cannot make either engine allocate more than the file itself holds. Checkpoints also
carry a sha256 per group of tensors (``net/G``, ``net/D``, ``net/C``, ``opt``, ``rng``,
``state``; :func:`tensor_digest`), verified on loading where present (older files have
none), and a model whose weights are not all finite is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from threengan_cli.core import fileio, paths
from threengan_cli.core.errors import EXIT_USAGE, Failure

FORMAT_VERSION = 1  # of checkpoint files; a newer one is refused
# A run's checkpoints (the run folder, train/runs, keeps them under these names): resumable
# last (weights, optimizer and RNG state), best on val, and the final epoch's weights alone
# once ``runs --prune-last`` ran. A model's short name shows its run for these.
BEST, LAST, FINAL = "best.safetensors", "last.safetensors", "final.safetensors"
META_KEY = "threengan"
DIGEST_KEY = "sha256"  # metadata: {group: sha256 of its tensors}
STATS = "stats"  # tensor group of a model's out-of-distribution statistics and temperature
NET = "net"  # tensor group of the trained networks' weights: net/<G|D|C>/<param>
USE = "use"  # the averaged weights to use, where a run's last checkpoint keeps them apart
MAX_CLASSES = 1000
IMAGE_SIDES = (8, 16, 32, 64, 128, 256, 512, 1024)


class CheckpointError(Failure):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


class ModelError(Failure):
    """A model that cannot be loaded or lacks a network the job needs; one line for the user."""


class ModelNotFound(ModelError):
    """The checkpoint or run the user named does not exist (a usage error, not a failure)."""

    exit_code = EXIT_USAGE


class ReadOnlyModel(ModelError):
    """A change to the bundled default model was asked for (a usage error)."""

    exit_code = EXIT_USAGE


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


# ------------------------------------------------------------------- checking the content
def check_meta(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """The metadata a model is rebuilt from, checked against its limits (see the module
    docstring); returns ``method``, ``classes``, ``image_size``, ``channels``, ``fit`` and
    the validated train ``settings``. Raises :class:`ModelError` naming what is wrong."""
    from threengan_cli.core.settings import TrainSettings
    from threengan_cli.data.images import FITS

    def bad(what: str) -> ModelError:
        return ModelError(f"{path}: {what} in the metadata")

    method = meta_value(meta, "method", path)
    raw = meta_value(meta, "settings", path)
    if not isinstance(raw, dict):
        raise bad("no settings object")
    try:
        settings = TrainSettings.from_stored(raw)
    except ValueError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise bad(f"invalid settings ({first[0].strip()})") from None
    if method != settings.method:
        raise bad(f"method {method!r} that is not its settings' {settings.method!r}")
    classes = meta_value(meta, "classes", path)
    if (
        not isinstance(classes, list)
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise bad("classes that are not a list of distinct names")
    if not 2 <= len(classes) <= MAX_CLASSES:
        raise bad(f"{len(classes)} classes (2 to {MAX_CLASSES} are supported)")
    if "num_classes" in meta and meta["num_classes"] != len(classes):
        raise bad(f"num_classes {meta['num_classes']!r}, not its {len(classes)} classes")
    size = meta_value(meta, "image_size", path)
    if type(size) is not int or size not in IMAGE_SIDES:
        raise bad(f"image_size {size!r} (one of {', '.join(map(str, IMAGE_SIDES))})")
    channels = meta.get("channels", 1)
    if type(channels) is not int or channels != 1:
        raise bad(f"channels {channels!r} (grayscale models have 1)")
    fit = meta.get("fit", "squash")
    if fit not in FITS:
        raise bad(f"fit {fit!r} (one of {', '.join(FITS)})")
    return {
        "method": method,
        "classes": list(classes),
        "image_size": size,
        "channels": channels,
        "fit": fit,
        "settings": settings,
    }


def _multiplier(side: int) -> int:
    return max(1, 32 // side)  # as networks._multiplier: a test holds the two together


def headed_shapes(
    outputs: int, width: int, image_size: int, channels: int = 1, bias: bool = True
) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of a discriminator body with a 4x4 head to ``outputs``
    logits (:class:`networks.Classifier` and its kin), computed without torch."""
    sides = [4 * 2**i for i in range(max(0, image_size.bit_length() - 3))][::-1]  # S/2 .. 4
    shapes: dict[str, tuple[int, ...]] = {}
    c_out = width * _multiplier(sides[0])
    shapes["body.layers.0.weight"] = (c_out, channels, 4, 4)
    index = 2
    for side in sides[1:]:
        c_in, c_out = width * _multiplier(2 * side), width * _multiplier(side)
        shapes[f"body.layers.{index}.weight"] = (c_out, c_in, 4, 4)
        bn = f"body.layers.{index + 1}"
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{name}"] = (c_out,)
        shapes[f"{bn}.num_batches_tracked"] = ()
        index += 3
    shapes["head.weight"] = (outputs, width * 8, 4, 4)
    if bias:
        shapes["head.bias"] = (outputs,)
    return shapes


def check_shapes(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    """Refuse a missing, unexpected or wrongly shaped tensor, naming it."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ModelError(f"{where} lacks the tensor {missing[0]} (damaged or not this network)")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ModelError(f"{where} holds an unexpected tensor {extra[0]}")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise ModelError(
                f"{where}: {key} has shape {tuple(found[key])}, the metadata's network needs "
                f"{tuple(shape)} (wrong class count, size or width)"
            )


def digest_group(key: str) -> str:
    """The checksum group of a tensor: one per network of each set of weights (``net/C``,
    ``use/C``, ``avg/G``), so that a loader reading one network checks just that; otherwise
    its first part (``opt``, ``rng``, ``state``)."""
    parts = key.split("/")
    return "/".join(parts[:2]) if parts[0] in (NET, USE, "avg") else parts[0]


def tensor_digest(entries: Iterable[tuple[str, tuple[int, ...], Any]]) -> str:
    """sha256 over ``(name, shape, raw little-endian bytes)`` of tensors, sorted by name."""
    digest = hashlib.sha256()
    for key, shape, data in sorted(entries, key=lambda e: e[0]):
        digest.update(f"{key}\0{','.join(map(str, shape))}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def verify_digest(
    meta: dict[str, Any], group: str, entries: list[tuple[str, tuple[int, ...], Any]], path: Path
) -> None:
    """Compare one group's tensors with the checksum saved for it (none saved: nothing to do)."""
    saved = meta.get(DIGEST_KEY)
    if saved is None:
        return
    if not isinstance(saved, dict) or group not in saved:
        raise CheckpointError(f"{path}: no checksum for its {group} tensors (damaged metadata)")
    if tensor_digest(entries) != saved[group]:
        raise CheckpointError(
            f"{path}: the {group} tensors do not match their checksum (the file is damaged)"
        )


def _raw(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def check_finite(arrays: dict[str, np.ndarray], where: str) -> None:
    for key, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ModelError(f"{where}: {key} holds NaN or infinite values; refusing the model")


def read_arrays(
    path: Path,
    prefix: Callable[[dict[str, Any]], str],
    expect: Callable[[dict[str, Any]], dict[str, tuple[int, ...]]] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    """Metadata, the float32 arrays under ``prefix(metadata)`` (e.g. ``net/C/``, prefix
    removed; nothing else is read) and the names of all the file's tensors.

    ``expect(metadata)`` gives the shapes those arrays must have; they are checked from the
    file's header before any is read. The group's checksum is verified where saved."""
    from safetensors import safe_open

    check_file(path)
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = parse_meta((fh.metadata() or {}).get(META_KEY), path)
            keys = list(fh.keys())
            cut = prefix(meta)
            mine = [k for k in keys if k.startswith(cut)]
            if expect is not None and mine:
                shapes = {k[len(cut) :]: tuple(fh.get_slice(k).get_shape()) for k in mine}
                check_shapes(shapes, expect(meta), f"{path} ({cut.rstrip('/')})")
            stored = {k: fh.get_tensor(k) for k in mine}
    except (CheckpointError, ModelError):
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or damaged: {exc})"
        ) from None
    if stored:
        entries = [(k, tuple(v.shape), _raw(v)) for k, v in stored.items()]
        verify_digest(meta, digest_group(mine[0]), entries, path)
    arrays = {k[len(cut) :]: v for k, v in stored.items()}
    floats = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in arrays.items()}
    return meta, floats, keys


# ----------------------------------------------------------------------- where it comes from
def checked_file(checkpoint: Path | None = None) -> Path:
    """The model file to load: ``checkpoint``, checked to be a regular file, or the bundled
    default model where it is ``None``."""
    if checkpoint is None:
        found = paths.bundled_model()
        if found is None:
            raise ModelError(
                "no model given and no bundled default model found: pass --run or --checkpoint"
            )
        return found
    checkpoint = Path(checkpoint).expanduser()
    if checkpoint.exists() and not checkpoint.is_file():  # a FIFO, /dev/zero, a folder...
        raise ModelNotFound(f"{checkpoint} is not a regular file, not a checkpoint")
    if not checkpoint.is_file():
        raise ModelNotFound(f"checkpoint not found: {checkpoint}")
    return checkpoint


def file_id(path: Path) -> str:
    """A short, content-based name of a checkpoint: ``file name@first 12 hex of sha256``."""
    name = path.name
    if path.name in (BEST, LAST, FINAL):
        name = f"{path.parent.name}/{path.name}"
    return f"{name}@{fileio.sha256_of(path)[:12]}"


def classifier_spec(meta: dict[str, Any], path: Path) -> tuple[str, int, int]:
    """Which network classifies, how many of its first logits are the classes, and how many
    logits it has, from the checkpoint's ``classifier`` entry. Files written before that
    entry existed name only their method: sgan's multi-task D classifies (one more logit,
    "fake"), every other method's C."""
    num_classes = len(meta_value(meta, "classes", path))
    spec = meta.get("classifier")
    if spec is None:
        if meta.get("method") == "sgan":
            return "D", num_classes, num_classes + 1
        return "C", num_classes, num_classes
    if not isinstance(spec, dict):
        raise ModelError(f"{path}: damaged metadata (classifier {spec!r})")
    network = spec.get("network")
    logits = spec.get("logits", num_classes)
    outputs = spec.get("outputs", logits + 1 if network == "D" else logits)
    if (
        network not in ("C", "D")
        or type(logits) is not int
        or type(outputs) is not int
        or logits != num_classes
        or outputs not in (logits, logits + 1)
    ):
        raise ModelError(f"{path}: damaged metadata (classifier {spec!r})")
    return network, logits, outputs


def weights_group(meta: dict[str, Any]) -> str:
    """The tensor group holding the weights to use: ``use`` where a run's last checkpoint
    keeps averaged weights with recomputed BatchNorm statistics apart from the live ones
    (``net``)."""
    return USE if meta.get("weights") == USE else NET


def weights_prefix(meta: dict[str, Any]) -> str:
    """:func:`weights_group` as the start of its tensors' names (``net/``, ``use/``)."""
    return weights_group(meta) + "/"


def normalisation(meta: dict[str, Any], path: Path) -> tuple[float, float]:
    """(scale, offset) mapping uint8 pixels to the model's input range, as recorded."""
    from threengan_cli.data.images import NORMALISATION

    norm = meta.get("normalisation", NORMALISATION)
    try:
        return float(norm["scale"]), float(norm["offset"])
    except (TypeError, KeyError, ValueError):
        raise ModelError(f"{path}: damaged metadata (normalisation)") from None


def meta_value(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise ModelError(f"{path} is not a threengan model checkpoint (its metadata has no {key})")
    return meta[key]


_MAX_HEADER = 100_000_000


# ------------------------------------------------------------------ the bundled model
def check_writable(path: Path) -> None:
    """Refuse to change the bundled default model: it is part of the installed package, and
    every later run without --run or --checkpoint would silently use what was changed."""
    bundled = paths.bundled_model()
    try:
        same = bundled is not None and os.path.samefile(path, bundled)
    except OSError:
        same = False
    if same:
        raise ReadOnlyModel(
            f"{path} is the bundled default model, which threengan never changes: copy it "
            f"(cp {bundled} my-model.safetensors) and pass --checkpoint my-model.safetensors"
        )


def _read_header(fh: Any, path: Path) -> dict[str, Any]:
    """The JSON header of an open safetensors file (the file positioned at its start)."""
    import struct

    try:
        (length,) = struct.unpack("<Q", fh.read(8))
        # A damaged length (2**40) must not become one huge read: the header lies inside
        # the file, and safetensors itself refuses headers over 100 MB.
        if length > min(_MAX_HEADER, os.fstat(fh.fileno()).st_size - 8):
            raise ValueError
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
    with the statistics of those weights (``stats/...``) where the source has them, and its
    metadata updated by ``changes`` (a key set to None is dropped)."""
    check_writable(target)
    check_file(source)
    with open(source, "rb") as src:
        header = _read_header(src, source)
        start = src.tell()
        meta = parse_meta((header.get("__metadata__") or {}).get(META_KEY), source)
        prefix = weights_prefix(meta)
        original, meta = meta, {k: v for k, v in {**meta, **changes}.items() if v is not None}
        if not any(k.startswith(prefix) for k in header):
            raise CheckpointError(f"{source} holds no network weights")
        kept = sorted(
            (k for k in header if k.startswith((prefix, STATS + "/"))),
            key=lambda k: header[k]["data_offsets"][0],
        )
        blobs: dict[str, bytes] = {}
        for key in kept:
            begin, end = header[key]["data_offsets"]
            src.seek(start + begin)
            blobs[key] = src.read(end - begin)
            if len(blobs[key]) != end - begin:
                raise CheckpointError(f"{source} is truncated")
    before: dict[str, list] = {}  # the source's checksums hold, or nothing is copied
    for key in kept:
        entry = (key, tuple(header[key]["shape"]), blobs[key])
        before.setdefault(digest_group(key), []).append(entry)
    for group, entries in before.items():
        verify_digest(original, group, entries, source)
    # The copies are stored under new names, so their checksums are computed anew.
    renamed = {k: f"{NET}/{k[len(prefix) :]}" if k.startswith(prefix) else k for k in kept}
    groups: dict[str, list] = {}
    for key in kept:
        entry = (renamed[key], tuple(header[key]["shape"]), blobs[key])
        groups.setdefault(digest_group(renamed[key]), []).append(entry)
    meta[DIGEST_KEY] = {group: tensor_digest(entries) for group, entries in groups.items()}
    new: dict[str, Any] = {"__metadata__": {META_KEY: json.dumps(meta)}}
    offset = 0
    for key in kept:
        size = len(blobs[key])
        new[renamed[key]] = {**header[key], "data_offsets": [offset, offset + size]}
        offset += size
    with fileio.atomic_file(target, "wb") as dst:
        dst.write(_header_bytes(new))
        for key in kept:
            dst.write(blobs[key])


def update_meta(path: Path, changes: dict[str, Any]) -> None:
    """Merge ``changes`` into a checkpoint's JSON metadata, atomically, tensors untouched.

    A safetensors file is an 8-byte little-endian header length, the JSON header (tensor
    offsets are relative to the end of the header, so it may change length) and the data.
    The new header is padded with spaces to a multiple of 8, as safetensors writes it, and
    the file is written whole under a temporary name, then renamed into place.
    """
    check_writable(path)
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
