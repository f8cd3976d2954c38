"""Evaluate flow: closed-loop rollouts of the candidate, the champion and two references.

All drivers run on the same held-out scenes (every evaluated task on every held-out seed; the
fleet never drives those seeds), in parallel on Ray, with
the safety driver in shadow mode: it never acts, it counts the takeovers it would have made
("interventions needed"). Results go to the Lance `evaluations` table, one row per (model version,
task, seed); a version already evaluated on a scene is not driven again, so the champion and the
references (privileged expert, random policy) are driven once and reused by later turns.

``simulator="neural"`` (``worldloop evaluate --in neural``) drives the candidate, the champion and
the random policy in the neural simulator instead (``sim.neural``: the latest world model and
dynamics model), from real starting windows of the lake; its scores go to the summary and the
candidate's metrics (``neural_eval_*``), never to the `evaluations` table, which holds the real
simulator's. With ``eval.screen`` a candidate is first compared with the champion there, and only
one that passes is driven in the real simulator; one that fails is marked ``screened_out`` and the
promote flow keeps the champion.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.runtime import DYNAMICS, POLICY, WORLD_MODEL, Context, ensure_ray
from sim import worlds
from stages import adapters, neural
from stages.evaluate import paired, summarize
from stages.schemas import EVALUATIONS, of_world

SIMULATORS = ("real", "neural")

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
def evaluate_drivers(ctx: Context, drivers: dict[str, tuple[str, str]], turn: int,
                     specs: dict[str, dict] | None = None) -> dict[str, list[dict]]:
    """Per-seed rows for each role's driver: from the table where present, else by driving.

    A driver is (model name, version): a reference, a registered policy, or the driver spec
    ``specs[role]`` gives (an unregistered checkpoint). All missing (driver, seed) rollouts share
    one pool, so no driver waits for another's tail.
    """
    seeds = scenes(ctx)
    ids = {(role, s): eval_id(ctx, name, version, s) for role, (name, version) in drivers.items() for s in seeds}
    have = {}
    if ctx.lake.exists("evaluations"):
        quoted = ", ".join(f"'{i}'" for i in set(ids.values()))
        have = {r["eval_id"]: r for r in ctx.lake.read("evaluations", filter=f"eval_id IN ({quoted})").to_pylist()}
    missing = [(role, s) for (role, s), i in ids.items() if i not in have]
    if missing:
        given = specs or {}
        results = adapters.run_rollouts([s for _, s in missing], spec=[given.get(r) or _driver(ctx, *drivers[r])
                                                                       for r, _ in missing],
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


@task(name="neural-starts", cache_policy=NO_CACHE)
def neural_starts(ctx: Context, turn: int, context: int) -> list:
    """Starting windows for the neural simulator: real rows of the world, its val split when it has one."""
    base = f"origin = 'real' AND {of_world(ctx.world_name)}"
    light = ctx.lake.read("frames", columns=["episode_id", "step"], filter=f"{base} AND split = 'val'")
    if light.num_rows == 0:
        light = ctx.lake.read("frames", columns=["episode_id", "step"], filter=f"{base} AND split = 'train'")
    spec = ctx.config.spec
    picks = neural.pick_starts(light, n=ctx.config.eval.neural_starts, context=context,
                               first_step=spec.warmup_steps, seed=turn)
    if not picks:
        raise ValueError(f"no real window of {context} steps in {ctx.world_uri} to start the neural simulator from")
    windows = [ctx.lake.read("frames", columns=list(neural.WINDOW_COLUMNS),
                             filter=f"{base} AND episode_id = '{e}' AND step > {t - context} AND step <= {t}")
               for e, t in picks]
    return neural.starts_from_windows(windows, picks, context=context, image_size=ctx.config.world.image_size,
                                      task_names={t.instruction: t.name for t in spec.tasks})


def evaluate_neural(ctx: Context, drivers: dict[str, tuple[str, str]], turn: int) -> dict[str, list[dict]]:
    """Per-start rows for each role's driver in the neural simulator (rows as ``summarize`` reads them)."""
    models, context = {}, 1
    for name, mv in zip((WORLD_MODEL, DYNAMICS), ctx.world_model_pair()):
        models[name] = {"registry_uri": ctx.world_uri, "storage_options": ctx.storage_options,
                        "name": name, "version": mv.version}
        context = max(context, mv.config["history"])  # frames both models need before a step
    starts = neural_starts(ctx, turn, context)
    out = adapters.neural_rollouts({role: _driver(ctx, *d) for role, d in drivers.items()}, starts,
                                   world=ctx.config.world, models=models, horizon=ctx.config.eval.neural_horizon,
                                   seed=turn)
    return {role: [{"task": r["task"], "seed": r["seed"], "scene": f"{r['episode_id']}@{r['start_step']}",
                    "score": r["score"], "success": r["success"], "steps": r["steps"], "interventions": 0,
                    "signal_rates": json.dumps({k[:-5]: v for k, v in r.items() if k.endswith("_rate")})}
                   for r in rows] for role, rows in out.items()}


