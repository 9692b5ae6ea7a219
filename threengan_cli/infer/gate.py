"""The out-of-distribution gate of a batch: which one was asked for, and whether it trips."""

from __future__ import annotations

from typing import Any

from threengan_cli.core.errors import UsageError


def gate_name(cfg: Any) -> str | None:
    """The ood gate asked for (--fail-on-ood or --max-ood-share), as the user named it."""
    if cfg.fail_on_ood:
        return "--fail-on-ood"
    if cfg.max_ood_share is not None:
        return f"--max-ood-share {cfg.max_ood_share}"
    return None


def check_judged(cfg: Any, model: Any) -> None:
    """A gate asked for needs the model's out-of-distribution statistics: a UsageError,
    before anything is classified, for a model without them."""
    gate = gate_name(cfg)
    if gate is not None and getattr(model, "stats", None) is None:
        raise UsageError(
            f"{gate} cannot be judged: model {model.model_id} has no out-of-distribution "
            "statistics (trained before threengan 0.2); fit them with "
            "tools/add_model_statistics.py, or drop the option"
        )


def breach(cfg: Any, flagged: int, classified: int) -> str | None:
    """Why the ood gate asked for trips (exit 4), or ``None``: --fail-on-ood on any flagged
    image, --max-ood-share F where more than the share F of the classified images is
    flagged."""
    gate = gate_name(cfg)
    if gate is None or classified == 0:
        return None
    limit = 0.0 if cfg.fail_on_ood else cfg.max_ood_share
    if flagged <= limit * classified:
        return None
    allowed = "none" if limit == 0 else f"at most {limit:.1%}"
    return (
        f"{flagged} of {classified} images ({flagged / classified:.1%}) are flagged as unlike "
        f"the model's training X-rays; {gate} allows {allowed} (exit 4)"
    )
