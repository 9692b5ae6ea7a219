"""vanilla / sgan / ecgan / 3ngan: which network is updated with which loss, one step each.

It reads better whole, so it stays one module over 500 lines: the four methods are read side
by side (ecgan is 3ngan with one line changed). Adding one touches this file (and, for a
built-in one, one line of core/names.py, the names ``--help`` lists without torch).

A method is a small class registered in :data:`METHODS`; :func:`register` also adds its name to
:data:`threengan_cli.core.names.METHOD_NAMES`, which settings validate against. Every method
answers: which networks it builds, their optimizers, one training step, which network's logits
classify an image (:attr:`Method.classifier`, written into every checkpoint so that loaders need
no method names), and what a step costs (:attr:`Method.step_ms`, for the benchmark's ETA).

Options of the robust recipe reach a step as two arguments: ``aug``, a differentiable
augmentation applied alike to every batch D and C see, real or generated, and in G's loss
(DiffAugment); and ``unlabelled``, a batch of real images without labels, which D sees as
real and C learns from through confident pseudo-labels of its un-augmented view (FixMatch's
weak/strong split). Without them a step is exactly the paper's. A third, ``pseudo``
(:class:`pseudolabels.PseudoLabels`, built by the loop from the settings), chooses the
pseudo-labels of generated and unlabelled images, from C or from its moving average (the
teacher), and counts them; a step called without it labels as the paper does.

A step reads top to bottom: (1) update D on ``fake.detach()``, (2) update C on real images and
confident fakes, (3) update G on the same ``fake``. Where one network sees real and generated
images in the same update, it sees them in one call (:func:`networks.separately`), each
batch still normalised on its own as DCGAN does. It never reads a value back to the host
(no ``.item()``) and returns detached scalar tensors; the loop decides when to look at them.
z is drawn from the run's own generator ``rng`` (torch's global RNG when none is given), whose
state the training loop saves for exact resume; runs in parallel threads never share one.

During G's update (3) the gradient flows through D and C into G, but D and C have
``requires_grad`` switched off for that forward: their weights are neither stepped nor given
a ``.grad`` by G's loss, and autograd skips computing their weight gradients, which is the
cheapest correct way (about a third of their backward FLOPs). Their BatchNorm layers stay in
training mode, as in DCGAN, so the forward passes of (3) also update their running statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from threengan_cli.core import names
from threengan_cli.model import losses, pseudolabels
from threengan_cli.model.augment import Augment
from threengan_cli.model.networks import (
    Classifier,
    Discriminator,
    Generator,
    MultiTaskDiscriminator,
    init_dcgan_weights,
    separately,
)

if TYPE_CHECKING:  # type-only: settings imports this registry to check method names
    from threengan_cli.core.settings import TrainSettings

Nets = dict[str, nn.Module]
Opts = dict[str, torch.optim.Optimizer]


@dataclass(frozen=True)
class StepOutput:
    """Detached scalar tensors of one step; ``None`` where the method lacks that network."""

    loss_d: torch.Tensor | None = None
    loss_c: torch.Tensor | None = None
    loss_g: torch.Tensor | None = None
    pseudo_rate: torch.Tensor | None = None  # share of generated images with a pseudo-label

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The present values by name, still tensors (no host sync)."""
        values = ((f.name, getattr(self, f.name)) for f in fields(self))
        return {name: value for name, value in values if value is not None}


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast for forward passes when ``dtype`` is given (bf16/fp16), else nothing.

    The cast cache is off on CUDA: a captured CUDA graph must not keep cast weights from the
    capture (the cache would hold stale copies after the optimizer steps)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=device.type != "cuda")


