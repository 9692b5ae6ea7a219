"""Methods: one step changes exactly the networks it should, and nothing else leaks."""

from __future__ import annotations

import copy

import pytest
import torch

from threengan_cli.core.config import SettingsError, resolve
from threengan_cli.core.settings import TrainSettings
from threengan_cli.model import methods
from threengan_cli.model.methods import METHODS, StepOutput
from threengan_cli.model.networks import (
    Classifier,
    Discriminator,
    Generator,
    MultiTaskDiscriminator,
)

SIZE, BATCH, K = 32, 4, 2


def _settings(method: str, **changes) -> TrainSettings:
    return TrainSettings(method=method, width=4, latent=8, batch_size=BATCH, **changes)


def _setup(method: str, seed: int = 0, **changes):
    settings = _settings(method, **changes)
    torch.manual_seed(seed)
    nets = METHODS[method].networks(settings, num_classes=K, image_size=SIZE)
    opts = METHODS[method].optimizers(nets, settings)
    real = torch.rand(BATCH, 1, SIZE, SIZE) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1])
    return settings, nets, opts, real, labels


def _params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _step(method, settings, nets, opts, real, labels, seed=1, **kw) -> StepOutput:
    torch.manual_seed(seed)
    return METHODS[method].step(nets, opts, real, labels, settings, **kw)


def test_settings_accept_exactly_the_registered_methods():
    for name in METHODS:
        assert TrainSettings(method=name).method == name
    with pytest.raises(SettingsError, match="train.method: must be one of 'vanilla'"):
        resolve("train", None, method="nope")


def test_vanilla_builds_only_the_classifier():
    _, nets, opts, *_ = _setup("vanilla")
    assert set(nets) == {"C"} and set(opts) == {"C"}
    assert isinstance(nets["C"], Classifier)


def test_sgan_builds_a_generator_and_a_multitask_discriminator_and_no_classifier():
    _, nets, *_ = _setup("sgan")
    assert set(nets) == {"G", "D"}
    assert isinstance(nets["G"], Generator)
    assert isinstance(nets["D"], MultiTaskDiscriminator)


@pytest.mark.parametrize("method", ["ecgan", "3ngan"])
def test_ecgan_and_3ngan_build_all_three_players(method):
    _, nets, *_ = _setup(method)
    assert set(nets) == {"G", "D", "C"}
    assert isinstance(nets["D"], Discriminator) and not isinstance(nets["D"], Classifier)


def test_optimizers_are_dcgan_adam_fused_on_cpu():
    settings, _, opts, *_ = _setup("3ngan", lr=1e-3, beta1=0.4)
    for opt in opts.values():
        assert isinstance(opt, torch.optim.Adam)
        assert opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.4, settings.beta2)
        assert opt.defaults["fused"] is True


@pytest.mark.parametrize(
    ("method", "updated"),
    [
        ("vanilla", {"C"}),
        ("sgan", {"G", "D"}),
        ("ecgan", {"G", "D", "C"}),
        ("3ngan", {"G", "D", "C"}),
    ],
)
def test_one_step_changes_exactly_the_networks_of_the_method(method, updated):
    settings, nets, opts, real, labels = _setup(method)
    before = {name: _params(net) for name, net in nets.items()}
    out = _step(method, settings, nets, opts, real, labels)
    changed = {name for name, net in nets.items() if not _same(before[name], _params(net))}
    assert changed == updated
    present = set(out.as_dict())
    expected = {f"loss_{n.lower()}" for n in updated}
    if "C" in updated and "G" in updated:
        expected.add("pseudo_rate")
    assert present == expected
    for value in out.as_dict().values():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value)


def _with_other_classifier(nets):
    other = copy.deepcopy(nets)
    with torch.no_grad():
        for p in other["C"].parameters():
            p.add_(0.5 * torch.sign(torch.sin(torch.arange(p.numel(), dtype=p.dtype))).view_as(p))
    return other


