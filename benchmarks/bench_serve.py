"""`make bench-serve`: the `act` endpoint on Ray Serve against the same model behind a minimal
FastAPI + uvicorn app, and requests failed while a promotion and a rollback roll out, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_serve                       # defaults
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_serve --requests 100 --seconds 3   # quick

1. Model. Two policies of ``--preset`` (default) for ``--world`` (carracing), random weights (latency
   does not depend on them), registered as v1 and v2 in a temporary registry.
2. Servers. Serve: this process starts a local Ray cluster and ``serving.app.deploy(version=1)``
   on a free port (one replica, as the flows deploy it). Plain: ``python -m benchmarks.bench_serve
   fastapi`` in a subprocess, uvicorn with one worker and a minimal FastAPI app (the request
   model, raw_base64 decoding, ``Policy.act``, a JSON answer; one torch thread, as a replica).
3. Load, from a client process of its own (``load`` below), the same for both servers: the same
   request (K frames of random pixels, ``raw_base64``, the world's state and task as ``/healthz``
   says). Latency: ``--requests`` (500) sequential requests on one keep-alive session after 50
   warm-up requests; p50/p99 end to end (``requests.Session``). Throughput: ``--clients`` (16)
   concurrent keep-alive clients (aiohttp, one event loop) for ``--seconds`` (10) after 2 s of
   warm-up; answered requests per second, non-2xx counted as failures.
4. Rollout. A steady stream from another process (``stream`` below: one keep-alive session,
   back to back) while this process deploys v2 (a promotion), waits ``--hold`` (3) s, deploys v1
   again (a rollback) and waits ``--hold`` s more. ``failed``: non-2xx answers and errors;
   ``unversioned``: 2xx answers that name no model version; ``versions_seen``: answers per version.

Output: a line per figure beside its baseline on stderr, and last one JSON object on stdout with
every figure (``p50_ms``, ``p99_ms``, ``p50_ms_fastapi``, ``p99_ms_fastapi``, ``rps_16``,
``rps_16_fastapi``, ``failed``, ``requests_during_rollout``, ``versions_seen``, ``cpu_count``,
``git_commit``, ...). Targets: p50 <= 10 ms at 1 client; rps_16 >= rps_16_fastapi; failed = 0.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from pydantic import BaseModel


def act_payload(health: dict, *, seed: int = 0) -> dict:
    """A valid POST /act body for the endpoint whose GET /healthz answered ``health``: K random frames
    as raw_base64, zeros for each state input, the first task. Names no world's fields."""
    rng = np.random.default_rng(seed)
    size = health["image_size"]
    frames = [base64.b64encode(rng.integers(0, 256, (size, size, 3), dtype=np.uint8).tobytes()).decode()
              for _ in range(health["history"])]
    body: dict = {"frames": frames, "encoding": "raw_base64"}
    if health.get("state"):
        body["state"] = {name: 0.0 for name in health["state"]}
    if health.get("tasks"):
        body["task"] = health["tasks"][0]
    return body


def _wait_http(url: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = requests.get(url, timeout=2)
            if r.ok:
                return r.json()
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.3)


# --- the client processes ---------------------------------------------------------------------------------

def stream(*, url: str, stop_file: str, ready_file: str, timeout_s: float = 5.0) -> dict:
    """POST ``url``/act back to back on one keep-alive session until ``stop_file`` exists; touches
    ``ready_file`` after the first answer. Counts failures (non-2xx, errors) and answers per version."""
    session = requests.Session()
    body = act_payload(session.get(f"{url}/healthz", timeout=timeout_s).json())
    n, failed, unversioned, versions, errors = 0, 0, 0, {}, []
    while not os.path.exists(stop_file):
        n += 1
        try:
            r = session.post(f"{url}/act", json=body, timeout=timeout_s)
            if not r.ok:
                failed += 1
                errors.append(f"{r.status_code}: {r.text[:200]}")
            elif (v := r.json().get("model_version")) is None:
                unversioned += 1
            else:
                versions[str(v)] = versions.get(str(v), 0) + 1
        except requests.RequestException as e:
            failed += 1
            errors.append(f"{type(e).__name__}: {e}"[:200])
        if n == 1:
            Path(ready_file).touch()
    return {"requests": n, "failed": failed, "unversioned": unversioned, "versions": versions, "errors": errors[:5]}


def latency(*, url: str, requests_n: int, warmup: int = 50) -> dict:
    """p50/p99 (ms) of ``requests_n`` sequential POST /act on one keep-alive session."""
    session = requests.Session()
    body = act_payload(session.get(f"{url}/healthz", timeout=10).json())
    first = session.post(f"{url}/act", json=body, timeout=10)
    if not first.ok:
        raise RuntimeError(f"{url}/act answered {first.status_code}: {first.text[:500]}")
    times, failed = [], 0
    for i in range(warmup + requests_n):
        t0 = time.perf_counter()
        r = session.post(f"{url}/act", json=body, timeout=10)
        dt = (time.perf_counter() - t0) * 1e3
        failed += not r.ok
        if i >= warmup:
            times.append(dt)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "failed": failed, "n": len(times)}


def throughput(*, url: str, clients: int, seconds: float, warmup_s: float = 2.0) -> dict:
    """Answered requests per second with ``clients`` concurrent keep-alive clients (aiohttp)."""
    import aiohttp

    body = act_payload(requests.get(f"{url}/healthz", timeout=10).json())

    async def run() -> dict:
        counts = {"ok": 0, "failed": 0}
        start = time.perf_counter()
        t_measure, t_end = start + warmup_s, start + warmup_s + seconds
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as s:
            async def client() -> None:
                while (now := time.perf_counter()) < t_end:
                    async with s.post(f"{url}/act", json=body) as r:
                        await r.read()
                        if now >= t_measure:
                            counts["ok" if r.status < 300 else "failed"] += 1

            await asyncio.gather(*(client() for _ in range(clients)))
        return {"rps": counts["ok"] / seconds, "failed": counts["failed"]}

    return asyncio.run(run())


# --- the plain app ----------------------------------------------------------------------------------------

class PlainActRequest(BaseModel):
    """The plain app's request: K raw_base64 frames (module level: FastAPI resolves annotations here)."""

    frames: list[str]
    encoding: str = "raw_base64"


def fastapi_app(*, checkpoint: str, version: int):
    """A minimal FastAPI app serving the policy saved at ``checkpoint``, as one writes it by hand."""
    import torch
    from fastapi import FastAPI

    from models.policy import load

    torch.set_num_threads(1)
    policy = load(checkpoint)
    c = policy.config

    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"model_version": version, "history": c.history, "image_size": c.image_size, "state": [], "tasks": []}

    @app.post("/act")
    def act(request: PlainActRequest) -> dict:
        frames = np.stack([np.frombuffer(base64.b64decode(f), np.uint8).reshape(c.image_size, c.image_size, 3)
                           for f in request.frames])
        return {"action": policy.act(frames[None])[0].tolist(), "model_version": version}

    return app


# --- the run ----------------------------------------------------------------------------------------------

def _client(mode: str, **kwargs) -> dict:
    """Run one client function in a process of its own; returns its JSON answer."""
    args = [sys.executable, "-m", "benchmarks.bench_serve", mode, "--kwargs", json.dumps(kwargs)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{mode} client failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _register(registry, tmp: Path, *, preset_name: str, world: str) -> None:
    import dataclasses

    import torch

    from models.policy import Policy, preset, save
    from sim import worlds

    spec = worlds.spec(world)
    if spec.policy_state or len(spec.tasks) > 1:
        raise ValueError(f"the bench's plain app serves pixels-only policies; world {world!r} has state or tasks")
    cfg = dataclasses.replace(preset(preset_name), action_low=tuple(a.low for a in spec.actions),
                              action_high=tuple(a.high for a in spec.actions))
    for seed in (1, 2):
        torch.manual_seed(seed)
        save(Policy(cfg).eval(), tmp / f"policy{seed}")
        registry.register("policy", tmp / f"policy{seed}", kind="policy")


def bench(args: argparse.Namespace) -> dict:
    import ray

    from serving.app import INGRESS_ENV, deploy
    from serving.cluster import free_port
    from stages.registry import Registry, git_commit

    os.environ[INGRESS_ENV] = args.ingress
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    registry = Registry(str(tmp / "registry"))
    _register(registry, tmp, preset_name=args.preset, world=args.world)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    port, plain_port = free_port(), free_port()
    common = dict(registry_uri=registry.uri, model_name="policy", world=args.world, port=port, app_name="act-bench",
                  route_prefix="/bench")
    url = deploy(**common, version=1)
    plain = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_serve", "fastapi", "--kwargs",
                              json.dumps({"checkpoint": str(tmp / "policy1"), "version": 1, "port": plain_port})])
    plain_url = f"http://127.0.0.1:{plain_port}"
    try:
        _wait_http(f"{plain_url}/healthz")
        figures: dict = {}
        for name, u in (("", url), ("_fastapi", plain_url)):
            lat = _client("latency", url=u, requests_n=args.requests)
            rps = _client("throughput", url=u, clients=args.clients, seconds=args.seconds)
            figures.update({f"p50_ms{name}": round(lat["p50_ms"], 2), f"p99_ms{name}": round(lat["p99_ms"], 2),
                            f"rps_{args.clients}{name}": round(rps["rps"], 1),
                            f"failed_load{name}": lat["failed"] + rps["failed"]})
        stop, ready = tmp / "stop", tmp / "ready"
        streamer = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_serve", "stream", "--kwargs",
                                     json.dumps({"url": url, "stop_file": str(stop), "ready_file": str(ready)})],
                                    stdout=subprocess.PIPE, text=True)
        _wait_file(ready, streamer)
        t0 = time.perf_counter()
        deploy(**common, version=2)  # promotion
        time.sleep(args.hold)
        deploy(**common, version=1)  # rollback
        time.sleep(args.hold)
        rollout_s = time.perf_counter() - t0
        stop.touch()
        out, _ = streamer.communicate(timeout=60)
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        plain.terminate()
        plain.wait(timeout=30)
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    figures.update({"failed": result["failed"] + result["unversioned"], "requests_during_rollout": result["requests"],
                    "versions_seen": result["versions"], "rollout_s": round(rollout_s, 1),
                    "rollout_errors": result["errors"], "preset": args.preset, "world": args.world,
                    "ingress": args.ingress,
                    "clients": args.clients, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_1m": os.getloadavg()[0], "git_commit": git_commit() or "unknown"})
    return figures


def _wait_file(path: Path, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the request stream did not start (exit code {proc.poll()})")
        time.sleep(0.1)


def _report(f: dict) -> None:
    n = f["clients"]
    lines = [("p50 at 1 client (target <= 10 ms)", f"{f['p50_ms']:.2f} ms", f"{f['p50_ms_fastapi']:.2f} ms"),
             ("p99 at 1 client", f"{f['p99_ms']:.2f} ms", f"{f['p99_ms_fastapi']:.2f} ms"),
             (f"throughput at {n} clients", f"{f[f'rps_{n}']:.1f} req/s", f"{f[f'rps_{n}_fastapi']:.1f} req/s"),
             ("failed under load", str(f["failed_load"]), str(f["failed_load_fastapi"]))]
    print(f"{'':36} {'Serve, ' + f['ingress']:>14} {'FastAPI+uvicorn':>16}", file=sys.stderr)
    for name, serve_v, plain_v in lines:
        print(f"{name:36} {serve_v:>14} {plain_v:>16}", file=sys.stderr)
    print(f"rollout v1 -> v2 -> v1 under a stream: {f['failed']} failed of {f['requests_during_rollout']} "
          f"(versions seen {f['versions_seen']}, {f['rollout_s']} s)", file=sys.stderr)
    print(f"machine: {f['cpu_count']} CPUs, load {f['loadavg_1m']:.1f}, commit {f['git_commit'][:12]}",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "latency", "throughput", "stream", "fastapi"],
                        help="bench (the whole run) or one of its helper processes")
    parser.add_argument("--kwargs", default="{}", help="helper processes: their keyword arguments as JSON")
    parser.add_argument("--preset", default="default", help="policy preset (default: %(default)s)")
    parser.add_argument("--world", default="carracing", help="a pixels-only world (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=500, help="sequential requests for p50/p99")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients for throughput")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds of throughput")
    parser.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy",
                        help="Serve's ingress (serving.app.ingress_env; default: %(default)s)")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds after each rollout")
    args = parser.parse_args(argv)
    kwargs = json.loads(args.kwargs)
    if args.mode == "fastapi":
        import uvicorn

        port = kwargs.pop("port")
        uvicorn.run(fastapi_app(**kwargs), host="127.0.0.1", port=port, log_level="warning")
        return
    if args.mode != "bench":
        result = {"latency": latency, "throughput": throughput, "stream": stream}[args.mode](**kwargs)
        print(json.dumps(result), flush=True)
        return
    figures = bench(args)
    _report(figures)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
