"""Clips of the newly kept episodes: reasoner, embeddings, tags, captions, near-duplicates.

Called by the curate flow before it commits the episodes rows. The reasoner is, in order: the
directory or URI in ``curate.reasoner`` (ours, or a local vision-language model), the registry's
``reasoner`` champion, or a new one trained here on the clips whose logs carry privileged state
(tag accuracy measured on the clips of held-out episodes and recorded in the registry). With
none of these, clips are written without embedding, tags or caption and are not de-duplicated.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import tempfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from flows.runtime import Context
from stages import curate_ray, dedup, events
from stages.curate import now_utc
from stages.lake import images
from stages.schemas import clips_schema, to_json

REASONER = "reasoner"


def candidate_clips(verdicts: dict, episodes: list[dict], turn: int) -> pa.Table:
    """One row per clip of the episodes about to be added; "frames" holds each clip's sampled
    frames (a fixed-shape uint8 tensor column [k, H, W, 3])."""
    rows, frames = [], []
    for ep in episodes:
        verdict = verdicts[ep["episode_id"]]
        clips = json.loads(verdict["clips"])
        if clips:
            frames.append(pickle.loads(verdict["clip_frames"]))
        for clip in clips:
            rows.append({
                "clip_id": f"{ep['episode_id']}:{clip['start_step']:05d}-{clip['end_step']:05d}:{clip['event']}",
                "episode_id": ep["episode_id"], "source_uri": ep["source_uri"],
                "start_step": clip["start_step"], "end_step": clip["end_step"],
                "event": clip["event"], "event_step": clip["event_step"], "score": clip["score"],
                "label_tags": to_json(clip["label_tags"]) if clip.get("label_tags") else "",
                "split": ep["split"], "turn": turn})
    if not rows:
        return pa.table({"clip_id": pa.array([], pa.string())})
    table = pa.Table.from_pylist(rows)
    return table.append_column("frames", pa.FixedShapeTensorArray.from_numpy_ndarray(np.concatenate(frames)))


def _held_out(table: pa.Table) -> np.ndarray:
    """Clips of "val" episodes; if there are none, of a hashed quarter of the episodes."""
    split = np.asarray(table.column("split").to_pylist())
    if (split == "val").any() and (split != "val").any():
        return split == "val"
    episodes = table.column("episode_id").to_pylist()
    held = np.array([int(hashlib.sha256(e.encode()).hexdigest()[:8], 16) % 4 == 0 for e in episodes])
    if held.all() or not held.any():  # too few episodes to hash apart: hold out the last one
        held = np.asarray(episodes) == sorted(set(episodes))[-1]
    return held


@ray.remote(num_cpus=1)
def _train(clips: np.ndarray, evts: list, tags: list, held: np.ndarray, preset: str, world: str,
           device: str) -> tuple[bytes, dict]:
    import dataclasses

    import torch

    from models import reasoner
    from sim import worlds

    torch.set_num_threads(1)
    spec = worlds.spec(world)
    config = dataclasses.replace(reasoner.preset(preset), tags=dict(spec.tags), events=spec.reasoner_events,
                                 mirror=dict(spec.mirror))
    model, metrics = reasoner.train_reasoner(
        clips[~held], [e for e, h in zip(evts, held) if not h], [t for t, h in zip(tags, held) if not h],
        config=config, val_clips=clips[held],
        val_events=[e for e, h in zip(evts, held) if h], val_tags=[t for t, h in zip(tags, held) if h],
        device=device)
    with tempfile.TemporaryDirectory() as d:
        reasoner.save(model, d)
        return _pack(d), metrics


def _pack(directory: str) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(directory, arcname=".")
    return buf.getvalue()


def reasoner_uri(ctx: Context, clips: pa.Table, turn: int) -> tuple[str, dict]:
    """Where the reasoner is (see the module docstring); ("", {}) when there is none."""
    c = ctx.config.curate
    if c.reasoner:
        return c.reasoner, {"source": "config"}
    champion = ctx.registry.get(REASONER, alias="champion")
    if champion is not None:
        return champion.artifact_uri, {"source": f"registry v{champion.version}", **champion.metrics}
    labelled = np.array([bool(t) for t in clips.column("label_tags").to_pylist()]) if clips.num_rows else []
    if clips.num_rows == 0 or not np.any(labelled) or len(set(clips.filter(pa.array(labelled))
                                                              .column("episode_id").to_pylist())) < 2:
        return "", {}
    table = clips.filter(pa.array(labelled))
    frames = images(table.column("frames"))
    held = _held_out(table)
    tags = [json.loads(t) for t in table.column("label_tags").to_pylist()]
    gpu = ctx.config.train.use_gpu
    packed, metrics = ray.get(_train.options(num_gpus=int(gpu)).remote(
        frames, table.column("event").to_pylist(), tags, held, c.reasoner_preset, ctx.world_name,
        "cuda" if gpu else "cpu"))
    import io
    import tarfile

    with tempfile.TemporaryDirectory() as d:
        with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
            tar.extractall(d, filter="data")
        mv = ctx.registry.register(REASONER, d, kind="reasoner", metrics=metrics,
                                   lineage={"turn": turn, "clips": int(table.num_rows),
                                            "held_out_clips": int(held.sum()),
                                            "frames_version": ctx.lake.version("frames")})
    ctx.registry.set_alias(REASONER, "champion", mv.version)
    return mv.artifact_uri, {"source": f"trained v{mv.version}", **metrics}


def write_clips(ctx: Context, verdicts: dict, episodes: list[dict], turn: int) -> dict:
    """Describe, de-duplicate and write the clips of ``episodes``.

    Returns ``{"added": rows, "events": {event: clips}, "duplicates": clips marked,
    "describer": where the reasoner came from and its held-out metrics}``.
    """
    c = ctx.config.curate
    clips = candidate_clips(verdicts, episodes, turn)
    if clips.num_rows == 0:
        return {"added": 0, "events": {}, "duplicates": 0, "describer": {}}
    uri, info = reasoner_uri(ctx, clips, turn)
    n = clips.num_rows
    emb = [[] for _ in range(n)]
    tags, captions = [""] * n, [""] * n
    duplicate_of, novelty = [""] * n, np.full(n, np.inf, np.float32)
    evts = clips.column("event").to_pylist()
    if uri:
        described = curate_ray.describe_clips(clips, reasoner_uri=uri, storage_options=ctx.storage_options,
                                              world=dataclasses.asdict(ctx.config.world),
                                              parallelism=ctx.config.fleet.parallelism)
        order = {cid: i for i, cid in enumerate(described.column("clip_id").to_pylist())}
        idx = [order[cid] for cid in clips.column("clip_id").to_pylist()]
        vectors = np.asarray(described.column("embedding").to_pylist(), np.float32)[idx]
        tags = [described.column("tags")[i].as_py() for i in idx]
        captions = [described.column("caption")[i].as_py() for i in idx]
        bank = ctx.lake.read("clips", columns=["clip_id", "event", "embedding"],
                             filter="duplicate_of = ''") if ctx.lake.exists("clips") else None
        bank = bank.filter(pc.equal(pc.list_value_length(bank.column("embedding")), vectors.shape[1])) \
            if bank is not None else None
        have = bank is not None and bank.num_rows > 0
        duplicate_of, novelty = dedup.mark_duplicates(
            vectors, ids=clips.column("clip_id").to_pylist(), groups=evts, threshold=c.dedup_threshold,
            existing=np.asarray(bank.column("embedding").to_pylist(), np.float32) if have else None,
            existing_ids=bank.column("clip_id").to_pylist() if have else None,
            existing_groups=bank.column("event").to_pylist() if have else None)
        if have:  # routine clips far from everything the lake holds are mined as novelty
            evts = ["novelty" if e == "none" and d > c.novelty_threshold else e for e, d in zip(evts, novelty)]
        emb = vectors.tolist()
    weights = events.sample_weights(evts, weights=events.oversample(ctx.config.spec))
    out = clips.drop_columns(["frames"]).set_column(clips.schema.get_field_index("event"), "event",
                                                   pa.array(evts, pa.string()))
    out = out.append_column("weight", pa.array(weights, pa.float32()))
    out = out.append_column("embedding", pa.array(emb, pa.list_(pa.float32())))
    out = out.append_column("duplicate_of", pa.array(duplicate_of, pa.string()))
    out = out.append_column("novelty", pa.array(np.where(np.isfinite(novelty), novelty, -1.0), pa.float32()))
    out = out.append_column("tags", pa.array(tags, pa.string()))
    out = out.append_column("caption", pa.array(captions, pa.string()))
    out = out.append_column("describer", pa.array([to_json(info) if uri else ""] * n, pa.string()))
    out = out.append_column("created_at", pa.array([now_utc()] * n, pa.timestamp("us", tz="UTC")))
    schema = clips_schema()
    added = ctx.lake.append("clips", out.select(schema.names).cast(schema), key="clip_id")
    return {"added": added, "events": dict(Counter(evts)), "duplicates": sum(map(bool, duplicate_of)),
            "describer": info}
