"""What every flow needs: the resolved config, the lake and landing URIs, Ray, the registry.

Credentials never travel as flow parameters (they would show in the Prefect UI): storage options
for `s3://` URIs come from the standard AWS_* environment variables.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property

from flows.config import FlywheelConfig, resolve
from sim import worlds

POLICY, WORLD_MODEL, DYNAMICS = "policy", "world_model", "dynamics"
MODELS = (POLICY, WORLD_MODEL, DYNAMICS)


def storage_options_from_env(*uris: str) -> dict | None:
    """Lance-style storage options for s3:// URIs, read from AWS_* variables; None for local paths."""
    if not any(u.startswith("s3://") for u in uris):
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options = {k: os.environ[v] for k, v in (("access_key_id", "AWS_ACCESS_KEY_ID"),
                                             ("secret_access_key", "AWS_SECRET_ACCESS_KEY"))
               if v in os.environ}
    options["region"] = os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    if endpoint:
        options["endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["allow_http"] = "true"
    return options


def code_version() -> str:
    """The package version and, in a git checkout, the commit: lineage for every table row."""
    from importlib.metadata import PackageNotFoundError, version

    from stages.registry import git_commit

    try:
        package = version("worldloop")
    except PackageNotFoundError:
        package = "unknown"
    commit = git_commit()
    return f"{package}+{commit[:12]}" if commit else package


@contextlib.contextmanager
def prefect_settings() -> Iterator[None]:
    """Prefect settings for the flows of a worldloop command (the CLI runs every command in it).

    Without ``PREFECT_API_URL`` Prefect starts a temporary API server for this process, and
    nothing watches flow-run heartbeats there: they let a server mark crashed runs, and this
    one stops with the process. Each flow run's heartbeat thread also costs up to 1 s at the
    run's end (it sleeps in 1 s steps and is joined), a second per stage of a turn. So they are
    off. Against a Prefect server (deployments, workers) Prefect's own settings stand.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def ensure_ray(address: str | None = None) -> None:
    """Connect to RAY_ADDRESS / `address` if given, else to `worldloop up`'s cluster when it runs (so
    endpoints outlive the command), else start (or reuse) a local cluster that stops with the process."""
    import ray

    from serving.cluster import running_address

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or running_address()
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:  # 2 cores: oversubscribe logically so Train workers and rollouts can share (STACK.md)
        ray.init(num_cpus=max(4, os.cpu_count() or 1), **kwargs)


@dataclass
class Context:
    """A run's resolved config and where its world's data lives.

    One lake holds several worlds: each world's tables and registry live under
    ``<lake>/<world>/`` (``world_uri``), so training, evaluation and serving of one world never
    read another's rows. The fleet logs into ``<landing>/<world>/``; curate reads the whole
    landing zone except the folders of other registered worlds.
    """

    config: FlywheelConfig
    lake_uri: str
    landing_uri: str
    storage_options: dict | None = None

    @classmethod
    def create(cls, *, config: str, lake: str, landing: str, world: str = worlds.DEFAULT,
               overrides: list[str] | None = None, config_file: str | None = None) -> "Context":
        """Resolve a preset for a world with overrides; WORLDLOOP_SERVE_PORT overrides the endpoint's
        port (a deployment detail)."""
        lake, landing = _absolute(lake), _absolute(landing)
        resolved = resolve(config, world=world, config_file=config_file, overrides=overrides)
        if os.environ.get("WORLDLOOP_SERVE_PORT"):
            port = int(os.environ["WORLDLOOP_SERVE_PORT"])
            resolved = replace(resolved, serve=replace(resolved.serve, port=port))
        return cls(resolved, lake, landing, storage_options_from_env(lake, landing))

    @property
    def world_name(self) -> str:
        return self.config.world.name

    @cached_property
    def world(self):
        return worlds.get(self.config.world)

    @property
    def world_uri(self) -> str:
        from stages import storage

        return storage.join(self.lake_uri, self.world_name)

    @property
    def fleet_landing_uri(self) -> str:
        from stages import storage

        return storage.join(self.landing_uri, self.world_name)

    @cached_property
    def lake(self):
        from stages.lake import Lake

        return Lake(self.world_uri, storage_options=self.storage_options)

    @cached_property
    def registry(self):
        from stages.registry import Registry

        return Registry(self.world_uri, storage_options=self.storage_options)

    def writer_lock(self):
        """Hold the whole lake's writer lock (``stages.lock.hold``) for a flow that writes it: one
        writing run per lake, however it was started. Nested flows share their parent's lease. The
        lock records the Prefect flow run's name; WORLDLOOP_LOCK_WAIT (seconds to wait for another
        run, default 0: stop at once naming it) and WORLDLOOP_LOCK_TTL (the lease, default 60 s)
        come from the environment."""
        from prefect.runtime import flow_run

        from stages import lock

        run = f"{flow_run.flow_name}/{flow_run.name}" if flow_run.id else ""
        return lock.hold(self.lake_uri, run=run, storage_options=self.storage_options)

    @property
    def work_dir(self) -> str:
        """Local scratch (Ray Train results) — never the lake itself."""
        path = os.path.abspath(os.environ.get("WORLDLOOP_WORK_DIR", ".worldloop"))
        os.makedirs(path, exist_ok=True)
        return path

    def candidate_policy(self, version: int | None = None):
        """The policy version to evaluate or promote: ``version``, or the latest registered one."""
        versions = self.registry.versions(POLICY)
        if not versions:
            raise ValueError("no policy in the registry: run `worldloop train --model policy` first")
        candidate = self.registry.get(POLICY, version=version) if version is not None else versions[-1]
        if candidate is None:
            raise ValueError(f"policy version {version} is not in the registry")
        return candidate

    def world_model_pair(self) -> tuple:
        """(generator, dynamics model) registry versions that run together: the latest world model and
        the dynamics model it was trained on (its lineage's ``condition_version``), else the latest."""
        found = {}
        for name in (WORLD_MODEL, DYNAMICS):
            versions = self.registry.versions(name)
            if not versions:
                raise ValueError(f"no {name} in the registry: run `worldloop train --model {name}` first")
            found[name] = versions[-1]
        paired = found[WORLD_MODEL].lineage.get("condition_version")
        if paired is not None:
            found[DYNAMICS] = self.registry.get(DYNAMICS, version=int(paired))
            if found[DYNAMICS] is None:
                raise ValueError(f"world_model v{found[WORLD_MODEL].version} was trained on dynamics v{paired}, "
                                 "which is not in the registry")
        return found[WORLD_MODEL], found[DYNAMICS]

    def current_turn(self) -> int:
        """The open turn: one past the last turn that finished (the `turns` table), 0 at first."""
        if not self.lake.exists("turns"):
            return 0
        turns = self.lake.read("turns", columns=["turn"]).column("turn").to_pylist()
        return max(turns) + 1 if turns else 0


def _absolute(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)
