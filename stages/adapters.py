"""Thin Ray adapters: map the pure stages over sources, seeds and batches on a Ray cluster.

Resources are declared here, beside the adapters. Everything a task needs travels as plain,
picklable arguments (URIs, config dicts, driver specs), so the same code runs on a laptop's local
cluster and on a multi-node cluster with the lake on S3.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any

import numpy as np
import ray

from stages.synthesize import Variant, synthesize_batch

ROLLOUT_CPUS = 1
SYNTH_CPUS = 1


def _bounded(submit, items: list, parallelism: int, desc: str) -> list:
    """Run `submit(item) -> ObjectRef` over items with at most `parallelism` in flight, in order,
    with a progress bar named `desc` on stderr."""
    from tqdm import tqdm

    results, pending = [None] * len(items), {}
    with tqdm(total=len(items), desc=desc, unit="episode", file=sys.stderr, mininterval=2.0,
              disable=not items) as bar:
        def collect(ref) -> None:
            results[pending.pop(ref)] = ray.get(ref)
            bar.update()
        for i, item in enumerate(items):
            if len(pending) >= max(1, parallelism):
                collect(ray.wait(list(pending), num_returns=1)[0][0])
            pending[submit(item)] = i
        while pending:
            collect(ray.wait(list(pending), num_returns=1)[0][0])
    return results


def _policy_act(model):
    """The policy's act over (frames, state, tasks), passing only the inputs its config reads."""
    return lambda frames, state, tasks: model.act(frames, state if model.config.state_dim else None,
                                                  list(tasks) if model.config.task_vocab else None)


@functools.lru_cache(maxsize=2)
def _load_policy(directory: str, created_at: str):
    """A registered version's weights, loaded once per worker process (``created_at`` tells apart
    a version of a lake deleted and made again at the same path)."""
    from models import policy as policy_model

    return policy_model.load(directory)


def _registered(spec: dict) -> tuple[str, Any]:
    """(local directory, model version) of the registry version a driver spec names."""
    from stages.registry import Registry

    registry = Registry(spec["registry_uri"], storage_options=spec.get("storage_options"))
    mv = registry.get(spec["name"], version=spec["version"])
    if mv is None:
        raise ValueError(f"{spec['name']} version {spec['version']} is not in the registry at {spec['registry_uri']}")
    return registry.fetch(mv), mv


def _registered_policy(spec: dict):
    """(policy, "name:vN") of a ``{"kind": "policy", ...}`` driver spec."""
    directory, mv = _registered(spec)
    return _load_policy(directory, mv.created_at.isoformat()), f"{spec['name']}:v{mv.version}"


def _build_driver(spec: dict, world):
    """A driver from a picklable spec: expert (noisy or not) | random | policy (registry) | checkpoint
    (a local policy directory) | endpoint (HTTP)."""
    from sim import rollout

    kind = spec["kind"]
    if kind == "expert":
        return world.expert(noisy=bool(spec.get("noisy")))
    if kind == "random":
        return world.random_driver()
    if kind == "policy":
        model, version = _registered_policy(spec)
        return rollout.PolicyDriver(_policy_act(model), history=model.config.history, name="policy",
                                    policy_version=version)
    if kind == "checkpoint":  # an unregistered policy checkpoint (an ablation's)
        model = _load_policy(spec["directory"], "")
        return rollout.PolicyDriver(_policy_act(model), history=model.config.history, name=spec.get("name", "policy"),
                                    policy_version=spec["directory"])
    if kind == "endpoint":
        from serving.client import ActClient

        client = ActClient(spec["url"], world=world.spec.name)
        return rollout.PolicyDriver(lambda frames, state, tasks: client.act(frames[0], state=state[0],
                                                                            task=tasks[0])[None],
                                    history=spec["history"], name="champion-endpoint",
                                    policy_version=spec.get("version", spec["url"]))
    raise ValueError(f"unknown driver kind {kind!r}")


@ray.remote(num_cpus=ROLLOUT_CPUS)
def _rollout(seed: int, task: str, spec: dict, world: dict, safety: str, log_uri: str | None,
             storage_options: dict | None) -> dict:
    import torch

    from sim import rollout, worlds
    from sim.worlds.base import WorldConfig
    from stages import mcap_log

    torch.set_num_threads(1)
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    w = worlds.get(WorldConfig(**world))
    episode, summary = rollout.run_episode(world=w, seed=seed, task=task, driver=_build_driver(spec, w),
                                           safety=safety, record=log_uri is not None)
    if log_uri is not None:
        mcap_log.write_episode(episode, log_uri, storage_options)
        summary["log_uri"] = log_uri
    return summary


