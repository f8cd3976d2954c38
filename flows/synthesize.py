"""Synthesize flow: the world model turns compute into recovery data, with provenance.

Parent windows are drawn from real training episodes (mined events preferred), rolled out by the
latest world model and the dynamics model it was trained with (the neural simulator) under
counterfactual actions (`stages.synthesize`), filtered for plausibility,
and written to the same `episodes`/`frames` tables with `origin = synthetic`, the parent episode,
the generator's version, and a per-frame `label_source`. Implausible variants become rejects.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.runtime import DYNAMICS, WORLD_MODEL, Context, ensure_ray
from sim import worlds
from stages import adapters, synthesize
from stages.schemas import EPISODES, REJECTS, of_world, vectors

LABELS = ("expert_replay", "heuristic", "inverse_dynamics")  # synth.labels


@task(name="load-parent-windows", cache_policy=NO_CACHE)
def parent_batch(ctx: Context, turn: int, history: int,
                 image_size: int) -> tuple[list[tuple[str, int]], dict, list[np.ndarray]]:
    """The parent windows (episode id, start step) of the world's real training rows, their batch
    (frames at the world model's ``image_size``) and their states (``stages.synthesize``)."""
    s = ctx.config.synth
    light = ctx.lake.read("frames", columns=["episode_id", "step", "intervention", "signals"],
                          filter=f"origin = 'real' AND split = 'train' AND {of_world(ctx.world_name)}")
    parents = synthesize.select_parents(light, n=s.variants, horizon=s.horizon + 1,
                                        min_step=max(ctx.config.spec.warmup_steps, history), seed=turn)
    windows = [ctx.lake.read("frames", columns=list(synthesize.WINDOW_COLUMNS),
                             filter=f"episode_id = '{e}' AND step >= {t - history + 1} AND step <= {t + s.horizon}")
               for e, t in parents]
    batch, states = synthesize.parent_batch(windows, starts=[t for _, t in parents], history=history,
                                            image_size=image_size)
    return parents, batch, states


@task(name="expert-relabel", cache_policy=NO_CACHE)
def expert_labels(ctx: Context, parents: list[tuple[str, int]], variants: list) -> list[np.ndarray | None]:
    """The world's expert's labels along each kept variant's counterfactual, replayed in the world's
    simulator from its parent's seed and logged actions (``sim.rollout.replay_labels``); None for a
    rejected variant or a parent that cannot be replayed (no seed, a span that does not start at
    step 0, a replay that does not reproduce the logged state)."""
    keep = [i for i, v in enumerate(variants) if v.reject_reason is None]
    episodes = ctx.lake.read("episodes", columns=["episode_id", "seed"], filter="origin = 'real'")
    seeds = dict(zip(episodes.column("episode_id").to_pylist(), episodes.column("seed").to_pylist()))
    task_of = {t.instruction: t.name for t in ctx.config.spec.tasks}
    items, where = [], []
    for i in keep:
        episode, start = parents[i]
        if seeds.get(episode, -1) < 0:
            continue
        rows = ctx.lake.read("frames", columns=["step", "action", "state", "task"],
                             filter=f"episode_id = '{episode}' AND step <= {start}").sort_by("step")
        task = task_of.get(rows.column("task")[0].as_py()) if rows.num_rows else None
        if task is None or rows.column("step").to_pylist() != list(range(start + 1)):
            continue
        actions, states = vectors(rows.column("action")), vectors(rows.column("state"))
        items.append({"seed": int(seeds[episode]), "task": task, "prefix": actions[:start],
                      "logged_state": states[start], "actions": variants[i].driven})
        where.append(i)
    out: list[np.ndarray | None] = [None] * len(variants)
    for i, labels in zip(where, adapters.replay_labels(items, world=ctx.config.world,
                                                       parallelism=ctx.config.synth.replay_parallelism)):
        out[i] = labels
    return out


@flow(name="synthesize")
def synthesize_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
                    world: str = worlds.DEFAULT, overrides: list[str] | None = None,
                    config_file: str | None = None, turn: int | None = None) -> dict:
    """Generate `config.synth.variants` synthetic episodes with the latest world model."""
    ctx = Context.create(config=config, lake=lake, landing=landing, world=world, overrides=overrides,
                         config_file=config_file)
    with ctx.writer_lock():
        if ctx.config.synth.labels not in LABELS:
            raise ValueError(f"synth.labels must be one of {LABELS}, got {ctx.config.synth.labels!r}")
        wm, dyn = ctx.world_model_pair()
        ensure_ray()
        turn = ctx.current_turn() if turn is None else turn
        s = ctx.config.synth
        context = max(wm.config["history"], dyn.config["history"])  # what the neural simulator starts from
        parents, batch, states = parent_batch(ctx, turn, context, wm.config["image_size"])
        if not parents:
            raise ValueError("no real training window long enough to start a synthetic variant from")
        params = {"offsets": list(s.offsets), "drift_steps": s.drift_steps, "max_frame_change": s.max_frame_change,
                  "max_color_shift": s.max_color_shift, "max_idm_ratio": s.max_idm_ratio,
                  "label_after_drift": synthesize.LABEL_IDM if s.labels == "inverse_dynamics" else synthesize.LABEL_GENERATOR}
        variants = adapters.synthesize_batches(ctx.registry.fetch(wm), ctx.registry.fetch(dyn),
                                               synthesize.split_batch(batch, s.parallelism),
                                               world=dataclasses.asdict(ctx.config.world), params=params,
                                               seed=1000 * turn, parallelism=s.parallelism)
        replayed = expert_labels(ctx, parents, variants) if s.labels == "expert_replay" else [None] * len(variants)
        variants = [synthesize.relabel(v, r) for v, r in zip(variants, replayed)]
        episodes, frames, rejects = synthesize.variant_tables(
            variants, parents=parents, tasks=batch["tasks"], parent_states=states, spec=ctx.config.spec, turn=turn,
            generator_version=f"{WORLD_MODEL}:v{wm.version}")
        added = {"frames": 0, "episodes": 0, "rejects": 0}
        if episodes:
            added["frames"] = ctx.lake.append("frames", pa.concat_tables(frames), key="frame_id")
            added["episodes"] = ctx.lake.append("episodes", pa.Table.from_pylist(episodes, schema=EPISODES),
                                                key="episode_id")
        if rejects:
            added["rejects"] = ctx.lake.append("rejects", pa.Table.from_pylist(rejects, schema=REJECTS),
                                               key="reject_id")
        ctx.lake.save_config("frames", {**ctx.config.to_dict(), "synth": dataclasses.asdict(s)})
        reasons = [v.reject_reason for v in variants if v.reject_reason]
        summary = {"stage": "synthesize", "turn": turn, "generator": f"{WORLD_MODEL}:v{wm.version}",
                   "dynamics": f"{DYNAMICS}:v{dyn.version}", "generated": len(parents), "kept": len(episodes),
                   "rejected": len(rejects), "rejected_by_critic": sum("inverse-dynamics" in r for r in reasons),
                   "idm_error": float(np.mean([v.idm_error for v in variants])),
                   "expert_relabelled": sum(r is not None for r in replayed),
                   "synthetic_frames": sum(t.num_rows for t in frames), "rows_added": added}
        get_run_logger().info("synthesize: %s", summary)
        return summary
