"""Ablate flow: does the lake's synthetic data help the policy? A matched-control experiment.

At equal real data (the lake's real training frames of the world) and equal compute (the same
steps, batch and recipe), the policy is trained from scratch ``seeds`` times on real frames only
(``synthetic_fraction`` 0) and ``seeds`` times with the configured share of synthetic frames, each
pair from the same training seed, on Ray Train. Every policy is driven on the same held-out scenes
in the real simulator (`flows.evaluate.evaluate_drivers`: rows in `evaluations`, never driven
twice). The lift is the paired difference mixed - real-only per scene, averaged over the training
seeds, with a 95% bootstrap CI over the scenes.

The result is a row of the lake's `ablations` table, keyed by the world, the real and synthetic
data it saw (their row counts and the frames table's version), the recipe and the seeds. The
flywheel trains its policy on synthetic frames only when the latest ablation of its world at the
current recipe has a CI above zero (``flows.train.synthetic_verdict``); otherwise the turn says
why it left them out.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger

from flows.evaluate import evaluate_drivers
from flows.runtime import POLICY, Context, ensure_ray
from flows.train import recipe_digest, run_training
from sim import worlds
from stages.evaluate import paired
from stages.schemas import ABLATIONS, of_world

ARMS = ("real", "mixed")


def _counts(ctx: Context) -> dict[str, int]:
    base = f"{of_world(ctx.world_name)} AND split = 'train'"
    return {origin: ctx.lake.count("frames", filter=f"{base} AND origin = '{origin}'") for origin in ("real", "synthetic")}


@flow(name="ablate")
def ablate_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
                world: str = worlds.DEFAULT, overrides: list[str] | None = None,
                config_file: str | None = None, seeds: int = 3, turn: int | None = None) -> dict:
    """Policies trained on real frames only and on real + synthetic frames, driven on the same held-out
    scenes; the paired lift with its 95% CI, recorded in the `ablations` table."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    ctx = Context.create(config=config, lake=lake, landing=landing, world=world, overrides=overrides,
                         config_file=config_file)
    with ctx.writer_lock():
        counts = _counts(ctx) if ctx.lake.exists("frames") else {"real": 0, "synthetic": 0}
        if not counts["real"] or not counts["synthetic"]:
            raise ValueError(f"the ablation needs real and synthetic training frames of {ctx.world_name}, the lake has "
                             f"{counts}: run a turn (or `worldloop synthesize`) first")
        fraction = ctx.config.train.synthetic_fraction
        if fraction <= 0:
            raise ValueError("train.synthetic_fraction is 0: nothing to ablate")
        ensure_ray()
        turn = ctx.current_turn() if turn is None else turn
        drivers, specs = {}, {}
        for seed in range(seeds):
            for arm, share in zip(ARMS, (0.0, fraction)):
                t = dataclasses.replace(ctx.config.train, synthetic_fraction=share)
                arm_ctx = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, train=t))
                started = time.perf_counter()
                result = run_training(arm_ctx, POLICY, 1000 + seed, None, run_name=f"ablate-{arm}-seed{seed}")
                print(f"ablate: trained {arm} policy, seed {seed}, synthetic share {share:g}  "
                      f"({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
                role = f"{arm}-{seed}"
                version = hashlib.sha256(result["checkpoint_dir"].encode()).hexdigest()[:16]
                drivers[role] = (f"ablation-{arm}", version)
                specs[role] = {"kind": "checkpoint", "directory": result["checkpoint_dir"], "name": f"ablation-{arm}"}
        rows = evaluate_drivers(ctx, drivers, turn, specs=specs)
        scene = {arm: {} for arm in ARMS}
        for role, rs in rows.items():
            arm = role.split("-")[0]
            for r in rs:
                scene[arm].setdefault((r["task"], r["seed"]), []).append(r["score"])
        mean = {arm: {k: float(np.mean(v)) for k, v in scene[arm].items()} for arm in ARMS}
        comparison = paired(mean["mixed"], mean["real"], resamples=ctx.config.eval.bootstrap)
        recipe, frames_version = recipe_digest(ctx), ctx.lake.version("frames")
        row = {"ablation_id": hashlib.sha256(json.dumps([ctx.world_name, counts, frames_version, recipe, seeds,
                                                         turn]).encode()).hexdigest()[:24],
               "world": ctx.world_name, "turn": turn, "recipe": recipe, "synthetic_fraction": fraction,
               "seeds": seeds, "scenes": comparison["n"], "real_frames": counts["real"],
               "synthetic_frames": counts["synthetic"], "frames_version": frames_version,
               "real_mean": float(np.mean(list(mean["real"].values()))),
               "mixed_mean": float(np.mean(list(mean["mixed"].values()))), "mean_diff": comparison["mean_diff"],
               "ci_low": comparison["ci95"][0], "ci_high": comparison["ci95"][1], "wins": comparison["wins"],
               "created_at": datetime.now(timezone.utc)}
        ctx.lake.append("ablations", pa.Table.from_pylist([row], schema=ABLATIONS), key="ablation_id")
        summary = {"stage": "ablate", **{k: v for k, v in row.items() if k != "created_at"},
                   "lift": row["ci_low"] > 0}
        get_run_logger().info("ablate: mixed - real %+.3g (95%% CI %+.3g .. %+.3g) over %d scenes x %d seeds",
                              row["mean_diff"], row["ci_low"], row["ci_high"], row["scenes"], seeds)
        return summary
