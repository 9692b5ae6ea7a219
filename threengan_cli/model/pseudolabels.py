"""Pseudo-labels of images without labels, and what choosing them carries from step to step.

C learns from two kinds of images without labels: generated ones (eq. 1's masked term, its
confidence bar ``tau``) and, with a pool, real unlabelled ones (FixMatch's term, its bar
``unlabelled_tau``). Each kind has a :class:`PseudoLabeller` that turns C's logits of the
un-augmented view into (argmax class, weight) targets and counts what it chose. Without the
options below a labeller is exactly :func:`losses.pseudo_labels`: the argmax, kept where its
softmax probability exceeds the bar.

The options, each off by default (settings ``unlabelled_*`` and ``generated_teacher``):

- distribution alignment (ReMixMatch): the probabilities are multiplied by the labelled
  images' class shares over a running mean of the model's predictions on the pool, then
  renormalised, so a model that keeps predicting one class more than the labels do has its
  targets pulled back;
- self-adaptive thresholds (FreeMatch): one bar per class from running means of the top
  probability and of each class's probability, in place of a fixed bar;
- a relative threshold (AdaMatch, Berthelot et al. 2021): the bar is ``tau`` times C's mean
  top probability on the labelled batch of the same step, so it follows how confident C is
  on the images whose labels it knows, rather than a fixed number a shifted site may never
  reach;
- a ramp-up of the unlabelled term's weight over its first epochs (Mean Teacher's);
- pseudo-labels from a teacher, the moving average of C's weights (Mean Teacher), instead of
  C itself (the step computes the teacher's logits; see :class:`PseudoLabels`).

Every piece of state is a device tensor updated in place, so a step stays capturable in a
CUDA graph and never reads a value back to the host; the loop saves :meth:`state` in every
checkpoint and restores it, so a resumed run chooses the same pseudo-labels.

The counts (per class: how many images the argmax gave, how many of those were confident,
and the sum of the probabilities) are diagnostics: the loop writes their shares into each
epoch's line of ``metrics.jsonl`` (:meth:`summary`) and zeroes them when an epoch starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from threengan_cli.model import losses

if TYPE_CHECKING:  # type-only: settings imports methods (and so this module) for the names
    from threengan_cli.core.settings import TrainSettings

# The running means' decay, warmed up as (1 + t) / (10 + t) like the weights' average
# (averaging.py). FreeMatch and ReMixMatch's code use 0.999 over a million steps; a run here
# has a few thousand (600 in the study profile), so the means follow the last ~100 steps.
MOMENTUM = 0.99
_WARMUP = 10.0
_ROWS = ("argmax", "confident", "probability")  # the rows of the counts


class PseudoLabeller:
    """Targets for one kind of image without labels; see the module docstring."""

    def __init__(
        self,
        num_classes: int,
        tau: float,
        device: torch.device,
        *,
        target: torch.Tensor | None = None,
        adaptive: bool = False,
        relative: bool = False,
        ramp_steps: int = 0,
    ):
        k = num_classes
        self.tau = tau
        self.target = target.to(device) if target is not None else None  # align when given
        self.adaptive = adaptive
        self.relative = relative
        self.ramp_steps = ramp_steps
        self.steps = torch.zeros((), device=device)
        self.model_mean = torch.full((k,), 1.0 / k, device=device)  # alignment's running mean
        self.confidence = torch.full((), 1.0 / k, device=device)  # FreeMatch's global bar
        self.class_mean = torch.full((k,), 1.0 / k, device=device)  # ... and its class means
        self.counts = torch.zeros(len(_ROWS), k, device=device)
        self.bar = torch.full((), tau, device=device)  # the relative bar of the last step

    @torch.no_grad()
    def __call__(
        self, logits: torch.Tensor, reference: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, weights) of the images whose logits (B, K) are given: argmax class, and
        1 where confident enough (times the ramp-up while it lasts), else 0. ``reference``:
        the labelled batch's logits, which a relative threshold is relative to."""
        probs = torch.softmax(logits.detach().float(), dim=1)
        self.steps += 1
        keep = 1 - ((1 + self.steps) / (_WARMUP + self.steps)).clamp(max=MOMENTUM)
        if self.target is not None:
            self.model_mean.lerp_(probs.mean(dim=0), keep)
            probs = losses.align_distribution(probs, self.target, self.model_mean)
        tau: float | torch.Tensor = self.tau
        if self.adaptive:
            self.confidence.lerp_(probs.max(dim=1).values.mean(), keep)
            self.class_mean.lerp_(probs.mean(dim=0), keep)
            tau = losses.adaptive_thresholds(self.confidence, self.class_mean)
        if self.relative:
            if reference is None:
                raise ValueError("a relative threshold needs the labelled batch's logits")
            self.bar.copy_(relative_threshold(self.tau, reference))
            tau = self.bar.expand(probs.shape[1])  # one bar for every class
        labels, mask = losses.confident_argmax(probs, tau)
        chosen = torch.zeros_like(probs).scatter_(1, labels[:, None], 1.0)  # one-hot, no sync
        self.counts += torch.stack([chosen.sum(0), (chosen * mask[:, None]).sum(0), probs.sum(0)])
        if self.ramp_steps:
            mask = mask * losses.rampup(self.steps / self.ramp_steps)
        return labels, mask

    def thresholds(self) -> torch.Tensor:
        """The bar of each class now, (K,)."""
        if self.adaptive:
            return losses.adaptive_thresholds(self.confidence, self.class_mean)
        if self.relative:
            return self.bar.expand_as(self.class_mean).clone()
        return torch.full_like(self.class_mean, self.tau)

    # ------------------------------------------------------------------ state and summary
    def state(self) -> dict[str, torch.Tensor]:
        return {
            "steps": self.steps,
            "model_mean": self.model_mean,
            "confidence": self.confidence,
            "class_mean": self.class_mean,
            "counts": self.counts,
        }

    @torch.no_grad()
    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Take back what :meth:`state` saved; a missing entry (a checkpoint written before
        it existed) keeps its fresh value."""
        for name, tensor in self.state().items():
            if name in state:
                tensor.copy_(state[name].to(tensor.device).reshape(tensor.shape))

    def summary(self, classes: list[str]) -> dict[str, Any] | None:
        """The epoch's counts as shares (one host read): how often each class was the argmax
        (``shares``), the share of images confident enough (``mask_rate``), per class
        (``class_mask_rates``), the classes among the confident ones (``confident_shares``)
        and the mean probability of each class (``mean_probability``); ``None`` when this
        labeller saw no image."""
        argmax, confident, probability = self.counts.tolist()
        seen = sum(argmax)
        if not seen:
            return None
        kept = sum(confident)

        def by_class(values: list[float]) -> dict[str, float]:
            return {c: round(v, 4) for c, v in zip(classes, values, strict=True)}

        out: dict[str, Any] = {
            "images": int(round(seen)),
            "mask_rate": round(kept / seen, 4),
            "shares": by_class([a / seen for a in argmax]),
            "class_mask_rates": by_class(
                [c / a if a else 0.0 for c, a in zip(confident, argmax, strict=True)]
            ),
            "confident_shares": by_class([c / kept if kept else 0.0 for c in confident]),
            "mean_probability": by_class([p / seen for p in probability]),
        }
        if self.adaptive:
            out["thresholds"] = by_class(self.thresholds().tolist())
        if self.relative:
            out["relative_threshold"] = round(float(self.bar), 4)
        if self.target is not None:
            out["model_mean"] = by_class(self.model_mean.tolist())
        if self.ramp_steps:
            out["ramp"] = round(float(losses.rampup(self.steps / self.ramp_steps)), 4)
        return out


def relative_threshold(tau: float, reference: torch.Tensor) -> torch.Tensor:
    """AdaMatch's relative confidence threshold: ``tau`` times the mean over the rows of
    ``reference`` (the labelled batch's logits, B x K) of their top softmax probability."""
    return tau * torch.softmax(reference.detach().float(), dim=1).max(dim=1).values.mean()


@dataclass
class PseudoLabels:
    """What a step needs to choose pseudo-labels: a labeller for generated images, one for
    the unlabelled pool, and the teacher (the moving average of C) each may read from."""

    generated: PseudoLabeller
    unlabelled: PseudoLabeller
    teacher: nn.Module | None = None
    generated_from_teacher: bool = False
    unlabelled_from_teacher: bool = False

    def teacher_for(self, kind: str) -> nn.Module | None:
        """The teacher if the pseudo-labels of ``kind`` (generated, unlabelled) come from it."""
        wanted = (
            self.generated_from_teacher if kind == "generated" else self.unlabelled_from_teacher
        )
        return self.teacher if wanted else None

    def labellers(self) -> dict[str, PseudoLabeller]:
        return {"generated": self.generated, "unlabelled": self.unlabelled}

    def zero_counts(self) -> None:
        for labeller in self.labellers().values():
            labeller.counts.zero_()

    def state(self) -> dict[str, torch.Tensor]:
        return {
            f"pseudo/{kind}/{name}": tensor
            for kind, labeller in self.labellers().items()
            for name, tensor in labeller.state().items()
        }

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        for kind, labeller in self.labellers().items():
            prefix = f"pseudo/{kind}/"
            labeller.restore(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )

    def summary(self, classes: list[str]) -> dict[str, Any]:
        found = {kind: lab.summary(classes) for kind, lab in self.labellers().items()}
        return {kind: value for kind, value in found.items() if value is not None}


def build(
    settings: TrainSettings,
    num_classes: int,
    device: torch.device,
    *,
    label_shares: torch.Tensor | None = None,
    steps_per_epoch: int = 1,
    teacher: nn.Module | None = None,
) -> PseudoLabels:
    """The labellers a run's settings ask for. ``label_shares``: the labelled images' class
    shares, the target of distribution alignment; ``teacher``: the averaged classifier."""
    if settings.unlabelled_align and label_shares is None:
        raise ValueError("distribution alignment needs the labelled images' class shares")
    wants_teacher = settings.unlabelled_teacher or settings.generated_teacher
    if wants_teacher and teacher is None:
        raise ValueError("teacher pseudo-labels need the averaged weights (ema > 0)")
    return PseudoLabels(
        generated=PseudoLabeller(num_classes, settings.tau, device),
        unlabelled=PseudoLabeller(
            num_classes,
            settings.unlabelled_tau,
            device,
            target=label_shares if settings.unlabelled_align else None,
            adaptive=settings.unlabelled_threshold == "adaptive",
            relative=settings.unlabelled_threshold == "relative",
            ramp_steps=settings.unlabelled_rampup * steps_per_epoch,
        ),
        teacher=teacher if wants_teacher else None,
        generated_from_teacher=settings.generated_teacher,
        unlabelled_from_teacher=settings.unlabelled_teacher,
    )


def plain(settings: TrainSettings, num_classes: int, device: torch.device) -> PseudoLabels:
    """Labellers with fixed bars (``tau``, ``unlabelled_tau``) and none of the options."""
    return PseudoLabels(
        generated=PseudoLabeller(num_classes, settings.tau, device),
        unlabelled=PseudoLabeller(num_classes, settings.unlabelled_tau, device),
    )
