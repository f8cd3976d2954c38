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


def _artifact_path(reg: Registry, mv) -> str:
    return f"{mv.artifact_uri}/model.safetensors" if mv.artifact_uri.startswith("s3://") \
        else str(Path(mv.artifact_uri) / "model.safetensors")


def test_tampered_or_partial_artifacts_are_refused(store, model_dir):
    from stages import storage
    from stages.registry import ArtifactError

    reg = Registry(*store)
    mv = reg.register("pol", model_dir, kind="policy")
    assert set(mv.manifest) == {"model.safetensors", "config.json", "sub/notes.txt"}
    assert mv.manifest["config.json"]["size"] == (model_dir / "config.json").stat().st_size
    target = _artifact_path(reg, mv)
    good = storage.read_bytes(target, reg.storage_options)
    storage.write_bytes(target, bytes([good[0] ^ 0xFF]) + good[1:], reg.storage_options)  # same size, one byte changed
    with pytest.raises(ArtifactError, match=r"changed since registration .*model.safetensors"):
        reg.fetch(mv)
    storage.delete(target, reg.storage_options)  # a partial artifact
    with pytest.raises(ArtifactError, match=r"missing \['model.safetensors'\]"):
        reg.fetch(mv)
    storage.write_bytes(target, good, reg.storage_options)
    assert _files(Path(reg.fetch(mv))) == _files(model_dir)
    storage.write_bytes(target.replace("model.safetensors", "extra.bin"), b"x", reg.storage_options)
    with pytest.raises(ArtifactError, match=r"unexpected \['extra.bin'\]"):
        Registry(*store).fetch(mv, model_dir.parent / "copy")


def test_a_damaged_cache_is_fetched_again(store, model_dir):
    reg = Registry(*store)
    if not reg.uri.startswith("s3://"):
        pytest.skip("local artifacts are verified in place, there is no cache")
    mv = reg.register("pol", model_dir, kind="policy")
    cached = Path(reg.fetch(mv))
    (cached / "config.json").write_text("{}")
    assert reg.fetch(mv) == str(cached) and _files(cached) == _files(model_dir)


def test_concurrent_registrations_take_distinct_versions(store, model_dir):
    from concurrent.futures import ThreadPoolExecutor

    reg = Registry(*store)
    reg.register("pol", model_dir, kind="policy")
    with ThreadPoolExecutor(4) as pool:  # each thread its own Registry, as separate processes would
        got = list(pool.map(lambda _: Registry(*store).register("pol", model_dir, kind="policy").version, range(4)))
    assert sorted(got) == [2, 3, 4, 5]
    assert [m.version for m in Registry(*store).versions("pol")] == [1, 2, 3, 4, 5]


def test_promote_and_rollback_keep_a_history(store, model_dir):
    reg = Registry(*store)
    for _ in range(3):
        reg.register("pol", model_dir, kind="policy")
    reg.promote("pol", 1, reason="first", flow_run="run-a", gate={"promote": True, "ci95": [1.0, 2.0]})
    reg.set_alias("pol", "challenger", 2, reason="lower bound -3 not above 0", gate={"promote": False})
    reg.promote("pol", 3, reason="beats v1", flow_run="run-b")
    assert reg.aliases("pol") == {"champion": 3, "previous": 1, "challenger": 2}
    with pytest.raises(ValueError, match="already the champion"):
        reg.promote("pol", 3, reason="again")
    reg.rollback("pol", reason="v3 misbehaves")
    assert reg.aliases("pol") | {} == {"champion": 1, "previous": 3, "challenger": 2}
    history = Registry(*store).history("pol")
    assert [(e.alias, e.version) for e in history] == [
        ("champion", 1), ("challenger", 2), ("previous", 1), ("champion", 3), ("previous", 3), ("champion", 1)]
    assert history[0].gate == {"promote": True, "ci95": [1.0, 2.0]} and history[0].flow_run == "run-a"
    assert history[-1].reason == "v3 misbehaves" and history[-1].flow_run.startswith("command: ")
    assert history[1].reason == "lower bound -3 not above 0" and history[3].gate is None
    reg.rollback("pol", reason="undo")  # a swap: the second rollback undoes the first
    assert reg.get("pol", alias="champion").version == 3


def test_rollback_without_previous_is_a_clear_error(tmp_path, model_dir):
    reg = Registry(tmp_path / "lake")
    reg.register("pol", model_dir, kind="policy")
    reg.promote("pol", 1, reason="first")
    with pytest.raises(ValueError, match="no previous champion"):
        reg.rollback("pol", reason="nothing to go back to")


def test_tables_of_the_old_schema_still_work(tmp_path, model_dir):
    """A lake written before manifests and alias reasons existed: readable, and writable after."""
    import datetime as dt

    import lance
    import pyarrow as pa

    from stages.storage import upload_dir

    root = tmp_path / "lake" / "registry"
    upload_dir(model_dir, root / "pol" / "v1")
    now = dt.datetime.now(dt.timezone.utc)
    ts = pa.timestamp("us", tz="UTC")
    old_models = pa.schema([("name", pa.string()), ("version", pa.int64()), ("artifact_uri", pa.string()),
                            ("kind", pa.string()), ("metrics", pa.string()), ("lineage", pa.string()),
                            ("config", pa.string()), ("created_at", ts)])
    old_aliases = pa.schema([("name", pa.string()), ("alias", pa.string()), ("version", pa.int64()), ("set_at", ts)])
    lance.write_dataset(pa.Table.from_pylist([{"name": "pol", "version": 1, "artifact_uri": str(root / "pol" / "v1"),
                                               "kind": "policy", "metrics": "{}", "lineage": "{}", "config": "{}",
                                               "created_at": now}], schema=old_models), str(root / "models.lance"))
    lance.write_dataset(pa.Table.from_pylist([{"name": "pol", "alias": "champion", "version": 1, "set_at": now}],
                                             schema=old_aliases), str(root / "aliases.lance"))
    reg = Registry(tmp_path / "lake")
    old = reg.get("pol", alias="champion")
    assert old.version == 1 and old.manifest is None and _files(Path(reg.fetch(old))) == _files(model_dir)
    assert reg.history("pol")[0].reason == "" and reg.history("pol")[0].gate is None
    new = reg.register("pol", model_dir, kind="policy")
    assert new.version == 2 and new.manifest is not None
    reg.promote("pol", 2, reason="new schema", gate={"promote": True})
    reg.update_metrics("pol", 1, {"score": 1.0})
    reopened = Registry(tmp_path / "lake")
    assert reopened.aliases("pol") == {"champion": 2, "previous": 1}
    assert reopened.get("pol", version=1).metrics == {"score": 1.0} and reopened.get("pol", version=1).manifest is None
    assert reopened.alias_history("pol", "champion")[-1].gate == {"promote": True}
