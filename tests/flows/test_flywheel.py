"""One tiny turn of each built-in world end to end, on one lake: real Ray, Lance, Prefect (test
API), CarRacing and the Meta-World arm, and a Ray Serve HTTP call to each world's champion."""
from __future__ import annotations

import base64
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 -- pa.compute
import pytest
import requests

from flows.ablate import ablate_flow
from flows.curate import curate_flow
from flows.evaluate import evaluate_flow
from flows.flywheel import flywheel_flow
from flows.promote import promote_flow
from flows.runtime import Context
from flows.train import synthetic_verdict
from stages import images
from stages.schemas import vectors
from tests.conftest import free_port


WORLDS = ("carracing", "metaworld-mt10")
# the arm's tiny turn evaluates two of its ten tasks and trains on one Ray Train worker (the car's
# turn covers two), so the suite stays quick
OVERRIDES = {"carracing": None,  # the arm's turn also trains with batches drawn a step ahead (the gpu preset's way)
             "metaworld-mt10": ['eval.tasks=["reach", "drawer-close"]', "train.num_workers=1", "train.prefetch=2"]}


@pytest.fixture(scope="module")
def turns(tmp_path_factory, ray_cluster, prefect_harness):
    """A tiny turn of each world, one after the other, into one lake and one landing zone."""
    root = tmp_path_factory.mktemp("flywheel")
    mp = pytest.MonkeyPatch()
    mp.setenv("WORLDLOOP_WORK_DIR", str(root / "work"))
    mp.setenv("WORLDLOOP_SERVE_PORT", str(free_port()))
    lake, landing = root / "lake", root / "landing"
    (landing / "turn-0000").mkdir(parents=True)
    (landing / "turn-0000" / "corrupt.mcap").write_bytes(b"\x89MCAP0\r\n\x01\x02 not an mcap file")
    out = {}
    for world in WORLDS:
        common = {"config": "tiny", "lake": str(lake), "landing": str(landing), "world": world,
                  "overrides": OVERRIDES[world]}
        run = flywheel_flow(**common, turns=1)
        out[world] = {**common, "stages": run["turns"][0]["stages"], "ctx": Context.create(**common)}
    yield out
    mp.undo()


@pytest.fixture(params=WORLDS)
def turn(request, turns):
    return turns[request.param]


def test_every_source_is_accounted_for(turn):
    curate = turn["stages"]["curate"]
    assert turn["stages"]["fleet"]["episodes"] == 2
    assert (curate["seen"], curate["kept"], curate["rejected"]) == (3, 2, 1)
    rejects = turn["ctx"].lake.read("rejects").to_pylist()
    assert [r["source_uri"].endswith("corrupt.mcap") for r in rejects if r["stage"] != "synthesize"] == [True]


def test_recurate_adds_nothing(turn, ray_cluster):
    lake = turn["ctx"].lake
    before = {n: lake.count(n) for n in ("episodes", "frames", "rejects")}
    again = curate_flow(config="tiny", lake=turn["lake"], landing=turn["landing"], world=turn["world"])
    assert again["seen"] == 0
    assert {n: lake.count(n) for n in ("episodes", "frames", "rejects")} == before


def test_synthetic_rows_carry_provenance(turn):
    lake, synth = turn["ctx"].lake, turn["stages"]["synthesize"]
    assert synth["generated"] == synth["kept"] + synth["rejected"] > 0
    episodes = lake.read("episodes", filter="origin = 'synthetic'").to_pylist()
    assert len(episodes) == synth["kept"]
    real_ids = set(lake.read("episodes", columns=["episode_id"], filter="origin = 'real'")
                   .column("episode_id").to_pylist())
    for e in episodes:
        assert e["parent_episode_id"] in real_ids and e["generator_version"].startswith("world_model:v")
    assert synth["dynamics"].startswith("dynamics:v") and 0 <= synth["rejected_by_critic"] <= synth["rejected"]
    # the parents are fleet episodes the world replays: every kept variant is labelled by the expert
    assert synth["expert_relabelled"] == synth["kept"]
    if episodes:
        rows = lake.read("frames", columns=["label_source", "state"], filter="origin = 'synthetic'")
        assert "expert_replay" in set(rows.column("label_source").to_pylist())
        assert np.isfinite(vectors(rows.column("state"))).all()  # predicted by the dynamics model


