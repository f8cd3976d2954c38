"""Describing clips, for any world: clip frame sampling and the scene reasoner's vocabulary.

A clip is a window [start, end) of an aligned span (one episode cut at gaps). The scene reasoner
(``models.reasoner``) describes it by one value per tag of the world's ``spec.tags``, given the
event mined for it (``"none"``, one of the world's ``spec.events``, or ``"novelty"``, mined at
description time), and a one-line caption (the world's ``caption``). Its training labels are
the world's ``privileged_tags`` (None for logs without privileged state, a real robot's); its
mirror augmentation maps tags by the spec's ``mirror`` (none when the world is not mirror-symmetric).
Everything world-specific is read from the world (``sim.worlds``) here, so the reasoner's
config carries the vocabulary and ``models`` never import a world.

The clips of a curate run, as Arrow: ``candidate_clips`` (from the spans' ``SpanVerdict``s),
``training_clips`` (the labelled ones, with held-out episodes, for training a reasoner) and
``clips_table`` (the final rows: the reasoner's description, de-duplication, novelty, weights).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages import dedup
from stages.curate import SpanVerdict
from stages.events import NONE, sample_weights
from stages.schemas import clips_schema, images, to_json

NOVELTY = "novelty"  # a routine clip far from every clip the lake holds (mined at description time)


def vocabulary(spec: Any) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """The reasoner's vocabulary of a world spec (anything with ``.tags`` and ``.events``; an
    event is an ``EventSpec`` or its name): (tags {tag: values}, events ("none", *the spec's
    events in priority order, "novelty"))."""
    events = (NONE, *(getattr(e, "name", e) for e in spec.events), NOVELTY)
    return {str(k): tuple(v) for k, v in spec.tags.items()}, tuple(dict.fromkeys(events))


def reasoner_config_for(spec: Any, preset: Any = "default", **overrides: Any):
    """A ``models.reasoner.ReasonerConfig`` for a world: the preset (a name or a config) with the
    spec's vocabulary (``vocabulary``) and mirror map (``spec.mirror``, {} when it has none: no
    mirror augmentation), then ``overrides``. ``spec`` may also be a ``World`` (its ``.spec``)."""
    from models import reasoner  # torch: only when a config is built

    spec = getattr(spec, "spec", spec)
    base = reasoner.preset(preset) if isinstance(preset, str) else preset
    tags, events = vocabulary(spec)
    mirror = {k: dict(v) for k, v in (getattr(spec, "mirror", None) or {}).items()}
    return dataclasses.replace(base, tags=tags, events=events, mirror=mirror, **overrides)


def _check_clip(length: int, start: int, end: int) -> None:
    if not 0 <= start < end <= length:
        raise ValueError(f"clip [{start}, {end}) is not a non-empty window of a span of {length} steps")


def clip_frames(frames: np.ndarray, start: int, end: int, k: int) -> np.ndarray:
    """k frames evenly spaced over the clip [start, end), the last one always frames[end-1].

    Indices are end-1 - round(i * (end-1-start) / (k-1)) for i = k-1 .. 0 (just end-1 for
    k = 1), so the first is frames[start] when k > 1; a clip shorter than k repeats frames.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8[T, H, W, 3], got {frames.dtype}{list(frames.shape)}")
    return frames[clip_indices(len(frames), start, end, k)]


def clip_indices(n: int, start: int, end: int, k: int) -> np.ndarray:
    """The indices ``clip_frames`` takes from ``n`` frames."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_clip(n, start, end)
    step = (end - 1 - start) / max(k - 1, 1)
    return end - 1 - np.round(step * np.arange(k - 1, -1, -1)).astype(np.int64)


def candidate_clips(verdicts: Mapping[str, SpanVerdict], episodes: Sequence[dict], *, turn: int) -> pa.Table:
    """One row per clip of the episodes about to be added (their verdicts by episode id);
    "frames" holds each clip's sampled frames (a fixed-shape uint8 tensor column [k, H, W, 3])."""
    rows, frames = [], []
    for ep in episodes:
        verdict = verdicts[ep["episode_id"]]
        if verdict.clips:
            frames.append(verdict.clip_frames)
        for clip in verdict.clips:
            rows.append({
                "clip_id": f"{ep['episode_id']}:{clip['start_step']:05d}-{clip['end_step']:05d}:{clip['event']}",
                "episode_id": ep["episode_id"], "source_uri": ep["source_uri"],
                "start_step": clip["start_step"], "end_step": clip["end_step"],
                "event": clip["event"], "event_step": clip["event_step"], "score": clip["score"],
                "label_tags": to_json(clip["label_tags"]) if clip.get("label_tags") else "",
                "task": ep.get("task", ""), "split": ep["split"], "turn": turn})
    if not rows:
        return pa.table({"clip_id": pa.array([], pa.string())})
    table = pa.Table.from_pylist(rows)
    return table.append_column("frames", pa.FixedShapeTensorArray.from_numpy_ndarray(np.concatenate(frames)))


def held_out(table: pa.Table) -> np.ndarray:
    """Clips of "val" episodes; if there are none, of a hashed quarter of the episodes."""
    split = np.asarray(table.column("split").to_pylist())
    if (split == "val").any() and (split != "val").any():
        return split == "val"
    episodes = table.column("episode_id").to_pylist()
    held = np.array([int(hashlib.sha256(e.encode()).hexdigest()[:8], 16) % 4 == 0 for e in episodes])
    if held.all() or not held.any():  # too few episodes to hash apart: hold out the last one
        held = np.asarray(episodes) == sorted(set(episodes))[-1]
    return held


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingClips:
    """A reasoner's training set: clip frames uint8 [N, k, H, W, 3], their events, label tags and
    tasks (a name or instruction, "" if the log has none), and which are held out (bool [N])."""

    frames: np.ndarray
    events: list[str]
    tags: list[dict[str, str]]
    tasks: list[str]
    held: np.ndarray


