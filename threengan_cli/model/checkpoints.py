"""Checkpoints: one safetensors file holding weights, optimizer and RNG state, and JSON metadata.

Layout of one checkpoint file (``*.safetensors``):
  tensors   ``net/<G|D|C>/<param>``            network weights
            ``avg/<G|C|D>/<param>``             moving averages of weights (resume only)
            ``use/<G|C|D>/<param>``             the weights to use (averaged, BatchNorm
                                                statistics recomputed) where
                                                ``meta["weights"] == "use"``
            ``opt/<G|D|C>/<index>/<key>``       optimizer state tensors (resume only)
            ``rng/<name>``                      RNG states (resume only)
            ``state/<name>``                    loop accumulators (resume only)
            ``stats/<name>``                    out-of-distribution statistics and the
                                                temperature, fitted at the end of a run
                                                (:mod:`ood`)
  header    ``__metadata__["threengan"]``       JSON: format version, method, settings,
                                                class names, image size, normalisation,
                                                library versions, seed, position, and the
                                                non-tensor parts of optimizer state

Loading never unpickles anything: safetensors holds raw tensors and the metadata is JSON.
A file written by a newer threengan, a truncated file, or a pickle (``torch.save``) file is
refused with a :class:`CheckpointError` that says which.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from threengan_cli.core import fileio
from threengan_cli.model.modelfile import (
    DIGEST_KEY,
    FORMAT_VERSION,
    NET,
    CheckpointError,
    check_file,
    digest_group,
    parse_meta,
    tensor_digest,
    verify_digest,
    weights_group,
)
from threengan_cli.model.modelfile import META_KEY as _META_KEY

__all__ = ["Checkpoint", "load", "save"]


@dataclass
class Checkpoint:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    path: Path | None = None

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix/`` with the prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + "/")}

    @property
    def weights_prefix(self) -> str:
        """The tensor group of the weights to use (``net`` or ``use``: modelfile's rule)."""
        return weights_group(self.meta)

    @property
    def network_names(self) -> list[str]:
        """The networks whose weights to use this file holds."""
        cut = self.weights_prefix + "/"
        return sorted({k.split("/")[1] for k in self.tensors if k.startswith(cut)})


def _optimizer_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = opt.state_dict()
    tensors, plain = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"opt/{name}/{index}/{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def save(
    path: Path,
    meta: dict[str, Any],
    nets: dict[str, nn.Module | dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    state: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    host_work: AbstractContextManager[Any] | None = None,
    groups: dict[str, dict[str, Any]] | None = None,
    stats: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint atomically (temporary file, fsync, rename).

    ``nets`` maps names to modules or to their state dicts (a copy of earlier weights).
    ``dtype`` stores floating-point weights in a smaller type (fp16 for shipped models).
    ``host_work`` is entered once every tensor is on the CPU, around serialising and
    writing: a run trained beside others hands its GPU turn on there. ``groups`` holds
    further sets of networks under their own prefix (``{"use": {"C": module}}``); ``stats``
    the model's out-of-distribution statistics and temperature (``stats/<name>``).
    """
    from safetensors.torch import save as st_save

    tensors: dict[str, torch.Tensor] = {}
    for prefix, group in {NET: nets, **(groups or {})}.items():
        for name, net in group.items():
            weights = net if isinstance(net, dict) else net.state_dict()
            for key, value in weights.items():
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                tensors[f"{prefix}/{name}/{key}"] = value
    opt_meta = {}
    for name, opt in (optimizers or {}).items():
        opt_tensors, opt_meta[name] = _optimizer_tensors(name, opt)
        tensors.update(opt_tensors)
    for name, value in (rng or {}).items():
        tensors[f"rng/{name}"] = value
    for name, value in (state or {}).items():
        tensors[f"state/{name}"] = value
    for name, value in (stats or {}).items():
        tensors[f"stats/{name}"] = value
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {**meta, "format_version": FORMAT_VERSION, "optimizers": opt_meta}
    with host_work or nullcontext():
        header[DIGEST_KEY] = digests(tensors)
        blob = st_save(tensors, metadata={_META_KEY: json.dumps(header, default=str)})
        try:
            fileio.write_bytes(Path(path), blob)
        except OSError as exc:  # a full disk: the previous file is still whole
            raise CheckpointError(
                f"cannot write checkpoint {path}: {exc.strerror or exc} (the previous one, if "
                "any, is kept)"
            ) from None


def _entries(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """Tensors by checksum group as (name, shape, raw bytes) entries."""
    groups: dict[str, list] = {}
    for key, value in tensors.items():
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        groups.setdefault(digest_group(key), []).append((key, tuple(value.shape), raw))
    return groups


def digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of each group of tensors (see :func:`modelfile.tensor_digest`)."""
    return {group: tensor_digest(entries) for group, entries in _entries(tensors).items()}


def load(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint file; refuse pickles, truncated files and newer formats."""
    from safetensors import safe_open

    path = Path(path)
    check_file(path)
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as fh:
            raw = (fh.metadata() or {}).get(_META_KEY)
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or damaged: {exc})"
        ) from None
    meta = parse_meta(raw, path)
    for group, entries in _entries(tensors).items():
        verify_digest(meta, group, entries, path)
    saved = meta.get(DIGEST_KEY)
    if isinstance(saved, dict):
        held = {digest_group(k) for k in tensors}
        gone = sorted(set(saved) - held)
        if gone:
            raise CheckpointError(f"{path}: its {gone[0]} tensors are missing (damaged file)")
    return Checkpoint(meta=meta, tensors=tensors, path=path)


def restore_networks(ckpt: Checkpoint, nets: dict[str, nn.Module], prefix: str = NET) -> None:
    """Load each network's weights from ``<prefix>/<name>/`` (strict: every key must fit)."""
    for name, net in nets.items():
        weights = ckpt.group(f"{prefix}/{name}")
        if not weights:
            raise CheckpointError(f"{ckpt.path}: no weights for network {name}")
        reference = net.state_dict()
        weights = {k: v.to(reference[k].dtype) if k in reference else v for k, v in weights.items()}
        try:
            net.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(f"{ckpt.path}: weights of {name} do not fit: {first}") from None


_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def restore_optimizers(ckpt: Checkpoint, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    saved = ckpt.meta.get("optimizers", {})
    for name, opt in optimizers.items():
        if name not in saved:
            raise CheckpointError(f"{ckpt.path}: no optimizer state for {name}; cannot resume")
        state: dict[int, dict[str, Any]] = {}
        for index, plain in saved[name]["plain"].items():
            state.setdefault(int(index), {}).update(plain)
        for key, value in ckpt.group(f"opt/{name}").items():
            index, entry = key.split("/", 1)
            state.setdefault(int(index), {})[entry] = value
        # Hyperparameters come from the checkpoint; how the update runs (fused, capturable...)
        # stays this machine's: a CPU checkpoint resumed on a GPU must still be capturable.
        groups = [
            {**group, **{k: current[k] for k in _IMPLEMENTATION if k in current}}
            for group, current in zip(saved[name]["param_groups"], opt.param_groups, strict=True)
        ]
        opt.load_state_dict({"state": state, "param_groups": groups})
        _follow_parameter_layouts(opt)


def _follow_parameter_layouts(opt: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments) its parameter's memory layout.

    Checkpoints store contiguous tensors, and ``load_state_dict`` keeps them so; a fused
    optimizer walks parameter, gradient and moments as flat memory, so a channels-last
    parameter with a contiguous moment would be updated element against the wrong element."""
    for group in opt.param_groups:
        for param in group["params"]:
            entries = opt.state.get(param, {})
            for key, value in entries.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    if value.stride() != param.stride():
                        entries[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
