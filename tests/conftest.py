"""Shared test setup: every test gets its own threengan home, never the user's real one;
a tiny prepared dataset and a tiny model, made once, for the tests that train or classify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from threengan_cli.core.settings import PrepareSettings
from threengan_cli.data.prepare import prepare


@pytest.fixture(autouse=True)
def threengan_home(tmp_path_factory, monkeypatch):
    """``THREENGAN_HOME`` points at a fresh temporary folder for each test."""
    home = tmp_path_factory.mktemp("threengan-home")
    monkeypatch.setenv("THREENGAN_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """32x32 two-class images (12 per class in train, 8 in val and in test): class 1 has a
    bright centre, so a model can learn something."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)

    def split(n):
        labels = np.arange(n) % 2
        images = rng.integers(0, 120, (n, 32, 32), dtype=np.uint8)
        images[labels == 1, 10:22, 10:22] += 120
        return images, labels.reshape(-1, 1)

    arrays = {}
    for name, n in (("train", 24), ("val", 8), ("test", 8)):
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split(n)
    np.savez(root / "tiny.npz", **arrays)
    out = root / "prepared"
    prepare(root / "tiny.npz", out, PrepareSettings(image_size=32, min_val=0, workers=1))
    return out


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A randomly initialised 3ngan checkpoint (G, D and C at width 4, 32 px)."""
    from model_factory import make_checkpoint  # imports torch: only the tests that need it

    return make_checkpoint(tmp_path_factory.mktemp("model") / "m.safetensors")


@pytest.fixture(scope="session")
def model(ckpt):
    from threengan_cli.infer.torch_engine import load_model

    return load_model(ckpt, device="cpu")


@pytest.fixture
def broken_torchvision(monkeypatch):
    """torchvision installed but failing to import, as one built for another torch does
    (``operator torchvision::nms does not exist``); the modules come back after the test."""
    import sys

    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torchvision":
                raise RuntimeError("operator torchvision::nms does not exist")
            return None

    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