def training_clips(clips: pa.Table) -> TrainingClips | None:
    """The ``candidate_clips`` with label tags (from privileged state), clips of held-out
    episodes marked (``held_out``); None when fewer than two episodes have labelled clips."""
    labelled = np.array([bool(t) for t in clips.column("label_tags").to_pylist()]) if clips.num_rows else []
    if clips.num_rows == 0 or not np.any(labelled) or len(set(clips.filter(pa.array(labelled))
                                                              .column("episode_id").to_pylist())) < 2:
        return None
    table = clips.filter(pa.array(labelled))
    return TrainingClips(frames=images(table.column("frames")), events=table.column("event").to_pylist(),
                         tags=[json.loads(t) for t in table.column("label_tags").to_pylist()],
                         tasks=table.column("task").to_pylist(), held=held_out(table))


def plan_accuracy(plan: Callable[[str, dict], str], task_names: Mapping[str, str], tasks: Sequence[str],
                  pred: Sequence[dict], true: Sequence[dict]) -> dict[str, Any]:
    """How often the plan in words from predicted tags, ``plan(task, tags)`` (the world's), is the
    plan from the simulator's tags, on clips whose task (a name or an instruction: ``task_names``
    maps both to the name) the world knows; {"n": clips judged, "accuracy": share or None}."""
    judged = [(task_names[t], p, q) for t, p, q in zip(tasks, pred, true) if t in task_names]
    hits = sum(plan(name, p) == plan(name, q) for name, p, q in judged)
    return {"n": len(judged), "accuracy": hits / len(judged) if judged else None}


def _described(clips: pa.Table, described: pa.Table) -> tuple[np.ndarray, list[str], list[str]]:
    """Embeddings float32 [N, D], tags and captions of ``described`` in the order of ``clips``."""
    order = {cid: i for i, cid in enumerate(described.column("clip_id").to_pylist())}
    idx = [order[cid] for cid in clips.column("clip_id").to_pylist()]
    vectors = np.asarray(described.column("embedding").to_pylist(), np.float32)[idx]
    return (vectors, [described.column("tags")[i].as_py() for i in idx],
            [described.column("caption")[i].as_py() for i in idx])


def clips_table(clips: pa.Table, *, described: pa.Table | None, bank: pa.Table | None, describer: str,
                weights: Mapping[str, float], dedup_threshold: float, novelty_threshold: float,
                created_at: datetime) -> pa.Table:
    """The clips-table rows (``clips_schema``) of ``candidate_clips``.

    Without ``described`` (no reasoner) a clip has no embedding, tags or caption and is not
    de-duplicated. With it (clip_id, embedding, tags, caption per clip, in any order), clips
    are marked duplicates (``dedup.mark_duplicates``, within an event type) of each other and of
    ``bank`` (the lake's clips that are no duplicates: clip_id, event, embedding; those of
    another embedding width are left out), and where the bank has clips, a routine clip farther
    than ``novelty_threshold`` from all of them is mined as ``novelty``. ``weight`` is a clip's
    training weight by its event (``weights``: ``events.oversample``); ``describer`` says where
    the reasoner came from.
    """
    n = clips.num_rows
    emb = [[] for _ in range(n)]
    tags, captions = [""] * n, [""] * n
    duplicate_of, novelty = [""] * n, np.full(n, np.inf, np.float32)
    evts = clips.column("event").to_pylist()
    if described is not None:
        vectors, tags, captions = _described(clips, described)
        bank = bank.filter(pc.equal(pc.list_value_length(bank.column("embedding")), vectors.shape[1])) \
            if bank is not None else None
        have = bank is not None and bank.num_rows > 0
        duplicate_of, novelty = dedup.mark_duplicates(
            vectors, ids=clips.column("clip_id").to_pylist(), groups=evts, threshold=dedup_threshold,
            existing=np.asarray(bank.column("embedding").to_pylist(), np.float32) if have else None,
            existing_ids=bank.column("clip_id").to_pylist() if have else None,
            existing_groups=bank.column("event").to_pylist() if have else None)
        if have:  # routine clips far from everything the lake holds are mined as novelty
            evts = [NOVELTY if e == NONE and d > novelty_threshold else e for e, d in zip(evts, novelty)]
        emb = vectors.tolist()
    out = clips.drop_columns(["frames"]).set_column(clips.schema.get_field_index("event"), "event",
                                                   pa.array(evts, pa.string()))
    columns = {"weight": pa.array(sample_weights(evts, weights=weights), pa.float32()),
               "embedding": pa.array(emb, pa.list_(pa.float32())),
               "duplicate_of": pa.array(duplicate_of, pa.string()),
               "novelty": pa.array(np.where(np.isfinite(novelty), novelty, -1.0), pa.float32()),
               "tags": pa.array(tags, pa.string()), "caption": pa.array(captions, pa.string()),
               "describer": pa.array([describer] * n, pa.string()),
               "created_at": pa.array([created_at] * n, pa.timestamp("us", tz="UTC"))}
    for name, column in columns.items():
        out = out.append_column(name, column)
    schema = clips_schema()
    return out.select(schema.names).cast(schema)


def clip_counts(table: pa.Table) -> dict[str, Any]:
    """Clips of a ``clips_table`` by event, and how many are marked duplicates."""
    return {"events": dict(Counter(table.column("event").to_pylist())),
            "duplicates": sum(map(bool, table.column("duplicate_of").to_pylist()))}
