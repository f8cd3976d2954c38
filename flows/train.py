"""Train flow: post-train the world model or the policy on Ray Train and register the checkpoint.

The policy warm-starts from the champion and the world model from its latest version, when their
config matches the preset in force. Lineage records the table versions, the config digest, the
parent version and the git commit; the resolved config is saved beside the weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.promote import champion_gaps
from flows.runtime import DYNAMICS, MODELS, POLICY, WORLD_MODEL, Context, ensure_ray
from sim import worlds
from stages.registry import git_commit
from stages.schemas import of_world
from stages.train import train_model


# a model config's training recipe: changing these between turns changes how the next fit runs,
# not what the weights mean, so the next turn still continues from the latest version
RECIPE_FIELDS = ("lr", "weight_decay", "batch_size", "steps")


def continues(previous: dict, config: dict) -> bool:
    """Whether weights trained under model config ``previous`` can continue under ``config``: the two
    agree on every field but the recipe's (``RECIPE_FIELDS``), compared in their JSON form."""
    def model(c: dict) -> dict:
        return {k: v for k, v in json.loads(json.dumps(c)).items() if k not in RECIPE_FIELDS}
    return model(previous) == model(config)


def warm_start(ctx: Context, kind: str, config: dict):
    """The registry version to continue from: the latest of `kind`, if its weights can continue under
    `config` (``continues``: the same model, whatever the recipe).

    Training is cumulative across turns; the gate decides only what is served. A policy candidate
    the gate kept out still carries its turn's fit: restarting from the champion would throw that
    away every turn the gate does not pass (on the arm, a candidate 0.08 above its champion over 100
    scenes, CI lower bound 0.00, was kept out; the next turn would have fitted from the champion
    again)."""
    if not ctx.config.train.warm_start:
        return None
    versions = ctx.registry.versions(kind)
    mv = versions[-1] if versions else None
    return mv if mv is not None and continues(mv.config, config) else None


def recipe_digest(ctx: Context) -> str:
    """What makes two ablations comparable: the policy's config and the synthetic share."""
    recipe = {"policy": dataclasses.asdict(ctx.config.policy), "synthetic_fraction": ctx.config.train.synthetic_fraction}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def synthetic_verdict(ctx: Context) -> dict:
    """Whether the policy may train on synthetic frames: {"use": bool, "reason": str, "ablation": row}."""
    if ctx.config.train.synthetic_fraction <= 0:
        return {"use": False, "reason": "train.synthetic_fraction is 0"}
    if not ctx.config.synth.require_lift:
        return {"use": True, "reason": "synth.require_lift is off: synthetic frames are used without an ablation"}
    rows = [] if not ctx.lake.exists("ablations") else ctx.lake.read(
        "ablations", filter=f"{of_world(ctx.world_name)} AND recipe = '{recipe_digest(ctx)}'").to_pylist()
    if not rows:
        return {"use": False, "reason": "left out: no ablation of this recipe on this lake has shown a lift yet "
                                        "(run `worldloop ablate`)"}
    last = max(rows, key=lambda r: r["created_at"])
    last["created_at"] = last["created_at"].isoformat()
    shown = (f"{last['mean_diff']:+.3g} (95% CI {last['ci_low']:+.3g} .. {last['ci_high']:+.3g}) over "
             f"{last['scenes']} scenes x {last['seeds']} seeds, turn {last['turn']}")
    if last["ci_low"] > 0:
        return {"use": True, "reason": f"used: the latest ablation shows a lift of {shown}", "ablation": last}
    return {"use": False, "reason": f"left out: the latest ablation shows no lift, {shown}", "ablation": last}


def training_gaps(ctx: Context) -> dict[str, float]:
    """The champion's shortfall to the expert per task, keyed by the task's text as the frames hold
    it (what ``train.focus`` spends the policy's steps on); empty without a champion or evaluations."""
    champion = ctx.registry.get(POLICY, alias="champion")
    if champion is None or ctx.config.train.focus <= 0:
        return {}
    spec = ctx.config.spec
    return {spec.instruction(task): gap for task, gap in champion_gaps(ctx, champion.version).items()}


