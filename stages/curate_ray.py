"""Ray adapters for curation: ingest units in tasks, judge spans in Ray Data batches, describe clips.

1. ``ingest`` — one Ray task per source unit runs ``stages.ingest.ingest_unit``; each span's
   frames table goes to the object store, only rows and references come back.
2. ``judge`` — a Ray Data pipeline over those tables (one block per span) runs the quality
   signals (``stages.quality``) on every frame, decides keep/reject per span, mines events and
   cuts clips (``stages.events``) for kept spans, and writes kept frames as uncommitted Lance
   fragments from the worker, so images never pass through the driver. Each clip carries ``k``
   of its frames (for the reasoner) and, where the log has privileged state, its label tags.
3. ``describe`` — Ray Data over clips with an actor pool holding the reasoner: an embedding,
   structured tags and a caption per clip.
Resources are declared here, beside the adapters.
"""
from __future__ import annotations

import pickle
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from stages import describe, events, quality, storage
from stages.adapters import _bounded
from stages.curate import to_json
from stages.ingest import ingest_unit
from stages.lake import Lake, images, vectors
from stages.streams import Mapping

INGEST_CPUS = 1
JUDGE_CPUS = 1
DESCRIBE_CPUS = 1


@ray.remote(num_cpus=INGEST_CPUS)
def _ingest(unit: dict, storage_options: dict | None, params: dict, known: frozenset) -> dict:
    result = ingest_unit(unit, fetch=lambda uri: storage.read_bytes(uri, storage_options),
                         mapping=Mapping.from_dict(params["mapping"]), **params["ingest"])
    result["spans"] = [(row, None if row["episode_id"] in known else ray.put(table))
                       for row, table in result["spans"]]
    return result


def ingest(units: list[dict], *, storage_options: dict | None, params: dict, known: set,
           parallelism: int) -> list[dict]:
    """``ingest_unit`` over units in Ray tasks; spans already in the lake (``known`` episode ids)
    come back with no frames reference."""
    frozen = frozenset(known)
    return _bounded(lambda u: _ingest.remote(u, storage_options, params, frozen), units, parallelism)


def _span(batch: pa.Table, mask: np.ndarray) -> dict[str, np.ndarray]:
    sub = batch.filter(pa.array(mask))
    return {"timestamps_ns": sub.column("timestamp_ns").to_numpy(),
            "actions": vectors(sub.column("action")), "states": vectors(sub.column("state")),
            "rewards": sub.column("reward").to_numpy(zero_copy_only=False).astype(np.float32),
            "interventions": sub.column("intervention").to_numpy(zero_copy_only=False).astype(bool),
            "off_track": sub.column("off_track").to_numpy(zero_copy_only=False).astype(bool)}


