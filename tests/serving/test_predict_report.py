"""predict (the world model) and report (the reasoner, turn reports) deployed by ``deploy_world`` on a real
Ray Serve instance, over real HTTP: tiny models built here with random weights, registered as the flows
register them (the world model's lineage names its dynamics model), a `turns` row with the real schema.
Deployed with a bearer token: every request but the 401 checks goes through ``HTTP``, which sends it."""
from __future__ import annotations

import base64
import dataclasses
import json
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
import requests
import torch

from models import dynamics as dynamics_lib
from models import reasoner as reasoner_lib
from models import world_model as world_model_lib
from serving.app import deploy_world
from serving.common import TOKEN_ENV
from sim import worlds
from stages.describe import reasoner_config_for
from stages.evaluate import summarize
from stages.lake import Lake
from stages.promote import gate
from stages.registry import Registry
from stages.schemas import TURNS
from tests.conftest import free_port

WORLD = "carracing"
SPEC = worlds.spec(WORLD)
SIZE = 16  # frames of the world model pair
CLIP = reasoner_config_for(SPEC, "tiny", image_size=SIZE)  # small frames: fast to fuzz
TOKEN = "predict-report-token"
HTTP = requests.Session()
HTTP.headers["Authorization"] = f"Bearer {TOKEN}"


def register_world_models(registry: Registry, tmp, *, seed: int = 0) -> dict[str, int]:
    """A tiny random generator + dynamics pair (the generator conditioned on the dynamics model, its lineage
    naming it, as flows/train.py records) and a tiny reasoner as champion; returns their versions."""
    torch.manual_seed(seed)
    d = dataclasses.replace(dynamics_lib.preset("tiny"), image_size=SIZE, action_dim=len(SPEC.actions),
                            state_dim=len(SPEC.state_names), signals=SPEC.signals)
    g = dataclasses.replace(world_model_lib.preset("tiny"), image_size=SIZE, action_dim=len(SPEC.actions),
                            condition_dim=d.embed)
    dynamics_lib.save(dynamics_lib.Dynamics(d).eval(), tmp / "dyn")
    dyn = registry.register("dynamics", tmp / "dyn", kind="dynamics")
    registry.register("dynamics", tmp / "dyn", kind="dynamics")  # a later, unpaired one: must not be served
    world_model_lib.save(world_model_lib.WorldModel(g).eval(), tmp / "wm")
    wm = registry.register("world_model", tmp / "wm", kind="world_model",
                           lineage={"condition_version": dyn.version})
    reasoner_lib.save(reasoner_lib.Reasoner(CLIP).eval(), tmp / "reasoner")
    rs = registry.register("reasoner", tmp / "reasoner", kind="reasoner")
    registry.set_alias("reasoner", "champion", rs.version)
    return {"world_model": wm.version, "dynamics": dyn.version, "reasoner": rs.version}


def _eval_rows(scores: list[float], *, off_track: float, interventions: int) -> list[dict]:
    return [{"task": "drive", "seed": s, "score": v, "success": False, "steps": 200, "interventions": interventions,
             "signal_rates": json.dumps({"off_track": off_track})} for s, v in enumerate(scores)]


