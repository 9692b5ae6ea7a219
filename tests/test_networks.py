"""Networks: shapes on tiny sizes, output range, DCGAN initialisation, stacked batches."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from threengan_cli.model.networks import (
    Classifier,
    Discriminator,
    DiscriminatorBody,
    Generator,
    MultiTaskDiscriminator,
    init_dcgan_weights,
    separately,
)


@pytest.mark.parametrize("image_size", [32, 64, 128])
@pytest.mark.parametrize("width", [4, 8])
def test_generator_makes_images_of_the_requested_size(image_size, width):
    g = Generator(latent=16, width=width, image_size=image_size, channels=1)
    assert g(torch.randn(2, 16)).shape == (2, 1, image_size, image_size)
    assert g(torch.randn(2, 16, 1, 1)).shape == (2, 1, image_size, image_size)


@pytest.mark.parametrize("image_size", [32, 64, 128])
@pytest.mark.parametrize("width", [4, 8])
def test_discriminator_body_ends_in_width_times_8_at_4x4(image_size, width):
    body = DiscriminatorBody(width, image_size, channels=1)
    assert body(torch.randn(2, 1, image_size, image_size)).shape == (2, width * 8, 4, 4)


@pytest.mark.parametrize("image_size", [32, 64, 128])
def test_heads_give_one_logit_k_logits_and_k_plus_1_logits(image_size):
    x = torch.randn(3, 1, image_size, image_size)
    assert Discriminator(4, image_size, 1)(x).shape == (3,)
    assert Classifier(2, 4, image_size, 1)(x).shape == (3, 2)
    assert Classifier(5, 4, image_size, 1)(x).shape == (3, 5)
    assert MultiTaskDiscriminator(2, 4, image_size, 1)(x).shape == (3, 3)


def test_networks_accept_several_channels():
    g = Generator(latent=8, width=4, image_size=32, channels=3)
    fake = g(torch.randn(2, 8))
    assert fake.shape == (2, 3, 32, 32)
    assert Classifier(2, 4, 32, channels=3)(fake).shape == (2, 2)


def test_at_64_pixels_the_layers_are_dcgans():
    g = Generator(latent=100, width=64, image_size=64)
    convs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (100, 512),
        (512, 256),
        (256, 128),
        (128, 64),
        (64, 1),
    ]
    d = DiscriminatorBody(64, 64, 1)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (1, 64),
        (64, 128),
        (128, 256),
        (256, 512),
    ]
    # DCGAN: no BatchNorm right after the first convolution of D
    assert not isinstance(d.layers[1], nn.BatchNorm2d)


def test_generator_output_lies_in_minus_one_to_one():
    torch.manual_seed(0)
    g = Generator(latent=8, width=4, image_size=32)
    # large weights push tanh into saturation; it must still stay within [-1, 1]
    for p in g.parameters():
        p.data.mul_(50)
    out = g(torch.randn(4, 8))
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_image_size_that_is_not_a_power_of_two_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        Generator(image_size=48)


def test_dcgan_init_draws_conv_weights_around_0_and_batchnorm_weights_around_1():
    torch.manual_seed(0)
    g = Generator(latent=100, width=64, image_size=64)
    g.apply(init_dcgan_weights)
    conv = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, nn.ConvTranspose2d)])
    bn_w = torch.cat([m.weight for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    bn_b = torch.cat([m.bias for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(conv.mean().item()) < 1e-3
    assert conv.std().item() == pytest.approx(0.02, rel=0.02)
    assert bn_w.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn_w.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.all(bn_b == 0)


def test_dcgan_init_zeroes_the_classifier_head_bias():
    c = Classifier(3, 4, 32, 1)
    nn.init.ones_(c.head.bias)
    c.apply(init_dcgan_weights)
    assert torch.all(c.head.bias == 0)


@pytest.mark.parametrize("sizes", [(3, 3), (4, 2), (2, 3, 1)])
def test_separately_equals_one_call_per_batch_outputs_gradients_and_running_stats(sizes):
    torch.manual_seed(0)
    one = Classifier(2, width=4, image_size=16, channels=1)
    one.apply(init_dcgan_weights)
    stacked = copy.deepcopy(one)
    batches = [torch.randn(n, 1, 16, 16) for n in sizes]

    expected = [one(b) for b in batches]
    got = separately(stacked, *batches)
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    sum(e.square().sum() * (i + 1) for i, e in enumerate(expected)).backward()
    sum(g.square().sum() * (i + 1) for i, g in enumerate(got)).backward()
    for (name, p), q in zip(one.named_parameters(), stacked.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(one.named_buffers(), stacked.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)  # incl. batch counts
    # BatchNorm is back to one batch afterwards: a plain call normalises all images together
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(stacked(x), one(x), rtol=1e-5, atol=1e-6)


def test_separately_is_not_the_same_as_normalising_the_stacked_batch_together():
    """The test above would pass for any network without BatchNorm: this one shows it has to
    split the statistics (real and generated images normalised together give other logits)."""
    torch.manual_seed(0)
    net = Discriminator(width=4, image_size=16, channels=1)
    real, fake = torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16) * 3 + 1
    split = torch.cat(separately(net, real, fake))
    together = net(torch.cat([real, fake]))
    assert not torch.allclose(split, together, atol=1e-3)


def test_a_borrowing_part_is_normalised_by_the_other_parts_statistics_and_tracks_none():
    torch.manual_seed(0)
    net = Classifier(2, width=4, image_size=16, channels=1)
    net.apply(init_dcgan_weights)
    alone = copy.deepcopy(net)
    ref, other = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16) * 3 + 2
    ref_out, borrowed = separately(net, ref, other, borrow={1: 0})
    torch.testing.assert_close(ref_out, alone(ref), rtol=1e-5, atol=1e-6)
    # by hand: every BatchNorm layer uses the reference's batch mean and (biased) variance,
    # obtained by running both through the network in eval mode with those as its statistics
    by_hand = copy.deepcopy(net)
    norms = [m for m in by_hand.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    captured = []
    hooks = [
        m.register_forward_pre_hook(lambda m, inp: captured.append(inp[0].detach())) for m in norms
    ]
    by_hand.train()(ref)
    for h in hooks:
        h.remove()
    for m, x in zip(norms, captured, strict=True):
        m.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        m.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    torch.testing.assert_close(borrowed, by_hand.eval()(other), rtol=1e-4, atol=1e-5)
    # only the reference part moved the running statistics: as one call on it alone
    for (name, b), c in zip(alone.named_buffers(), net.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(borrowed, separately(net, ref, other)[1], atol=1e-3)