def test_models_are_registered_with_lineage(turn):
    registry = turn["ctx"].registry
    policy = registry.versions("policy")[-1]
    assert policy.lineage["tables"]["frames"] >= 1 and policy.config["history"] >= 1
    assert "eval_mean" in policy.metrics
    # the policy drew its windows by clip weight: event clips at least as often as their share
    assert policy.lineage["tables"]["clips"] >= 1
    assert policy.metrics["train_event_share"] >= policy.metrics["train_event_share_natural"]
    with open(os.path.join(registry.fetch(policy), "train_config.json")) as f:
        saved = json.load(f)
    assert saved["flywheel"]["name"] == "tiny" and saved["lineage"]["turn"] == 0
    assert registry.versions("world_model")
    spec = turn["ctx"].config.spec  # the dynamics model takes the world's shapes and signal names
    dynamics = registry.versions("dynamics")[-1]
    assert dynamics.config["signals"] == list(spec.signals) and dynamics.config["state_dim"] == len(spec.state_names)
    assert dynamics.config["action_dim"] == len(spec.actions) and "train_loss" in dynamics.metrics


def test_neural_simulator_evaluates_and_screens(turn, tmp_path):
    """`evaluate --in neural` drives policies in the world model from the lake's real windows; with
    `eval.screen` a candidate that fails there is never driven in the real simulator nor promoted."""
    lake = tmp_path / "lake"
    shutil.copytree(turn["lake"], lake)  # this test registers a version: on a copy of the turn's lake
    common = {k: turn[k] for k in ("config", "landing", "world")} | {"lake": str(lake)}
    overrides = turn["overrides"] or []
    ctx = Context.create(**common, overrides=overrides)
    champion = ctx.registry.get("policy", alias="champion")
    twin = ctx.registry.register("policy", ctx.registry.fetch(champion), kind="policy")
    out = evaluate_flow(**common, overrides=overrides, simulator="neural")
    assert out["simulator"] == "neural" and set(out["results"]) == {"candidate", "champion", "random"}
    assert out["candidate_version"] == twin.version and out["results"]["candidate"]["n"] == ctx.config.eval.neural_starts
    # the same weights from the same starts under the same sampling noise score the same
    assert out["comparison"]["mean_diff"] == 0.0 and out["reference"] == "champion"
    assert ctx.registry.get("policy", version=twin.version).metrics["neural_eval_starts"] == 4
    real_rows = ctx.lake.count("evaluations")
    strict = [*overrides, "eval.screen=true", "eval.screen_margin=-1"]  # must beat the champion by 1
    screened = evaluate_flow(**common, overrides=strict)
    assert screened["screened_out"] and screened["screen"]["mean_diff"] == 0.0
    assert ctx.lake.count("evaluations") == real_rows  # no real-simulator time was spent on it
    decision = promote_flow(**common, overrides=strict, serve=False)
    assert not decision["promote"] and "screened out in the neural simulator" in decision["reason"]
    assert ctx.registry.get("policy", alias="champion").version == champion.version


def test_evaluation_is_paired_and_gated(turn):
    ev, promote, cfg = turn["stages"]["evaluate"], turn["stages"]["promote"], turn["ctx"].config
    assert set(ev["results"]) >= {"candidate", "expert", "random"}
    scenes = sorted((t, s) for t in cfg.eval_tasks for s in (1000, 1001))
    assert ev["comparison"]["seeds"] == scenes  # every driver on the same (task, seed) scenes
    assert promote["promote"] == (promote["ci95"][0] > cfg.gate.margin)  # vs the random policy: the lower bound
    rows = turn["ctx"].lake.read("evaluations").to_pylist()
    assert sorted({(r["task"], r["seed"]) for r in rows}) == scenes
    assert set(ev["results"]["candidate"]["per_task"]) == set(cfg.eval_tasks)


