"""Facts about this machine: devices, CPU features, versions. Decided in one place."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from threengan_cli import __version__, paths


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX); whether that is
    faster than fp32 is :func:`cpu_bf16_verdict`'s question."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_bf16_verdict(flags: set[str] | None = None) -> tuple[str, str]:
    """Whether bf16 training pays on this CPU, from its features: ``(verdict, why)`` with
    verdict ``unproven``, ``slower`` or ``emulated``. None of them is ``pays``: no CPU has
    yet been measured training these networks faster in bf16.

    - AMX (``amx_bf16``): bf16 matrix products run on the tile unit, about 5x fp32 (2048^2
      matmul, 175 against 31 GFLOP/s), but the 64 px 3ngan step measured 10.7 s bf16 against
      8.0 s fp32, and 12.0 against 9.6 s, in one of three runs 4.0 against 4.3 s
      (``benchmarks/bench_step.py --precisions fp32,bf16`` on a loaded 2-core AMX VM):
      convolutions at batch 10 and autocast's casts eat the matmul gain. Train warns.
    - AVX512-BF16 without AMX: measured slower than fp32 on an Intel Xeon (a 2048^2 matmul at
      166 GFLOP/s against 300-322 for fp32; the 3ngan step 291 ms against 215 ms): warns.
    - neither: emulated, 13-20x slower than fp32 (measured on an AVX2 EPYC): refused.
    """
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "unproven", (
            "native (AMX), but threengan's training step was not measured faster than fp32 "
            "on an AMX CPU (3ngan 10.7 s against 8.0 s per step): fp32 recommended"
        )
    if "avx512_bf16" in flags:
        return "slower", (
            "AVX512-BF16 without AMX: measured slower than fp32 on such a CPU "
            "(3ngan step 291 ms against 215 ms)"
        )
    return "emulated", "no AVX512-BF16 or AMX: emulated, 13-20x slower than fp32 (refused)"


def available_devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [
            f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())
        ]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def select_device(name: str = "auto"):
    """The torch device for ``auto|cpu|cuda|cuda:N|mps``; a missing device is a ValueError."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps asked for, but MPS is not available here")
    return device


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


NO_TORCH = (
    "PyTorch is not installed: classify and evaluate work without it (NumPy engine); "
    "train, generate and benchmark need it: pip install torch (CPU only: pip install torch "
    "--index-url https://download.pytorch.org/whl/cpu)"
)


def has_torch() -> bool:
    from importlib.util import find_spec

    return find_spec("torch") is not None


def library_versions() -> dict[str, str]:
    import numpy
    import PIL

    if has_torch():
        import torch

        torch_version = torch.__version__
    else:
        torch_version = "not installed"
    return {
        "threengan": __version__,
        "python": platform.python_version(),
        "torch": torch_version,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
    }


def describe() -> dict[str, object]:
    from threengan_cli.modelfile import bundled_model

    if has_torch():
        import torch
    else:  # classify-only installs: the facts that need torch say so
        torch = None

    flags = cpu_flags()
    features = sorted(
        f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"}
    )
    try:
        import pydicom

        dicom = f"pydicom {pydicom.__version__}"
    except ImportError:
        dicom = "not installed (pip install 'threengan[dicom]')"
    return {
        **library_versions(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu cores": os.cpu_count(),
        "torch threads": torch.get_num_threads() if torch else "-",
        "cpu features": features,
        "bf16 on cpu": "{}: {}".format(*cpu_bf16_verdict(flags)),
        "devices": available_devices() if torch else ["cpu (NumPy engine only)"],
        # What torch was built with, not what this machine has ("devices" says that).
        "torch built with CUDA": (torch.version.cuda or "no (a CPU-only build)") if torch else "-",
        "dicom": dicom,
        "data dir": str(paths.home()),
        "default model": str(bundled_model() or "not installed"),
        "examples": str(paths.examples_dir() or "not installed"),
    }


def stream_seed(seed: int, index: int, offset: int = 0) -> int:
    """The seed of sub-stream ``index`` (an epoch's batch order, a block of latents) of
    something seeded ``seed``; ``offset`` separates kinds of streams. A pure function, so a
    resumed run or a second call draws the same numbers; distinct for every (seed, index)
    with fewer than 1,000,003 indices."""
    return seed * 1_000_003 + index + offset
