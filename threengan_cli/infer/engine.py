"""What a model file says about the model in it, read once for every loader: the torch
engine, the NumPy engine and ``train --init``. Also what both engines share once loaded: the
out-of-distribution statistics and temperature, the stored decision threshold, and the
calibrated softmax. Torch-free: the NumPy engine must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from threengan_cli import metrics
from threengan_cli.infer import ood
from threengan_cli.model import modelfile
from threengan_cli.model.modelfile import ModelError


@dataclass(frozen=True)
class ModelSpec:
    """A checked model file's description: everything its networks are rebuilt from."""

    path: Path
    model_id: str
    method: str
    classes: list[str]
    image_size: int
    channels: int
    fit: str
    settings: Any  # the validated TrainSettings it was trained with
    classifier: str  # the network whose logits classify (sgan: its multi-task D)
    logits: int  # how many of its first logits are the classes
    outputs: int  # how many logits it has (sgan's D: one more, "fake")
    scale: float  # uint8 -> model range: x * scale + offset
    offset: float


def spec_of(meta: dict[str, Any], path: Path) -> ModelSpec:
    """The description of the model whose metadata is ``meta``, checked against its limits
    (:func:`modelfile.check_meta`); a :class:`ModelError` names what is wrong."""
    info = modelfile.check_meta(meta, path)
    classifier, logits, outputs = modelfile.classifier_spec(meta, path)
    scale, offset = modelfile.normalisation(meta, path)
    return ModelSpec(
        path=path,
        model_id=modelfile.file_id(path),
        method=info["method"],
        classes=info["classes"],
        image_size=info["image_size"],
        channels=info["channels"],
        fit=info["fit"],
        settings=info["settings"],
        classifier=classifier,
        logits=logits,
        outputs=outputs,
        scale=scale,
        offset=offset,
    )


def read_stats(
    path: Path, meta: dict[str, Any], width: int, arrays: dict[str, np.ndarray] | None = None
) -> ood.ModelStats | None:
    """The model's out-of-distribution statistics and temperature, or ``None`` for a model
    trained before they existed. ``arrays``: its ``stats`` tensors where the caller read
    them already (the torch engine, with the rest of the checkpoint, checksummed); else they
    are read here, their shapes checked before and their checksum after."""
    if not ood.has_stats(meta):
        return None
    try:
        shapes = ood.expected_shapes(meta, width)
        if arrays is None:
            group = modelfile.STATS + "/"
            _, arrays, _ = modelfile.read_arrays(path, lambda _: group, lambda _: shapes)
        else:
            found = {k: tuple(v.shape) for k, v in arrays.items()}
            modelfile.check_shapes(found, shapes, f"{path} (stats)")
        if set(arrays) != set(shapes):
            raise ood.StatsError(f"its {modelfile.STATS} tensors are missing (damaged file)")
        return ood.from_arrays(arrays, meta)
    except ood.StatsError as exc:
        raise ModelError(f"{path}: {exc}") from None
    except modelfile.CheckpointError as exc:
        raise ModelError(str(exc)) from None


def probabilities(logits: np.ndarray, stats: ood.ModelStats | None) -> np.ndarray:
    """Class probabilities (float32) from class logits, divided by the model's temperature
    first where it has one."""
    logits = np.asarray(logits, dtype=np.float32)
    temperature = stats.temperature if stats is not None else 1.0
    return metrics.softmax(logits, temperature).astype(np.float32)


def exact(p: float) -> float:
    """The float32 ``p`` as the shortest decimal that reads back as the same float32.

    Python writes a float32 widened to float64 with 17 digits (0.7571609616279602); rounding
    to a fixed number of decimals instead loses the ranking near 0 and 1 (0.9999999 -> 1.0).
    """
    return float(np.format_float_positional(np.float32(p), unique=True, trim="0"))


THRESHOLD_KEY = "threshold"  # in the metadata: {"value", "rule", "split", "dataset", ...}


