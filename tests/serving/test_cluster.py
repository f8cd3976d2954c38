"""`worldloop up` / `down`: a Ray cluster with Serve that outlives the commands, joined by a deploy from
another process, and stopped exactly (the session's own Ray untouched). Real processes, real HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import psutil
import pytest
import requests
import torch

from models.policy import Policy, preset, save
from serving import cluster
from stages.registry import Registry
from tests.conftest import free_port

WORLDLOOP = [sys.executable, "-m", "flows.cli"]


def _worldloop(args: list[str], home, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, WORLDLOOP_HOME=str(home))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(WORLDLOOP + args, cwd=os.getcwd(), env=env, capture_output=True, text=True,
                          timeout=timeout)


def _json(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _session_ray_pids(ray) -> list[psutil.Process]:
    """This test session's own GCS and raylet processes."""
    node = ray._private.worker._global_node
    return [psutil.Process(info.process.pid) for infos in node.all_processes.values() for info in infos]


def test_up_deploy_outlives_the_process_down_stops_exactly_it(ray_cluster, tmp_path):
    ours = _session_ray_pids(ray_cluster)
    assert ours
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()

    refused = _worldloop(["up", "--host", "0.0.0.0", "--port", str(port)], home)
    assert refused.returncode == 2 and "WORLDLOOP_API_TOKEN" in refused.stderr
    assert not (home / ".worldloop" / "cluster.json").exists()

    first = _json(_worldloop(["up", "--port", str(port), "--json"], home))
    assert first["status"] == "started" and first["owned"] and first["port"] == port
    again = _json(_worldloop(["up", "--port", str(port), "--json"], home))
    assert again["status"] == "running" and again["address"] == first["address"]  # idempotent
    try:
        registry = Registry(tmp_path / "lake")
        torch.manual_seed(0)
        save(Policy(preset("tiny")).eval(), tmp_path / "p")
        registry.set_alias("policy", "champion", registry.register("policy", tmp_path / "p", kind="policy").version)
        # a separate process deploys through ensure_ray (which finds `up`'s cluster) and exits
        script = textwrap.dedent(f"""
            import ray
            from flows.runtime import ensure_ray
            from serving.app import deploy
            ensure_ray()
            print(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
            print(deploy(registry_uri={registry.uri!r}, model_name="policy", port={port}, app_name="act-up-test"))
        """)
        done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, WORLDLOOP_HOME=str(home)),
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        gcs_port, url = done.stdout.strip().splitlines()[-2:]
        assert gcs_port == first["address"].rsplit(":", 1)[1]
        health = requests.get(f"{url}/healthz", timeout=10)  # the deploying process is gone
        assert health.ok and health.json()["model_version"] == 1
        owned = [psutil.Process(p["pid"]) for p in first["processes"]]
        assert all(p.is_running() for p in owned)
        haproxy = [c for p in owned for c in p.children(recursive=True) if c.name() == "haproxy"]
        assert haproxy, "the default ingress is Serve's HAProxy, a child of up's cluster"
        (haproxy_dir,) = cluster._haproxy_dirs(first)
        assert os.path.isfile(os.path.join(haproxy_dir, "haproxy.cfg"))
    finally:
        down = _json(_worldloop(["down", "--json", "--grace-period", "6"], home))
    assert down["status"] == "stopped" and down["serve_stopped"]
    assert set(p.pid for p in owned) <= set(down["terminated"]) | set(down["killed"])
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in owned + haproxy)
    assert not any(first["temp_dir"] in " ".join(p.info["cmdline"] or ())
                   for p in psutil.process_iter(["cmdline"]))
    assert not (home / ".worldloop" / "cluster.json").exists() and not os.path.exists(haproxy_dir)
    assert all(p.is_running() for p in ours)  # the session's own Ray is untouched ...
    assert ray_cluster.get(ray_cluster.put(41)) == 41  # ... and still works
    with pytest.raises(requests.ConnectionError):  # the endpoint went with the cluster
        requests.get(f"{url}/healthz", timeout=3)
    twice = _json(_worldloop(["down", "--json"], home))
    assert twice["status"] == "not running" and "nothing to stop" in twice["message"]


def test_serve_config_file_is_valid_and_uses_the_default_ingress(monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.app import INGRESS_ENV, ingress_env

    config = ServeDeploySchema.model_validate(yaml.safe_load(open("serving/config.yaml")))
    assert {a.import_path for a in config.applications} == {"serving.cluster:app_builder"}
    monkeypatch.delenv(INGRESS_ENV, raising=False)
    env = ingress_env()
    in_file = config.controller_options.runtime_env["env_vars"]
    assert {k: env[k] for k in in_file} == in_file  # the file's ingress is the flows' default
    monkeypatch.setenv(INGRESS_ENV, "proxy")
    assert ingress_env() == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    monkeypatch.setenv(INGRESS_ENV, "nginx")
    with pytest.raises(ValueError, match="haproxy, proxy"):
        ingress_env()
