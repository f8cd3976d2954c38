"""Fleet flow: drive a turn's episodes in the world and write them as MCAP logs to the landing zone.

Turn 0 is driven by the world's privileged expert with its exploration noise (so recoveries are
in the data); later turns by the current champion through its served endpoint, with the
privileged expert as safety driver (its takeovers are flagged as interventions in the logs).
Episodes go round-robin over the world's tasks; when the champion drives, `fleet.focus` of them go
to the tasks where it fell short of the expert on the held-out scenes, in proportion to the gap
(`stages.evaluate.focus_tasks`). Logs land in ``<landing>/<world>/turn-NNNN/``.
"""
from __future__ import annotations

from collections import Counter

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.promote import champion_gaps
from flows.runtime import POLICY, Context, ensure_ray
from sim import worlds
from stages import adapters, storage
from stages.evaluate import focus_tasks


def fleet_scenes(ctx: Context, turn: int, *, champion: int | None = None) -> list[tuple[int, str]]:
    """(seed, task) of each episode of the turn; the seeds never meet the held-out ones. ``champion``:
    the version of the policy that drives (None: the expert); `fleet.focus` of its episodes follow
    its per-task gaps to the expert, the rest `fleet.task_weights`."""
    f = ctx.config.fleet
    seeds = [f.seed_base + 1000 * turn + i
             for i in range((champion is not None and f.champion_episodes) or f.episodes)]
    if set(seeds) & set(ctx.config.eval_seeds):
        raise ValueError("fleet seeds overlap the held-out evaluation seeds; change fleet.seed_base")
    tasks = ctx.world.spec.task_names
    if unknown := sorted(set(f.task_weights) - set(tasks)):
        raise ValueError(f"fleet.task_weights names tasks {unknown} that world {ctx.world_name!r} does not have; "
                         f"its tasks: {list(tasks)}")
    gaps = champion_gaps(ctx, champion) if champion is not None and f.focus else {}
    return list(zip(seeds, focus_tasks(tasks, len(seeds), gaps=gaps, focus=f.focus, weights=f.task_weights)))


def driver_spec(ctx: Context, endpoint: str | None) -> dict:
    """Who drives this turn: the champion's endpoint when there is one, else the noisy expert."""
    champion = ctx.registry.get(POLICY, alias="champion")
    if champion is None or endpoint is None:
        return {"kind": "expert", "noisy": True}
    return {"kind": "endpoint", "url": endpoint, "history": champion.config["history"],
            "version": f"{POLICY}:v{champion.version}", "champion": champion.version}


@task(name="drive-episodes", cache_policy=NO_CACHE)
def drive(ctx: Context, turn: int, spec: dict) -> list[dict]:
    who = "expert" if spec["kind"] == "expert" else "champion"
    scenes = fleet_scenes(ctx, turn, champion=spec.get("champion"))
    uris = [storage.join(ctx.fleet_landing_uri, f"turn-{turn:04d}", f"{who}-{task}-seed-{s}.mcap")
            for s, task in scenes]
    return adapters.run_rollouts(scenes, spec=spec, world=ctx.config.world, safety="active",
                                 log_uris=uris, storage_options=ctx.storage_options,
                                 parallelism=ctx.config.fleet.parallelism, desc="fleet")


@flow(name="fleet")
def fleet_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
               world: str = worlds.DEFAULT, overrides: list[str] | None = None,
               config_file: str | None = None, turn: int | None = None, endpoint: str | None = None) -> dict:
    """Drive `config.fleet.episodes` episodes (`champion_episodes` when the champion drives) and log
    them; returns a summary."""
    ctx = Context.create(config=config, lake=lake, landing=landing, world=world, overrides=overrides,
                         config_file=config_file)
    with ctx.writer_lock():
        ensure_ray()
        turn = ctx.current_turn() if turn is None else turn
        spec = driver_spec(ctx, endpoint)
        summaries = drive(ctx, turn, spec)
        n = len(summaries)
        summary = {
            "stage": "fleet", "turn": turn, "driver": spec.get("version", spec["kind"]), "episodes": n,
            "mean_score": sum(s["score"] for s in summaries) / n,
            "interventions": sum(s["interventions"] for s in summaries),
            "frames": sum(s["steps"] for s in summaries),
            "success_rate": sum(s["success"] for s in summaries) / n,
            "tasks": dict(sorted(Counter(s["task"] for s in summaries).items())),
            "landing": storage.join(ctx.fleet_landing_uri, f"turn-{turn:04d}"),
        }
        get_run_logger().info("fleet: %s", summary)
        return summary


