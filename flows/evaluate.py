"""Evaluate flow: closed-loop rollouts of the candidate, the champion and two references.

All drivers run on the same held-out scenes (every evaluated task on every held-out seed; the
fleet never drives those seeds), in parallel on Ray, with
the safety driver in shadow mode: it never acts, it counts the takeovers it would have made
("interventions needed"). Results go to the Lance `evaluations` table, one row per (model version,
task, seed); a version already evaluated on a scene is not driven again, so the champion and the
references (privileged expert, random policy) are driven once and reused by later turns.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.runtime import POLICY, Context, ensure_ray
from sim import worlds
from stages import adapters
from stages.evaluate import paired, summarize
from stages.schemas import EVALUATIONS

REFERENCES = {"expert": {"kind": "expert", "noisy": False}, "random": {"kind": "random"}}


def scenes(ctx: Context) -> list[tuple[int, str]]:
    """The held-out (seed, task) pairs every driver is evaluated on."""
    return [(s, t) for t in ctx.config.eval_tasks for s in ctx.config.eval_seeds]


def eval_id(ctx: Context, model_name: str, model_version: str, scene: tuple[int, str]) -> str:
    w = ctx.config.world
    key = f"{model_name}|{model_version}|{scene[0]}|{scene[1]}|{w.name}|{w.image_size}|{ctx.world.max_steps}|" \
          f"{json.dumps(w.options, sort_keys=True)}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _driver(ctx: Context, name: str, version: str) -> dict:
    if name in REFERENCES:
        return REFERENCES[name]
    return {"kind": "policy", "registry_uri": ctx.world_uri, "storage_options": ctx.storage_options,
            "name": name, "version": int(version)}


@task(name="closed-loop-rollouts", cache_policy=NO_CACHE)
def evaluate_drivers(ctx: Context, drivers: dict[str, tuple[str, str]], turn: int) -> dict[str, list[dict]]:
    """Per-seed rows for each role's driver: from the table where present, else by driving.

    All missing (driver, seed) rollouts share one pool, so no driver waits for another's tail.
    """
    seeds = scenes(ctx)
    ids = {(role, s): eval_id(ctx, name, version, s) for role, (name, version) in drivers.items() for s in seeds}
    have = {}
    if ctx.lake.exists("evaluations"):
        quoted = ", ".join(f"'{i}'" for i in set(ids.values()))
        have = {r["eval_id"]: r for r in ctx.lake.read("evaluations", filter=f"eval_id IN ({quoted})").to_pylist()}
    missing = [(role, s) for (role, s), i in ids.items() if i not in have]
    if missing:
        results = adapters.run_rollouts([s for _, s in missing], spec=[_driver(ctx, *drivers[r]) for r, _ in missing],
                                        world=ctx.config.world, safety="shadow", storage_options=ctx.storage_options,
                                        parallelism=ctx.config.eval.parallelism, desc="evaluate")
        now = datetime.now(timezone.utc)
        rows = [{"eval_id": ids[(role, s)], "model_name": drivers[role][0], "model_version": drivers[role][1],
                 "role": role, "task": s[1], "seed": s[0], "score": float(r["score"]),
                 "success": bool(r["success"]), "steps": int(r["steps"]),
                 "signal_rates": json.dumps({k[:-5]: v for k, v in r.items() if k.endswith("_rate")}),
                 "interventions": int(r["interventions"]), "turn": turn, "created_at": now} for (role, s), r in zip(missing, results)]
        ctx.lake.append("evaluations", pa.Table.from_pylist(rows, schema=EVALUATIONS), key="eval_id")
        have.update({row["eval_id"]: row for row in rows})
    return {role: [have[ids[(role, s)]] for s in seeds] for role in drivers}


@flow(name="evaluate")
def evaluate_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
                  world: str = worlds.DEFAULT, overrides: list[str] | None = None,
                  config_file: str | None = None, version: int | None = None, turn: int | None = None) -> dict:
    """Evaluate a policy version (default: the latest) against the champion and the references."""
    ctx = Context.create(config=config, lake=lake, landing=landing, world=world, overrides=overrides,
                         config_file=config_file)
    ensure_ray()
    turn = ctx.current_turn() if turn is None else turn
    versions = ctx.registry.versions(POLICY)
    if not versions:
        raise ValueError("no policy in the registry: run `worldloop train --model policy` first")
    candidate = ctx.registry.get(POLICY, version=version) if version is not None else versions[-1]
    if candidate is None:
        raise ValueError(f"policy version {version} is not in the registry")
    champion = ctx.registry.get(POLICY, alias="champion")
    drivers = {"candidate": (POLICY, str(candidate.version)), "expert": ("expert", "privileged"),
               "random": ("random", "uniform")}
    if champion is not None and champion.version != candidate.version:
        drivers["champion"] = (POLICY, str(champion.version))
    rows = evaluate_drivers(ctx, drivers, turn)
    resamples = ctx.config.eval.bootstrap
    results = {role: dict(summarize(r, resamples=resamples), model=f"{drivers[role][0]}:{drivers[role][1]}")
               for role, r in rows.items()}
    reference = "champion" if "champion" in rows else "random"
    scores = {role: {(r["task"], r["seed"]): r["score"] for r in rs} for role, rs in rows.items()}
    comparison = paired(scores["candidate"], scores[reference], resamples=resamples)
    ctx.registry.update_metrics(POLICY, candidate.version, {
        "eval_mean": results["candidate"]["mean"], "eval_ci95": results["candidate"]["ci95"],
        "eval_seeds": list(ctx.config.eval_seeds), "eval_tasks": list(ctx.config.eval_tasks),
        "eval_success_rate": results["candidate"]["success_rate"],
        "eval_signal_rates": results["candidate"]["signal_rates"]})
    summary = {"stage": "evaluate", "turn": turn, "candidate_version": candidate.version,
               "reference": reference, "results": results, "comparison": comparison}
    get_run_logger().info("evaluate: %s", {r: round(v["mean"], 1) for r, v in results.items()})
    return summary
