"""Ray adapters for curation: ingest units in tasks, judge spans in Ray Data batches, describe clips.

1. ``ingest`` — one Ray task per source unit runs ``stages.ingest.ingest_unit``; each span's
   frames table goes to the object store, only rows and references come back.
2. ``judge`` — a Ray Data pipeline over those tables (one block per span) runs the quality
   signals (``stages.quality``) on every frame, decides keep/reject per span, mines events and
   cuts clips (``stages.events``) for kept spans, and writes kept frames as uncommitted Lance
   fragments from the worker, so images never pass through the driver. Each clip carries ``k``
   of its frames (for the reasoner) and, where the log has privileged state, its label tags.
3. ``describe`` — describer actors hold the reasoner and give each clip an embedding,
   structured tags and a caption; the actors live as long as the driver's Ray job, so later
   curate runs of the same process (the turns of a flywheel run) skip loading torch again.
Resources are declared here, beside the adapters.
"""
from __future__ import annotations

import pickle
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
# Describer actors outlive the describe step (see ``_describers``) and are idle outside it: they
# reserve no CPU, so the stages after curation (Ray Train, rollouts) can always be scheduled.
DESCRIBE_CPUS = 0


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


_REASONERS: dict[tuple, Any] = {}  # per process: the loaded reasoner by (URI, its files)


def _reasoner(uri: str, storage_options: dict | None) -> Any:
    """The reasoner at ``uri``, loaded once per process while its files stay the same; a
    changed file (size or etag) loads the model again."""
    files = tuple((o["uri"], o["size"], o["etag"]) for o in storage.list_objects(
        uri, suffix="", storage_options=storage_options))
    key = (uri, files)
    if key not in _REASONERS:
        from models.reasoner import load_reasoner

        _REASONERS.clear()
        _REASONERS[key] = load_reasoner(uri, storage_options=storage_options)
    return _REASONERS[key]


def describe_batch(clips: pa.Table, *, reasoner: Any) -> pa.Table:
    """Embedding (the L2-normalised mean over a clip's frames), tags and caption for clip rows
    (clip_id, event, pickled uint8[k,H,W,3] frames)."""
    frames = np.stack([pickle.loads(b) for b in clips.column("frames").to_pylist()])  # [N,k,H,W,3]
    n, k = frames.shape[:2]
    emb = reasoner.embed(frames.reshape(n * k, *frames.shape[2:])).reshape(n, k, -1).mean(axis=1)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    described = reasoner.describe(frames, [str(e) for e in clips.column("event").to_pylist()])
    return pa.table({"clip_id": clips.column("clip_id"),
                     "embedding": pa.array(emb.astype(np.float32).tolist(), pa.list_(pa.float32())),
                     "tags": pa.array([to_json(d["tags"]) for d in described], pa.string()),
                     "caption": pa.array([d["caption"] for d in described], pa.string())})


@ray.remote(num_cpus=DESCRIBE_CPUS)
class Describer:
    """A Ray actor holding reasoners (``_reasoner``) across the curate runs of one driver process."""

    def __init__(self) -> None:
        import torch

        import models.reasoner  # noqa: F401 -- importing is most of the start-up: do it at creation

        torch.set_num_threads(1)

    def describe(self, clips: pa.Table, reasoner_uri: str, storage_options: dict | None) -> pa.Table:
        return describe_batch(clips, reasoner=_reasoner(reasoner_uri, storage_options))


_DESCRIBERS: dict[str, list] = {}  # Ray job id -> describer actors, reused by later runs of this process


def _describers(count: int) -> list:
    """``count`` describer actors of this Ray job, created on first use and kept (torch and
    the reasoner load once per actor, not once per curate run)."""
    job = ray.get_runtime_context().get_job_id()
    actors = _DESCRIBERS.setdefault(job, [])
    actors += [Describer.remote() for _ in range(count - len(actors))]
    return actors[:count]


def describe_clips(clips: pa.Table, *, reasoner_uri: str, storage_options: dict | None,
                   parallelism: int, batch_size: int = 128) -> pa.Table:
    """Embedding, tags and caption for each clip (columns clip_id, event, frames), in chunks of
    ``batch_size`` spread over ``parallelism`` describer actors."""
    if clips.num_rows == 0:
        return pa.table({"clip_id": pa.array([], pa.string())})
    clips = clips.select(["clip_id", "event", "frames"])
    actors = _describers(max(1, parallelism))  # always all: a later, larger run finds them warm
    futures = [actors[i % len(actors)].describe.remote(clips.slice(start, batch_size), reasoner_uri,
                                                       storage_options)
               for i, start in enumerate(range(0, clips.num_rows, batch_size))]
    return pa.concat_tables(ray.get(futures))