@contextlib.contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Let gradients pass through ``modules`` to their inputs without touching their weights."""
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _adam(module: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """DCGAN's Adam. Fused kernels on CUDA and CPU (measured: on CPU with torch 2.14 the fused
    update is faster than foreach for these networks); foreach elsewhere (e.g. MPS). On CUDA
    it is capturable (its step count lives on the GPU), so a CUDA graph can replay it."""
    device = next(module.parameters()).device
    kind: dict[str, bool] = {"foreach": True}
    if device.type in ("cuda", "cpu"):
        kind = {"fused": True, "capturable": device.type == "cuda"}
    return torch.optim.Adam(
        module.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2), **kind
    )


def _update(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _pseudo_label_term(
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    settings: TrainSettings,
    pseudo: pseudolabels.PseudoLabels,
    logits_labelled: torch.Tensor,
) -> torch.Tensor:
    """Unlabelled images: CE of the strongly augmented view against the confident argmax of
    the weak (un-augmented) view, masked by the pool's labeller, times its weight (FixMatch).
    ``logits_labelled``: the labelled batch's, for a threshold relative to them (AdaMatch)."""
    labels, weights = pseudo.unlabelled(logits_weak, logits_labelled)
    return settings.unlabelled_weight * losses.masked_ce(logits_strong, labels, weights)


def _plain_pseudo_labels(
    settings: TrainSettings, logits: torch.Tensor
) -> pseudolabels.PseudoLabels:
    """The labellers of a step called without any (tests, bench_step.py): fixed bars, C's
    own logits, none of the options."""
    return pseudolabels.plain(settings, logits.shape[1], logits.device)


def _teacher(pseudo: pseudolabels.PseudoLabels | None, kind: str) -> nn.Module | None:
    return pseudo.teacher_for(kind) if pseudo is not None else None


@torch.no_grad()
def _teacher_logits(
    teacher: nn.Module, batch: torch.Tensor, reference: torch.Tensor | None = None
) -> torch.Tensor:
    """The teacher's logits of ``batch``, no gradient. Its BatchNorm layers normalise the
    batch by its own statistics, as C's do in training (the averaged weights do not fit C's
    running statistics, averaging.py), or by those of ``reference`` where given."""
    if reference is None:
        return separately(teacher, batch)[0].float()
    return separately(teacher, reference, batch, borrow={1: 0})[1].float()