@task(name="ray-train", cache_policy=NO_CACHE)
def run_training(ctx: Context, kind: str, turn: int, init_dir: str | None, run_name: str | None = None,
                 condition_dir: str | None = None) -> dict:
    t = ctx.config.train
    model_config = getattr(ctx.config, kind)
    weighted = kind == POLICY and t.oversample_events and ctx.lake.exists("clips")
    spec = ctx.config.spec
    return train_model(
        kind, frames_uri=ctx.lake.table_uri("frames"), model_config=model_config,
        storage_path=os.path.join(ctx.work_dir, "ray_results"), storage_options=ctx.storage_options,
        num_workers=t.num_workers, cpus_per_worker=t.cpus_per_worker, use_gpu=t.use_gpu,
        synthetic_fraction=t.synthetic_fraction if kind == POLICY else 0.0, init_dir=init_dir,
        filter=None if kind == POLICY else "origin = 'real'", seed=turn,
        state_index=spec.policy_state_index.tolist(), run_name=run_name or f"{kind}-turn{turn}",
        clips_uri=ctx.lake.table_uri("clips") if weighted else None, duplicate_weight=t.duplicate_weight,
        world=spec.name, prefetch=t.prefetch, checkpoint_every=t.checkpoint_every,
        data_version=json.dumps({n: ctx.lake.version(n) for n in ("frames", "clips") if ctx.lake.exists(n)}),
        condition_dir=condition_dir, precision=t.precision,
        task_gaps=training_gaps(ctx) if kind == POLICY else None, focus=t.focus if kind == POLICY else 0.0)


def conditioning(ctx: Context, kind: str):
    """The dynamics version whose vectors condition a generator that reads them (None otherwise): the
    latest whose width and frames match."""
    c = getattr(ctx.config, kind)
    if kind != WORLD_MODEL or not c.condition_dim:
        return None
    matching = [mv for mv in ctx.registry.versions(DYNAMICS)
                if mv.config["embed"] == c.condition_dim and mv.config["image_size"] == c.image_size]
    if not matching:
        raise ValueError(f"the world model reads the dynamics model's {c.condition_dim}-wide vector and no dynamics "
                         "model of that width is in the registry: run `worldloop train --model dynamics` first "
                         "(or --set train.condition_generator=false)")
    return matching[-1]


@flow(name="train")
def train_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
               world: str = worlds.DEFAULT, overrides: list[str] | None = None,
               config_file: str | None = None, model: str = POLICY, turn: int | None = None) -> dict:
    """Train `model` ("policy", "world_model" or "dynamics") and register a new version; returns a summary."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    ctx = Context.create(config=config, lake=lake, landing=landing, world=world, overrides=overrides,
                         config_file=config_file)
    with ctx.writer_lock():
        if not ctx.lake.exists("frames"):
            raise ValueError(f"no frames table in {ctx.world_uri}: run `worldloop curate` first")
        ensure_ray()
        turn = ctx.current_turn() if turn is None else turn
        model_config = dataclasses.asdict(getattr(ctx.config, model))
        parent = warm_start(ctx, model, model_config)
        verdict = synthetic_verdict(ctx) if model == POLICY else None
        if verdict is not None and not verdict["use"]:
            ctx = dataclasses.replace(ctx, config=dataclasses.replace(
                ctx.config, train=dataclasses.replace(ctx.config.train, synthetic_fraction=0.0)))
        teacher = conditioning(ctx, model)
        result = run_training(ctx, model, turn, ctx.registry.fetch(parent) if parent else None,
                              condition_dir=ctx.registry.fetch(teacher) if teacher else None)
        lineage = {"turn": turn, "config": ctx.config.name, "config_digest": ctx.config.digest(),
                   "condition_version": teacher.version if teacher else None,
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
        if teacher is not None:
            summary["conditioned_on"] = f"{DYNAMICS}:v{teacher.version}"
        if verdict is not None:
            summary["synthetic"] = {"used": verdict["use"], "reason": verdict["reason"],
                                    "fraction": ctx.config.train.synthetic_fraction}
        get_run_logger().info("train: %s", summary)
        return summary
