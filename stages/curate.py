"""Row builders of the curated tables: episodes, frames, rejects (schemas: ``stages.schemas``),
and ``SpanVerdict``, what judging one span decided.

Pure functions over NumPy and Arrow: no Ray, Prefect or Lance. Every row carries lineage: the
source URI, a content hash, the flywheel turn, and (for episodes) the code and config versions
that produced it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from stages import images
from stages.frames import Frames
from stages.schemas import frames_schema, to_json

PRIVILEGED_EXPERT, EXECUTED, MIXED = "privileged_expert", "executed", "mixed"
IMAGE_COLUMNS = ("image", "height", "width")
# the episodes columns that say where a span came from, and their values when a caller gives none
_EPISODE_DEFAULTS = {"format": "", "span_index": 0, "start_ns": -1, "end_ns": -1,
                     "split_reason": "", "task": "", "topics": "{}", "source_shape": "",
                     "flagged_frames": 0, "quality": "{}", "code_version": "", "config_digest": ""}


def vector_names(episode: dict[str, Any], key: str, width: int, features: dict[str, Any] | None) -> list[str]:
    """Names of an episode's ``key`` vectors ("action" or "state"): the episode's own
    (``<key>_names``), else its world's from ``features`` when the widths agree, else
    ``<key>_0`` ... ``<key>_{width-1}``."""
    names = episode.get(f"{key}_names")
    if names is None and features and features.get("world") == episode.get("world"):
        names = features.get({"action": "actions", "state": "state"}[key])
    names = [str(n) for n in names] if names is not None else []
    return names if len(names) == width else [f"{key}_{i}" for i in range(width)]


def content_hash(data: bytes) -> str:
    """sha256 of the bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def split_for(episode_id: str, *, val_fraction: float) -> str:
    """Deterministic "train"/"val" assignment from a hash of the episode id."""
    bucket = int(hashlib.sha256(episode_id.encode()).hexdigest()[:8], 16) / 2**32
    return "val" if bucket < val_fraction else "train"


def now_utc() -> datetime:
    """The ``created_at`` value for new rows."""
    return datetime.now(timezone.utc)


def reject_row(source_uri: str, *, stage: str, reason: str, detail: str, turn: int,
               span: tuple[int, int] = (-1, -1), frames: int = 0) -> dict[str, Any]:
    """A rejects-table row for a whole source (span (-1, -1)) or a time span of it.

    Its id hashes (source, span, stage, reason), so a re-run adds it only once. ``frames`` is
    how many camera frames the rejected part held (0 when the source could not be decoded).
    """
    key = f"{source_uri}\n{span[0]}:{span[1]}\n{stage}\n{reason}"
    return {"reject_id": hashlib.sha256(key.encode()).hexdigest()[:32], "source_uri": source_uri,
            "stage": stage, "reason": reason, "detail": detail, "turn": int(turn),
            "created_at": now_utc(), "span_start_ns": int(span[0]), "span_end_ns": int(span[1]),
            "frames": int(frames)}


