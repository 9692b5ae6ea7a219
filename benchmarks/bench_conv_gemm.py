"""Would an im2col + GEMM convolution beat oneDNN's inside the CPU training step? (No.)

    python benchmarks/bench_conv_gemm.py [--repeats 12] [--method 3ngan]

An experiment kept so that its figures in docs/performance.md can be re-run. The 4x4,
stride-2, padding-1 convolutions of D and C are computed as one matrix product per pass:
the input is padded, viewed as (C, 4, 4, B, H/2, W/2) through strides and copied once into
columns; forward ``W @ X``; backward ``G @ X^T`` for the weights and ``W^T @ G`` folded back
(16 strided adds) for the input. The script first checks that this equals ``F.conv2d``
(outputs and both gradients), then times the real training step with the GEMM convolution
switched on for chosen layers (by input channels at width 64: 1 = first layer, 128 = the
16x16 -> 8x8 layer, 256 = the layer with a 4x4 output), every variant timed in turn, one
step each per round. Prints a Markdown table of medians and ratios to oneDNN.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from threengan_cli.core.settings import TrainSettings
from threengan_cli.model.methods import METHODS


def im2col(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> columns (C*16, B*H/2*W/2) of a 4x4, stride-2, padding-1 convolution."""
    b, c, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1))
    s = xp.stride()
    view = xp.as_strided((c, 4, 4, b, h // 2, w // 2), (s[1], s[2], s[3], s[0], 2 * s[2], 2 * s[3]))
    return view.reshape(c * 16, b * (h // 2) * (w // 2))


def col2im(cols: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The adjoint of :func:`im2col`: columns summed back into an input-shaped tensor."""
    b, c, h, w = shape
    ho, wo = h // 2, w // 2
    xp = cols.new_zeros(b, c, h + 2, w + 2)
    parts = cols.view(c, 4, 4, b, ho, wo)
    for kh in range(4):
        for kw in range(4):
            xp[:, :, kh : kh + 2 * ho : 2, kw : kw + 2 * wo : 2] += parts[:, kh, kw].transpose(0, 1)
    return xp[:, :, 1:-1, 1:-1]


class GemmConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        cols = im2col(x)
        out_channels = weight.shape[0]
        y = weight.reshape(out_channels, -1) @ cols  # (O, B*L)
        ctx.save_for_backward(cols, weight)
        ctx.shape = x.shape
        b, _, h, w = x.shape
        return y.view(out_channels, b, h // 2, w // 2).transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        cols, weight = ctx.saved_tensors
        out_channels = weight.shape[0]
        g = grad.transpose(0, 1).reshape(out_channels, -1)
        grad_w = (g @ cols.T).view_as(weight)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = col2im(weight.reshape(out_channels, -1).T @ g, ctx.shape)
        return grad_x, grad_w


def check_equal() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 8, 16, 16, requires_grad=True)
    w = torch.randn(12, 8, 4, 4, requires_grad=True)
    g = torch.randn(3, 12, 8, 8)
    ref = F.conv2d(x, w, stride=2, padding=1)
    got = GemmConv.apply(x, w)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(got, (x, w), g), torch.autograd.grad(ref, (x, w), g)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--method", default="3ngan")
    args = parser.parse_args()
    check_equal()

    settings = TrainSettings(method=args.method, batch_size=10, width=64, seed=0)
    method = METHODS[args.method]
    torch.manual_seed(0)
    nets = method.networks(settings, num_classes=2, image_size=64)
    opts = method.optimizers(nets, settings)
    real = torch.rand(10, 1, 64, 64) * 2 - 1
    labels = torch.arange(10) % 2

    gemm_for: set[int] = set()  # input channel counts whose convolutions use GemmConv
    plain = nn.Conv2d.forward

    def forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        if conv.stride == (2, 2) and conv.bias is None and conv.in_channels in gemm_for:
            return GemmConv.apply(x, conv.weight)
        return plain(conv, x)

    variants = {
        "oneDNN": set(),
        "GEMM: first layer": {1},
        "GEMM: 16x16 -> 8x8": {128},
        "GEMM: 8x8 -> 4x4": {256},
        "GEMM: first and 8x8 -> 4x4": {1, 256},
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    nn.Conv2d.forward = forward
    try:
        for _ in range(3):
            method.step(nets, opts, real, labels, settings)
        for _ in range(args.repeats):
            for name, layers in variants.items():
                gemm_for.clear()
                gemm_for.update(layers)
                t0 = time.perf_counter()
                method.step(nets, opts, real, labels, settings)
                times[name].append(time.perf_counter() - t0)
    finally:
        nn.Conv2d.forward = plain

    base = statistics.median(times["oneDNN"])
    print(f"{args.method} step, batch 10, width 64, 64 px; median of {args.repeats} in turn\n")
    print("| convolutions | ms/step | speed vs oneDNN |")
    print("| --- | ---: | ---: |")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t) * 1e3:.1f} | {base / statistics.median(t):.2f}x |")


if __name__ == "__main__":
    main()