def run_rollouts(scenes: list[tuple[int, str]], *, spec: dict | list[dict], world, safety: str,
                 log_uris: list[str] | None = None, storage_options: dict | None = None,
                 parallelism: int = 2, desc: str = "episodes") -> list[dict]:
    """Drive one episode per (seed, task) scene, `parallelism` at a time; with `log_uris`, each is
    logged as MCAP. `spec` is one driver spec for all scenes, or one per scene; `desc` names the
    progress bar."""
    world_dict = dataclasses.asdict(world)
    specs = spec if isinstance(spec, list) else [spec] * len(scenes)
    items = list(zip(scenes, specs, log_uris or [None] * len(scenes)))
    return _bounded(lambda it: _rollout.remote(it[0][0], it[0][1], it[1], world_dict, safety, it[2],
                                               storage_options), items, parallelism, desc)


@ray.remote(num_cpus=ROLLOUT_CPUS)
def _replay_labels(item: dict, world: dict) -> np.ndarray | None:
    from sim import rollout, worlds
    from sim.worlds.base import WorldConfig

    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    return rollout.replay_labels(world=worlds.get(WorldConfig(**world)), **item)


def replay_labels(items: list[dict], *, world, parallelism: int = 2) -> list[np.ndarray | None]:
    """``sim.rollout.replay_labels`` for each item (its keyword arguments: seed, task, prefix,
    logged_state, actions), `parallelism` at a time; the expert's labels, or None where the world
    could not replay the parent."""
    world_dict = dataclasses.asdict(world)
    return _bounded(lambda item: _replay_labels.remote(item, world_dict), items, parallelism, "replays")


@ray.remote(num_cpus=SYNTH_CPUS)
class WorldModelActor:
    """Holds one world model and its dynamics model and synthesizes batches with them (``stages.synthesize``)."""

    def __init__(self, model_dir: str, dynamics_dir: str, world: dict, threads: int = 1):
        import torch

        from models import dynamics, world_model
        from sim import worlds
        from sim.worlds.base import WorldConfig

        torch.set_num_threads(threads)
        self.model = world_model.load(model_dir).eval()
        self.dynamics = dynamics.load(dynamics_dir).eval()
        self.world = worlds.get(WorldConfig(**world))

    def synthesize(self, batch: dict[str, np.ndarray], **params) -> list[Variant]:
        return Variant.split(synthesize_batch(batch, model=self.model, dynamics=self.dynamics, world=self.world,
                                              **params))


def synthesize_batches(model_dir: str, dynamics_dir: str, batches: list[dict], *, world: dict, params: dict[str, Any],
                       seed: int, parallelism: int = 1) -> list[Variant]:
    """Hold the world model and its dynamics model in `parallelism` Ray actors and synthesize the
    batches across them (batch i with seed ``seed + i``); the variants of all batches, in order."""
    from ray.util import ActorPool

    pool = ActorPool([WorldModelActor.remote(model_dir, dynamics_dir, world, threads=SYNTH_CPUS)
                      for _ in range(max(1, parallelism))])
    items = list(enumerate(batches))
    done = pool.map(lambda a, item: a.synthesize.remote(item[1], **params, seed=seed + item[0]), items)
    return [variant for variants in done for variant in variants]


@ray.remote(num_cpus=ROLLOUT_CPUS)
def _neural_rollouts(drivers: dict[str, dict], starts: list, *, world: dict, models: dict[str, dict], horizon: int,
                     seed: int) -> dict[str, list[dict]]:
    import torch

    from models import dynamics, world_model
    from sim import neural, worlds
    from sim.worlds.base import WorldConfig

    torch.set_num_threads(ROLLOUT_CPUS)
    w = worlds.get(WorldConfig(**world))
    sim = neural.NeuralSim(world_model.load(_registered(models["world_model"])[0]),
                           dynamics.load(_registered(models["dynamics"])[0]), w.spec, seed=seed)
    out = {}
    for role, spec in drivers.items():
        if spec["kind"] == "policy":
            model = _registered_policy(spec)[0]
            act, history = _policy_act(model), model.config.history
        elif spec["kind"] == "random":
            rng = np.random.default_rng(seed)
            act = lambda frames, state, tasks: rng.uniform(w.spec.action_low, w.spec.action_high,  # noqa: E731
                                                           (len(frames), len(w.spec.actions))).astype(np.float32)
            history = 1
        else:
            raise ValueError(f"a {spec['kind']} driver cannot drive in the neural simulator (it reads the real one)")
        out[role] = neural.run_policy(sim, starts, lambda obs: act(obs["frames"][:, -history:], obs["state"],
                                                                   obs["tasks"]), horizon=horizon)
    return out


def neural_rollouts(drivers: dict[str, dict], starts: list, *, world, models: dict[str, dict], horizon: int,
                    seed: int = 0) -> dict[str, list[dict]]:
    """Each driver (a policy or random driver spec, by role) driven ``horizon`` steps from every
    start in the neural simulator of the registered world model and dynamics model (``models``:
    {"world_model": spec, "dynamics": spec}: registry URI, storage options, name, version), in one Ray task;
    one summary row per start and role (``sim.neural.run_policy``)."""
    return ray.get(_neural_rollouts.remote(drivers, starts, world=dataclasses.asdict(world), models=models,
                                           horizon=horizon, seed=seed))