def expert_labels(episode: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Training labels: the privileged expert's action where finite, else the executed action.

    Returns (labels float32[T,A], label_source str[T] of "privileged_expert"/"executed").
    """
    expert = np.asarray(episode["expert_actions"], np.float32)
    actions = np.asarray(episode["actions"], np.float32)
    use_expert = np.isfinite(expert).all(axis=1)
    labels = np.where(use_expert[:, None], expert, actions).astype(np.float32)
    return labels, np.where(use_expert, PRIVILEGED_EXPERT, EXECUTED)


def _list(values: np.ndarray) -> pa.ListArray:
    """float32 [N, D] as a list column (D values a row)."""
    n, width = values.shape
    flat = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1))
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * width), flat)


def _rising_edges(flags: np.ndarray) -> int:
    return int(np.count_nonzero(np.diff(flags.astype(np.int8), prepend=0) == 1))


def episode_to_tables(episode: dict[str, Any], *, episode_id: str, source_uri: str,
                      content_hash: str, turn: int, origin: str, parent_episode_id: str,
                      generator_version: str, label_source: str | Sequence[str],
                      split: str, lineage: dict[str, Any] | None = None,
                      flags: Sequence[Sequence[str]] | None = None,
                      features: dict[str, Any] | None = None) -> tuple[dict[str, Any], pa.Table]:
    """An episode dict as (episodes-table row, frames table).

    ``episode["labels"]`` (float32[T,A]) are the training labels; ``label_source`` is one
    string for the whole episode or one per step (the row then says "mixed" if they differ).
    ``states`` [T,S] are required (NaN where unknown); rewards default to NaN, interventions
    and ``signals`` ({name: bool[T]}) to False. The action width A and state width S come from
    the arrays, their names from ``vector_names``; frames of any size are kept as they are
    (``stages.images``); lazy ``Frames`` give the table without its image columns, for the
    caller to add a chunk at a time (``with_images``). ``features`` (``features_of``) go to the
    frames schema's metadata. ``lineage`` fills the episodes
    columns that say where the span came from (format, span_index, start_ns, ..., code_version,
    config_digest; see ``stages.schemas.EPISODES``); ``flags`` gives each frame's quality flags.
    """
    if "labels" not in episode:
        raise ValueError("episode needs 'labels' float32[T,A] (see expert_labels)")
    frames = episode["frames"]
    lazy = isinstance(frames, Frames)
    frames = frames if lazy else np.ascontiguousarray(frames, np.uint8)
    n = len(frames)
    actions = np.asarray(episode["actions"], np.float32).reshape(n, -1)
    labels = np.asarray(episode["labels"], np.float32).reshape(n, actions.shape[1])
    states = np.asarray(episode["states"], np.float32).reshape(n, -1)
    rewards = np.asarray(episode.get("rewards", np.full(n, np.nan)), np.float32)
    interventions = np.asarray(episode.get("interventions", np.zeros(n, bool)), bool)
    signals = {k: np.asarray(v, bool) for k, v in episode.get("signals", {}).items()}
    raised = [[k for k, v in signals.items() if v[i]] for i in range(n)] if signals else [[]] * n
    task = str(episode.get("instruction", episode.get("task", "")))
    sources = np.broadcast_to(np.asarray(label_source, dtype=object), (n,))
    distinct = set(sources.tolist())
    flags = [list(f) for f in flags] if flags is not None else [[] for _ in range(n)]
    extra = {**_EPISODE_DEFAULTS, **(lineage or {})}
    unknown = set(extra) - set(_EPISODE_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown lineage columns {sorted(unknown)}")
    world = str(episode.get("world", "unknown"))
    row = {
        "episode_id": episode_id, "source_uri": source_uri, "content_hash": content_hash,
        "world": world, "seed": int(episode.get("seed", -1)),
        "length": n, "episode_return": float(rewards.astype(np.float64).sum()),
        "interventions": _rising_edges(interventions),
        "intervention_steps": int(interventions.sum()), "signal_steps": to_json({k: int(v.sum()) for k, v in signals.items()}),
        "split": split, "turn": int(turn), "origin": origin,
        "parent_episode_id": parent_episode_id, "generator_version": generator_version,
        "driver": str(episode.get("driver", "")),
        "policy_version": str(episode.get("policy_version", "")),
        "label_source": distinct.pop() if len(distinct) == 1 else MIXED,
        "created_at": now_utc(), **extra,
        "action_names": to_json(vector_names(episode, "action", actions.shape[1], features)),
        "state_names": to_json(vector_names(episode, "state", states.shape[1], features)),
    }
    row["flagged_frames"] = sum(1 for f in flags if f)
    steps = np.arange(n, dtype=np.int32)
    columns = [
        pa.array([f"{episode_id}:{s:05d}" for s in range(n)], pa.string()),
        pa.array([episode_id] * n, pa.string()), pa.array([world] * n, pa.string()), pa.array(steps),
        pa.array(np.asarray(episode["timestamps_ns"], np.int64)),
        _list(actions), _list(labels), pa.array(sources.tolist(), pa.string()),
        _list(states), pa.array(rewards), pa.array(interventions),
        pa.array(raised, pa.list_(pa.string())), pa.array([task] * n, pa.string()),
        pa.array([origin] * n, pa.string()),
        pa.array([split] * n, pa.string()), pa.array(np.full(n, turn, np.int64)),
        pa.array(flags, pa.list_(pa.string())),
    ]
    schema = frames_schema(features)
    light = pa.Table.from_arrays(columns, schema=pa.schema([f for f in schema if f.name not in IMAGE_COLUMNS],
                                                           metadata=schema.metadata))
    return row, light if lazy else with_images(light, frames)


def with_images(light: pa.Table, frames: np.ndarray) -> pa.Table:
    """A frames table without its image columns (``episode_to_tables`` of lazy frames) with
    ``frames`` (uint8 [N, H, W, 3], one per row) added, in the frames schema's order."""
    columns, full = dict(zip(IMAGE_COLUMNS, images.to_columns(frames))), frames_schema()
    names = [n for n in full.names if n in columns or n in light.column_names]
    fields = [light.schema.field(n) if n in light.column_names else full.field(n) for n in names]
    arrays = [columns[n] if n in columns else light.column(n) for n in names]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=light.schema.metadata))