def _generator_after_one_step(method, nets, **changes):
    # tau=0 and lam=1 make every pseudo-label count strongly, so any path from C to G shows
    settings = _settings(method, tau=0.0, lam=1.0, **changes)
    opts = METHODS[method].optimizers(nets, settings)
    torch.manual_seed(3)
    real = torch.rand(BATCH, 1, SIZE, SIZE) * 2 - 1
    _step(method, settings, nets, opts, real, torch.tensor([0, 1, 0, 1]))
    return _params(nets["G"])


def test_ecgan_generator_gets_no_gradient_from_the_classifier():
    _, nets, *_ = _setup("ecgan")
    other = _with_other_classifier(nets)
    assert _same(
        _generator_after_one_step("ecgan", nets), _generator_after_one_step("ecgan", other)
    )


@pytest.mark.slow
def test_3ngan_generator_gets_gradient_from_the_classifier():
    _, nets, *_ = _setup("3ngan")
    other = _with_other_classifier(nets)
    a = _generator_after_one_step("3ngan", copy.deepcopy(nets))
    b = _generator_after_one_step("3ngan", copy.deepcopy(other))
    assert not _same(a, b)
    without = _generator_after_one_step("3ngan", nets, use_generator_classifier_loss=False)
    assert not _same(a, without)


def test_3ngan_ablation_trains_the_generator_against_the_discriminator_only():
    _, nets, *_ = _setup("3ngan")
    other = _with_other_classifier(nets)
    off = {"use_generator_classifier_loss": False}
    assert _same(
        _generator_after_one_step("3ngan", nets, **off),
        _generator_after_one_step("3ngan", other, **off),
    )