@flow(name="evaluate")
def evaluate_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
                  world: str = worlds.DEFAULT, overrides: list[str] | None = None,
                  config_file: str | None = None, version: int | None = None, turn: int | None = None,
                  simulator: str = "real") -> dict:
    """Evaluate a policy version (default: the latest) against the champion and the references, in the
    real simulator or (``simulator="neural"``) in the world model's."""
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator must be one of {SIMULATORS}, got {simulator!r}")
    ctx = Context.create(config=config, lake=lake, landing=landing, world=world, overrides=overrides,
                         config_file=config_file)
    with ctx.writer_lock():
        ensure_ray()
        turn = ctx.current_turn() if turn is None else turn
        candidate = ctx.candidate_policy(version)
        champion = ctx.registry.get(POLICY, alias="champion")
        drivers = {"candidate": (POLICY, str(candidate.version)), "random": ("random", "uniform")}
        if champion is not None and champion.version != candidate.version:
            drivers["champion"] = (POLICY, str(champion.version))
        if simulator == "neural":
            return _summary(ctx, candidate.version, evaluate_neural(ctx, drivers, turn), drivers, turn, "neural")
        screened = None
        if ctx.config.eval.screen and "champion" in drivers:
            pair = evaluate_neural(ctx, {r: drivers[r] for r in ("candidate", "champion")}, turn)
            screened = neural.screen([r["score"] for r in pair["candidate"]], [r["score"] for r in pair["champion"]],
                                     margin=ctx.config.eval.screen_margin)
            ctx.registry.update_metrics(POLICY, candidate.version, {"screened_out": not screened["passed"],
                                                                   "screen": screened})
            if not screened["passed"]:
                summary = {"stage": "evaluate", "turn": turn, "candidate_version": candidate.version,
                           "screened_out": True, "screen": screened}
                get_run_logger().info("evaluate: screened out in the neural simulator: %s", screened)
                return summary
        drivers["expert"] = ("expert", "privileged")
        rows = evaluate_drivers(ctx, drivers, turn)
        return _summary(ctx, candidate.version, rows, drivers, turn, "real") | ({"screen": screened} if screened else {})


def _summary(ctx: Context, version: int, rows: dict[str, list[dict]], drivers: dict, turn: int, simulator: str) -> dict:
    """Per-role summaries, the candidate's paired comparison, and its metrics in the registry."""
    resamples = ctx.config.eval.bootstrap
    results = {role: dict(summarize(r, resamples=resamples), model=f"{drivers[role][0]}:{drivers[role][1]}")
               for role, r in rows.items()}
    reference = "champion" if "champion" in rows else "random"
    key = ("task", "seed") if simulator == "real" else ("scene",)
    scores = {role: {tuple(r[k] for k in key): r["score"] for r in rs} for role, rs in rows.items()}
    comparison = paired(scores["candidate"], scores[reference], resamples=resamples)
    mine = results["candidate"]
    if simulator == "neural":
        metrics = {"neural_eval_mean": mine["mean"], "neural_eval_ci95": mine["ci95"], "neural_eval_starts": mine["n"],
                   "neural_eval_diff": {reference: comparison["mean_diff"]}}
    else:
        metrics = {"eval_mean": mine["mean"], "eval_ci95": mine["ci95"], "eval_seeds": list(ctx.config.eval_seeds),
                   "eval_tasks": list(ctx.config.eval_tasks), "eval_success_rate": mine["success_rate"],
                   "eval_signal_rates": mine["signal_rates"]}
    ctx.registry.update_metrics(POLICY, version, metrics)
    get_run_logger().info("evaluate (%s simulator): %s", simulator, {r: round(v["mean"], 2) for r, v in results.items()})
    return {"stage": "evaluate", "simulator": simulator, "turn": turn, "candidate_version": version,
            "reference": reference, "results": results, "comparison": comparison}
