"""Promote flow: the gate, the rollout to Ray Serve, then the aliases.

The candidate is compared, on the same held-out scenes, with the champion (or, for the first
candidate, with a random policy), from the rows of the `evaluations` table that match this run's
world config (`flows.evaluate.eval_id`), by `stages.promote.gate` with the config's `gate` section.
The decision, with its numbers, goes to the candidate's metrics and to the alias history.

A winner is deployed first and probed with a real request built from a real frame of the lake; the
`champion` alias moves only once it answers as the new version (`roll_out`). A version that fails
to deploy or answer leaves the aliases where they were, the champion is deployed again, and the
summary says why. A loser becomes the `challenger`.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow.compute as pc
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.evaluate import eval_id, scenes
from flows.runtime import POLICY, Context, ensure_ray
from sim import worlds
from stages import images
from stages.evaluate import task_gaps
from stages.promote import gate
from stages.registry import AliasEvent, ModelVersion
from stages.schemas import of_world, vectors

# what a policy's registry config says about its interface with the world: two policies that differ
# here were not built for the same world and config, and the gate does not compare them
INTERFACE = ("image_size", "action_low", "action_high", "state_dim", "task_vocab")


def flow_run_label() -> str | None:
    """The Prefect flow run this code runs in ("prefect flow run NAME (ID)"), else None (the
    registry then records the command line)."""
    from prefect.context import FlowRunContext

    run = FlowRunContext.get()
    return f"prefect flow run {run.flow_run.name} ({run.flow_run.id})" if run and run.flow_run else None


def evaluation_rows(ctx: Context, name: str, version: str) -> list[dict]:
    """The evaluations rows of a driver on this run's held-out scenes under this run's world config."""
    if not ctx.lake.exists("evaluations"):
        return []
    quoted = ", ".join(f"'{eval_id(ctx, name, version, s)}'" for s in scenes(ctx))
    return ctx.lake.read("evaluations", filter=f"eval_id IN ({quoted})").to_pylist()


def scores(ctx: Context, name: str, version: str) -> dict[tuple[str, int], float]:
    """Score per held-out (task, seed) scene of a model version, from the evaluations table."""
    return {(r["task"], r["seed"]): r["score"] for r in evaluation_rows(ctx, name, version)}


def champion_gaps(ctx: Context, version: int) -> dict[str, float]:
    """Per task, how far the champion fell short of the expert on this run's held-out scenes (from
    the evaluations table; empty when either was not evaluated on them)."""
    return task_gaps(scores(ctx, POLICY, str(version)), scores(ctx, "expert", "privileged"))


def decide(ctx: Context, candidate: ModelVersion, reference: ModelVersion | tuple[str, str]) -> dict:
    """The gate's decision for ``candidate`` against a registered ``reference`` (the champion) or a
    reference driver (name, version), e.g. ("random", "uniform")."""
    registered = isinstance(reference, ModelVersion)
    name, version = (POLICY, str(reference.version)) if registered else reference
    role = "champion" if registered else f"{name} policy"
    g = ctx.config.gate
    return gate(candidate=evaluation_rows(ctx, POLICY, str(candidate.version)),
                reference=evaluation_rows(ctx, name, version), reference_role=role,
                scenes=[(t, s) for s, t in scenes(ctx)], margin=g.margin, tolerances=g.tolerances(),
                candidate_setup=_setup(candidate), reference_setup=_setup(reference) if registered else None,
                enforce_guards=registered, resamples=ctx.config.eval.bootstrap)


def _setup(mv: ModelVersion) -> dict:
    return {k: mv.config[k] for k in INTERFACE if k in mv.config}


def serve_version(ctx: Context, version: int) -> dict:
    """Deploy exactly policy ``version`` (its artifacts verified first) and check that it answers a
    real frame from the lake as that version."""
    from serving.app import deploy
    from serving.client import ActClient

    mv = ctx.registry.get(POLICY, version=version)
    if mv is None:
        raise ValueError(f"policy version {version} is not in the registry")
    ctx.registry.fetch(mv)  # a tampered or partial artifact stops here, before Serve is touched
    s = ctx.config.serve
    url = deploy(registry_uri=ctx.world_uri, model_name=POLICY, world=ctx.world_name, version=mv.version,
                 storage_options=ctx.storage_options, host=s.host, port=s.port,
                 app_name=s.app_name or f"act-{ctx.world_name}", num_replicas=s.num_replicas,
                 route_prefix=s.route_prefix or f"/{ctx.world_name}")
    k = mv.config["history"]
    start = ctx.config.spec.warmup_steps
    rows = ctx.lake.read("frames", columns=["episode_id", "step", "image", "height", "width", "state", "task"],
                         filter=f"origin = 'real' AND {of_world(ctx.world_name)} AND step >= {start} "
                                f"AND step < {start + k}")
    rows = rows.filter(pc.equal(rows.column("episode_id"), rows.column("episode_id")[0])).sort_by("step")
    state = vectors(rows.column("state"))[-1][ctx.config.spec.policy_state_index]
    client = ActClient(url, world=ctx.world_name)
    action = client.act(images.decode(rows, mv.config["image_size"])[:k], state=state,
                        task=rows.column("task")[-1].as_py())
    health = client.health()
    if health.get("model_version") != mv.version:
        raise RuntimeError(f"the endpoint answers as v{health.get('model_version')}, not v{mv.version}")
    return {"url": url, "health": health, "probe_action": [round(float(a), 4) for a in action]}


@task(name="serve-champion", cache_policy=NO_CACHE)
def serve_champion(ctx: Context) -> dict:
    """(Re)deploy the champion and check it answers a real frame from the lake."""
    champion = ctx.registry.get(POLICY, alias="champion")
    if champion is None:
        raise ValueError(f"no {ctx.world_name} champion in {ctx.lake_uri}")
    return serve_version(ctx, champion.version)


@task(name="serve-companions", cache_policy=NO_CACHE)
def serve_companions(ctx: Context) -> dict:
    """Roll the world's predict (world model) and report (reasoner, turn reports) applications to the
    registry's latest versions beside act. A failure is reported, never fatal: the policy's endpoint
    is what the turn ships."""
    from serving.app import deploy_world

    s = ctx.config.serve
    try:
        return deploy_world(registry_uri=ctx.world_uri, world=ctx.world_name, storage_options=ctx.storage_options,
                            host=s.host, port=s.port, apps=("predict", "report"))
    except Exception as err:  # noqa: BLE001 - reported in the summary
        return {"urls": {}, "error": f"{type(err).__name__}: {err}"}


def roll_out(ctx: Context, *, version: int, move: Callable[[], list[AliasEvent]], serve: bool) -> dict:
    """Deploy and probe ``version``, and only then ``move`` the aliases. Without ``serve`` the aliases
    move at once. On a failed deployment or probe nothing moves, the champion is deployed again, and
    ``error`` says why (``restored``: whether the champion answers again)."""
    if not serve:
        return {"moved": True, "events": move()}
    ensure_ray()
    try:
        endpoint = serve_version(ctx, version)
    except Exception as err:  # any failure to deploy or answer: keep the champion serving
        out = {"moved": False, "error": f"v{version} failed to deploy or answer the probe: "
                                        f"{type(err).__name__}: {err}"}
        champion = ctx.registry.get(POLICY, alias="champion")
        if champion is None:
            return out | {"restored": False}
        try:
            return out | {"restored": True, "endpoint": serve_version(ctx, champion.version)}
        except Exception as again:  # say so; the caller's summary carries both errors
            return out | {"restored": False, "restore_error": f"{type(again).__name__}: {again}"}
    return {"moved": True, "endpoint": endpoint, "events": move()}


@flow(name="promote")
def promote_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
                 world: str = worlds.DEFAULT, overrides: list[str] | None = None,
                 config_file: str | None = None, version: int | None = None, serve: bool = True) -> dict:
    """Gate a policy version (default: the latest), roll a winner out to Ray Serve, then move the aliases."""
    ctx = Context.create(config=config, lake=lake, landing=landing, world=world, overrides=overrides,
                         config_file=config_file)
    with ctx.writer_lock():
        candidate = ctx.candidate_policy(version)
        champion = ctx.registry.get(POLICY, alias="champion")
        cand = scores(ctx, POLICY, str(candidate.version))
        screened = candidate.metrics.get("screened_out") and candidate.metrics.get("screen")
        if not screened and len(cand) < len(scenes(ctx)):
            raise ValueError(f"policy v{candidate.version} is not evaluated on all held-out scenes: "
                             f"run `worldloop evaluate --version {candidate.version}` first")
        if screened:
            decision = {"promote": False, "reason": f"candidate screened out in the neural simulator: mean score "
                        f"{screened['candidate']:.2f} vs the champion's {screened['champion']:.2f} over "
                        f"{screened['n']} starts (margin {screened['margin']:g}); not driven in the real simulator"}
        elif champion is not None and champion.version == candidate.version:
            decision = {"promote": False, "reason": "candidate is already the champion"}
        else:
            decision = decide(ctx, candidate, champion if champion is not None else ("random", "uniform"))
        summary = {"stage": "promote", "candidate_version": candidate.version, **decision}
        who = flow_run_label()
        if "reference_role" in decision or screened:
            ctx.registry.update_metrics(POLICY, candidate.version, {"gate": decision})
        if decision["promote"]:
            rollout = roll_out(ctx, version=candidate.version, serve=serve, move=lambda: ctx.registry.promote(
                POLICY, candidate.version, reason=decision["reason"], flow_run=who, gate=decision))
            summary.update({k: rollout[k] for k in ("endpoint", "error", "restored") if k in rollout})
            if not rollout["moved"]:
                summary.update(promote=False, reason=f"the gate passed ({decision['reason']}) but {rollout['error']}; "
                                                     f"the champion was {'restored' if rollout['restored'] else 'NOT restored'}")
        elif champion is None or champion.version != candidate.version:
            ctx.registry.set_alias(POLICY, "challenger", candidate.version, reason=decision["reason"], flow_run=who,
                                   gate=decision)
        champion = ctx.registry.get(POLICY, alias="champion")
        summary.update(champion_version=champion.version if champion else None,
                       champion_score=float(np.mean(list(scores(ctx, POLICY, str(champion.version)).values())))
                       if champion else None)
        if serve and champion is not None and "endpoint" not in summary:
            ensure_ray()
            summary["endpoint"] = serve_champion(ctx)
        if serve and ctx.config.serve.companions:
            summary["companions"] = serve_companions(ctx)
        get_run_logger().info("promote: %s", summary)
        return summary
