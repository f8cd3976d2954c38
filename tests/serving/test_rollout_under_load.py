"""A promotion and a rollback under a steady request stream from another process: no request fails and
every answer names the version that produced it (real Serve, real HTTP, the session's Ray)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from models.policy import Policy, preset, save
from serving.app import deploy
from stages.registry import Registry
from tests.conftest import free_port

APP = "act_rollout_test"


def test_promotion_and_rollback_drop_no_request(ray_cluster, tmp_path):
    from ray import serve

    registry = Registry(tmp_path / "lake")
    for seed in (1, 2):
        torch.manual_seed(seed)
        save(Policy(preset("tiny")).eval(), tmp_path / f"p{seed}")
        registry.register("policy", tmp_path / f"p{seed}", kind="policy")
    common = dict(registry_uri=registry.uri, model_name="policy", port=free_port(), app_name=APP)
    url = deploy(**common, version=1)
    stop, ready = tmp_path / "stop", tmp_path / "ready"
    streamer = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_serve", "stream", "--kwargs",
         json.dumps({"url": url, "stop_file": str(stop), "ready_file": str(ready)})],
        stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert streamer.poll() is None and time.monotonic() < deadline, "the request stream did not start"
            time.sleep(0.1)
        deploy(**common, version=2)  # promotion: v2 replaces v1 at the same URL
        time.sleep(1.0)
        deploy(**common, version=1)  # rollback
        time.sleep(1.0)
    finally:
        stop.touch()
        out, _ = streamer.communicate(timeout=60)
        serve.delete(APP)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["failed"] == 0, result["errors"]
    assert result["unversioned"] == 0
    assert set(result["versions"]) == {"1", "2"}, result  # both versions answered during the stream
    assert sum(result["versions"].values()) == result["requests"] > 20
