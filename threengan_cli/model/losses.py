"""Loss functions of 3N-GAN and its baselines, as pure functions of logits.

Nothing here calls ``backward``, touches an optimizer, reads a value to the host or loops
over samples; masks are float weights, never boolean indexing, so every loss has a fixed
shape and is capturable in a CUDA graph. Pass float32 logits (``.float()`` after autocast).

Documented choices (DESIGN section 1 leaves them open):

- ``masked_ce`` averages over the *whole* batch: ``sum_i w_i * CE_i / B``. A batch with few
  confident pseudo-labels therefore contributes little, rather than a few samples being
  weighted up to a full batch's worth.
- The KL term of eq. 1 defaults to ``kl_batch_mean``: KL(p̄_real || p̄_fake) between the
  batch-mean class distributions of C's predictions on real and on generated images. It asks
  the generated batch to carry the same class mix as the real one, without pairing images
  that have nothing to do with each other. ``kl_per_pair`` (mean over i of
  KL(p_real_i || p_fake_i), pairing by index) is the option ``kl = "per-pair"``.
- ``discriminator_loss`` is the sum of the real and fake BCE terms, as DCGAN's reference code.
- SGAN (Salimans et al. 2016) uses K+1 logits, the last (index K) meaning "fake".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Real/fake and pseudo-labels
# --------------------------------------------------------------------------------------------


def bce_real_fake(logits: torch.Tensor, is_real: bool) -> torch.Tensor:
    """Mean BCE of real/fake logits (B,) against the target 1 (real) or 0 (generated)."""
    target = torch.full_like(logits, 1.0 if is_real else 0.0)
    return F.binary_cross_entropy_with_logits(logits, target)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """D's loss: BCE(D(x), 1) + BCE(D(G(z)), 0)."""
    return bce_real_fake(logits_real, True) + bce_real_fake(logits_fake, False)


