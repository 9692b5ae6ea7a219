"""tools/add_model_statistics.py: statistics fitted into a model from its prepared dataset
(given by name or folder), and one line with exit 2 for a missing checkpoint, a missing
dataset or one the model was not trained on."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from model_factory import make_checkpoint

from threengan_cli.core.settings import PrepareSettings
from threengan_cli.data.prepare import prepare
from threengan_cli.infer import numpy_engine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tool():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import add_model_statistics
    finally:
        sys.path.pop(0)
    return add_model_statistics.main


def _prepared(root: Path, size: int) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        labels = np.arange(n) % 2
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    np.savez(root / f"px{size}.npz", **arrays)
    settings = PrepareSettings(
        image_size=size, min_val=0, workers=1, class_names=["normal", "pneumonia"]
    )
    prepare(root / f"px{size}.npz", root / f"px{size}", settings)
    return root / f"px{size}"


def _fails(tool, capsys, args, code, words):
    with pytest.raises(SystemExit) as exited:
        tool([str(a) for a in args])
    err = capsys.readouterr().err
    assert exited.value.code == code, err
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_bad_checkpoints_and_datasets_are_one_line_errors(tmp_path, tool, capsys):
    model = make_checkpoint(tmp_path / "m.safetensors")  # 32 px
    data = _prepared(tmp_path, 32)
    _fails(tool, capsys, [tmp_path / "missing.safetensors", data], 2, "checkpoint not found")
    _fails(tool, capsys, [model, tmp_path / "nowhere"], 2, "no prepared dataset")
    _fails(tool, capsys, [model, "never-prepared"], 2, "no prepared dataset 'never-prepared'")
    _fails(tool, capsys, [model, _prepared(tmp_path, 16)], 2, "holds 16px images")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    _fails(tool, capsys, [tmp_path / "bad.safetensors", data], 1, "bad.safetensors")


def test_a_dataset_given_by_name_gets_the_model_its_statistics(tmp_path, tool, threengan_home):
    model = make_checkpoint(tmp_path / "m.safetensors")
    assert numpy_engine.load(model).stats is None
    (threengan_home / "datasets").mkdir(exist_ok=True)
    _prepared(tmp_path, 32).rename(threengan_home / "datasets" / "tiny")
    out = tmp_path / "with-stats.safetensors"
    tool([str(model), "tiny", "--out", str(out)])
    assert numpy_engine.load(out).stats is not None
