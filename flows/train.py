"""Train flow: post-train the world model or the policy on Ray Train and register the checkpoint.

The policy warm-starts from the champion and the world model from its latest version, when their
config matches the preset in force. Lineage records the table versions, the config digest, the
parent version and the git commit; the resolved config is saved beside the weights.
"""
from __future__ import annotations

import dataclasses
import json
import os

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.runtime import MODELS, POLICY, Context, ensure_ray
from sim import worlds
from stages.registry import git_commit
from stages.train import train_model


def _same(a: dict, b: dict) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def warm_start(ctx: Context, kind: str, config: dict):
    """The registry version to continue from, if its config matches `config`."""
    if not ctx.config.train.warm_start:
        return None
    mv = ctx.registry.get(kind, alias="champion") if kind == POLICY else None
    if mv is None:
        versions = ctx.registry.versions(kind)
        mv = versions[-1] if versions else None
    return mv if mv is not None and _same(mv.config, config) else None


@task(name="ray-train", cache_policy=NO_CACHE)
def run_training(ctx: Context, kind: str, turn: int, init_dir: str | None, run_name: str | None = None) -> dict:
    t = ctx.config.train
    model_config = getattr(ctx.config, kind)
    weighted = kind == POLICY and t.oversample_events and ctx.lake.exists("clips")
    spec = ctx.config.spec
    # synthetic rows know only the static part of the state (``stages.synthesize.variant_states``):
    # a policy that reads moving state trains on real rows
    moving = any(name not in spec.static_state for name in spec.policy_state)
    return train_model(
        kind, frames_uri=ctx.lake.table_uri("frames"), model_config=model_config,
        storage_path=os.path.join(ctx.work_dir, "ray_results"), storage_options=ctx.storage_options,
        num_workers=t.num_workers, cpus_per_worker=t.cpus_per_worker, use_gpu=t.use_gpu,
        synthetic_fraction=t.synthetic_fraction if kind == POLICY else 0.0, init_dir=init_dir,
        filter=None if kind == POLICY and not moving else "origin = 'real'", seed=turn,
        state_index=spec.policy_state_index.tolist(), run_name=run_name or f"{kind}-turn{turn}",
        clips_uri=ctx.lake.table_uri("clips") if weighted else None, duplicate_weight=t.duplicate_weight,
        world=spec.name, prefetch=t.prefetch, checkpoint_every=t.checkpoint_every,
        data_version=json.dumps({n: ctx.lake.version(n) for n in ("frames", "clips") if ctx.lake.exists(n)}))


@flow(name="train")
def train_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
               world: str = worlds.DEFAULT, overrides: list[str] | None = None,
               config_file: str | None = None, model: str = POLICY, turn: int | None = None) -> dict:
    """Train `model` ("policy", "world_model" or "dynamics") and register a new version; returns a summary."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    ctx = Context.create(config=config, lake=lake, landing=landing, world=world, overrides=overrides,
                         config_file=config_file)
    if not ctx.lake.exists("frames"):
        raise ValueError(f"no frames table in {ctx.world_uri}: run `worldloop curate` first")
    ensure_ray()
    turn = ctx.current_turn() if turn is None else turn
    model_config = dataclasses.asdict(getattr(ctx.config, model))
    parent = warm_start(ctx, model, model_config)
    result = run_training(ctx, model, turn, ctx.registry.fetch(parent) if parent else None)
    lineage = {"turn": turn, "config": ctx.config.name, "config_digest": ctx.config.digest(),
               "tables": {n: ctx.lake.version(n) for n in ("frames", "episodes", "clips")
                          if ctx.lake.exists(n)},
               "parent_version": parent.version if parent else None, "git_commit": git_commit()}
    metrics = {f"train_{k}": v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    with open(os.path.join(result["checkpoint_dir"], "train_config.json"), "w") as f:  # as LeRobot does
        json.dump({"flywheel": ctx.config.to_dict(), "model": model, "lineage": lineage}, f, indent=2, default=str)
    mv = ctx.registry.register(model, result["checkpoint_dir"], kind=model, metrics=metrics,
                               lineage=lineage, config=model_config)
    summary = {"stage": "train", "model": model, "turn": turn, "version": mv.version,
               "warm_start_from": lineage["parent_version"], "metrics": metrics,
               "artifact_uri": mv.artifact_uri}
    get_run_logger().info("train: %s", summary)
    return summary
