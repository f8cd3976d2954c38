"""Synthesize flow: the world model turns compute into recovery data, with provenance.

Parent windows are drawn from real training episodes (mined events preferred), rolled out by the
latest world model under counterfactual actions (`stages.synthesize`), filtered for plausibility,
and written to the same `episodes`/`frames` tables with `origin = synthetic`, the parent episode,
the generator's version, and a per-frame `label_source`. Implausible variants become rejects.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.runtime import WORLD_MODEL, Context, ensure_ray
from stages import adapters
from stages.curate import episode_to_tables, reject_row
from stages.schemas import EPISODES, REJECTS
from stages.lake import images, vectors
from stages.synthesize import select_parents


def _window(ctx: Context, episode_id: str, start: int, history: int, horizon: int) -> dict:
    rows = ctx.lake.read("frames", columns=["step", "image", "action", "label", "state", "task"],
                         filter=f"episode_id = '{episode_id}' AND step >= {start - history + 1} "
                                f"AND step <= {start + horizon}").sort_by("step")
    steps = rows.column("step").to_numpy()
    frames, actions, labels = images(rows.column("image")), vectors(rows.column("action")), vectors(rows.column("label"))
    at = int(np.searchsorted(steps, start))
    return {"history": frames[at - history + 1: at + 1], "actions": actions[at:], "labels": labels[at:],
            "states": vectors(rows.column("state"))[at + 1:], "task": rows.column("task")[at].as_py()}


@task(name="load-parent-windows", cache_policy=NO_CACHE)
def parent_batch(ctx: Context, turn: int, history: int) -> tuple[list[tuple[str, int]], dict]:
    s = ctx.config.synth
    light = ctx.lake.read("frames", columns=["episode_id", "step", "intervention", "signals"],
                          filter="origin = 'real' AND split = 'train'")
    parents = select_parents(light, n=s.variants, horizon=s.horizon + 1,
                             min_step=max(ctx.config.spec.warmup_steps, history), seed=turn)
    windows = [_window(ctx, e, t, history, s.horizon) for e, t in parents]
    batch = {"history_BKHWC": np.stack([w["history"] for w in windows]),
             "parent_actions_BTA": np.stack([w["actions"] for w in windows]),
             "parent_labels_BTA": np.stack([w["labels"] for w in windows]),
             "tasks": np.array([w["task"] for w in windows], dtype=object)}
    return parents, batch, [w["states"] for w in windows]


def _tables(ctx: Context, turn: int, wm, parents, out: dict, tasks, states) -> tuple[list[dict], list[pa.Table], list[dict]]:
    episodes, frames, rejects = [], [], []
    version = f"{WORLD_MODEL}:v{wm.version}"
    for i, (parent, start) in enumerate(parents):
        offset = float(out["offsets_B"][i])
        uri = f"worldmodel://{version}?parent={parent}&step={start}&offset={offset:+.2f}&turn={turn}"
        if out["reject_reasons"][i] is not None:
            rejects.append(reject_row(uri, stage="synthesize", reason="implausible",
                                      detail=out["reject_reasons"][i], turn=turn))
            continue
        digest = hashlib.sha256(uri.encode()).hexdigest()
        n = out["frames_BTHWC"].shape[1]
        spec = ctx.config.spec
        # the parent's logged states are those of the real trajectory, not of this variant: NaN
        episode = {"world": spec.name, "seed": -1, "driver": version, "policy_version": "",
                   "frames": out["frames_BTHWC"][i], "actions": out["actions_BTA"][i],
                   "labels": out["labels_BTA"][i], "instruction": tasks[i],
                   "states": _variant_states(spec, states[i][:n], n),
                   "timestamps_ns": (start + 1 + np.arange(n, dtype=np.int64)) * spec.step_ns}
        row, table = episode_to_tables(
            episode, episode_id=f"syn-{digest[:24]}", source_uri=uri, content_hash=digest, turn=turn,
            origin="synthetic", parent_episode_id=parent, generator_version=version,
            label_source=out["label_sources_BT"][i].tolist(), split="train")
        episodes.append(row)
        frames.append(table)
    return episodes, frames, rejects


def _variant_states(spec, parent_states: np.ndarray, n: int) -> np.ndarray:
    """States of a variant: the policy's inputs that the perturbation does not move (the task's
    goal, say) are kept from the parent where the world marks them static; everything else is
    unknown (NaN), since no simulator produced it."""
    states = np.full((n, len(spec.state_names)), np.nan, np.float32)
    static = [spec.state_names.index(name) for name in spec.static_state]
    if static and len(parent_states):
        states[:len(parent_states), static] = parent_states[:, static]
        states[len(parent_states):, static] = parent_states[-1, static]
    return states


@flow(name="synthesize")
def synthesize_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
                    world: str = "carracing", overrides: list[str] | None = None,
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
    parents, batch, states = parent_batch(ctx, turn, wm.config["history"])
    if not parents:
        raise ValueError("no real training window long enough to start a synthetic variant from")
    params = {"offsets": list(s.offsets), "drift_steps": s.drift_steps,
              "max_frame_change": s.max_frame_change, "max_color_shift": s.max_color_shift}
    chunks = [{k: v[idx] for k, v in batch.items()}
              for idx in np.array_split(np.arange(len(parents)), max(1, s.parallelism)) if len(idx)]
    outs = adapters.synthesize_batches(ctx.registry.fetch(wm), chunks, world=dataclasses.asdict(ctx.config.world),
                                       params=params, seed=1000 * turn,
                                       parallelism=s.parallelism)
    out = {k: (sum((o[k] for o in outs), []) if k == "reject_reasons" else np.concatenate([o[k] for o in outs]))
           for k in outs[0]}
    episodes, frames, rejects = _tables(ctx, turn, wm, parents, out, batch["tasks"], states)
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
