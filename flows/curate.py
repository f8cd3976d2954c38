"""Curate flow: new logs in the landing zone -> Lance `frames`, `episodes`, `clips`, `rejects`.

Source units (an MCAP file, a ROS bag, a LeRobot dataset; see ``stages.sources``) not yet in
the `sources` manifest are decoded, aligned and judged on quality in one Ray Data pipeline,
mined for events and cut into clips, and the clips are embedded, de-duplicated and described
(``flows.describe``). Every unit seen is accounted for: kept + rejected = seen.

Crash safety: kept frames are written as uncommitted fragments, then committed in this order:
frames, clips, episodes (the completion mark of an episode), rejects, and last the manifest.
A run that dies half-way leaves frames or clips whose episode row is missing; the next run
deletes those orphans first and processes the unit again (it is not in the manifest), so
nothing is duplicated and nothing is lost. Another live run's in-flight episodes look exactly like
such orphans, which is why curate (as every flow that writes) holds the lake's writer lock
(``stages.lock``): while it is held no other run writes the lake, so every orphan is a dead run's.
"""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.config import FlywheelConfig
from flows.describe import write_clips
from flows.runtime import Context, code_version, ensure_ray
from sim import worlds
from stages import curate_ray, lock, sources, storage
from stages.curate import SpanVerdict, reject_row
from stages.ingest import IngestResult
from stages.schemas import EPISODES, REJECTS, SOURCES, features_of, frames_schema, to_json

TABLES = ("frames", "episodes", "clips", "rejects", "sources")


@task(name="list-new-sources", cache_policy=NO_CACHE)
def new_units(ctx: Context) -> tuple[list[dict], int]:
    """Units in the landing zone whose key (URI, files, sizes, etags) is not in the manifest."""
    listed = storage.list_objects(ctx.landing_uri, suffix="", storage_options=ctx.storage_options)
    others = [storage.join(ctx.landing_uri, name) + "/" for name in worlds.names() if name != ctx.world_name]
    listed = [o for o in listed if not any(o["uri"].startswith(p) for p in others)]  # another world's fleet logs
    units = sources.discover(listed, root=ctx.landing_uri)
    done = ctx.lake.keys("sources", "source_key")
    return [u for u in units if u["key"] not in done], len(units)


@task(name="repair", cache_policy=NO_CACHE)
def repair(ctx: Context) -> dict:
    """Delete frames and clips of episodes that never got their episodes row (a crashed run).

    Only under the lake's writer lock (checked): with no other writer alive, no orphan can be a
    live run's episode between its frames commit and its episodes commit."""
    lock.require_held(ctx.lake_uri)
    complete = ctx.lake.keys("episodes", "episode_id")
    removed = {}
    for name in ("frames", "clips"):
        orphans = sorted(ctx.lake.keys(name, "episode_id") - complete)
        if orphans:
            quoted = ",".join("'" + o.replace("'", "''") + "'" for o in orphans)
            before = ctx.lake.count(name)
            ctx.lake.dataset(name).delete(f"episode_id IN ({quoted})")
            removed[name] = before - ctx.lake.count(name)
    return removed


def stage_params(config: FlywheelConfig, turn: int) -> dict:
    """The keyword arguments of the pure stages from a resolved config: ``mapping`` (a dict for
    ``Mapping.from_dict``), ``ingest`` (of ``ingest_unit``) and ``judge`` (of ``judge_spans``)."""
    c, spec = config.curate, config.spec
    return {"mapping": c.mapping, "ingest": {
        "turn": turn, "max_bytes": c.max_log_bytes, "max_frames": c.max_episode_frames,
        "max_side": c.max_image_side, "world": spec.name,
        "adopt_undeclared": c.adopt_undeclared, "action_dim": len(spec.actions),
        "state_dim": len(spec.state_names), "signal_names": spec.signals, "min_length": c.min_length,
        "gap_factor": c.gap_factor, "hold_factor": c.hold_factor, "val_fraction": c.val_fraction,
        "features": features_of(spec),
        "lineage": {"code_version": code_version(), "config_digest": config.digest()}},
        "judge": {"clip_k": c.clip_frames, "signal_params": {}, "event_params": dict(c.events),
                  "world": dataclasses.asdict(config.world),
                  "verdict_params": {"max_frozen_fraction": c.max_frozen_fraction,
                                     "max_dark_fraction": c.max_dark_fraction,
                                     "max_dropped_fraction": c.max_dropped_fraction,
                                     "action_low": spec.action_low.tolist(),
                                     "action_high": spec.action_high.tolist()}}}


@task(name="ingest-and-judge", cache_policy=NO_CACHE)
def ingest_and_judge(ctx: Context, units: list[dict],
                     turn: int) -> tuple[list[IngestResult], dict[str, SpanVerdict]]:
    """Decode, align and judge each unit's new spans (one Ray Data pipeline)."""
    params = stage_params(ctx.config, turn)
    results, judged = curate_ray.ingest_and_judge(
        units, storage_options=ctx.storage_options, params={k: params[k] for k in ("mapping", "ingest")},
        known=ctx.lake.keys("episodes", "episode_id"), lake=ctx.lake, judge_params=params["judge"],
        parallelism=ctx.config.fleet.parallelism)
    return results, {v.span_id: v for v in judged}