def stored_threshold(meta: dict[str, Any], path: Path | str) -> dict[str, Any] | None:
    """The decision threshold ``evaluate --threshold-from`` stored in a model's metadata, or
    ``None`` where none is stored.

    A stored value that is not a number strictly between 0 and 1 (NaN, 2.0, text) is a
    :class:`ModelError`: deciding at the default 0.5 instead would silently give other
    labels than the ones the stored threshold was chosen to give. Checked where the
    threshold is used, so that ``--threshold`` or a new ``--threshold-from`` still works."""
    found = meta.get(THRESHOLD_KEY)
    if found is None:
        return None
    value = found.get("value") if isinstance(found, dict) else found
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ModelError(
            f"{path}: its stored threshold {value!r} is not a number between 0 and 1 (damaged "
            "metadata); give --threshold, or store a new one with evaluate --threshold-from val"
        )
    return found


def which_model(meta: dict[str, Any]) -> str | None:
    """Which model of its run a checkpoint holds, in words: "final, epoch 30", "best on val,
    epoch 12" or "latest, epoch 7 of an unfinished run"; None for a file that is not a run's
    checkpoint as training wrote it (the bundled model, an export)."""
    position = meta.get("position")
    epoch = position.get("epoch") if isinstance(position, dict) else None
    if not isinstance(epoch, int):
        return None
    if meta.get("weights") == "best-on-val":
        return f"best on val, epoch {epoch}"
    if meta.get("weights") == "final" or meta.get("finished"):
        return f"final, epoch {epoch}"
    return f"latest, epoch {epoch} of an unfinished run"


class Engine:
    """What both engines' models answer alike; each defines ``outputs_of``, ``meta`` and
    ``path``."""

    meta: dict[str, Any]
    path: Path | None
    model_id: str

    @property
    def which(self) -> str | None:
        """Which model of its run this is ("final, epoch 30"), or None (not a run's)."""
        return which_model(self.meta)

    @property
    def stored_threshold(self) -> dict[str, Any] | None:
        """The threshold ``evaluate --threshold-from`` stored in the metadata, if any."""
        return stored_threshold(self.meta, self.path or self.model_id)

    def decision_threshold(self, given: float | None) -> tuple[float, str, str]:
        """The decision threshold classify and evaluate use, where it comes from (given,
        model or default) and a note for stderr: a given one (flag or --config) wins; else
        the one ``evaluate --threshold-from`` stored in the model; else classify's default. A
        damaged stored one is an error (exit 1), unless a given one overrides it."""
        from threengan_cli.core.use_settings import ClassifySettings

        if given is not None:
            return given, "given", ""
        stored = self.stored_threshold
        if stored is None:
            return ClassifySettings.model_fields["threshold"].default, "default", ""
        how = f"chosen on {stored.get('split', 'val')} by {stored.get('rule', '?')}"
        return float(stored["value"]), "model", f" (the model's: {how}; --threshold overrides it)"

    def ood_threshold(self, given: float | None) -> tuple[float | None, str | None, str]:
        """The out-of-distribution threshold classify and evaluate flag above, where it comes
        from (given or model) and a note for stderr: a given one (flag or --config) wins; else
        the model's own. ``None`` for a model without statistics, whose note says so."""
        if getattr(self, "stats", None) is None:
            note = (
                "; this model has no out-of-distribution statistics (trained before threengan "
                "0.2): the ood columns are empty"
            )
            return None, None, note
        if given is not None:
            return given, "given", ""
        split = self.stats.info.get("ood", {}).get("threshold", {}).get("split", "val")
        return exact(self.stats.threshold), "model", f" (flags 5% of the model's {split} split)"

    def probabilities_of(self, images_u8: np.ndarray) -> np.ndarray:
        """uint8 images (B, H, W) at the model's size -> class probabilities (B, K), float32."""
        return self.outputs_of(images_u8)[0]

    def outputs_of(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError
