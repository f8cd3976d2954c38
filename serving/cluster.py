"""A long-lived local service: the Ray cluster `worldloop up` starts (or joins), with Serve on it.

Endpoints deployed by a command live in that command's Ray cluster; a plain `worldloop run`
starts its own and the endpoint dies with it. ``up`` starts a head node with ``ray start --head``
in its own temp dir (so nothing else on the machine shares it) and Serve's ingress (serving.app.start_serve) on
``host:port``; Serve's controller is detached and outlives the driver that started it. What was
started is recorded in a state file, ``<home>/.worldloop/cluster.json`` (home: ``$WORLDLOOP_HOME``,
else the working directory): the address, the temp dir, the processes it owns, the HTTP address.
``flows.runtime.ensure_ray`` connects to that cluster when it is alive and no ``RAY_ADDRESS`` is
set, so `worldloop run` and Prefect-run flows deploy into it and the printed URL keeps answering.

``down`` stops exactly what ``up`` started: Serve, then the processes whose command line names
``up``'s temp dir and their children (raylet first, GCS last, as ``ray stop`` orders them),
SIGTERM then SIGKILL after a grace period. Never ``ray stop``: that kills every Ray on the
machine. With ``RAY_ADDRESS`` set, ``up`` joins that cluster and only makes sure Serve runs there;
``down`` then shuts Serve down only if ``up`` started it, and leaves the cluster alone.

The cluster's processes inherit ``up``'s environment (Ray tasks do not see a driver's variables).
``app_builder`` builds the same ``act`` application from Serve's config file format
(``serving/config.yaml``) for ``serve run`` / ``serve deploy`` on any cluster.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_FILE = "cluster.json"


def state_path(*, home: str | None = None) -> Path:
    """Where ``up`` records what it started: ``<home>/.worldloop/cluster.json``."""
    return Path(home or os.environ.get("WORLDLOOP_HOME") or os.getcwd()).absolute() / ".worldloop" / STATE_FILE


def read_state(*, home: str | None = None) -> dict | None:
    """The recorded state, or None when there is none (or it is unreadable, e.g. half-written)."""
    try:
        return json.loads(state_path(home=home).read_text())
    except (OSError, ValueError):
        return None


def running_address(*, home: str | None = None) -> str | None:
    """The address of the cluster ``up`` recorded, when it is alive; None otherwise."""
    state = read_state(home=home)
    return state["address"] if state and _alive(state) else None


def check_bind(*, host: str, port: int) -> None:
    """Refuse a bad port, and any non-loopback host unless a bearer token is configured."""
    from serving.common import api_token

    if not 1 <= port <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port}")
    try:
        api_token(host)
    except PermissionError as e:
        raise ValueError(str(e)) from None


def up(*, host: str = "127.0.0.1", port: int | None = None, ray_port: int | None = None,
       num_cpus: int | None = None, home: str | None = None, address: str | None = None,
       timeout_s: float = 120.0) -> dict:
    """Start (or join) the long-lived cluster and make sure Serve's ingress runs on it.

    ``port`` defaults to ``$WORLDLOOP_SERVE_PORT`` or 8000 (the flows' default endpoint port);
    ``address`` / ``$RAY_ADDRESS`` names an existing cluster to join instead of starting one.
    Idempotent: with ``up``'s cluster alive it only makes sure Serve runs. Returns the state and a
    one-line ``message``.
    """
    port = port if port is not None else int(os.environ.get("WORLDLOOP_SERVE_PORT", "8000"))
    check_bind(host=host, port=port)
    state = read_state(home=home)
    if state and _alive(state):
        serve_http = _ensure_serve(state["address"], host=host, port=port)
        return {**state, **serve_http, "status": "running",
                "message": f"already up: Ray at {state['address']}, Serve at {serve_http['url']}"}
    cleared = ""
    if state:  # a crashed or killed cluster: clear what is left of it before starting anew
        _stop(state, grace_s=5.0)
        state_path(home=home).unlink(missing_ok=True)
        cleared = f"the recorded cluster at {state['address']} was not running (cleared); "
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        state = {"address": address, "owned": False, "temp_dir": None, "processes": []}
    else:
        _check_free(host=host, port=port, what="Serve's HTTP port (--port)")
        if ray_port:
            _check_free(host="127.0.0.1", port=ray_port, what="the Ray head's port (--ray-port)")
        state = _start_head(ray_port=ray_port, num_cpus=num_cpus or max(4, os.cpu_count() or 1),
                            timeout_s=timeout_s)
    state["started_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write_state(state, home=home)  # before Serve: a failure below still leaves `down` what to stop
    try:
        state.update(_ensure_serve(state["address"], host=host, port=port, timeout_s=timeout_s))
    except Exception:
        if state["owned"]:
            _stop(state, grace_s=5.0)
            state_path(home=home).unlink(missing_ok=True)
        raise
    _write_state(state, home=home)
    stops = ("`worldloop down` stops it" if state["owned"] else
             "joined that cluster: `worldloop down` leaves it running and stops only a Serve that `up` started")
    return {**state, "status": "started",
            "message": f"up: {cleared}Ray at {state['address']}, Serve at {state['url']}; {stops}"}


def down(*, home: str | None = None, grace_s: float = 10.0) -> dict:
    """Stop what ``up`` started (Serve, then its own Ray processes) and remove the state file.

    Harmless when nothing is up. Returns the pids stopped and a one-line ``message``.
    """
    path = state_path(home=home)
    state = read_state(home=home)
    if state is None:
        path.unlink(missing_ok=True)  # an unreadable file is no state either
        return {"status": "not running", "message": f"nothing to stop (no {path})"}
    alive = _alive(state)
    serve_stopped = False
    haproxy_dirs = _haproxy_dirs(state) if state["owned"] else set()  # before Serve stops its HAProxy
    if alive and (state["owned"] or state.get("serve_started")):
        with contextlib.suppress(Exception):  # the processes go below anyway; a failure here is not fatal
            from ray import serve

            with _driver(state["address"]):
                serve.shutdown()
            serve_stopped = True
    stopped = _stop(state, grace_s=grace_s) if state["owned"] else {"terminated": [], "killed": []}
    for folder in haproxy_dirs:
        shutil.rmtree(folder, ignore_errors=True)
    path.unlink(missing_ok=True)
    what = (f"stopped Ray at {state['address']} ({len(stopped['terminated']) + len(stopped['killed'])} "
            f"processes)" if state["owned"] else f"left the cluster at {state['address']} running")
    if not alive:
        what = f"the cluster at {state['address']} was not running; cleared what was left of it"
    return {"status": "stopped", "address": state["address"], "serve_stopped": serve_stopped, **stopped,
            "message": f"down: {what}{', Serve shut down' if serve_stopped else ''}"}


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config builder (``import_path: serving.cluster:app_builder``): one application of a world.

    ``args``: ``app`` (``act``, the default; ``predict``; ``report``), ``lake`` (path or s3:// URI; the
    registry is ``<lake>/<world>``) or ``registry_uri``, ``world`` (default: the default world),
    ``model_name`` (act's policy, default ``policy``; report's reasoner, default ``reasoner``),
    ``alias`` (``champion``), ``num_replicas`` (1), ``host`` (the proxy's host: anything but loopback
    needs ``$WORLDLOOP_API_TOKEN``). Credentials and the token come from the cluster's environment.
    """
    from flows.runtime import storage_options_from_env
    from serving.app import build_one
    from serving.common import api_token
    from sim import worlds
    from stages import storage

    known = {"app", "lake", "registry_uri", "world", "model_name", "alias", "num_replicas", "host"}
    if unknown := set(args) - known:
        raise ValueError(f"unknown app_builder args {sorted(unknown)}; known: {sorted(known)}")
    if ("lake" in args) == ("registry_uri" in args):
        raise ValueError("app_builder needs exactly one of `lake` and `registry_uri`")
    world = args.get("world", worlds.DEFAULT)
    uri = args.get("registry_uri") or storage.join(args["lake"], world)
    uri = uri if "://" in uri else os.path.abspath(uri)
    return build_one(args.get("app", "act"), registry_uri=uri, world=world,
                     storage_options=storage_options_from_env(uri), token=api_token(args.get("host", "127.0.0.1")),
                     alias=args.get("alias", "champion"), num_replicas=int(args.get("num_replicas", 1)),
                     model_name=args.get("model_name"))


# --- the head node ----------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on the loopback that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_free(*, host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # as servers bind: connections of a stopped server lingering in TIME_WAIT do not hold the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"{what} {host}:{port} is not available ({e.strerror}); choose another") from None


def _start_head(*, ray_port: int | None, num_cpus: int, timeout_s: float) -> dict:
    """`ray start --head` in a fresh temp dir; returns the state naming the processes it started."""
    # Ray's unix sockets live under the temp dir and their paths may not exceed ~107 bytes: keep it short.
    temp_dir = tempfile.mkdtemp(prefix="wl-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    gcs_port = ray_port or free_port()
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_cli is None:
        raise RuntimeError("the `ray` command is not installed beside this Python; install ray[serve]")
    cmd = [ray_cli, "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus}", "--disable-usage-stats", "--include-dashboard=false",
           f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}"]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    # Ray turns token auth on for `ray start` when ~/.ray/auth_token exists, but a driver given an
    # explicit address (ensure_ray) never turns it on: keep the two agreeing unless the user chose.
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        done = None
    state = {"address": f"127.0.0.1:{gcs_port}", "owned": True, "temp_dir": temp_dir,
             "num_cpus": num_cpus, "processes": []}
    state["processes"] = [_identity(p) for p in _session_processes(state)]
    if done is None or done.returncode != 0:
        _stop(state, grace_s=5.0)
        tail = "timed out" if done is None else (done.stderr or done.stdout).strip()[-2000:]
        raise RuntimeError(f"`ray start --head --port={gcs_port}` failed: {tail}")
    return state


def _identity(proc) -> dict:
    return {"pid": proc.pid, "create_time": proc.create_time(), "name": proc.name()}


def _session_processes(state: dict) -> list:
    """The live processes ``up`` owns: those recorded (same pid and start time), those whose command
    line names its temp dir, and all their children (Ray's agents and workers, Serve's replicas)."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for rec in state.get("processes", []):
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(rec["pid"])
            if abs(p.create_time() - rec["create_time"]) < 1e-3:
                found[p.pid] = p
    if state.get("temp_dir"):
        for p in psutil.process_iter(["cmdline"]):
            if any(state["temp_dir"] in arg for arg in p.info["cmdline"] or ()):
                found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in p.children(recursive=True)})
    found.pop(os.getpid(), None)
    return [p for p in found.values() if _running(p)]


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _alive(state: dict) -> bool:
    """Whether the recorded cluster still runs: its GCS process (owned) and its port answer."""
    host, _, port = state["address"].rpartition(":")
    if state.get("owned"):
        import psutil

        gcs = [r for r in state.get("processes", []) if r["name"].startswith("gcs_server")]
        try:
            if not gcs or not _running(psutil.Process(gcs[0]["pid"])):
                return False
            if abs(psutil.Process(gcs[0]["pid"]).create_time() - gcs[0]["create_time"]) >= 1e-3:
                return False  # the pid was reused by another process
        except psutil.Error:
            return False
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=2).close()
        return True
    except (OSError, ValueError):
        return False


def _stop(state: dict, *, grace_s: float) -> dict:
    """SIGTERM the owned processes in ``ray stop``'s order (raylet and its children, the rest, GCS
    last), SIGKILL what outlives its share of ``grace_s``; then remove the temp dir."""
    import psutil

    procs = _session_processes(state)
    names = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            names[p.pid] = p.name()
    raylet = [p for p in procs if names.get(p.pid, "").startswith("raylet")]
    gcs = [p for p in procs if names.get(p.pid, "").startswith("gcs_server")]
    raylet_tree = raylet + [c for r in raylet for c in procs if c not in raylet and _descends(c, r)]
    rest = [p for p in procs if p not in raylet_tree and p not in gcs]
    terminated, killed = [], []
    for bucket in (raylet_tree, rest, gcs):
        for p in bucket:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        gone, alive = psutil.wait_procs(bucket, timeout=grace_s / 3)
        terminated += [p.pid for p in gone]
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        killed += [p.pid for p in alive]
    if state.get("temp_dir"):
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
    return {"terminated": sorted(terminated), "killed": sorted(killed)}


def _haproxy_dirs(state: dict) -> set[str]:
    """The per-node folders of Serve's HAProxy files (config, sockets) that the cluster's HAProxy
    command lines name (``-f <base>/<node id>/haproxy.cfg``): only folders named by a Ray node id."""
    import psutil

    dirs = set()
    for p in _session_processes(state):
        with contextlib.suppress(psutil.Error):
            if p.name() == "haproxy":
                cmd = p.cmdline()
                dirs |= {os.path.dirname(cmd[i + 1]) for i, arg in enumerate(cmd[:-1]) if arg == "-f"}
    return {d for d in dirs if re.fullmatch(r"[0-9a-f]{56}", os.path.basename(d))}


def _descends(proc, ancestor) -> bool:
    import psutil

    try:
        return any(a.pid == ancestor.pid for a in proc.parents())
    except psutil.Error:
        return False


# --- Serve ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _driver(address: str) -> Iterator[None]:
    """This process connected to the cluster at ``address`` for the block (disconnected after)."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("this process is already connected to a Ray cluster; run `worldloop up` / "
                           "`worldloop down` from a process of its own")
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def _ensure_serve(address: str, *, host: str, port: int, timeout_s: float = 120.0) -> dict:
    """Start Serve's ingress on ``host:port`` unless Serve runs (its address cannot move); wait
    until it answers. Returns its host, port, URL and whether this call started it."""
    import requests
    from ray.serve.context import _get_global_client

    from serving.app import start_serve

    with _driver(address):
        try:
            _get_global_client()
            started = False
        except Exception:  # Serve is not running on this cluster
            started = True
        start_serve(host=host, port=port)
        http = _get_global_client().http_config
    url_host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    url = f"http://{url_host}:{http.port}/"
    if (http.host, http.port) != (host, port):
        print(f"note: Serve already runs on this cluster at {http.host}:{http.port}; it keeps that address",
              file=sys.stderr)
    deadline = time.monotonic() + timeout_s
    while True:  # any HTTP answer will do: with no application yet the proxy says 503 "not populated"
        try:
            requests.get(f"{url}-/routes", timeout=2)
            break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve's ingress did not answer at {url} within {timeout_s:.0f} s")
        time.sleep(0.5)
    return {"host": http.host, "port": http.port, "url": url, "serve_started": started}


def _write_state(state: dict, *, home: str | None) -> None:
    path = state_path(home=home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)  # readers never see half a file