def test_one_lake_holds_both_worlds_apart(turns):
    car, arm = (turns[w]["ctx"] for w in WORLDS)
    assert car.world_uri != arm.world_uri and car.lake_uri == arm.lake_uri
    for ctx in (car, arm):
        spec = ctx.config.spec
        assert set(ctx.lake.read("episodes", columns=["world"], filter="origin = 'real'")
                   .column("world").to_pylist()) == {spec.name}
        features = json.loads(ctx.lake.dataset("frames").schema.metadata[b"worldloop.features"])
        assert features["actions"] == list(spec.action_names) and features["state"] == list(spec.state_names)
        assert ctx.registry.get("policy", alias="champion").config["state_dim"] == len(spec.policy_state)
    # the arm's fleet logs are its own: the car's curate never read them, and the reverse
    assert all("/metaworld-mt10/" not in u for u in car.lake.keys("sources", "source_uri"))
    assert all("/carracing/" not in u for u in arm.lake.keys("sources", "source_uri"))


def test_served_champion_answers_a_real_frame(turn):
    promote = turn["stages"]["promote"]
    if not promote["promote"]:
        pytest.fail(f"tiny candidate was not promoted, so nothing is served: {promote['reason']}")
    url = promote["endpoint"]["url"].rstrip("/")
    champion = turn["ctx"].registry.get("policy", alias="champion")
    k, spec = champion.config["history"], turn["ctx"].config.spec
    rows = turn["ctx"].lake.read("frames", columns=["episode_id", "image", "height", "width", "state", "task"],
                                 filter="origin = 'real' AND step < 8")
    rows = rows.filter(pa.compute.equal(rows.column("episode_id"), rows.column("episode_id")[0]))
    body = {"frames": [base64.b64encode(f.tobytes()).decode() for f in images.decode(rows)[:k]],
            "encoding": "raw_base64"}
    if spec.policy_state:  # what the world observes besides pixels: named state and the task
        state = rows.column("state")[0].as_py()
        body["state"] = {name: state[spec.state_names.index(name)] for name in spec.policy_state}
        body["task"] = rows.column("task")[0].as_py()
    reply = requests.post(f"{url}/act", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model_version"] == champion.version
    assert list(reply.json()["action"]) == list(spec.action_names)
    bad = requests.post(f"{url}/act", json={"frames": ["@@@"], "encoding": "raw_base64"}, timeout=30)
    assert 400 <= bad.status_code < 500 and bad.json()
    assert requests.get(f"{url}/healthz", timeout=30).json()["model_version"] == champion.version
    assert "/act" in requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    world = turn["world"]  # the world model and the reasoner are served beside the policy
    companions = promote["companions"]["urls"]
    assert set(companions) == {f"predict-{world}", f"report-{world}"}, promote["companions"]
    for app_url in companions.values():
        assert requests.get(f"{app_url.rstrip('/')}/healthz", timeout=30).status_code == 200
    report = requests.get(f"{companions[f'report-{world}'].rstrip('/')}/turn/0", timeout=30)
    assert report.status_code == 200 and report.json()["report"]["recommendations"], report.text


def test_the_served_champion_drives_the_next_fleet_toward_its_gaps(turns, tmp_path):
    """Turn 1's fleet: the champion drives over HTTP with the expert as safety driver, and with
    `fleet.focus` 1 every episode goes to a task where it fell short of the expert on the held-out
    scenes (round-robin when it fell short nowhere). `train.focus` reads the same gaps, keyed by the
    task text the frames hold."""
    from flows.fleet import fleet_flow
    from flows.promote import champion_gaps
    from flows.train import training_gaps

    turn = turns["metaworld-mt10"]
    promote = turn["stages"]["promote"]
    if not promote["promote"]:
        pytest.fail(f"tiny candidate was not promoted, so nothing is served: {promote['reason']}")
    overrides = [*turn["overrides"], "fleet.focus=1.0", "fleet.champion_episodes=3"]
    common = {k: turn[k] for k in ("config", "lake", "world")} | {"landing": str(tmp_path / "landing")}
    out = fleet_flow(**common, overrides=overrides, turn=1, endpoint=promote["endpoint"]["url"])
    champion = turn["ctx"].registry.get("policy", alias="champion")
    assert out["driver"] == f"policy:v{champion.version}" and out["episodes"] == 3
    gaps = champion_gaps(Context.create(**common, overrides=overrides), champion.version)
    assert set(gaps) == set(turn["ctx"].config.eval_tasks)  # from the evaluations rows of both drivers
    short = {t for t, g in gaps.items() if g > 0}
    tasks = turn["ctx"].config.spec.task_names
    assert set(out["tasks"]) <= (short or set(tasks)) and sum(out["tasks"].values()) == 3
    logs = sorted(os.listdir(tmp_path / "landing" / "metaworld-mt10" / "turn-0001"))
    assert len(logs) == 3 and all(name.startswith("champion-") and name.endswith(".mcap") for name in logs)
    spec = turn["ctx"].config.spec
    focused = Context.create(**common, overrides=[*overrides, "train.focus=0.5"])
    assert training_gaps(focused) == {spec.instruction(t): g for t, g in gaps.items()}
    assert training_gaps(Context.create(**common, overrides=overrides)) == {}  # train.focus 0: none


def test_status_reports_tables_models_and_turn_tags(turn):
    from flows import cli

    status = cli._status(cli._parser().parse_args(["status", "--lake", turn["lake"], "--landing", turn["landing"],
                                                   "--world", turn["world"]]))
    assert status["next_turn"] == 1
    assert "turn-0" in status["tables"]["frames"]["tags"]
    assert status["models"]["policy"]["versions"] == [1]
    assert status["tables"]["turns"]["rows"] == 1


def test_turn_summary_renders_clips_and_the_reasoner(turn):
    from flows.cli import render

    text = render({"turns": [{"turn": 0, "stages": turn["stages"]}]})
    clips = turn["stages"]["curate"]["clips"]
    assert sum(clips["events"].values()) == turn["stages"]["curate"]["rows_added"]["clips"] > 0
    assert f"  clips       +{turn['stages']['curate']['rows_added']['clips']} (" in text
    assert "  reasoner    " in text and "turn 0" in text and "  promote     " in text
    assert "of draws (" in text  # the policy line: how often event clips were drawn


def test_a_turn_leaves_synthetic_frames_out_until_an_ablation_shows_a_lift(turn):
    used = turn["stages"]["train_policy"]["synthetic"]
    assert not used["used"] and used["fraction"] == 0.0
    assert "no ablation" in used["reason"]


def test_an_ablation_on_the_lakes_own_data_decides_the_verdict(turns, tmp_path):
    """`worldloop ablate` trains real-only and real + synthetic policies on the lake's own data and
    records the paired lift; the next turn's verdict follows it. The flow is world-agnostic: it runs
    on the arm, whose synthetic rows also carry the dynamics model's predicted state."""
    turn = turns["metaworld-mt10"]
    common = {k: turn[k] for k in ("config", "landing", "world", "overrides")}
    lake = tmp_path / "lake"
    shutil.copytree(turn["lake"], lake)
    out = ablate_flow(**common, lake=str(lake), seeds=1)
    cfg = turn["ctx"].config
    assert out["scenes"] == len(cfg.eval_seeds) * len(cfg.eval_tasks) and out["seeds"] == 1
    assert out["real_frames"] > 0 and out["synthetic_frames"] > 0
    assert out["ci_low"] <= out["mean_diff"] <= out["ci_high"] and out["lift"] == (out["ci_low"] > 0)
    ctx = Context.create(**common, lake=str(lake))
    assert ctx.lake.count("ablations") == 1
    roles = set(ctx.lake.read("evaluations", columns=["model_name"]).column("model_name").to_pylist())
    assert {"ablation-real", "ablation-mixed"} <= roles  # driven in the real simulator, recorded
    verdict = synthetic_verdict(ctx)
    assert verdict["use"] == out["lift"] and f"{out['mean_diff']:+.3g}" in verdict["reason"]
