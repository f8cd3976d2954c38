"""The flywheel flow: one or more whole turns — fleet, curate, post-train the world model (its
generator and its dynamics model), synthesize, post-train the policy, evaluate, promote — each stage
a Prefect subflow.

From turn 1 on, the fleet is driven by the served champion. A finished turn is recorded in the
`turns` table and every lake table is tagged `turn-N`, so any turn's data can be read back.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone

import pyarrow as pa
from prefect import flow, get_run_logger

from flows.curate import curate_flow
from flows.evaluate import evaluate_flow
from flows.fleet import fleet_flow
from flows.promote import promote_flow, serve_champion
from flows.runtime import DYNAMICS, POLICY, WORLD_MODEL, Context, ensure_ray
from flows.synthesize import synthesize_flow
from flows.train import train_flow
from sim import worlds
from stages.schemas import TURNS

TAGGED = ("episodes", "frames", "rejects", "clips", "evaluations", "sources")


def _timed(stages: dict, at_turn: int, name: str, fn, **kwargs) -> dict:
    """Run one stage, record its wall time and say on stderr that it ended (a person is watching)."""
    start = time.perf_counter()
    stages[name] = fn(**kwargs)
    stages[name]["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"turn {at_turn}: {name} done in {stages[name]['wall_s']} s", file=sys.stderr, flush=True)
    return stages[name]


def finish_turn(ctx: Context, turn: int, started: datetime, stages: dict) -> None:
    promote = stages["promote"]
    row = {"turn": turn, "config": ctx.config.name, "started_at": started,
           "finished_at": datetime.now(timezone.utc), "candidate_version": promote["candidate_version"],
           "promoted": promote["promote"], "champion_version": promote["champion_version"],
           "summary": json.dumps(stages, default=str)}
    for name in TAGGED:
        if ctx.lake.exists(name):
            ctx.lake.tag(name, f"turn-{turn}")
    ctx.lake.append("turns", pa.Table.from_pylist([row], schema=TURNS), key="turn")


@flow(name="flywheel")
def flywheel_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
                  world: str = worlds.DEFAULT, overrides: list[str] | None = None,
                  config_file: str | None = None, turns: int = 1, serve: bool = True) -> dict:
    """Run `turns` whole turns of the flywheel; returns every stage's summary per turn."""
    ctx = Context.create(config=config, lake=lake, landing=landing, world=world, overrides=overrides,
                         config_file=config_file)
    with ctx.writer_lock():
        ensure_ray()
        common = {"config": config, "lake": lake, "landing": landing, "world": world, "overrides": overrides,
                  "config_file": config_file}
        done = []
        for _ in range(turns):
            turn, started, stages = ctx.current_turn(), datetime.now(timezone.utc), {}
            endpoint = None
            if serve and ctx.registry.get(POLICY, alias="champion") is not None:
                endpoint = serve_champion(ctx)["url"]  # the fleet drives through the served champion
            _timed(stages, turn, "fleet", fleet_flow, **common, turn=turn, endpoint=endpoint)
            _timed(stages, turn, "curate", curate_flow, **common, turn=turn)
            _timed(stages, turn, "train_dynamics", train_flow, **common, model=DYNAMICS, turn=turn)
            _timed(stages, turn, "train_world_model", train_flow, **common, model=WORLD_MODEL, turn=turn)
            _timed(stages, turn, "synthesize", synthesize_flow, **common, turn=turn)
            policy = _timed(stages, turn, "train_policy", train_flow, **common, model=POLICY, turn=turn)
            _timed(stages, turn, "evaluate", evaluate_flow, **common, version=policy["version"], turn=turn)
            _timed(stages, turn, "promote", promote_flow, **common, version=policy["version"], serve=serve)
            finish_turn(ctx, turn, started, stages)
            get_run_logger().info("turn %d finished: %s", turn, stages["promote"]["reason"])
            done.append({"turn": turn, "stages": stages})
        return {"turns": done}