@dataclasses.dataclass(frozen=True, eq=False)  # eq: arrays have no single truth value
class SpanVerdict:
    """What judging one span decided (``stages.curate_ray.judge_spans``).

    ``kept`` is True exactly when there are no ``reasons`` (codes; ``detail`` says them in
    words); ``counts`` are its quality counts (``stages.quality.span_verdicts``), ``frames`` its
    rows. A kept span also has ``fragments`` (its frames written as uncommitted Lance fragments:
    their metadata as JSON, ``stages.lake.Lake.write_fragments``), ``clips`` (``stages.events``
    clip dicts with ``label_tags``) and ``clip_frames``, each clip's sampled frames
    (uint8 [C, k, H, W, 3], C = len(clips)).

    It travels through Ray Data as one Arrow struct (``ARROW``; ``to_row`` / ``from_row``):
    reasons, fragments and clip frames in plain columns (the frames as raw bytes and their
    shape), counts and clips as JSON.
    """

    span_id: str
    kept: bool
    reasons: tuple[str, ...]
    detail: str
    counts: dict[str, int]
    frames: int
    fragments: tuple[str, ...] = ()
    clips: tuple[dict[str, Any], ...] = ()
    clip_frames: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.uint8))

    ARROW = pa.struct([
        ("span_id", pa.string()), ("kept", pa.bool_()), ("reasons", pa.list_(pa.string())),
        ("detail", pa.string()), ("counts", pa.string()), ("frames", pa.int64()),
        ("fragments", pa.list_(pa.string())), ("clips", pa.string()),
        ("clip_frames", pa.binary()), ("clip_shape", pa.list_(pa.int64())),
    ])

    def to_row(self) -> dict[str, Any]:
        """This verdict as a value of the ``ARROW`` struct."""
        frames = np.ascontiguousarray(self.clip_frames, np.uint8)
        return {"span_id": self.span_id, "kept": bool(self.kept), "reasons": list(self.reasons),
                "detail": self.detail, "counts": to_json(self.counts), "frames": int(self.frames),
                "fragments": list(self.fragments), "clips": to_json(list(self.clips)),
                "clip_frames": frames.tobytes(), "clip_shape": list(frames.shape)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SpanVerdict:
        """The verdict of a value of the ``ARROW`` struct (as ``to_pylist`` gives it)."""
        frames = np.frombuffer(row["clip_frames"], np.uint8).reshape(row["clip_shape"])
        return cls(span_id=row["span_id"], kept=row["kept"], reasons=tuple(row["reasons"]),
                   detail=row["detail"], counts=json.loads(row["counts"]), frames=row["frames"],
                   fragments=tuple(row["fragments"]), clips=tuple(json.loads(row["clips"])),
                   clip_frames=frames)
