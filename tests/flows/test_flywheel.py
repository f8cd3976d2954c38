"""One tiny turn end to end: real Ray, Lance, Prefect (test API), CarRacing and a Ray Serve HTTP call."""
from __future__ import annotations

import base64
import json
import os

import pytest
import requests

from flows.curate import curate_flow
from flows.flywheel import flywheel_flow
from flows.runtime import Context
from stages.lake import images
from tests.conftest import free_port


@pytest.fixture(scope="module")
def turn(tmp_path_factory, ray_cluster, prefect_harness):
    root = tmp_path_factory.mktemp("flywheel")
    mp = pytest.MonkeyPatch()
    mp.setenv("WORLDLOOP_WORK_DIR", str(root / "work"))
    mp.setenv("WORLDLOOP_SERVE_PORT", str(free_port()))
    lake, landing = root / "lake", root / "landing"
    (landing / "turn-0000").mkdir(parents=True)
    (landing / "turn-0000" / "corrupt.mcap").write_bytes(b"\x89MCAP0\r\n\x01\x02 not an mcap file")
    out = flywheel_flow(config="tiny", lake=str(lake), landing=str(landing), turns=1)
    yield {"lake": str(lake), "landing": str(landing), "stages": out["turns"][0]["stages"],
           "ctx": Context.create(config="tiny", lake=str(lake), landing=str(landing))}
    mp.undo()


def test_every_source_is_accounted_for(turn):
    curate = turn["stages"]["curate"]
    assert turn["stages"]["fleet"]["episodes"] == 2
    assert (curate["seen"], curate["kept"], curate["rejected"]) == (3, 2, 1)
    rejects = turn["ctx"].lake.read("rejects").to_pylist()
    assert [r["source_uri"].endswith("corrupt.mcap") for r in rejects if r["stage"] != "synthesize"] == [True]


def test_recurate_adds_nothing(turn, ray_cluster):
    lake = turn["ctx"].lake
    before = {n: lake.count(n) for n in ("episodes", "frames", "rejects")}
    again = curate_flow(config="tiny", lake=turn["lake"], landing=turn["landing"])
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
    if episodes:
        sources = set(lake.read("frames", columns=["label_source"], filter="origin = 'synthetic'")
                      .column("label_source").to_pylist())
        assert sources <= {"recovery_heuristic", "generator_action"}


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


def test_evaluation_is_paired_and_gated(turn):
    ev, promote = turn["stages"]["evaluate"], turn["stages"]["promote"]
    assert set(ev["results"]) >= {"candidate", "expert", "random"}
    assert ev["comparison"]["seeds"] == [("drive", 1000), ("drive", 1001)]
    assert promote["promote"] == (ev["comparison"]["mean_diff"] > 0)
    rows = turn["ctx"].lake.read("evaluations").to_pylist()
    assert {r["seed"] for r in rows} == {1000, 1001}


def test_served_champion_answers_a_real_frame(turn):
    promote = turn["stages"]["promote"]
    if not promote["promote"]:
        pytest.fail(f"tiny candidate was not promoted, so nothing is served: {promote['reason']}")
    url = promote["endpoint"]["url"].rstrip("/")
    champion = turn["ctx"].registry.get("policy", alias="champion")
    k = champion.config["history"]
    frames = turn["ctx"].lake.read("frames", columns=["image"], filter="origin = 'real' AND step < 8")
    body = {"frames": [base64.b64encode(f.tobytes()).decode() for f in images(frames.column("image"))[:k]],
            "encoding": "raw_base64"}
    reply = requests.post(f"{url}/act", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model_version"] == champion.version
    bad = requests.post(f"{url}/act", json={"frames": ["@@@"], "encoding": "raw_base64"}, timeout=30)
    assert 400 <= bad.status_code < 500 and bad.json()
    assert requests.get(f"{url}/healthz", timeout=30).json()["model_version"] == champion.version
    assert "/act" in requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]


def test_status_reports_tables_models_and_turn_tags(turn):
    from flows import cli

    status = cli._status(cli._parser().parse_args(["status", "--lake", turn["lake"], "--landing", turn["landing"]]))
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
