"""The `worldloop` console script: argument handling, --json output, clear errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest

from flows import cli

from flows.config import preset, resolve


def test_json_summary_is_one_object_on_stdout(tmp_path, capsys, ray_cluster, prefect_harness):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "empty.mcap").write_bytes(b"")
    code = cli.main(["curate", "--config", "tiny", "--lake", str(tmp_path / "lake"),
                     "--landing", str(landing), "--json"])
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out)
    assert (summary["seen"], summary["kept"], summary["rejected"]) == (1, 0, 1)
    assert "seen 1 = kept 0 + rejected 1" in captured.err  # the person watching reads it too
    assert summary["rejects"][0]["reason"] == "empty"


def test_stage_without_its_inputs_fails_clearly(tmp_path, capsys, prefect_harness):
    code = cli.main(["train", "--config", "tiny", "--lake", str(tmp_path / "lake"),
                     "--landing", str(tmp_path / "landing")])
    assert code == 2
    assert "run `worldloop curate` first" in capsys.readouterr().err


def test_sigterm_stops_what_the_command_started(tmp_path):
    """A command killed by SIGTERM (a scheduler's stop, `kill`) stops its Prefect API server and
    whatever else it started instead of leaving them orphaned."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "fleet", "--config", "tiny", "--world", "carracing",
                             "--lake", str(tmp_path / "lake"), "--landing", str(tmp_path / "landing"),
                             "--set", "fleet.episodes=500"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    def cmdline(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # gone meanwhile
            return ""

    try:
        started, deadline = [], time.monotonic() + 120
        while not any("prefect.server" in cmdline(c) for c in started):
            assert proc.poll() is None and time.monotonic() < deadline, "no Prefect API server started"
            time.sleep(0.5)
            started = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) != 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [cmdline(p)[:120] for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()


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
    tiny, default, gpu = (resolve(name, world="carracing") for name in ("tiny", "default", "gpu"))
    assert tiny.fleet.seed_base == default.fleet.seed_base and gpu.train.use_gpu and not default.train.use_gpu
    assert tiny.world.image_size == tiny.policy.image_size == tiny.world_model.image_size == 32
    assert not set(default.eval_seeds) & {default.fleet.seed_base + i for i in range(1000)}
    assert tiny.digest() != default.digest()
    assert preset("tiny").name == "tiny"


def test_overrides_and_config_file_resolve_in_order(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"train": {"num_workers": 1}, "eval.seeds": [1000, 1002]}))
    cfg = resolve("tiny", world="carracing", config_file=str(path),
                  overrides=["eval.seeds=[1003]", "world.image_size=64", "synth.offsets=[0.25]"])
    assert cfg.train.num_workers == 1 and cfg.eval_seeds == (1003,) and cfg.synth.offsets == (0.25,)
    assert cfg.world.image_size == cfg.policy.image_size == cfg.world_model.image_size == 64  # shapes follow the world
    assert cfg.policy.action_low == (-1.0, 0.0, 0.0) and cfg.policy.state_dim == 0
    with pytest.raises(ValueError, match="unknown config key 'train.nope'"):
        resolve("tiny", overrides=["train.nope=1"])
    with pytest.raises(ValueError, match="expected a number"):
        resolve("tiny", overrides=["train.num_workers=many"])
    with pytest.raises(ValueError, match="unknown world"):
        resolve("tiny", world="no-such-world")
    with pytest.raises(ValueError, match="train.precision must be fp32 or bf16"):
        resolve("tiny", overrides=["train.precision=fp16"])
    assert resolve("gpu").train.precision == "bf16" and resolve("default").train.precision == "fp32"
    for text in ("push,reach", "('push', 'reach')", '["push", "reach"]'):  # a list as text, never its characters
        assert resolve("tiny", world="metaworld-mt10", overrides=[f"eval.tasks={text}"]).eval.tasks == ("push", "reach")
    assert resolve("tiny", overrides=["eval.seeds=1000, 1001"]).eval_seeds == (1000, 1001)


