"""Curate flow: new logs in the landing zone -> Lance `episodes`, `frames`, `rejects` tables.

A manifest table (`sources`: URI, size, etag, content hash, outcome) makes the flow incremental: a
log already processed with the same size and etag is skipped, and every table write is keyed
(episode id from the content hash, frame id, reject id), so a re-run adds nothing twice.
Every source seen is accounted for: kept + rejected = seen.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.runtime import Context, ensure_ray
from stages import adapters, storage
from stages.curate import EPISODES, REJECTS

SOURCES = pa.schema([
    ("source_key", pa.string()), ("source_uri", pa.string()), ("size", pa.int64()), ("etag", pa.string()),
    ("content_hash", pa.string()), ("outcome", pa.string()), ("episode_id", pa.string()),
    ("turn", pa.int64()), ("processed_at", pa.timestamp("us", tz="UTC")),
])


def source_key(source: dict) -> str:
    return hashlib.sha256(f"{source['uri']}|{source['size']}|{source['etag']}".encode()).hexdigest()[:32]


@task(name="list-new-sources", cache_policy=NO_CACHE)
def new_sources(ctx: Context) -> tuple[list[dict], int]:
    """Logs in the landing zone not yet in the manifest (with the same size and etag)."""
    listed = storage.list_objects(ctx.landing_uri, suffix=".mcap", storage_options=ctx.storage_options)
    done = set()
    if ctx.lake.exists("sources"):
        done = set(ctx.lake.read("sources", columns=["source_key"]).column("source_key").to_pylist())
    return [s for s in listed if source_key(s) not in done], len(listed)


@task(name="write-tables", cache_policy=NO_CACHE)
def write_tables(ctx: Context, results: list[dict], turn: int) -> dict:
    lake, now = ctx.lake, datetime.now(timezone.utc)
    kept = [r for r in results if r["episode"] is not None]
    rejected = [r for r in results if r["reject"] is not None]
    added = {"frames": 0, "episodes": 0, "rejects": 0}
    if kept:  # frames first: an episode row exists only once all its frames are in
        added["frames"] = lake.append("frames", pa.concat_tables([r["frames"] for r in kept]), key="frame_id")
        added["episodes"] = lake.append("episodes", pa.Table.from_pylist([r["episode"] for r in kept],
                                                                           schema=EPISODES),
                                        key="episode_id")
    if rejected:
        added["rejects"] = lake.append("rejects", pa.Table.from_pylist([r["reject"] for r in rejected],
                                                                         schema=REJECTS),
                                       key="reject_id")
    manifest = [{"source_key": source_key(r["source"]), "source_uri": r["source"]["uri"],
                 "size": r["source"]["size"], "etag": r["source"]["etag"],
                 "content_hash": r["source"].get("content_hash", ""),
                 "outcome": "kept" if r["episode"] else "rejected",
                 "episode_id": r["episode"]["episode_id"] if r["episode"] else "",
                 "turn": turn, "processed_at": now} for r in results]
    if manifest:
        lake.append("sources", pa.Table.from_pylist(manifest, schema=SOURCES), key="source_key")
    return added


@flow(name="curate")
def curate_flow(config: str = "default", lake: str = "./lake", landing: str = "./landing",
                turn: int | None = None) -> dict:
    """Ingest new MCAP logs; returns counts (seen = kept + rejected), rows added and table versions."""
    ctx = Context.create(config=config, lake=lake, landing=landing)
    ensure_ray()
    turn = ctx.current_turn() if turn is None else turn
    sources, listed = new_sources(ctx)
    c = ctx.config.curate
    results = adapters.curate_sources(sources, storage_options=ctx.storage_options, turn=turn,
                                      image_size=ctx.config.world.image_size, min_length=c.min_length,
                                      val_fraction=c.val_fraction, parallelism=ctx.config.fleet.parallelism)
    added = write_tables(ctx, results, turn)
    for name in ("episodes", "frames", "rejects"):
        if ctx.lake.exists(name):
            ctx.lake.save_config(name, ctx.config.to_dict())
    summary = {
        "stage": "curate", "turn": turn, "listed": listed, "seen": len(sources),
        "kept": sum(r["episode"] is not None for r in results),
        "rejected": sum(r["reject"] is not None for r in results),
        "rejects": [{"source": r["reject"]["source_uri"], "reason": r["reject"]["reason"]}
                    for r in results if r["reject"] is not None],
        "rows_added": added,
        "versions": {n: ctx.lake.version(n) for n in ("episodes", "frames", "rejects") if ctx.lake.exists(n)},
    }
    assert summary["kept"] + summary["rejected"] == summary["seen"], "a source was lost"
    get_run_logger().info("curate: %s", {k: v for k, v in summary.items() if k != "rejects"})
    return summary
