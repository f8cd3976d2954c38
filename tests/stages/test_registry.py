"""The model registry on a local directory and on S3 (moto's server, the real S3 protocol)."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from models.policy import Policy, load, preset, save
from stages.registry import Registry


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    """(registry uri, storage options) on a fresh local dir or a fresh S3 prefix."""
    monkeypatch.setenv("WORLDLOOP_CACHE", str(tmp_path / "cache"))
    if request.param == "local":
        return str(tmp_path / "lake"), None
    _, options = request.getfixturevalue("s3_server")
    return f"s3://lake/{uuid.uuid4().hex}", options


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (d / "config.json").write_text(json.dumps({"hidden": 32}))
    (d / "sub").mkdir()
    (d / "sub" / "notes.txt").write_text("nested files travel too")
    return d


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_register_versions_and_get(store, model_dir):
    reg = Registry(*store)
    assert reg.get("pol") is None and reg.versions("pol") == []
    v1 = reg.register("pol", model_dir, kind="policy", metrics={"score": np.float32(1.5)},
                      lineage={"tables": {"frames": 3}})
    v2 = reg.register("pol", model_dir, kind="policy", lineage={"parent_version": 1}, config={"hidden": 64})
    assert (v1.version, v2.version) == (1, 2)
    assert v1.metrics == {"score": 1.5} and v1.config == {"hidden": 32}  # config.json is the default
    assert v2.config == {"hidden": 64} and v2.lineage["parent_version"] == 1 and "git_commit" in v2.lineage
    assert v2.artifact_uri.endswith("/registry/pol/v2") and v2.artifact_uri.startswith(store[0])
    reopened = Registry(*store)
    assert reopened.versions("pol") == [v1, v2]
    assert reopened.get("pol") == v2 and reopened.get("pol", version=1) == v1
    assert reopened.get("pol", version=7) is None and reopened.get("other") is None


def test_aliases_keep_history(store, model_dir):
    reg = Registry(*store)
    for _ in range(2):
        reg.register("pol", model_dir, kind="policy")
    assert reg.get("pol", alias="champion") is None
    for v in (1, 2, 1):
        reg.set_alias("pol", "champion", v)
    reg.set_alias("pol", "candidate", 2)
    assert reg.get("pol", alias="champion").version == 1
    assert reg.get("pol", alias="candidate").version == 2
    assert [e.version for e in reg.alias_history("pol", "champion")] == [1, 2, 1]
    with pytest.raises(LookupError, match="no version 5"):
        reg.set_alias("pol", "champion", 5)


def test_fetch_round_trips_artifacts(store, model_dir, tmp_path):
    reg = Registry(*store)
    mv = reg.register("pol", model_dir, kind="policy")
    local = Path(reg.fetch(mv))
    assert _files(local) == _files(model_dir)
    assert reg.fetch(mv) == str(local)  # cached (or, on a local registry, the artifact folder itself)
    copy = Path(reg.fetch(mv, tmp_path / "copy"))
    assert _files(copy) == _files(model_dir)


def test_fetched_policy_acts_like_the_registered_one(store, tmp_path):
    torch.manual_seed(0)
    policy = Policy(preset("tiny")).eval()
    save(policy, tmp_path / "ckpt")
    reg = Registry(*store)
    mv = reg.register("driver", tmp_path / "ckpt", kind="policy", metrics={"return": 12.0})
    c = policy.config
    frames = np.random.default_rng(0).integers(0, 256, (2, c.history, c.image_size, c.image_size, 3), np.uint8)
    np.testing.assert_allclose(load(reg.fetch(mv)).act(frames), policy.act(frames), atol=1e-6)
    assert mv.config["history"] == c.history


def test_update_metrics_merges(store, model_dir):
    reg = Registry(*store)
    reg.register("pol", model_dir, kind="policy", metrics={"train_loss": 0.5, "score": 1.0})
    reg.register("pol", model_dir, kind="policy")
    updated = reg.update_metrics("pol", 1, {"score": 3.0, "eval_return_ci": [1.0, 5.0]})
    assert updated.metrics == {"train_loss": 0.5, "score": 3.0, "eval_return_ci": [1.0, 5.0]}
    reopened = Registry(*store)
    assert reopened.get("pol", version=1) == updated
    assert [m.version for m in reopened.versions("pol")] == [1, 2] and reopened.get("pol", version=2).metrics == {}
    with pytest.raises(LookupError, match="no version 9"):
        reg.update_metrics("pol", 9, {"score": 0})


def test_register_never_overwrites_leftover_artifacts(tmp_path, model_dir):
    reg = Registry(tmp_path / "lake")
    reg.register("pol", model_dir, kind="policy")
    leftover = tmp_path / "lake" / "registry" / "pol" / "v2"  # an interrupted register
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half-written")
    mv = reg.register("pol", model_dir, kind="policy")
    assert mv.version == 3 and (leftover / "model.safetensors").read_bytes() == b"half-written"
    assert [m.version for m in reg.versions("pol")] == [1, 3]


def test_bad_input_is_a_clear_error(tmp_path, model_dir):
    reg = Registry(tmp_path / "lake")
    with pytest.raises(ValueError, match="invalid model name"):
        reg.register("../escape", model_dir, kind="policy")
    with pytest.raises(ValueError, match="invalid kind"):
        reg.register("pol", model_dir, kind="critic")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a non-empty directory"):
        reg.register("pol", tmp_path / "empty", kind="policy")
    with pytest.raises(ValueError, match="metrics is not JSON-serializable"):
        reg.register("pol", model_dir, kind="policy", metrics={"f": object()})
    with pytest.raises(ValueError, match="either version or alias"):
        reg.get("pol", version=1, alias="champion")
    with pytest.raises(ValueError, match="invalid alias"):
        reg.alias_history("pol", "bad alias")
    with pytest.raises(ValueError, match="unsupported registry URI"):
        Registry("gs://bucket/lake")
    assert reg.versions("pol") == []
