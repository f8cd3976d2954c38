"""The `worldloop` console script: argument handling, --json output, clear errors."""
from __future__ import annotations

import json

from flows import cli
from flows.config import preset


def test_json_summary_is_one_object_on_stdout(tmp_path, capsys, ray_cluster, prefect_harness):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "empty.mcap").write_bytes(b"")
    code = cli.main(["curate", "--config", "tiny", "--lake", str(tmp_path / "lake"),
                     "--landing", str(landing), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out)
    assert (summary["seen"], summary["kept"], summary["rejected"]) == (1, 0, 1)
    assert summary["rejects"][0]["reason"] == "empty"


def test_stage_without_its_inputs_fails_clearly(tmp_path, capsys, prefect_harness):
    code = cli.main(["train", "--config", "tiny", "--lake", str(tmp_path / "lake"),
                     "--landing", str(tmp_path / "landing")])
    assert code == 2
    assert "run `worldloop curate` first" in capsys.readouterr().err


def test_heartbeats_are_off_only_without_a_prefect_server():
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.runtime import prefect_settings

    default = PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value()
    assert default is not None
    with temporary_settings(restore_defaults={PREFECT_API_URL}), prefect_settings():
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None  # ephemeral API: nobody watches them
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}), prefect_settings():
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == default
    assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == default


def test_presets_derive_and_agree():
    tiny, default, gpu = preset("tiny"), preset("default"), preset("gpu")
    assert tiny.fleet.seed_base == default.fleet.seed_base and gpu.train.use_gpu and not default.train.use_gpu
    assert tiny.world.image_size == tiny.policy.image_size == tiny.world_model.image_size
    assert not set(default.eval.seeds) & {default.fleet.seed_base + i for i in range(1000)}
    assert tiny.digest() != default.digest()
