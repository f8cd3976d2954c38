"""Promote flow: the gate, the `champion` alias, and the Ray Serve rollout.

The candidate is compared, on the same held-out seeds, with the champion (or, for the first
candidate, with a random policy), from the rows of the `evaluations` table. A winner gets the
`champion` alias; the endpoint is then (re)deployed in place — the URL stays the same — and
checked with a real request built from a real frame of the lake.
"""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.runtime import POLICY, Context, ensure_ray
from sim import worlds
from stages.evaluate import paired
from stages import images
from stages.schemas import of_world, vectors
from stages.promote import gate


def scores(ctx: Context, name: str, version: str) -> dict[tuple[str, int], float]:
    """Score per held-out (task, seed) scene of a model version, from the evaluations table."""
    wanted = {(t, s) for t in ctx.config.eval_tasks for s in ctx.config.eval_seeds}
    if not ctx.lake.exists("evaluations"):
        return {}
    rows = ctx.lake.read("evaluations", columns=["task", "seed", "score"],
                         filter=f"model_name = '{name}' AND model_version = '{version}'").to_pylist()
    return {(r["task"], r["seed"]): r["score"] for r in rows if (r["task"], r["seed"]) in wanted}


@task(name="serve-champion", cache_policy=NO_CACHE)
def serve_champion(ctx: Context) -> dict:
    """(Re)deploy the champion and check it answers a real frame from the lake."""
    from serving.app import deploy
    from serving.client import ActClient

    s = ctx.config.serve
    url = deploy(registry_uri=ctx.world_uri, model_name=POLICY, alias="champion", world=ctx.world_name,
                 storage_options=ctx.storage_options, host=s.host, port=s.port,
                 app_name=s.app_name or f"act-{ctx.world_name}", num_replicas=s.num_replicas,
                 route_prefix=s.route_prefix or f"/{ctx.world_name}")
    champion = ctx.registry.get(POLICY, alias="champion")
    k = champion.config["history"]
    start = ctx.config.spec.warmup_steps
    rows = ctx.lake.read("frames", columns=["episode_id", "step", "image", "height", "width", "state", "task"],
                         filter=f"origin = 'real' AND {of_world(ctx.world_name)} AND step >= {start} "
                                f"AND step < {start + k}")
    rows = rows.filter(pc.equal(rows.column("episode_id"), rows.column("episode_id")[0])).sort_by("step")
    state = vectors(rows.column("state"))[-1][ctx.config.spec.policy_state_index]
    client = ActClient(url, world=ctx.world_name)
    action = client.act(images.decode(rows, champion.config["image_size"])[:k], state=state, task=rows.column("task")[-1].as_py())
    health = client.health()
    return {"url": url, "health": health, "probe_action": [round(float(a), 4) for a in action]}


@flow(name="promote")
def promote_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
                 world: str = worlds.DEFAULT, overrides: list[str] | None = None,
                 config_file: str | None = None, version: int | None = None, serve: bool = True) -> dict:
    """Gate a policy version (default: the latest) and roll the champion out to Ray Serve."""
    ctx = Context.create(config=config, lake=lake, landing=landing, world=world, overrides=overrides,
                         config_file=config_file)
    versions = ctx.registry.versions(POLICY)
    if not versions:
        raise ValueError("no policy in the registry: run `worldloop train --model policy` first")
    candidate = ctx.registry.get(POLICY, version=version) if version is not None else versions[-1]
    champion = ctx.registry.get(POLICY, alias="champion")
    cand = scores(ctx, POLICY, str(candidate.version))
    screened = candidate.metrics.get("screened_out") and candidate.metrics.get("screen")
    if not screened and len(cand) < len(ctx.config.eval_seeds) * len(ctx.config.eval_tasks):
        raise ValueError(f"policy v{candidate.version} is not evaluated on all held-out scenes: "
                         f"run `worldloop evaluate --version {candidate.version}` first")
    if screened:
        decision = {"promote": False, "reason": f"candidate screened out in the neural simulator: mean score "
                    f"{screened['candidate']:.2f} vs the champion's {screened['champion']:.2f} over "
                    f"{screened['n']} starts (margin {screened['margin']:g}); not driven in the real simulator"}
    elif champion is not None and champion.version == candidate.version:
        decision = {"promote": False, "reason": "candidate is already the champion"}
    elif champion is not None:
        decision = gate(paired(cand, scores(ctx, POLICY, str(champion.version))), reference_role="champion")
    else:
        decision = gate(paired(cand, scores(ctx, "random", "uniform")), reference_role="random policy")
    if decision["promote"]:
        ctx.registry.set_alias(POLICY, "champion", candidate.version)
    champion = ctx.registry.get(POLICY, alias="champion")
    summary = {"stage": "promote", "candidate_version": candidate.version, **decision,
               "champion_version": champion.version if champion else None,
               "champion_score": float(np.mean(list(scores(ctx, POLICY, str(champion.version)).values())))
               if champion else None}
    if serve and champion is not None:
        ensure_ray()
        summary["endpoint"] = serve_champion(ctx)
    get_run_logger().info("promote: %s", summary)
    return summary