def _classifier_views(
    C: nn.Module,
    aug: Augment | None,
    *batches: torch.Tensor,
    unlabelled: torch.Tensor | None,
    teacher: nn.Module | None = None,
    labelled_norm: bool = False,
    interpolate: bool = False,
    rng: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """C's logits of the augmented ``batches`` and, with ``unlabelled``, of its weak
    (un-augmented) and strong (augmented) views, all in one call of C. With a ``teacher``,
    the weak view's logits are the teacher's, and C sees the strong view only. With
    ``labelled_norm`` the weak view is normalised by the statistics of the first batch (the
    labelled images) un-augmented, not by its own: the pool's class mix then does not move
    what its pseudo-labels are.

    With ``interpolate`` (AdaMatch's random logit interpolation) the labelled batch and the
    pool's views are also seen as one batch, normalised by their joint statistics: the pool's
    logits are that batch's, and the labelled batch's are drawn, logit by logit, uniformly
    between its own-statistics logits and its joint-statistics ones (from ``rng``), so C
    learns labels that hold under either normalisation."""
    t = aug or _same
    parts = [t(b) for b in batches]
    n = len(batches)
    if unlabelled is None:
        return [o.float() for o in separately(C, *parts)], None, None
    reference = batches[0] if labelled_norm else None
    if teacher is not None:
        weak = _teacher_logits(teacher, unlabelled, reference)
        out = [o.float() for o in separately(C, *parts, t(unlabelled))]
        return out[:n], weak, out[n]
    if reference is not None:
        parts += [reference, unlabelled, t(unlabelled)]
        out = [o.float() for o in separately(C, *parts, borrow={n + 1: n})]
        return out[:n], out[n + 1].detach(), out[n + 2]
    if interpolate:
        return _interpolated_views(C, parts, t(unlabelled) if aug is not None else None,
                                   unlabelled, rng)  # fmt: skip
    parts += [unlabelled, t(unlabelled)] if aug is not None else [unlabelled]
    out = [o.float() for o in separately(C, *parts)]
    weak = out[n]
    strong = out[n + 1] if aug is not None else out[n]
    return out[:n], weak, strong


def _interpolated_views(
    C: nn.Module,
    parts: list[torch.Tensor],
    strong_input: torch.Tensor | None,
    weak_input: torch.Tensor,
    rng: torch.Generator | None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """:func:`_classifier_views` with random logit interpolation (see there)."""
    pool = [weak_input] + ([strong_input] if strong_input is not None else [])
    joint_batch = torch.cat([parts[0], *pool])
    out = [o.float() for o in separately(C, *parts, joint_batch)]
    alone, joint = out[0], out[-1]
    k, m = parts[0].shape[0], weak_input.shape[0]
    lam = torch.rand(alone.shape, generator=rng, device=alone.device)
    labelled = lam * alone + (1 - lam) * joint[:k]
    weak = joint[k : k + m]
    strong = joint[k + m :] if strong_input is not None else weak
    return [labelled, *out[1:-1]], weak.detach(), strong


def _init(net: nn.Module) -> nn.Module:
    net.apply(init_dcgan_weights)
    return net


@dataclass(frozen=True)
class ClassifierSpec:
    """Which network classifies and how many of its first logits are the classes (the rest,
    such as sgan's "fake", are dropped). Stored in checkpoints as ``meta["classifier"]``."""

    network: str = "C"
    drop_last: bool = False

    def as_meta(self, num_classes: int) -> dict[str, object]:
        outputs = num_classes + 1 if self.drop_last else num_classes
        return {"network": self.network, "logits": num_classes, "outputs": outputs}


class Method:
    """Base of a training method; subclasses fill in the class attributes and ``step``."""

    name: ClassVar[str]
    players: ClassVar[tuple[str, ...]]  # the networks built, among "G", "D", "C"
    classifier: ClassVar[ClassifierSpec] = ClassifierSpec()
    # ms per step at batch 10, width 64, 64 px on the project's 2-core CPU
    # (benchmarks/bench_step.py, 2026-11-25); only ratios are used, to weigh runs for the ETA.
    step_ms: ClassVar[float]

    @classmethod
    def networks(
        cls, settings: TrainSettings, num_classes: int, image_size: int, channels: int = 1
    ) -> Nets:
        """Freshly initialised networks, built in G, D, C order from torch's global RNG."""
        w = settings.width
        build: dict[str, Callable[[], nn.Module]] = {
            "G": lambda: Generator(settings.latent, w, image_size, channels),
            "D": lambda: Discriminator(w, image_size, channels),
            "C": lambda: Classifier(num_classes, w, image_size, channels),
        }
        return {name: _init(build[name]()) for name in cls.players}

    @staticmethod
    def optimizers(nets: Nets, settings: TrainSettings) -> Opts:
        """One Adam per network; build after moving the networks to their device."""
        return {name: _adam(net, settings) for name, net in nets.items()}

    @classmethod
    def step(
        cls,
        nets: Nets,
        opts: Opts,
        real: torch.Tensor,
        labels: torch.Tensor,
        settings: TrainSettings,
        autocast: torch.dtype | None = None,
        rng: torch.Generator | None = None,
        aug: Augment | None = None,
        unlabelled: torch.Tensor | None = None,
        pseudo: pseudolabels.PseudoLabels | None = None,
    ) -> StepOutput:
        raise NotImplementedError

    @classmethod
    def predict(cls, nets: Nets, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) of the network that classifies at evaluation time."""
        logits = nets[cls.classifier.network](x)
        return logits[:, :-1] if cls.classifier.drop_last else logits


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    names.add(cls.name)  # settings know a method by that list alone
    METHODS[cls.name] = cls
    return cls


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


@register
class Vanilla(Method):
    """C alone, supervised cross-entropy on the labelled images."""

    name = "vanilla"
    players = ("C",)
    step_ms = 74.9

    @classmethod
    def step(
        cls,
        nets,
        opts,
        real,
        labels,
        settings,
        autocast=None,
        rng=None,
        aug=None,
        unlabelled=None,
        pseudo=None,
    ) -> StepOutput:
        if aug is None and unlabelled is None:  # the paper's baseline, as it always ran
            with _autocast(real.device, autocast):
                logits = nets["C"](real)
            loss_c = F.cross_entropy(logits.float(), labels)
        else:
            with _autocast(real.device, autocast):
                (logits,), weak, strong = _classifier_views(
                    nets["C"],
                    aug,
                    real,
                    unlabelled=unlabelled,
                    teacher=_teacher(pseudo, "unlabelled"),
                    labelled_norm=settings.unlabelled_norm == "labelled",
                    interpolate=settings.unlabelled_interpolation,
                    rng=rng,
                )
            loss_c = F.cross_entropy(logits, labels)
            if weak is not None:
                pseudo = pseudo or _plain_pseudo_labels(settings, logits)
                loss_c = loss_c + _pseudo_label_term(weak, strong, settings, pseudo, logits)
        _update(opts["C"], loss_c)
        return StepOutput(loss_c=loss_c.detach())


@register
class SGAN(Method):
    """One K+1-way discriminator that both classifies and tells fake from real.

    D trains on the labelled batch (supervised CE over K+1 classes plus "not fake") and on
    generated images ("fake"); G is trained to make D say "not fake". See
    :func:`losses.sgan_discriminator_loss`.
    """

    name = "sgan"
    players = ("G", "D")
    classifier = ClassifierSpec("D", drop_last=True)  # the K class logits; the last is "fake"
    step_ms = 285.2

    @classmethod
    def networks(cls, settings, num_classes, image_size, channels=1) -> Nets:
        w = settings.width
        return {
            "G": _init(Generator(settings.latent, w, image_size, channels)),
            "D": _init(MultiTaskDiscriminator(num_classes, w, image_size, channels)),
        }

    @classmethod
    def step(
        cls,
        nets,
        opts,
        real,
        labels,
        settings,
        autocast=None,
        rng=None,
        aug=None,
        unlabelled=None,
        pseudo=None,
    ) -> StepOutput:
        G, D = nets["G"], nets["D"]
        t = aug or _same
        z = torch.randn(real.shape[0], settings.latent, device=real.device, generator=rng)
        with _autocast(real.device, autocast):
            fake = G(z)

        # (1) Update D: classify the labelled real images, call the generated ones fake;
        # unlabelled real images count as "not fake" (Salimans et al.'s unsupervised term)
        with _autocast(real.device, autocast):
            if unlabelled is None:
                d_real, d_fake = separately(D, t(real), t(fake.detach()))
                d_unl = None
            else:
                d_real, d_unl, d_fake = separately(D, t(real), t(unlabelled), t(fake.detach()))
                d_unl = d_unl.float()
        loss_d = losses.sgan_discriminator_loss(d_real.float(), labels, d_fake.float(), d_unl)
        _update(opts["D"], loss_d)

        # (3) Update G: generated images should not be judged fake
        with _frozen(D), _autocast(real.device, autocast):
            d_gen = D(t(fake))
        loss_g = losses.sgan_generator_loss(d_gen.float())
        _update(opts["G"], loss_g)

        return StepOutput(loss_d=loss_d.detach(), loss_g=loss_g.detach())


@register
class ThreeNGAN(Method):
    """3N-GAN: eq. 1 for C, eq. 2 for G (through C, C not stepped), BCE for D."""

    name = "3ngan"
    players = ("G", "D", "C")
    step_ms = 476.3
    # ecgan reuses this step with both switches off
    kl_in_classifier: ClassVar[bool] = True
    classifier_trains_generator: ClassVar[bool] = True

    @classmethod
    def step(
        cls,
        nets,
        opts,
        real,
        labels,
        settings,
        autocast=None,
        rng=None,
        aug=None,
        unlabelled=None,
        pseudo=None,
    ) -> StepOutput:
        G, D, C = nets["G"], nets["D"], nets["C"]
        use_kl = cls.kl_in_classifier
        use_c_for_g = cls.classifier_trains_generator and settings.use_generator_classifier_loss
        t = aug or _same
        z = torch.randn(real.shape[0], settings.latent, device=real.device, generator=rng)
        with _autocast(real.device, autocast):
            fake = G(z)

        # (1) Update D: real -> 1 (labelled and unlabelled alike), generated -> 0. With more
        # unlabelled images than labelled ones (unlabelled_ratio > 1) D sees one batch of
        # them: the ratio is the pseudo-label term's, and D's real batch keeps its size.
        if unlabelled is not None:
            seen_real = torch.cat([real, unlabelled[: settings.batch_size]])
        else:
            seen_real = real
        with _autocast(real.device, autocast):
            d_real, d_fake = separately(D, t(seen_real), t(fake.detach()))
        loss_d = losses.discriminator_loss(d_real.float(), d_fake.float())
        _update(opts["D"], loss_d)

        # (2) Update C: labelled real images, confident generated ones (eq. 1), and confident
        # unlabelled real ones when there are any. With a teacher, the generated images'
        # pseudo-labels come from its logits of the un-augmented fakes.
        weak = strong = None
        if aug is None and unlabelled is None:
            with _autocast(real.device, autocast):
                c_real, c_fake = separately(C, real, fake.detach())
            c_real, c_fake = c_real.float(), c_fake.float()
        else:
            with _autocast(real.device, autocast):
                (c_real, c_fake), weak, strong = _classifier_views(
                    C,
                    aug,
                    real,
                    fake.detach(),
                    unlabelled=unlabelled,
                    teacher=_teacher(pseudo, "unlabelled"),
                    labelled_norm=settings.unlabelled_norm == "labelled",
                    interpolate=settings.unlabelled_interpolation,
                    rng=rng,
                )
        pseudo = pseudo or _plain_pseudo_labels(settings, c_real)
        gen_teacher = pseudo.teacher_for("generated")
        if gen_teacher is not None:
            with _autocast(real.device, autocast):
                fake_labelled_by = _teacher_logits(gen_teacher, fake.detach())
        else:
            fake_labelled_by = c_fake
        fake_labels, weights = pseudo.generated(fake_labelled_by)
        loss_c = losses.classifier_loss(
            c_real,
            labels,
            c_fake,
            fake_labels,
            weights,
            lam=settings.lam,
            alpha=settings.alpha if use_kl else 0.0,
            kl=settings.kl if use_kl else "none",
        )
        if weak is not None:
            loss_c = loss_c + _pseudo_label_term(weak, strong, settings, pseudo, c_real)
        _update(opts["C"], loss_c)

        # (3) Update G on the same fake: fool D and, in 3ngan, be classified confidently by C
        with _frozen(D, C), _autocast(real.device, autocast):
            seen_fake = t(fake)
            d_gen = D(seen_fake)
            c_gen = C(seen_fake) if use_c_for_g else None
        if c_gen is not None:
            c_gen = c_gen.float()
            gen_pseudo, gen_weights = losses.pseudo_labels(c_gen, settings.tau)
            loss_g = losses.generator_loss(
                d_gen.float(), c_gen, gen_pseudo, gen_weights, lam=settings.lam
            )
        else:
            loss_g = losses.generator_loss(d_gen.float())
        _update(opts["G"], loss_g)

        return StepOutput(
            loss_d=loss_d.detach(),
            loss_c=loss_c.detach(),
            loss_g=loss_g.detach(),
            pseudo_rate=weights.mean(),
        )


@register
class ECGAN(ThreeNGAN):
    """EC-GAN: C learns from real labels and confident fakes (no KL); G is trained by D only."""

    name = "ecgan"
    step_ms = 387.2
    kl_in_classifier = False
    classifier_trains_generator = False
