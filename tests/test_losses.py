"""Losses: values computed by hand on two or three samples."""

from __future__ import annotations

import math

import pytest
import torch

from threengan_cli.model import losses


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_bce_real_fake_matches_log_sigmoid_by_hand():
    logits = torch.tensor([0.0, 2.0])
    sig = [0.5, 1 / (1 + math.exp(-2.0))]
    real = -(math.log(sig[0]) + math.log(sig[1])) / 2
    fake = -(math.log(1 - sig[0]) + math.log(1 - sig[1])) / 2
    assert losses.bce_real_fake(logits, True).item() == pytest.approx(real)
    assert losses.bce_real_fake(logits, False).item() == pytest.approx(fake)
    both = losses.discriminator_loss(logits, logits).item()
    assert both == pytest.approx(real + fake)


def test_pseudo_labels_take_the_argmax_and_keep_only_confident_ones():
    logits = torch.tensor([[3.0, 0.0], [0.0, 0.1], [-4.0, 0.0]], requires_grad=True)
    labels, weights = losses.pseudo_labels(logits, tau=0.9)
    # max probabilities: 0.953, 0.525, 0.982
    assert labels.tolist() == [0, 1, 1]
    assert weights.tolist() == [1.0, 0.0, 1.0]
    assert weights.dtype == torch.float32
    assert not labels.requires_grad and not weights.requires_grad


def test_pseudo_label_confidence_must_exceed_tau_strictly():
    logits = torch.tensor([[0.0, 0.0]])  # max probability exactly 0.5
    _, weights = losses.pseudo_labels(logits, tau=0.5)
    assert weights.tolist() == [0.0]


def test_masked_ce_averages_over_the_whole_batch_not_over_the_kept_samples():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    weights = torch.tensor([1.0, 0.0, 1.0])
    ce0 = -math.log(_softmax([2.0, 0.0])[0])
    ce2 = -math.log(0.5)
    expected = (ce0 + ce2) / 3  # the masked sample still counts in the denominator
    assert losses.masked_ce(logits, labels, weights).item() == pytest.approx(expected)


def test_masked_ce_of_an_all_masked_batch_is_zero_with_a_zero_gradient():
    logits = torch.randn(3, 2, requires_grad=True)
    loss = losses.masked_ce(logits, torch.tensor([0, 1, 0]), torch.zeros(3))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(logits.grad == 0)