def judge_batch(batch: pa.Table, *, lake: Lake, signal_params: dict, verdict_params: dict,
                event_params: dict, clip_k: int) -> pa.Table:
    """Quality, verdict, events, clips and fragment writes for the spans in one batch.

    Returns one row per span: span_id, kept, reasons (JSON list), detail, counts (JSON),
    frames, fragments (pickled Lance fragment metadata of the kept frames), clips (JSON list),
    clip_frames (pickled uint8[C,k,H,W,3] of the clips' sampled frames).
    """
    ids = batch.column("episode_id").to_numpy(zero_copy_only=False)
    imgs = images(batch.column("image"))
    signals = quality.frame_signals(
        {"span_id": ids, "step": batch.column("step").to_numpy(),
         "timestamp_ns": batch.column("timestamp_ns").to_numpy(), "image": imgs,
         "action": vectors(batch.column("action")), "state": vectors(batch.column("state"))},
        **signal_params)
    config = events.EventConfig(**event_params)
    out: dict[str, list] = {k: [] for k in ("span_id", "kept", "reasons", "detail", "counts", "frames",
                                            "fragments", "clips", "clip_frames")}
    for verdict in quality.span_verdicts(signals, **verdict_params):
        mask = ids == verdict["span_id"]
        out["span_id"].append(verdict["span_id"])
        out["kept"].append(bool(verdict["kept"]))
        out["reasons"].append(to_json(verdict["reasons"]))
        out["detail"].append(verdict["detail"])
        out["counts"].append(to_json(verdict["counts"]))
        out["frames"].append(int(mask.sum()))
        fragments, clips, clip_frames = [], [], np.zeros((0,), np.uint8)
        if verdict["kept"]:
            flags = pa.array([list(f) for f in np.asarray(signals["flags"], dtype=object)[mask]],
                             pa.list_(pa.string()))
            table = batch.filter(pa.array(mask))
            table = table.set_column(table.schema.get_field_index("flags"), "flags", flags)
            fragments = lake.write_fragments("frames", table)
            span = _span(batch, mask)
            found = events.mine_events(span, config=config)
            clips = events.event_clips(int(mask.sum()), found, config=config)
            span_imgs = imgs[mask]
            clip_frames = np.stack([describe.clip_frames(span_imgs, c["start_step"], c["end_step"], clip_k)
                                    for c in clips]) if clips else clip_frames
            for c in clips:
                c["label_tags"] = describe.privileged_tags(
                    span["states"], timestamps_ns=span["timestamps_ns"], start=c["start_step"],
                    end=c["end_step"])
        out["fragments"].append(pickle.dumps(fragments))
        out["clips"].append(to_json(clips))
        out["clip_frames"].append(pickle.dumps(clip_frames))
    return pa.table({k: pa.array(v, pa.binary() if k in ("fragments", "clip_frames") else None)
                     for k, v in out.items()})


def judge(frame_refs: list, *, lake: Lake, signal_params: dict, verdict_params: dict,
          event_params: dict, clip_k: int, parallelism: int) -> list[dict]:
    """Run ``judge_batch`` over span frames tables (object refs) with Ray Data."""
    if not frame_refs:
        return []
    ds = ray.data.from_arrow_refs(frame_refs).map_batches(
        judge_batch, batch_size=None, batch_format="pyarrow", num_cpus=JUDGE_CPUS,
        concurrency=max(1, parallelism),
        fn_kwargs={"lake": lake, "signal_params": signal_params, "verdict_params": verdict_params,
                   "event_params": event_params, "clip_k": clip_k})
    return ds.take_all()


class _Describer:
    """Ray Data actor: holds the reasoner, adds embedding / tags / caption to clip rows."""

    def __init__(self, reasoner_uri: str, storage_options: dict | None) -> None:
        import torch

        from models.reasoner import load_reasoner

        torch.set_num_threads(1)
        self.reasoner = load_reasoner(reasoner_uri, storage_options=storage_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        clips = np.stack([pickle.loads(b) for b in batch["frames"]])  # [N,k,H,W,3]
        n, k = clips.shape[:2]
        emb = self.reasoner.embed(clips.reshape(n * k, *clips.shape[2:]))
        described = self.reasoner.describe(clips, [str(e) for e in batch["event"]])
        emb = emb.reshape(n, k, -1).mean(axis=1)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return {"clip_id": batch["clip_id"], "embedding": emb.astype(np.float32),
                "tags": np.array([to_json(d["tags"]) for d in described], dtype=object),
                "caption": np.array([d["caption"] for d in described], dtype=object)}


def describe_clips(clips: pa.Table, *, reasoner_uri: str, storage_options: dict | None,
                   parallelism: int, batch_size: int = 128) -> pa.Table:
    """Embedding, tags and caption for each clip (columns clip_id, event, frames) via Ray Data."""
    if clips.num_rows == 0:
        return pa.table({"clip_id": pa.array([], pa.string())})
    ds = ray.data.from_arrow(clips.select(["clip_id", "event", "frames"])).map_batches(
        _Describer, batch_size=batch_size, batch_format="numpy", num_cpus=DESCRIBE_CPUS,
        concurrency=max(1, min(parallelism, -(-clips.num_rows // batch_size))),
        fn_constructor_kwargs={"reasoner_uri": reasoner_uri, "storage_options": storage_options})
    rows = ds.to_arrow_refs()
    return pa.concat_tables(ray.get(rows))


def event_params(config: Any) -> dict:
    """The event miner's parameters from a config dataclass (a picklable dict)."""
    return asdict(config)
