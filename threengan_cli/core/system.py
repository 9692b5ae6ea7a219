"""Facts about this machine: devices, CPU features, versions. Decided in one place."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from threengan_cli import __version__
from threengan_cli.core import paths


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
    faster than fp32 only a measurement of this CPU says (``accel.measure_cpu_bf16``)."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_bf16_support(flags: set[str] | None = None) -> str:
    """What this CPU's features say about bf16: native (and by which unit) or emulated. Not
    a speed verdict: bf16 was measured faster than fp32 on one AVX512-BF16 CPU and slower on
    another, and slower on an AMX one in two runs of three (docs/performance.md)."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "native (AMX)"
    if "avx512_bf16" in flags:
        return "native (AVX512-BF16, no AMX)"
    return "emulated (no AVX512-BF16 or AMX: train refuses bf16)"


def bf16_fact(measured: dict | None = None, flags: set[str] | None = None) -> str:
    """``info``'s line on bf16 training on this CPU: its support, and the speed as measured
    here (``measured``, from ``accel.measure_cpu_bf16``) or "unmeasured"."""
    support = cpu_bf16_support(flags)
    if measured is None:
        return f"{support}; speed unmeasured (threengan info --measure times it)"
    ratio = measured["bf16_speedup"]
    verdict = f"{ratio:.2f}x faster" if ratio > 1 else f"{1 / ratio:.2f}x slower"
    return (
        f"{support}; measured now: 3ngan step fp32 {measured['fp32_ms']:.0f} ms, bf16 "
        f"{measured['bf16_ms']:.0f} ms (median of {measured['steps']}): bf16 {verdict}"
    )


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


def bf16_unmeasured(precision: str, device: str) -> bool:
    """Whether training asks for bf16 on a CPU where it runs natively: not known to be
    faster than fp32 there until ``info --measure`` times it. (Where it is emulated, training
    refuses it.)"""
    return (
        precision == "bf16"
        and device in ("auto", "cpu")
        and cpu_bf16()
        and select_device(device).type == "cpu"
    )


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


def torchvision_version() -> str:
    """torchvision's installed version, read from its package metadata (without importing
    it, which a torchvision built for another torch fails to do), or "not installed"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchvision")
    except PackageNotFoundError:
        return "not installed"


def torchvision_state() -> str:
    """torchvision's version if it imports, else what is wrong: "not installed" or
    "broken: ..." with the error and the fix (``info`` shows it)."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # a torchvision built for another torch raises RuntimeError
        if torchvision_version() == "not installed":
            return "not installed"
        return f"broken: {torchvision_problem(exc)}"
    return torchvision_version()


def torchvision_problem(exc: BaseException) -> str:
    """One line for a torchvision that does not import: both versions, the error, the fix.
    pip pairs a torch from one index with a torchvision from another (a CPU torch, a CUDA
    torchvision) without complaint; only the pair built together works."""
    import torch

    tv = torchvision_version()
    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if tv == "not installed":
        return (
            f"torchvision is not installed (torch {torch.__version__}): pip install "
            f"torchvision{_index_of(torch.__version__)}"
        )
    base = torch.__version__.split("+")[0]
    return (
        f"torchvision {tv} does not work with torch {torch.__version__} ({cause}): install "
        f"the pair built together, from one index: pip install --force-reinstall "
        f"torch=={base} torchvision{_index_of(torch.__version__)}"
    )


def _index_of(torch_version: str) -> str:
    """The ``--index-url`` torch's own build came from (``+cpu``, ``+cu121``), or nothing
    for PyPI's build."""
    _, _, local = torch_version.partition("+")
    return f" --index-url https://download.pytorch.org/whl/{local}" if local else ""


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
        "torchvision": torchvision_version(),
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
    }


def describe() -> dict[str, object]:

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
        "torchvision": torchvision_state() if torch else torchvision_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu cores": os.cpu_count(),
        "torch threads": torch.get_num_threads() if torch else "-",
        "cpu features": features,
        "bf16 on cpu": bf16_fact(flags=flags),
        "devices": available_devices() if torch else ["cpu (NumPy engine only)"],
        # What torch was built with, not what this machine has ("devices" says that).
        "torch built with CUDA": (torch.version.cuda or "no (a CPU-only build)") if torch else "-",
        "dicom": dicom,
        "data dir": str(paths.home()),
        "default model": str(paths.bundled_model() or "not installed"),
        "examples": str(paths.examples_dir() or "not installed"),
    }


def stream_seed(seed: int, index: int, offset: int = 0) -> int:
    """The seed of sub-stream ``index`` (an epoch's batch order, a block of latents) of
    something seeded ``seed``; ``offset`` separates kinds of streams. A pure function, so a
    resumed run or a second call draws the same numbers; distinct for every (seed, index)
    with fewer than 1,000,003 indices."""
    return seed * 1_000_003 + index + offset