def test_kl_is_zero_for_identical_predictions():
    logits = torch.tensor([[1.0, -1.0], [0.3, 0.2], [-2.0, 0.5]])
    assert losses.kl_batch_mean(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.kl_per_pair(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_batch_mean_compares_the_mean_class_distributions_real_first():
    real = [[2.0, 0.0], [0.0, 0.0]]
    fake = [[0.0, 1.0], [-1.0, 1.0]]
    p = [sum(col) / 2 for col in zip(*map(_softmax, real), strict=True)]
    q = [sum(col) / 2 for col in zip(*map(_softmax, fake), strict=True)]
    got = losses.kl_batch_mean(torch.tensor(real), torch.tensor(fake)).item()
    assert got == pytest.approx(_kl(p, q))
    assert got != pytest.approx(_kl(q, p))  # the direction is KL(p_real || p_fake)


def test_kl_batch_mean_is_zero_when_per_image_predictions_differ_but_the_mix_is_equal():
    real = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    fake = torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    assert losses.kl_batch_mean(real, fake).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.kl_per_pair(real, fake).item() > 1.0


def test_kl_per_pair_averages_the_kl_of_each_index_pair():
    real = [[2.0, 0.0], [0.0, 0.0], [1.0, 3.0]]
    fake = [[0.0, 1.0], [-1.0, 1.0], [0.5, 0.5]]
    expected = sum(_kl(_softmax(r), _softmax(f)) for r, f in zip(real, fake, strict=True)) / 3
    got = losses.kl_per_pair(torch.tensor(real), torch.tensor(fake)).item()
    assert got == pytest.approx(expected)


def test_kl_per_pair_refuses_batches_of_different_size():
    with pytest.raises(ValueError, match="equal shape"):
        losses.kl_per_pair(torch.zeros(3, 2), torch.zeros(2, 2))


def test_kl_term_dispatches_by_mode():
    real = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    fake = torch.tensor([[0.0, 1.0], [-1.0, 1.0]])
    assert losses.kl_term("batch-mean", real, fake) == losses.kl_batch_mean(real, fake)
    assert losses.kl_term("per-pair", real, fake) == losses.kl_per_pair(real, fake)
    assert losses.kl_term("none", real, fake).item() == 0.0
    with pytest.raises(ValueError, match="unknown KL mode"):
        losses.kl_term("symmetric", real, fake)


def test_classifier_loss_is_ce_plus_lambda_masked_ce_plus_alpha_kl():
    real = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    fake = torch.tensor([[4.0, 0.0], [0.0, 0.5]])
    pseudo, weights = losses.pseudo_labels(fake, tau=0.9)  # only the first is confident
    assert weights.tolist() == [1.0, 0.0]
    ce = (-math.log(_softmax([2.0, 0.0])[0]) - math.log(_softmax([0.0, 1.0])[0])) / 2
    masked = -math.log(_softmax([4.0, 0.0])[0]) / 2
    p = [sum(c) / 2 for c in zip(_softmax([2.0, 0.0]), _softmax([0.0, 1.0]), strict=True)]
    q = [sum(c) / 2 for c in zip(_softmax([4.0, 0.0]), _softmax([0.0, 0.5]), strict=True)]
    expected = ce + 0.01 * masked + 0.3 * _kl(p, q)
    got = losses.classifier_loss(real, labels, fake, pseudo, weights, lam=0.01, alpha=0.3)
    assert got.item() == pytest.approx(expected)
    without_kl = losses.classifier_loss(real, labels, fake, pseudo, weights, 0.01, 0.3, "none")
    assert without_kl.item() == pytest.approx(ce + 0.01 * masked)


def test_generator_loss_is_bce_to_real_plus_lambda_masked_ce():
    d_logits = torch.tensor([0.0, 1.0])
    c_logits = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    pseudo, weights = losses.pseudo_labels(c_logits, tau=0.9)
    bce = -(math.log(0.5) + math.log(1 / (1 + math.exp(-1.0)))) / 2
    masked = -math.log(_softmax([0.0, 3.0])[1]) / 2
    got = losses.generator_loss(d_logits, c_logits, pseudo, weights, lam=0.01)
    assert got.item() == pytest.approx(bce + 0.01 * masked)
    assert losses.generator_loss(d_logits).item() == pytest.approx(bce)


def test_sgan_discriminator_loss_by_hand_with_fake_as_last_class():
    real = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]  # K=2 classes + fake
    labels = [0, 1]
    fake = [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    sup = -sum(math.log(_softmax(r)[y]) for r, y in zip(real, labels, strict=True)) / 2
    unsup_real = -sum(math.log(1 - _softmax(r)[2]) for r in real) / 2
    unsup_fake = -sum(math.log(_softmax(f)[2]) for f in fake) / 2
    got = losses.sgan_discriminator_loss(
        torch.tensor(real), torch.tensor(labels), torch.tensor(fake)
    )
    assert got.item() == pytest.approx(sup + unsup_real + unsup_fake)


def test_sgan_generator_loss_is_minus_log_of_not_fake():
    fake = [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    expected = -sum(math.log(1 - _softmax(f)[2]) for f in fake) / 2
    got = losses.sgan_generator_loss(torch.tensor(fake))
    assert got.item() == pytest.approx(expected)


def test_losses_stay_finite_for_extreme_logits():
    big = torch.tensor([[80.0, -80.0, 0.0], [-80.0, 80.0, 90.0]])
    assert torch.isfinite(losses.sgan_generator_loss(big))
    assert torch.isfinite(losses.sgan_discriminator_loss(big, torch.tensor([0, 1]), big))
    assert torch.isfinite(losses.kl_batch_mean(big[:, :2], -big[:, :2]))
    assert torch.isfinite(losses.kl_per_pair(big[:, :2], -big[:, :2]))


def test_confident_argmax_takes_a_threshold_per_class_of_the_argmax():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]])
    labels, weights = losses.confident_argmax(probs, torch.tensor([0.65, 0.9]))
    assert labels.tolist() == [0, 1, 1]
    assert weights.tolist() == [1.0, 0.0, 0.0]  # 0.7 > 0.65; 0.6 and 0.8 not over 0.9
    _, same = losses.confident_argmax(probs, 0.65)
    assert same.tolist() == [1.0, 0.0, 1.0]


def test_pseudo_labels_are_the_confident_argmax_of_the_softmax():
    logits = torch.tensor([[3.0, 0.0], [0.0, 0.1]])
    expected = losses.confident_argmax(torch.softmax(logits, dim=1), 0.9)
    got = losses.pseudo_labels(logits, 0.9)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_distribution_alignment_scales_by_target_over_model_mean_and_renormalises():
    probs = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    target = torch.tensor([0.5, 0.5])
    model_mean = torch.tensor([0.8, 0.2])  # the model favours class 0
    # row 1: 0.6 * 0.625 = 0.375, 0.4 * 2.5 = 1.0 -> 0.2727, 0.7273
    # row 2: 0.2 * 0.625 = 0.125, 0.8 * 2.5 = 2.0 -> 0.0588, 0.9412
    got = losses.align_distribution(probs, target, model_mean)
    assert got[0].tolist() == pytest.approx([0.375 / 1.375, 1.0 / 1.375])
    assert got[1].tolist() == pytest.approx([0.125 / 2.125, 2.0 / 2.125])
    same = losses.align_distribution(probs, target, target)
    assert torch.allclose(same, probs)


def test_adaptive_thresholds_scale_the_global_bar_by_each_class_mean_over_the_largest():
    got = losses.adaptive_thresholds(torch.tensor(0.8), torch.tensor([0.3, 0.6]))
    assert got.tolist() == pytest.approx([0.4, 0.8])


def test_rampup_rises_from_exp_minus_5_to_1_and_stays():
    values = losses.rampup(torch.tensor([-1.0, 0.0, 0.5, 1.0, 3.0])).tolist()
    assert values == pytest.approx(
        [math.exp(-5), math.exp(-5), math.exp(-5 * 0.25), 1.0, 1.0], rel=1e-6
    )