@task(name="commit-tables", cache_policy=NO_CACHE)
def commit(ctx: Context, units: list[dict], results: list[IngestResult], verdicts: dict[str, SpanVerdict],
           turn: int) -> dict:
    """Commit frames, clips, episodes, rejects and the manifest, in that order; returns counts."""
    spec, lake, now = ctx.config.spec, ctx.lake, datetime.now(timezone.utc)
    fragments = [f for v in verdicts.values() for f in v.fragments]
    schema = frames_schema(features_of(spec))
    before = lake.count("frames")
    lake.commit_fragments("frames", fragments, schema)
    added = {"frames": lake.count("frames") - before}
    episodes, rejects, manifest = [], [], []
    for unit, result in zip(units, results):
        rejects += result.rejects
        kept = rejected = frames_kept = 0
        for row in result.episodes:
            verdict = verdicts.get(row["episode_id"])
            if verdict is None:  # already in the lake from an earlier run
                kept, frames_kept = kept + 1, frames_kept + row["length"]
            elif verdict.kept:
                kept, frames_kept = kept + 1, frames_kept + row["length"]
                episodes.append({**row, "quality": to_json(verdict.counts)})
            else:
                rejected += 1
                rejects.append(reject_row(row["source_uri"], stage="quality", reason=",".join(verdict.reasons),
                                          detail=verdict.detail, turn=turn,
                                          span=(row["start_ns"], row["end_ns"]), frames=row["length"]))
        manifest.append({
            "source_key": unit["key"], "source_uri": unit["uri"], "format": unit["format"],
            "files": len(unit["files"]), "size": sum(f["size"] for f in unit["files"]),
            "etag": to_json([f["etag"] for f in unit["files"]]), "content_hash": result.content_hash,
            "outcome": "kept" if kept else "rejected", "episodes": result.episodes_seen,
            "spans_kept": kept, "spans_rejected": rejected + len(result.rejects),
            "frames_seen": result.frames_seen, "frames_kept": frames_kept, "turn": turn,
            "processed_at": now})
    clips = write_clips(ctx, verdicts, episodes, turn)
    added["clips"] = clips.pop("added")
    added["episodes"] = lake.append("episodes", pa.Table.from_pylist(episodes, schema=EPISODES),
                                    key="episode_id") if episodes else 0
    added["rejects"] = lake.append("rejects", pa.Table.from_pylist(rejects, schema=REJECTS),
                                   key="reject_id") if rejects else 0
    if manifest:
        lake.append("sources", pa.Table.from_pylist(manifest, schema=SOURCES), key="source_key")
    lake.compact("frames")  # a fragment per log: the samplers' random reads slow with their count
    return {"added": added, "manifest": manifest, "rejects": rejects, "clips": clips}


def save_lineage(ctx: Context, units: list[dict], turn: int) -> None:
    """Beside each table version: the resolved config and the lineage of this run."""
    lineage = {"turn": turn, "code_version": code_version(), "config_digest": ctx.config.digest(),
               "sources": [{"uri": u["uri"], "format": u["format"], "key": u["key"]} for u in units]}
    for name in TABLES:
        if ctx.lake.exists(name):
            ctx.lake.save_config(name, {**ctx.config.to_dict(), "lineage": lineage})


@flow(name="curate")
def curate_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
                world: str = worlds.DEFAULT, overrides: list[str] | None = None,
                config_file: str | None = None, turn: int | None = None, mapping: dict | None = None, reasoner: str | None = None) -> dict:
    """Ingest new logs; returns counts (seen = kept + rejected), rows added and table versions.

    ``mapping`` overrides which topic or feature plays which role (``stages.streams.Mapping``);
    ``reasoner`` is a saved reasoner or local vision-language model to describe clips with.
    """
    ctx = Context.create(config=config, lake=lake, landing=landing, world=world, overrides=overrides,
                         config_file=config_file)
    with ctx.writer_lock():
        overrides = {"mapping": {**ctx.config.curate.mapping, **mapping}} if mapping else {}
        overrides |= {"reasoner": reasoner} if reasoner else {}
        if overrides:
            curate_cfg = dataclasses.replace(ctx.config.curate, **overrides)
            ctx = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, curate=curate_cfg))
        ensure_ray()
        turn = ctx.current_turn() if turn is None else turn
        repaired = repair(ctx)
        units, listed = new_units(ctx)
        results, verdicts = ingest_and_judge(ctx, units, turn)
        out = commit(ctx, units, results, verdicts, turn)
        save_lineage(ctx, units, turn)
        manifest = out["manifest"]
        summary = {
            "stage": "curate", "turn": turn, "listed": listed, "seen": len(units),
            "kept": sum(m["outcome"] == "kept" for m in manifest),
            "rejected": sum(m["outcome"] == "rejected" for m in manifest),
            "frames_seen": sum(m["frames_seen"] for m in manifest),
            "frames_kept": sum(m["frames_kept"] for m in manifest),
            "spans_kept": sum(m["spans_kept"] for m in manifest),
            "spans_rejected": sum(m["spans_rejected"] for m in manifest),
            "frames_rejected": sum(r["frames"] for r in out["rejects"]),
            "rejects": [{"source": r["source_uri"], "stage": r["stage"], "reason": r["reason"]}
                        for r in out["rejects"]],
            "rows_added": out["added"], "clips": out["clips"], "repaired": repaired,
            "versions": {n: ctx.lake.version(n) for n in TABLES if ctx.lake.exists(n)},
        }
        assert summary["kept"] + summary["rejected"] == summary["seen"], "a source was lost"
        get_run_logger().info("curate: %s", {k: v for k, v in summary.items() if k != "rejects"})
        return summary