def _snapshot_after_step(opt, net, store):
    original = opt.step

    def step(*args, **kwargs):
        result = original(*args, **kwargs)
        store["params"] = _params(net)
        store["grads"] = [p.grad.detach().clone() for p in net.parameters()]
        return result

    opt.step = step


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_3ngan_generator_update_leaves_classifier_and_discriminator_untouched(autocast):
    settings, nets, opts, real, labels = _setup("3ngan", tau=0.0, lam=1.0)
    after_c, after_d, g_grads = {}, {}, {}
    _snapshot_after_step(opts["C"], nets["C"], after_c)
    _snapshot_after_step(opts["D"], nets["D"], after_d)
    _snapshot_after_step(opts["G"], nets["G"], g_grads)
    _step("3ngan", settings, nets, opts, real, labels, autocast=autocast)
    # C and D were stepped once, by their own optimizers; G's update changed neither their
    # weights nor the gradients their own step used
    assert _same(after_c["params"], _params(nets["C"]))
    assert _same(after_c["grads"], [p.grad for p in nets["C"].parameters()])
    assert _same(after_d["params"], _params(nets["D"]))
    assert _same(after_d["grads"], [p.grad for p in nets["D"].parameters()])
    assert all(p.requires_grad for net in nets.values() for p in net.parameters())
    assert any(g.abs().sum() > 0 for g in g_grads["grads"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_step_is_deterministic_under_a_fixed_seed(method):
    runs = []
    for _ in range(2):
        settings, nets, opts, real, labels = _setup(method)
        out = _step(method, settings, nets, opts, real, labels)
        runs.append((out.as_dict(), [_params(net) for net in nets.values()]))
    (out_a, params_a), (out_b, params_b) = runs
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    assert all(_same(a, b) for a, b in zip(params_a, params_b, strict=True))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_steps_stay_finite_and_predict_gives_k_logits(method, autocast):
    settings, nets, opts, real, labels = _setup(method, kl="per-pair")
    for seed in range(2):
        out = _step(method, settings, nets, opts, real, labels, seed=seed, autocast=autocast)
        assert all(torch.isfinite(v) for v in out.as_dict().values())
    assert all(torch.isfinite(p).all() for net in nets.values() for p in net.parameters())
    logits = METHODS[method].predict(nets, real)
    assert logits.shape == (BATCH, K)


def test_step_never_reads_a_value_back_to_the_host(monkeypatch):
    settings, nets, opts, real, labels = _setup("3ngan")

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside the training step")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    _step("3ngan", settings, nets, opts, real, labels)


def test_pseudo_rate_is_the_share_of_confident_generated_images():
    settings, nets, opts, real, labels = _setup("3ngan", tau=0.0)
    assert _step("3ngan", settings, nets, opts, real, labels).pseudo_rate == 1.0
    settings, nets, opts, real, labels = _setup("3ngan", tau=1.0)
    assert _step("3ngan", settings, nets, opts, real, labels).pseudo_rate == 0.0


def test_step_output_as_dict_lists_only_present_values():
    out = StepOutput(loss_c=torch.tensor(1.0))
    assert list(out.as_dict()) == ["loss_c"]


def test_frozen_restores_requires_grad_even_after_an_error():
    net = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError), methods._frozen(net):
        assert not any(p.requires_grad for p in net.parameters())
        raise RuntimeError
    assert all(p.requires_grad for p in net.parameters())


# ------------------------------------------------------------------ pseudo-label options
def _pool(seed: int = 5, n: int = BATCH) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _labels_from(settings, teacher=None):
    from threengan_cli.model import pseudolabels

    if teacher is None:
        return pseudolabels.plain(settings, K, torch.device("cpu"))
    return pseudolabels.build(settings, K, torch.device("cpu"), teacher=teacher)


def _c_after_step(method, nets, settings, pseudo, **kw):
    opts = METHODS[method].optimizers(nets, settings)
    real = torch.rand(BATCH, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    _step(method, settings, nets, opts, real, torch.tensor([0, 1, 0, 1]), pseudo=pseudo, **kw)
    return _params(nets["C"])


@pytest.mark.parametrize("method", ["vanilla", "3ngan"])
def test_a_teacher_labels_the_pool_and_is_never_updated(method):
    settings, nets, *_ = _setup(method, ema=0.99, unlabelled_teacher=True, unlabelled_tau=0.0)
    teacher = _with_other_classifier(nets)["C"]
    kept = _params(teacher)
    pseudo = _labels_from(settings, teacher)
    with_teacher = _c_after_step(method, copy.deepcopy(nets), settings, pseudo, unlabelled=_pool())
    assert _same(kept, _params(teacher))
    # the pool's pseudo-labels are the teacher's argmax on the un-augmented pool images
    with torch.no_grad():
        expected = torch.bincount(teacher(_pool()).argmax(1), minlength=K).float()
    assert torch.equal(pseudo.unlabelled.counts[0], expected)
    # and C learns from them: labelled by C itself, C ends elsewhere
    own = _c_after_step(method, nets, settings, _labels_from(settings), unlabelled=_pool())
    assert not _same(with_teacher, own)


def test_a_teacher_labels_the_generated_images_when_asked():
    settings, nets, *_ = _setup("3ngan", ema=0.99, generated_teacher=True, tau=0.0, lam=1.0)
    teacher = _with_other_classifier(nets)["C"]
    kept = _params(teacher)
    with_teacher = _c_after_step(
        "3ngan", copy.deepcopy(nets), settings, _labels_from(settings, teacher)
    )
    assert _same(kept, _params(teacher))
    own = _c_after_step("3ngan", nets, settings, _labels_from(settings))
    assert not _same(with_teacher, own)


def test_with_a_larger_unlabelled_ratio_d_still_sees_one_batch_of_the_pool():
    results = {}
    for ratio in (1, 2):
        settings, nets, opts, real, labels = _setup("3ngan", unlabelled_ratio=ratio)
        pool = _labels_from(settings)
        unlabelled = _pool(n=ratio * BATCH)
        _step("3ngan", settings, nets, opts, real, labels, unlabelled=unlabelled, pseudo=pool)
        results[ratio] = (_params(nets["D"]), _params(nets["C"]), pool.unlabelled.counts)
    assert _same(results[1][0], results[2][0])  # D: the same first batch of the pool
    assert not _same(results[1][1], results[2][1])  # C: pseudo-labels of all of it
    assert results[1][2][0].sum() == BATCH and results[2][2][0].sum() == 2 * BATCH


def test_a_step_without_labellers_labels_the_pool_as_the_papers_rule():
    runs = []
    for given in (False, True):
        settings, nets, opts, real, labels = _setup("3ngan")
        pseudo = _labels_from(settings) if given else None
        _step("3ngan", settings, nets, opts, real, labels, unlabelled=_pool(), pseudo=pseudo)
        runs.append([_params(net) for net in nets.values()])
    assert all(_same(a, b) for a, b in zip(*runs, strict=True))


def test_with_labelled_norm_the_pool_is_labelled_under_the_labelled_batchs_statistics():
    from threengan_cli.model.networks import separately

    pool = _pool() * 0.5 + 0.4  # brighter than the labelled batch: other statistics

    settings, nets, opts, real, labels = _setup(
        "3ngan", unlabelled_norm="labelled", unlabelled_tau=0.0
    )
    with torch.no_grad():
        own = separately(copy.deepcopy(nets["C"]), pool)[0].argmax(1)
        borrowed = separately(copy.deepcopy(nets["C"]), real, pool, borrow={1: 0})[1].argmax(1)
    pseudo = _labels_from(settings)
    _step("3ngan", settings, nets, opts, real, labels, unlabelled=pool, pseudo=pseudo)
    assert torch.equal(pseudo.unlabelled.counts[0], torch.bincount(borrowed, minlength=K).float())
    # else this test could not tell the two apart
    assert not torch.equal(torch.bincount(own, minlength=K), torch.bincount(borrowed, minlength=K))


def test_random_logit_interpolation_draws_labelled_logits_between_own_and_joint_statistics():
    from threengan_cli.model.networks import separately

    settings, nets, opts, real, labels = _setup("vanilla")
    C, pool = nets["C"], _pool() * 0.5 + 0.4  # brighter: the joint statistics differ
    with torch.no_grad():
        alone = separately(C, real)[0]
        joint = separately(C, torch.cat([real, pool]))[0]
        (got,), weak, strong = methods._classifier_views(
            C, None, real, unlabelled=pool, interpolate=True, rng=torch.Generator().manual_seed(4)
        )
    lam = torch.rand(alone.shape, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(got, lam * alone + (1 - lam) * joint[:BATCH], atol=1e-6)
    assert torch.allclose(weak, joint[BATCH:], atol=1e-6) and torch.equal(weak, strong)
    assert not torch.allclose(alone, joint[:BATCH], atol=1e-3)  # else this shows nothing


def test_interpolation_with_augmentation_labels_the_weak_view_and_trains_the_strong_one():
    from threengan_cli.model.augment import policy

    settings, nets, opts, real, labels = _setup("3ngan", unlabelled_interpolation=True)
    aug = policy(("cutout", "color"), torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        (c_real, c_fake), weak, strong = methods._classifier_views(
            nets["C"], aug, real, real, unlabelled=_pool(), interpolate=True, rng=gen
        )
    assert c_real.shape == c_fake.shape == weak.shape == strong.shape == (BATCH, K)
    assert not torch.equal(weak, strong)
    before = _params(nets["C"])
    out = _step("3ngan", settings, nets, opts, real, labels, unlabelled=_pool(), aug=aug)
    assert torch.isfinite(out.loss_c) and not _same(before, _params(nets["C"]))


def test_a_relative_threshold_in_a_step_follows_cs_confidence_on_the_labelled_batch():
    from threengan_cli.model import pseudolabels
    from threengan_cli.model.networks import separately

    settings, nets, opts, real, labels = _setup("3ngan", unlabelled_threshold="relative")
    with torch.no_grad():
        c_real = separately(copy.deepcopy(nets["C"]), real)[0]
    pseudo = pseudolabels.build(settings, K, torch.device("cpu"))
    _step("3ngan", settings, nets, opts, real, labels, unlabelled=_pool(), pseudo=pseudo)
    expected = pseudolabels.relative_threshold(settings.unlabelled_tau, c_real)
    assert float(pseudo.unlabelled.bar) == pytest.approx(float(expected), abs=1e-6)
    assert float(expected) < settings.unlabelled_tau