def pseudo_labels(logits_fake: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax class of each generated image and a float weight, 1 where max softmax > tau.

    Both are detached: the pseudo-label is a target, not something to optimise.
    """
    return confident_argmax(torch.softmax(logits_fake.detach().float(), dim=1), tau)


def confident_argmax(
    probs: torch.Tensor, tau: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax class of each row of ``probs`` (B, K) and a float weight, 1 where its
    probability exceeds ``tau``: one number, or a threshold per class, (K,)."""
    confidence, labels = probs.max(dim=1)
    threshold = tau[labels] if isinstance(tau, torch.Tensor) else tau
    return labels, (confidence > threshold).float()


def align_distribution(
    probs: torch.Tensor, target: torch.Tensor, model_mean: torch.Tensor
) -> torch.Tensor:
    """Distribution alignment (ReMixMatch, Berthelot et al. 2020): each row of ``probs``
    (B, K) times ``target / model_mean`` (K,), renormalised to sum to 1. A model whose mean
    prediction favours a class more than the target does has that class scaled down."""
    aligned = probs * (target / model_mean)
    return aligned / aligned.sum(dim=1, keepdim=True)


def adaptive_thresholds(confidence: torch.Tensor, class_mean: torch.Tensor) -> torch.Tensor:
    """FreeMatch's self-adaptive thresholds (Wang et al. 2023), (K,): the global threshold
    ``confidence`` (a running mean of the top probability) times each class's running mean
    probability over the largest one, so a class the model predicts less gets a lower bar."""
    return confidence * class_mean / class_mean.max()


def rampup(progress: torch.Tensor) -> torch.Tensor:
    """exp(-5 (1 - t)^2) for t = ``progress`` clamped to [0, 1]: the sigmoid-shaped ramp of
    an unsupervised weight (Laine & Aila 2017; Mean Teacher), from 0.0067 at t = 0 to 1."""
    t = progress.clamp(0.0, 1.0)
    return torch.exp(-5.0 * (1.0 - t) ** 2)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample times its weight, averaged over the whole batch (sum / B)."""
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    return (per_sample * weights).mean()


# --------------------------------------------------------------------------------------------
# KL between predictions on real and generated images
# --------------------------------------------------------------------------------------------


def _log_batch_mean(logits: torch.Tensor) -> torch.Tensor:
    """log of the batch-mean softmax, (K,), computed in log space for stability."""
    return torch.logsumexp(F.log_softmax(logits, dim=1), dim=0) - math.log(logits.shape[0])


def kl_batch_mean(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """KL(p̄_real || p̄_fake), p̄ the batch-mean softmax; batch sizes may differ."""
    log_p = _log_batch_mean(logits_real)
    log_q = _log_batch_mean(logits_fake)
    return (log_p.exp() * (log_p - log_q)).sum()


def kl_per_pair(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Mean over i of KL(p_real_i || p_fake_i), pairing by index; batches of equal size."""
    if logits_real.shape != logits_fake.shape:
        raise ValueError(
            f"per-pair KL needs batches of equal shape, got {tuple(logits_real.shape)} "
            f"and {tuple(logits_fake.shape)}"
        )
    log_p = F.log_softmax(logits_real, dim=1)
    log_q = F.log_softmax(logits_fake, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def kl_term(mode: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The KL term of eq. 1 for ``mode`` in "batch-mean" | "per-pair" | "none"."""
    if mode == "batch-mean":
        return kl_batch_mean(logits_real, logits_fake)
    if mode == "per-pair":
        return kl_per_pair(logits_real, logits_fake)
    if mode == "none":
        return logits_real.new_zeros(())
    raise ValueError(f"unknown KL mode {mode!r}: use batch-mean, per-pair or none")


# --------------------------------------------------------------------------------------------
# 3N-GAN, eq. 1 and eq. 2 (ecgan uses eq. 1 without KL and plain BCE for G)
# --------------------------------------------------------------------------------------------


def classifier_loss(
    logits_real: torch.Tensor,
    labels: torch.Tensor,
    logits_fake: torch.Tensor,
    pseudo: torch.Tensor,
    weights: torch.Tensor,
    lam: float,
    alpha: float,
    kl: str = "batch-mean",
) -> torch.Tensor:
    """Eq. 1: CE(ŷ, y) + lam * CE_masked(ŷ_g, pseudo) + alpha * KL(ŷ, ŷ_g).

    ``pseudo``/``weights`` come from :func:`pseudo_labels` of ``logits_fake``. With
    ``alpha=0`` or ``kl="none"`` the KL term is skipped, which is EC-GAN's classifier loss.
    """
    loss = F.cross_entropy(logits_real, labels) + lam * masked_ce(logits_fake, pseudo, weights)
    if alpha and kl != "none":
        loss = loss + alpha * kl_term(kl, logits_real, logits_fake)
    return loss


def generator_loss(
    d_logits_fake: torch.Tensor,
    c_logits_fake: torch.Tensor | None = None,
    pseudo: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    lam: float = 0.0,
) -> torch.Tensor:
    """Eq. 2: BCE(D(G(z)), 1) + lam * CE_masked(C(G(z)), pseudo).

    Without ``c_logits_fake`` (ecgan, or 3ngan's ablation) it is DCGAN's non-saturating loss.
    """
    loss = bce_real_fake(d_logits_fake, True)
    if c_logits_fake is not None:
        loss = loss + lam * masked_ce(c_logits_fake, pseudo, weights)
    return loss


# --------------------------------------------------------------------------------------------
# SGAN: one K+1-way discriminator (Salimans et al. 2016), index K = "fake"
# --------------------------------------------------------------------------------------------


def _log_not_fake(logits: torch.Tensor) -> torch.Tensor:
    """log(1 - p_fake) per sample: logsumexp of the K class logits minus that of all K+1."""
    return torch.logsumexp(logits[:, :-1], dim=1) - torch.logsumexp(logits, dim=1)


def sgan_discriminator_loss(
    logits_real: torch.Tensor,
    labels: torch.Tensor,
    logits_fake: torch.Tensor,
    logits_unlabelled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Salimans et al.'s L_supervised + L_unsupervised for the K+1-way D.

    - supervised: CE over all K+1 classes of the labelled real images against their label;
    - unsupervised: -log(1 - p_fake(x_real)) - log p_fake(G(z)).

    Without an unlabelled pool (the paper's setting) the unsupervised real term is computed
    on the same labelled batch as the supervised one; with ``logits_unlabelled`` it is
    computed on the labelled and unlabelled real images together.
    """
    fake_class = logits_fake.shape[1] - 1
    supervised = F.cross_entropy(logits_real, labels)
    seen_real = (
        logits_real if logits_unlabelled is None else torch.cat([logits_real, logits_unlabelled])
    )
    real_not_fake = -_log_not_fake(seen_real).mean()
    fake_is_fake = -F.log_softmax(logits_fake, dim=1)[:, fake_class].mean()
    return supervised + real_not_fake + fake_is_fake


def sgan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss: -log(1 - p_fake(G(z))), generated images judged not fake."""
    return -_log_not_fake(logits_fake).mean()
