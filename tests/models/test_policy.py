"""The pixels-to-action policy: shapes and ranges, errors, save/load (local and S3), it can learn."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from models.policy import PRESETS, Policy, PolicyConfig, config_from_dict, load, preset, save


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small nets on a shared 2-core box train far faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> Policy:
    torch.manual_seed(0)
    return Policy(preset("tiny"))


def frames(cfg: PolicyConfig, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, cfg.history, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)


def test_presets_derive_and_validate():
    assert set(PRESETS) == {"tiny", "default", "gpu"}
    assert preset("default").image_size == 64 and preset("default").history >= 2
    assert preset("gpu").history == preset("default").history  # same inputs, bigger net
    with pytest.raises(ValueError, match="unknown policy preset"):
        preset("huge")
    with pytest.raises(ValueError, match="history"):
        PolicyConfig(history=0)
    with pytest.raises(ValueError, match="divisible"):
        PolicyConfig(image_size=60)
    cfg = preset("default")
    assert config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    with pytest.raises(ValueError, match="unknown PolicyConfig fields"):
        config_from_dict({"colour": "red"})


def test_forward_and_act_shapes_and_ranges(tiny):
    x = frames(tiny.config, 5)
    out = tiny(torch.from_numpy(x))
    assert out.shape == (5, 3)
    acts = tiny.act(x)
    assert acts.shape == (5, 3) and acts.dtype == np.float32
    assert (np.abs(acts[:, 0]) <= 1).all() and ((acts[:, 1:] >= 0) & (acts[:, 1:] <= 1)).all()
    assert tiny.training  # act() restores the mode it found
    with pytest.raises(ValueError, match="uint8"):
        tiny.act(x.astype(np.float32))
    with pytest.raises(ValueError, match="frames must be"):
        tiny.act(x[:, :1])
    with pytest.raises(ValueError, match="NaN"):
        tiny.loss(torch.from_numpy(x), torch.full((5, 3), float("nan")))


def test_default_preset_runs(tmp_path):
    policy = Policy(preset("default"))
    assert policy.act(frames(policy.config, 2)).shape == (2, 3)


def test_save_load_round_trip(tiny, tmp_path):
    x = frames(tiny.config, 3, seed=1)
    save(tiny, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    again = load(tmp_path / "ckpt")
    assert again.config == tiny.config and not again.training
    np.testing.assert_array_equal(again.act(x), tiny.act(x))
    with pytest.raises(ValueError, match="not a policy checkpoint"):
        load(tmp_path / "missing")


def test_save_load_s3(tiny, s3_server):
    _, options = s3_server
    uri = "s3://lake/models/policy/test-v1"
    save(tiny, uri, storage_options=options)
    again = load(uri, storage_options=options)
    x = frames(tiny.config, 2, seed=2)
    np.testing.assert_array_equal(again.act(x), tiny.act(x))


def test_tiny_overfit_loss_drops():
    torch.manual_seed(0)
    cfg = preset("tiny")
    policy = Policy(cfg)
    x = torch.from_numpy(frames(cfg, 16, seed=3))
    target = torch.from_numpy(np.random.default_rng(3).uniform([-1, 0, 0], [1, 1, 1], (16, 3)).astype(np.float32))
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    first = policy.loss(x, target).item()
    for _ in range(cfg.steps):
        loss = policy.loss(x, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
