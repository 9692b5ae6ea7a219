"""A damaged or hostile checkpoint is refused by both engines (torch and NumPy) with one line,
before anything is allocated from its metadata: wrong class count, missing or misshapen
tensors, absurd sizes, NaN/Inf weights, and tensors that do not match their checksum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_factory import make_checkpoint, write_image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from threengan_cli.cli.app import app
from threengan_cli.infer import numpy_engine
from threengan_cli.infer.torch_engine import load_model
from threengan_cli.model import checkpoints, modelfile
from threengan_cli.model.modelfile import DIGEST_KEY, META_KEY, ModelError
from threengan_cli.model.networks import Classifier, MultiTaskDiscriminator

runner = CliRunner()


def _read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()[META_KEY])
    return meta, load_file(str(path))


def _write(path: Path, meta: dict, tensors: dict, digest: bool = False) -> Path:
    meta = dict(meta)
    meta.pop(DIGEST_KEY, None)
    if digest:
        meta[DIGEST_KEY] = checkpoints.digests(tensors)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("good") / "m.safetensors")


def variant(good: Path, tmp_path: Path, change, digest: bool = False) -> Path:
    meta, tensors = _read(good)
    change(meta, tensors)
    return _write(tmp_path / "bad.safetensors", meta, tensors, digest)


def both_refuse(path: Path, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        load_model(path, device="cpu")
    with pytest.raises(ModelError, match=match):
        numpy_engine.load(path)


def test_the_saved_checksum_is_verified_and_old_files_without_it_still_load(good, tmp_path):
    meta, _ = _read(good)
    assert set(meta[DIGEST_KEY]) == {"net/G", "net/D", "net/C"}
    old = variant(good, tmp_path, lambda m, t: None)  # written without a checksum
    assert load_model(old, device="cpu").classes == ["normal", "pneumonia"]
    assert numpy_engine.load(old).classes == ["normal", "pneumonia"]


def _flip_a_bit_of(path: Path, key: str, out: Path) -> Path:
    """A copy of the file with one bit flipped in the first byte of tensor ``key``: the low
    mantissa byte of a little-endian float, so the value stays finite and only the checksum
    can tell."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8 : 8 + header_len])[key]["data_offsets"][0]
    data[8 + header_len + begin] ^= 0x10
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("group", ["net/G", "net/D", "net/C"])
def test_one_flipped_bit_in_a_weight_is_refused(good, tmp_path, group):
    key = next(k for k in sorted(_read(good)[1]) if k.startswith(group + "/"))
    flipped = _flip_a_bit_of(good, key, tmp_path / "flipped.safetensors")
    with pytest.raises(ModelError, match=f"the {group} tensors do not match their checksum"):
        load_model(flipped, device="cpu")


def test_one_flipped_bit_in_the_classifier_is_refused_by_the_numpy_engine(good, tmp_path):
    key = next(k for k in sorted(_read(good)[1]) if k.startswith("net/C/"))
    flipped = _flip_a_bit_of(good, key, tmp_path / "flipped.safetensors")
    with pytest.raises(ModelError, match="the net/C tensors do not match their checksum"):
        numpy_engine.load(flipped)


@pytest.mark.parametrize("digest", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(good, tmp_path, value, digest):
    def poison(meta, tensors):
        tensors["net/C/head.weight"][0, 0, 0, 0] = value

    both_refuse(variant(good, tmp_path, poison, digest), "NaN or infinite")


def test_a_wrong_class_count_is_refused(good, tmp_path):
    def three(meta, tensors):
        meta["classes"] = ["a", "b", "c"]
        meta["num_classes"] = 3

    both_refuse(variant(good, tmp_path, three), r"head\.weight has shape \(2, 32, 4, 4\)")


def test_a_missing_or_misshapen_tensor_is_refused(good, tmp_path):
    def drop(meta, tensors):
        del tensors["net/C/head.bias"]

    both_refuse(variant(good, tmp_path, drop), r"lacks the tensor head\.bias")

    def reshape(meta, tensors):
        tensors["net/C/body.layers.0.weight"] = torch.zeros(4, 1, 3, 3)

    both_refuse(variant(good, tmp_path, reshape), r"body\.layers\.0\.weight has shape")

    def extra(meta, tensors):
        tensors["net/C/body.layers.99.weight"] = torch.zeros(1)

    both_refuse(variant(good, tmp_path, extra), "unexpected tensor")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("image_size", 2**30, "image_size"),
        ("image_size", -64, "image_size"),
        ("image_size", 48, "image_size"),
        ("image_size", True, "image_size"),
        ("classes", [f"c{i}" for i in range(5000)], "5000 classes"),
        ("classes", ["only"], "1 classes"),
        ("classes", ["a", "a"], "distinct"),
        ("classes", "ab", "distinct"),
        ("channels", 1_000_000, "channels"),
        ("fit", "stretch", "fit"),
        ("method", "gan", "method"),
    ],
)
def test_absurd_metadata_is_refused_before_anything_is_built(good, tmp_path, key, value, match):
    def change(meta, tensors):
        meta[key] = value

    both_refuse(variant(good, tmp_path, change), match)


@pytest.mark.parametrize(("key", "value"), [("width", 10**9), ("width", -4), ("latent", 0)])
def test_absurd_settings_in_the_metadata_are_refused(good, tmp_path, key, value):
    def change(meta, tensors):
        meta["settings"][key] = value

    both_refuse(variant(good, tmp_path, change), "invalid settings")


def test_classify_with_a_damaged_model_exits_1_with_one_line(good, tmp_path):
    def three(meta, tensors):
        meta["classes"] = ["a", "b", "c"]

    bad = variant(good, tmp_path, three)
    image = write_image(tmp_path / "x.png")
    for engine in ("numpy", "torch"):
        result = runner.invoke(
            app, ["classify", str(image), "--checkpoint", str(bad), "--engine", engine]
        )
        assert result.exit_code == 1, result.output
        assert result.output.count("\n") == 1 and "error:" in result.output


@pytest.mark.parametrize("size", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("width", [1, 4, 64])
def test_the_numpy_engine_knows_the_classifier_shapes_torch_builds(size, width):
    with torch.device("meta"):
        nets = [Classifier(3, width, size), MultiTaskDiscriminator(2, width, size)]
        for net, outputs in zip(nets, (3, 3), strict=True):
            expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
            assert modelfile.headed_shapes(outputs, width, size) == expected
