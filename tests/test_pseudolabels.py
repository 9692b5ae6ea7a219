"""Pseudo-labellers: without options exactly the paper's rule; each option moves what it
should (values computed by hand); counts and state survive a save and restore."""

from __future__ import annotations

import json
import math

import pytest
import torch

from threengan_cli.core.settings import TrainSettings
from threengan_cli.model import losses, pseudolabels
from threengan_cli.model.pseudolabels import PseudoLabeller

CPU = torch.device("cpu")


def _logits(*probs_of_class_1: float) -> torch.Tensor:
    """Two-class logits whose softmax gives these probabilities of class 1."""
    return torch.tensor([[0.0, math.log(p / (1 - p))] for p in probs_of_class_1])


def test_a_plain_labeller_is_the_papers_rule():
    logits = torch.randn(16, 2) * 3
    got = PseudoLabeller(2, 0.9, CPU)(logits)
    expected = losses.pseudo_labels(logits, 0.9)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_counts_hold_argmax_confident_and_probability_sums_per_class():
    labeller = PseudoLabeller(2, 0.9, CPU)
    labeller(_logits(0.05, 0.5 + 1e-3, 0.95, 0.99))
    argmax, confident, probability = labeller.counts.tolist()
    assert argmax == [1.0, 3.0]
    assert confident == [1.0, 2.0]  # 0.95 for class 0; 0.95 and 0.99 for class 1
    assert probability == pytest.approx([0.95 + 0.499 + 0.05 + 0.01, 0.05 + 0.501 + 0.95 + 0.99])
    summary = labeller.summary(["N", "P"])
    assert summary["images"] == 4 and summary["mask_rate"] == 0.75
    assert summary["shares"] == {"N": 0.25, "P": 0.75}
    assert summary["class_mask_rates"] == {"N": 1.0, "P": pytest.approx(0.6667)}
    assert summary["confident_shares"] == {"N": pytest.approx(0.3333), "P": pytest.approx(0.6667)}


def test_a_labeller_that_saw_nothing_has_no_summary():
    assert PseudoLabeller(2, 0.9, CPU).summary(["N", "P"]) is None


def test_alignment_moves_the_running_mean_and_pulls_targets_toward_the_labels_shares():
    # A model that calls every image class 1 with 0.8: with the labels half and half the
    # running mean becomes (0.2, 0.8) after the first step (decay warm-up 2/11 keeps 2/11 of
    # the uniform start): 0.5 * 2/11 + 0.2 * 9/11, and the aligned probability of class 1 is
    # 0.8 / m1 over (0.2 / m0 + 0.8 / m1).
    labeller = PseudoLabeller(2, 0.6, CPU, target=torch.tensor([0.5, 0.5]))
    labels, weights = labeller(_logits(0.8, 0.8))
    m0 = 0.5 * 2 / 11 + 0.2 * 9 / 11
    m1 = 1 - m0
    aligned = (0.8 / m1) / (0.2 / m0 + 0.8 / m1)
    assert labeller.model_mean.tolist() == pytest.approx([m0, m1])
    assert aligned < 0.6  # the alignment took the confidence under the bar
    assert labels.tolist() == [1, 1] and weights.tolist() == [0.0, 0.0]
    plain_weights = PseudoLabeller(2, 0.6, CPU)(_logits(0.8, 0.8))[1]
    assert plain_weights.tolist() == [1.0, 1.0]


def test_adaptive_thresholds_start_low_and_give_the_rarer_class_a_lower_bar():
    labeller = PseudoLabeller(2, 0.95, CPU, adaptive=True)
    labels, weights = labeller(_logits(0.3, 0.9, 0.9, 0.9))
    keep = 9 / 11  # the warm-up decay of the first step is 2/11
    confidence = 0.5 * (1 - keep) + keep * (0.7 + 0.9 * 3) / 4
    class_mean = [0.5 * (1 - keep) + keep * m for m in ((0.7 + 0.1 * 3) / 4, (0.3 + 0.9 * 3) / 4)]
    bars = [confidence * m / max(class_mean) for m in class_mean]
    assert labeller.thresholds().tolist() == pytest.approx(bars)
    assert bars[0] < bars[1] < 0.95
    assert bars[0] == pytest.approx(0.3298, abs=1e-4) and bars[1] == pytest.approx(0.7864, abs=1e-4)
    assert weights.tolist() == [1.0, 1.0, 1.0, 1.0]  # 0.7 and 0.9 clear the lower bars
    assert labels.tolist() == [0, 1, 1, 1]