def turn_row(turn: int) -> dict:
    """A finished turn as flows/flywheel.py writes it, its summary built by the real evaluate and gate code:
    a candidate that scores higher on average but leaves the track more, so the gate keeps the champion."""
    cand = _eval_rows([620, 410, 700, 380, 655], off_track=0.12, interventions=2)
    champ = _eval_rows([600, 450, 640, 420, 610], off_track=0.03, interventions=0)
    decision = gate(candidate=cand, reference=champ, reference_role="champion",
                    scenes=[("drive", s) for s in range(5)], tolerances={"interventions": 0.0, "off_track": 0.02},
                    resamples=500)
    summary = {
        "fleet": {"stage": "fleet", "turn": turn, "driver": "policy:v2", "episodes": 6, "mean_score": 512.5,
                  "interventions": 3, "frames": 1200, "success_rate": 0.0},
        "curate": {"stage": "curate", "turn": turn, "seen": 6, "kept": 5, "rejected": 1, "frames_kept": 1000,
                   "rejects": [{"source": "s3://landing/turn-0001/champion-drive-seed-3.mcap", "stage": "ingest",
                                "reason": "timestamps go backwards at message 40"}]},
        "evaluate": {"stage": "evaluate", "simulator": "real", "turn": turn, "candidate_version": 3,
                     "reference": "champion",
                     "results": {"candidate": dict(summarize(cand, resamples=500), model="policy:3"),
                                 "champion": dict(summarize(champ, resamples=500), model="policy:2")}},
        "promote": {"stage": "promote", "candidate_version": 3, **decision, "champion_version": 2}}
    return {"turn": turn, "config": "default", "started_at": datetime(2026, 11, 2, 9, tzinfo=timezone.utc),
            "finished_at": datetime(2026, 11, 2, 9, 40, tzinfo=timezone.utc), "candidate_version": 3,
            "promoted": decision["promote"], "champion_version": 2, "summary": json.dumps(summary, default=str)}


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory):
    """act (skipped: no policy), predict and report of the car world, deployed by deploy_world."""
    from ray import serve

    tmp = tmp_path_factory.mktemp("world")
    registry = Registry(str(tmp / "lake"))
    versions = register_world_models(registry, tmp)
    Lake(registry.uri).append("turns", pa.Table.from_pylist([turn_row(1)], schema=TURNS), key="turn")
    with pytest.MonkeyPatch.context() as mp:  # the replicas get the token from the deployment, not the env
        mp.setenv(TOKEN_ENV, TOKEN)
        out = deploy_world(registry_uri=registry.uri, world=WORLD, port=free_port())
    try:
        yield {**out, "versions": versions, "registry": registry}
    finally:
        for name in out["urls"]:
            serve.delete(name)


def _predict_url(world) -> str:
    return world["urls"][f"predict-{WORLD}"]


def _report_url(world) -> str:
    return world["urls"][f"report-{WORLD}"]


def _example(url: str, path: str, schema_name: str) -> dict:
    """The example the OpenAPI schema gives for the request body (the png_base64 variant's)."""
    schema = HTTP.get(f"{url}/openapi.json", timeout=10).json()
    return schema["components"]["schemas"][schema_name]["examples"][0]


def test_deploy_world_skips_act_without_a_policy_and_serves_the_paired_models(world):
    assert set(world["urls"]) == {f"predict-{WORLD}", f"report-{WORLD}"}
    assert "no version with alias 'champion'" in world["skipped"][f"act-{WORLD}"]
    health = HTTP.get(f"{_predict_url(world)}/healthz", timeout=10).json()
    v = world["versions"]
    assert (health["world_model_version"], health["dynamics_version"]) == (v["world_model"], v["dynamics"])
    assert health["states"] == list(SPEC.state_names) and health["image_size"] == SIZE