def test_models_take_the_worlds_shapes():
    arm = resolve("tiny", world="metaworld-mt10")
    assert arm.policy.action_low == (-1.0,) * 4 and arm.policy.action_high == (1.0,) * 4
    assert arm.policy.state_dim == 7 and {"drawer", "window", "door"} <= set(arm.policy.task_vocab)
    assert arm.world_model.action_dim == 4 and arm.world_model.task_vocab == arm.policy.task_vocab
    demo = resolve("default", world="metaworld-mt10")  # the world's own preset overrides
    assert (demo.fleet.episodes, demo.fleet.champion_episodes, len(demo.eval_seeds)) == (390, 60, 10)
    assert (demo.curate.min_length, demo.policy.shift, arm.policy.shift) == (20, 4, 4)
    assert demo.policy.aux_input and demo.policy.aux_dim == 4 and not arm.policy.aux_input  # obj x, y, z, to goal
    assert resolve("gpu", world="metaworld-mt10").curate.min_length == 20  # "all" applies to every preset
    car = resolve("tiny", world="carracing")
    assert car.policy.task_vocab == () and car.policy.loss_weights == (2.0, 1.0, 1.0) and car.policy.shift == 0


def test_worlds_command_lists_every_registered_world(capsys):
    assert cli.main(["worlds", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["worlds"]
    assert {"carracing", "metaworld-mt10"} <= set(out)
    assert [a["name"] for a in out["carracing"]["actions"]] == ["steer", "gas", "brake"]
    assert cli.main(["worlds"]) == 0
    assert "carracing  " in capsys.readouterr().out


def test_fleet_scenes_per_driver(tmp_path):
    from flows.fleet import fleet_scenes
    from flows.runtime import Context

    ctx = Context.create(config="default", lake=str(tmp_path / "lake"), landing=str(tmp_path / "landing"),
                         world="metaworld-mt10")
    expert, champion = fleet_scenes(ctx, 0), fleet_scenes(ctx, 1, champion=1)
    assert (len(expert), len(champion)) == (390, 60)
    weights = ctx.config.fleet.task_weights  # the arm's preset: the grasp tasks twice as often
    assert Counter(t for _, t in expert) == {t: 30 * weights.get(t, 1) for t in ctx.world.spec.task_names}
    assert {t for _, t in champion} == set(ctx.world.spec.task_names) and expert[:10] != expert[10:20]  # interleaved
    assert not {s for s, _ in expert} & {s for s, _ in champion} and len({s for s, _ in expert}) == 390
    typo = Context.create(config="default", lake=str(tmp_path / "lake"), landing=str(tmp_path / "landing"),
                          world="metaworld-mt10", overrides=["fleet.task_weights.pick_place=2"])
    with pytest.raises(ValueError, match=r"task_weights names tasks \['pick_place'\].*pick-place"):
        fleet_scenes(typo, 0)
    car = Context.create(config="default", lake=str(tmp_path / "lake"), landing=str(tmp_path / "landing"))
    assert len(fleet_scenes(car, 1, champion=1)) == car.config.fleet.episodes  # 0: same as the expert's


def test_up_says_why_the_cluster_did_not_start(tmp_path, monkeypatch, capsys):
    from serving import cluster
    from tests.conftest import free_port

    def fail(**_):
        raise RuntimeError("`ray start --head --port=6379` failed: address already in use")

    monkeypatch.setenv("WORLDLOOP_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "_start_head", fail)
    assert cli.main(["up", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err.startswith("worldloop up: `ray start --head --port=6379` failed") and "Traceback" not in err
    assert not (tmp_path / ".worldloop" / "cluster.json").exists()


def test_reading_configs_and_building_a_textless_policy_import_no_model_library():
    """transformers and diffusers load where a module that needs them is built: a command that only
    reads configs (`down`, `worlds`, `status`) or a car policy process never pays their import."""
    script = ("import sys\nfrom flows import cli\nfrom flows.config import resolve\n"
              "from models.policy import Policy\n"
              "cfg = resolve('tiny', world='carracing')\nPolicy(cfg.policy)\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'diffusers'}))\n"
              "from models.text import TaskEncoder\nTaskEncoder(('pick', 'up'), 8, 4)\n"
              "print('transformers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.getcwd(), env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[]", "True"]