def test_rampup_scales_the_weights_by_the_steps_done():
    labeller = PseudoLabeller(2, 0.5, CPU, ramp_steps=4)
    seen = [labeller(_logits(0.9))[1].item() for _ in range(5)]
    expected = [math.exp(-5 * (1 - min(t / 4, 1)) ** 2) for t in range(1, 6)]
    assert seen == pytest.approx(expected, rel=1e-6)


def test_state_restores_into_a_fresh_labeller_that_then_labels_the_same():
    a = PseudoLabeller(2, 0.7, CPU, target=torch.tensor([0.5, 0.5]), adaptive=True, ramp_steps=9)
    for seed in range(3):
        a(torch.randn(6, 2, generator=torch.Generator().manual_seed(seed)))
    b = PseudoLabeller(2, 0.7, CPU, target=torch.tensor([0.5, 0.5]), adaptive=True, ramp_steps=9)
    b.restore({k: v.clone() for k, v in a.state().items()})
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(9))
    got_a, got_b = a(logits), b(logits)
    assert all(torch.equal(x, y) for x, y in zip(got_a, got_b, strict=True))
    assert torch.equal(a.counts, b.counts)


def test_a_relative_threshold_is_tau_times_the_labelled_batchs_mean_confidence():
    labelled = _logits(0.9, 0.3)  # top probabilities 0.9 and 0.7: mean 0.8
    assert float(pseudolabels.relative_threshold(0.9, labelled)) == pytest.approx(0.72)
    relative = PseudoLabeller(2, 0.9, CPU, relative=True)
    _, weights = relative(_logits(0.75, 0.70, 0.2), labelled)
    assert weights.tolist() == [1.0, 0.0, 1.0]  # 0.75 and 0.8 clear 0.72; 0.70 does not
    fixed = PseudoLabeller(2, 0.9, CPU)
    assert fixed(_logits(0.75, 0.70, 0.2), labelled)[1].tolist() == [0.0, 0.0, 0.0]
    assert relative.summary(["N", "P"])["relative_threshold"] == pytest.approx(0.72)
    assert relative.thresholds().tolist() == pytest.approx([0.72, 0.72])
    # a more confident labelled batch raises the bar with it
    _, weights = relative(_logits(0.75, 0.70, 0.2), _logits(0.99, 0.01))
    assert weights.tolist() == [0.0, 0.0, 0.0]


def test_a_relative_threshold_needs_the_labelled_logits():
    with pytest.raises(ValueError, match="labelled batch's logits"):
        PseudoLabeller(2, 0.9, CPU, relative=True)(_logits(0.8))


def test_build_follows_the_settings_and_refuses_a_teacher_it_lacks():
    settings = TrainSettings(
        unlabelled_align=True, unlabelled_threshold="adaptive", unlabelled_rampup=3
    )
    built = pseudolabels.build(
        settings, 2, CPU, label_shares=torch.tensor([0.5, 0.5]), steps_per_epoch=20
    )
    pool = built.unlabelled
    assert pool.target is not None and pool.adaptive and pool.ramp_steps == 60
    assert built.generated.target is None and not built.generated.adaptive
    assert built.teacher_for("unlabelled") is None
    assert not pool.relative
    relative = pseudolabels.build(TrainSettings(unlabelled_threshold="relative"), 2, CPU)
    assert relative.unlabelled.relative and not relative.generated.relative
    with pytest.raises(ValueError, match="averaged weights"):
        pseudolabels.build(TrainSettings(unlabelled_teacher=True), 2, CPU)