def test_predict_answers_its_own_example_and_a_raw_request(world):
    url = _predict_url(world)
    example = _example(url, "/predict", "PredictRequestPng")
    r = HTTP.post(f"{url}/predict", json=example, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    frame = np.frombuffer(base64.b64decode(body["frame"]), np.uint8)
    assert frame.size == SIZE * SIZE * 3
    assert set(body["state"]) == set(SPEC.state_names) and set(body["signals"]) == set(SPEC.signals)
    assert 0 <= body["done"] <= 1 and body["success"] is False and body["world"] == WORLD
    assert body["world_model_version"] == world["versions"]["world_model"]
    # the same request with raw frames gives the same next frame (seeded sampling, batch of one)
    raw = dict(example, encoding="raw_base64",
               frames=[base64.b64encode(np.zeros((SIZE, SIZE, 3), np.uint8).tobytes()).decode()] * len(example["frames"]))
    again = HTTP.post(f"{url}/predict", json=raw, timeout=30)
    assert again.status_code == 200 and again.json()["frame"] == body["frame"]


def test_predict_refuses_malformed_requests_with_4xx(world):
    url = _predict_url(world)
    good = _example(url, "/predict", "PredictRequestPng")
    first = SPEC.action_names[0]
    cases = {
        "too few frames": (dict(good, frames=good["frames"][:-1]), 422, "frames"),
        "an action beyond its bound": (dict(good, action={**good["action"], first: 1e9}), 422, first),
        "a missing action field": (dict(good, action={k: v for k, v in good["action"].items() if k != first}),
                                   422, first),
        "too many actions": (dict(good, actions=good["actions"] + good["actions"][:1]), 422, "actions"),
        "a state of another world": (dict(good, states=[{"joint": 0.0}] * len(good["states"])), 422, "states"),
        "a PNG of the wrong size": (dict(good, frames=[_png(8)] * len(good["frames"])), 400, "expected 16x16"),
        "an integer beyond 64 bits": (dict(good, action={**good["action"], first: 2 ** 70}), 422, "64 bits"),
    }
    for what, (body, status, said) in cases.items():
        r = HTTP.post(f"{url}/predict", json=body, timeout=30)
        assert r.status_code == status and said in r.text, (what, r.status_code, r.text[:300])
    r = HTTP.post(f"{url}/predict", data=b"x" * 10_000_000, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 413


def _png(size: int) -> str:
    from serving.common import png_base64

    return png_base64(np.zeros((size, size, 3), np.uint8))


def test_clip_report_from_the_schema_example(world):
    url = _report_url(world)
    health = HTTP.get(f"{url}/healthz", timeout=10).json()
    assert health["reasoner_version"] == world["versions"]["reasoner"] and health["events"] == list(CLIP.events)
    example = _example(url, "/clip", "ClipRequestPng")
    for event in ("none", "off_track"):
        r = HTTP.post(f"{url}/clip", json=dict(example, event=event), timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body["tags"]) == set(CLIP.tags) and all(body["tags"][k] in CLIP.tags[k] for k in CLIP.tags)
        report = body["report"]
        assert report["title"].startswith(f"Clip report, world {WORLD}") and body["caption"] in report["title"]
        assert report["text"].splitlines()[0] == report["title"] and "Recommendations:" in report["text"]
        if event == "off_track":  # a weighted event: the report says why it matters and what to do
            assert any("weighted x4" in r for r in report["recommendations"])
            assert any(e.description in o for e in SPEC.events if e.name == "off_track" for o in report["observations"])
        else:
            assert report["recommendations"][0].startswith("Routine data")


def test_clip_refuses_malformed_requests_with_4xx(world):
    url = _report_url(world)
    good = _example(url, "/clip", "ClipRequestPng")
    for body, status in ((dict(good, event="crash"), 422), (dict(good, frames=good["frames"][:2]), 422),
                         (dict(good, frames=["iVBORw0KGgo="] * len(good["frames"])), 400),
                         (dict(good, encoding="list"), 422), ({**good, "extra": 1}, 422)):
        r = HTTP.post(f"{url}/clip", json=body, timeout=30)
        assert r.status_code == status, (body.get("event"), r.text[:300])
    r = HTTP.post(f"{url}/clip", data="event=none", headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and "application/json" in r.json()["detail"]


def test_turn_report_reads_like_a_report(world):
    url = _report_url(world)
    r = HTTP.get(f"{url}/turn/1", timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["turn"], body["promoted"], body["candidate_version"], body["champion_version"]) == (1, False, 3, 2)
    text = body["report"]["text"]
    print(text)
    # what the fleet did, what failed (the rejected log with its reason, the regressed guard), what changed
    assert "6 episodes driven by policy:v2" in text
    assert "timestamps go backwards at message 40" in text
    assert any("off_track" in f and "0.12" in f and "0.03" in f for f in body["failures"]), body["failures"]
    assert any(c.startswith("Kept champion v2") for c in body["changes"]), body["changes"]
    recs = body["report"]["recommendations"]
    assert any("off_track" in r for r in recs) and any("ingest" in r for r in recs), recs
    assert "nan" not in text.lower() and "?" not in text


def test_turn_report_refuses_unknown_and_malformed_turns(world):
    url = _report_url(world)
    assert HTTP.get(f"{url}/turn/7", timeout=10).status_code == 404
    for bad in ("-1", "x", str(2 ** 70)):
        r = HTTP.get(f"{url}/turn/{bad}", timeout=10)
        assert r.status_code == 422, (bad, r.text)


def test_predict_and_report_need_the_token(world):
    predict, report = _predict_url(world), _report_url(world)
    example = _example(predict, "/predict", "PredictRequestPng")
    for method, url, kw in (("POST", f"{predict}/predict", {"json": example}),
                            ("POST", f"{report}/clip", {"json": {}}), ("GET", f"{report}/turn/1", {}),
                            ("GET", f"{predict}/openapi.json", {})):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = requests.request(method, url, headers=headers, timeout=10, **kw)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), (url, r.text)
    for url in (predict, report):  # probes need no token
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    schema = HTTP.get(f"{report}/openapi.json", timeout=10).json()
    assert schema["paths"]["/clip"]["post"]["security"] == [{"bearer": []}]
