"""Synthesize flow: the world model turns compute into recovery data, with provenance.

Parent windows are drawn from real training episodes (mined events preferred), rolled out by the
latest world model under counterfactual actions (`stages.synthesize`), filtered for plausibility,
and written to the same `episodes`/`frames` tables with `origin = synthetic`, the parent episode,
the generator's version, and a per-frame `label_source`. Implausible variants become rejects.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.runtime import WORLD_MODEL, Context, ensure_ray
from sim import worlds
from stages import adapters, synthesize
from stages.schemas import EPISODES, REJECTS, of_world


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


@flow(name="synthesize")
def synthesize_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
                    world: str = worlds.DEFAULT, overrides: list[str] | None = None,
                    config_file: str | None = None, turn: int | None = None) -> dict:
    """Generate `config.synth.variants` synthetic episodes with the latest world model."""
    ctx = Context.create(config=config, lake=lake, landing=landing, world=world, overrides=overrides,
                         config_file=config_file)
    versions = ctx.registry.versions(WORLD_MODEL)
    if not versions:
        raise ValueError("no world model in the registry: run `worldloop train --model world_model` first")
    ensure_ray()
    turn = ctx.current_turn() if turn is None else turn
    wm, s = versions[-1], ctx.config.synth
    parents, batch, states = parent_batch(ctx, turn, wm.config["history"], wm.config["image_size"])
    if not parents:
        raise ValueError("no real training window long enough to start a synthetic variant from")
    params = {"offsets": list(s.offsets), "drift_steps": s.drift_steps,
              "max_frame_change": s.max_frame_change, "max_color_shift": s.max_color_shift}
    variants = adapters.synthesize_batches(ctx.registry.fetch(wm), synthesize.split_batch(batch, s.parallelism),
                                           world=dataclasses.asdict(ctx.config.world), params=params,
                                           seed=1000 * turn, parallelism=s.parallelism)
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
    summary = {"stage": "synthesize", "turn": turn, "generator": f"{WORLD_MODEL}:v{wm.version}",
               "generated": len(parents), "kept": len(episodes), "rejected": len(rejects),
               "synthetic_frames": sum(t.num_rows for t in frames), "rows_added": added}
    get_run_logger().info("synthesize: %s", summary)
    return summary