# ------------------------------------------------------------------------------ the loop
def _loop_settings(**kw) -> TrainSettings:
    base = {"width": 4, "latent": 8, "batch_size": 4, "epochs": 3, "device": "cpu", "seed": 3}
    return TrainSettings(**{**base, "recipe": "robust", "unlabelled": "rest", "size": 8, **kw})


ALL_OPTIONS = {
    "unlabelled_align": True,
    "unlabelled_threshold": "adaptive",
    "unlabelled_teacher": True,
    "unlabelled_ratio": 2,
    "unlabelled_rampup": 2,
    "unlabelled_norm": "labelled",
    "generated_teacher": True,
}


def test_every_epoch_logs_the_pseudo_label_shares_and_mask_rates(dataset, tmp_path):
    from threengan_cli.train import training

    run = tmp_path / "run"
    training.train(dataset, _loop_settings(epochs=2, unlabelled_ratio=2), run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        pool, generated = record["pseudo"]["unlabelled"], record["pseudo"]["generated"]
        assert pool["images"] == 2 * 2 * 4  # 2 steps of 2 x 4 unlabelled images
        assert generated["images"] == 8  # one generated image per labelled one
        for kind in (pool, generated):
            assert sum(kind["shares"].values()) == pytest.approx(1.0, abs=1e-3)
            assert 0.0 <= kind["mask_rate"] <= 1.0
            assert set(kind["class_mask_rates"]) == {"0", "1"}


def test_a_run_with_every_pseudo_label_option_resumes_exactly(dataset, tmp_path):
    from model_factory import train_until_stopped

    from threengan_cli.model import checkpoints
    from threengan_cli.train import training

    settings = _loop_settings(epochs=2, **ALL_OPTIONS)
    full = tmp_path / "full"
    training.train(dataset, settings, full)
    stopped = tmp_path / "stopped"
    train_until_stopped(dataset, settings, stopped)
    training.train(dataset, settings, stopped, resume=True)
    a = checkpoints.load(full / "last.safetensors")
    b = checkpoints.load(stopped / "last.safetensors")
    for group in ("net", "avg", "use", "state"):
        ga, gb = a.group(group), b.group(group)
        assert ga and ga.keys() == gb.keys()
        assert all(torch.equal(ga[k], gb[k]) for k in ga), group

    def pseudo(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["pseudo"] for line in lines]

    assert pseudo(stopped) == pseudo(full)
    assert "thresholds" in pseudo(full)[-1]["unlabelled"]


ADAMATCH = {
    "unlabelled_align": True,
    "unlabelled_threshold": "relative",
    "unlabelled_tau": 0.9,
    "unlabelled_interpolation": True,
    "precise_bn_images": "unlabelled",
}


@pytest.mark.slow
def test_a_run_with_the_site_options_resumes_exactly(dataset, tmp_path):
    from model_factory import train_until_stopped

    from threengan_cli.model import checkpoints
    from threengan_cli.train import training

    settings = _loop_settings(epochs=2, **ADAMATCH)
    full = tmp_path / "full"
    training.train(dataset, settings, full)
    stopped = tmp_path / "stopped"
    train_until_stopped(dataset, settings, stopped)
    training.train(dataset, settings, stopped, resume=True)
    a = checkpoints.load(full / "last.safetensors")
    b = checkpoints.load(stopped / "last.safetensors")
    for group in ("net", "use"):
        ga, gb = a.group(group), b.group(group)
        assert ga and all(torch.equal(ga[k], gb[k]) for k in ga), group
    last = json.loads((full / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 < last["pseudo"]["unlabelled"]["relative_threshold"] <= 0.9


def test_teacher_pseudo_labels_need_a_classifier_c(dataset, tmp_path):
    from threengan_cli.train import events, training

    with pytest.raises(events.TrainingError, match="need a classifier C; sgan has none"):
        training.train(dataset, _loop_settings(method="sgan", unlabelled_teacher=True), tmp_path)
