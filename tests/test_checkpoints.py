"""Checkpoints: round trip, atomic writes, refusal of pickles, truncation and newer formats."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from threengan_cli.model import checkpoints, modelfile
from threengan_cli.model.modelfile import CheckpointError


def _nets():
    torch.manual_seed(0)
    return {"C": nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), "G": nn.Linear(3, 4)}


def test_weights_optimizer_and_rng_round_trip(tmp_path):
    nets = _nets()
    opts = {
        k: torch.optim.Adam(v.parameters(), lr=1e-3, betas=(0.5, 0.999)) for k, v in nets.items()
    }
    loss = nets["C"](torch.randn(2, 1, 5, 5)).sum() + nets["G"](torch.randn(2, 3)).sum()
    loss.backward()
    for opt in opts.values():
        opt.step()
    path = tmp_path / "last.safetensors"
    rng = {"torch": torch.get_rng_state()}
    checkpoints.save(path, {"method": "x"}, nets, opts, rng=rng)

    fresh = _nets()
    fresh_opts = {
        k: torch.optim.Adam(v.parameters(), lr=1e-3, betas=(0.5, 0.999)) for k, v in fresh.items()
    }
    ckpt = checkpoints.load(path)
    checkpoints.restore_networks(ckpt, fresh)
    checkpoints.restore_optimizers(ckpt, fresh_opts)
    for name in nets:
        for a, b in zip(
            nets[name].state_dict().values(), fresh[name].state_dict().values(), strict=True
        ):
            assert torch.equal(a, b)
        sa, sb = opts[name].state_dict()["state"], fresh_opts[name].state_dict()["state"]
        assert sa.keys() == sb.keys()
        for index in sa:
            for key in sa[index]:
                assert torch.equal(torch.as_tensor(sa[index][key]), torch.as_tensor(sb[index][key]))
    assert torch.equal(ckpt.group("rng")["torch"], rng["torch"])
    assert ckpt.meta["method"] == "x"
    assert ckpt.network_names == ["C", "G"]


def test_restored_adam_moments_take_their_channels_last_parameters_layout(tmp_path):
    """Training on a CPU keeps the networks channels-last; checkpoints store contiguous
    tensors. Fused Adam walks parameter and moments as flat memory, so a moment restored in
    the other layout would be applied to the wrong elements: the resumed step must equal the
    uninterrupted one exactly."""

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3))
        net = net.to(memory_format=torch.channels_last)
        return net, torch.optim.Adam(net.parameters(), lr=0.1, fused=True)

    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)

    def step(net, opt):
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()

    net, opt = make()
    step(net, opt)
    path = tmp_path / "last.safetensors"
    checkpoints.save(path, {}, {"C": net}, {"C": opt})
    step(net, opt)

    fresh, fresh_opt = make()
    ckpt = checkpoints.load(path)
    checkpoints.restore_networks(ckpt, {"C": fresh})
    checkpoints.restore_optimizers(ckpt, {"C": fresh_opt})
    for param in fresh.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert fresh_opt.state[param][key].stride() == param.stride()
    step(fresh, fresh_opt)
    for a, b in zip(net.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_fp16_storage_loads_into_fp32_networks(tmp_path):
    nets = _nets()
    path = tmp_path / "small.safetensors"
    checkpoints.save(path, {}, nets, dtype=torch.float16)
    fresh = _nets()
    checkpoints.restore_networks(checkpoints.load(path), fresh)
    assert fresh["G"].weight.dtype == torch.float32
    assert torch.allclose(fresh["G"].weight, nets["G"].weight, atol=1e-3)


def test_a_pickle_file_is_refused_without_being_unpickled(tmp_path):
    torch_file = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, torch_file)
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoints.load(torch_file)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoints.load(raw)


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoints.save(path, {}, _nets())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        checkpoints.load(path)


def test_a_checkpoint_from_a_newer_format_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "new.safetensors"
    monkeypatch.setattr(checkpoints, "FORMAT_VERSION", modelfile.FORMAT_VERSION + 1)
    checkpoints.save(path, {}, _nets())
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="newer threengan"):
        checkpoints.load(path)


def test_missing_file_and_wrong_shapes_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        checkpoints.load(tmp_path / "nope.safetensors")
    path = tmp_path / "c.safetensors"
    checkpoints.save(path, {}, {"G": nn.Linear(3, 4)})
    with pytest.raises(CheckpointError, match="do not fit"):
        checkpoints.restore_networks(checkpoints.load(path), {"G": nn.Linear(3, 5)})


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    checkpoints.save(path, {"n": 1}, _nets())
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(modelfile.CheckpointError, match="cannot write checkpoint .*disk full"):
        checkpoints.save(path, {"n": 2}, _nets())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    assert checkpoints.load(path).meta["n"] == 1
