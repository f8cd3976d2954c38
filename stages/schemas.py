"""Every lake table's schema, in one place.

The curated tables (``EPISODES``, ``REJECTS``, ``clips_schema``, ``frames_schema`` with the
world's ``features_of`` in its metadata), the ones the flows write (``SOURCES``: the curate
manifest, ``EVALUATIONS``, ``TURNS``) and the model registry's (``MODELS``, ``ALIASES``).
Pure Arrow: no Ray, Prefect or Lance. ``to_json`` is the encoding of the string columns (and
schema metadata) that hold small structures; ``images`` and ``vectors`` decode tensor and
list columns into NumPy (the frames table's images: ``stages.images.decode``).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.images import IMAGE

_TS = pa.timestamp("us", tz="UTC")

# ---- curated tables (row builders: stages.curate) --------------------------------------------

EPISODES = pa.schema([
    ("episode_id", pa.string()), ("source_uri", pa.string()), ("content_hash", pa.string()),
    ("world", pa.string()), ("seed", pa.int64()), ("length", pa.int64()),
    ("episode_return", pa.float64()), ("interventions", pa.int64()),
    ("intervention_steps", pa.int64()), ("signal_steps", pa.string()), ("split", pa.string()),
    ("turn", pa.int64()), ("origin", pa.string()), ("parent_episode_id", pa.string()),
    ("generator_version", pa.string()), ("driver", pa.string()), ("policy_version", pa.string()),
    ("label_source", pa.string()), ("created_at", _TS),
    # where in the source this span came from, and how it was read
    ("format", pa.string()), ("span_index", pa.int64()), ("start_ns", pa.int64()),
    ("end_ns", pa.int64()), ("split_reason", pa.string()), ("task", pa.string()),
    ("topics", pa.string()), ("source_shape", pa.string()),
    ("flagged_frames", pa.int64()), ("quality", pa.string()),
    ("code_version", pa.string()), ("config_digest", pa.string()),
    # the names of the frames' action and state vectors (JSON lists), as the log gave them
    ("action_names", pa.string()), ("state_names", pa.string()),
])
REJECTS = pa.schema([
    ("reject_id", pa.string()), ("source_uri", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("turn", pa.int64()), ("created_at", _TS),
    ("span_start_ns", pa.int64()), ("span_end_ns", pa.int64()), ("frames", pa.int64()),
])


def clips_schema() -> pa.Schema:
    """Schema of the clips table: event windows and routine tiles of kept episodes.

    ``embedding`` is empty when no reasoner was available to embed the clip; ``tags`` and
    ``label_tags`` are JSON objects (predicted, and from privileged state where the log has it).
    """
    return pa.schema([
        ("clip_id", pa.string()), ("episode_id", pa.string()), ("source_uri", pa.string()),
        ("start_step", pa.int32()), ("end_step", pa.int32()), ("event", pa.string()),
        ("event_step", pa.int32()), ("score", pa.float32()), ("weight", pa.float32()),
        ("embedding", pa.list_(pa.float32())), ("duplicate_of", pa.string()),
        ("novelty", pa.float32()), ("tags", pa.string()), ("caption", pa.string()),
        ("label_tags", pa.string()), ("describer", pa.string()), ("split", pa.string()),
        ("turn", pa.int64()), ("created_at", _TS),
    ])


def frames_schema(features: dict[str, Any] | None = None) -> pa.Schema:
    """Schema of the frames table.

    ``image`` holds a frame's RGB bytes at the resolution it was curated at, ``height`` and
    ``width`` its shape (``stages.images``); ``action``, ``label`` and ``state`` are vectors of
    the episode's own widths (their names are in the episodes table); ``world`` is the world
    the log declared, or its format and source when it declared none. ``flags`` lists the
    quality signals a kept frame raised (``frozen``, ``dark``, ``overexposed``,
    ``dropped_before``); an empty list is a clean frame. ``signals`` lists the world's boolean
    signals raised at the step; ``task`` is the instruction. ``features`` (the lake's world:
    action and state names, ...) go to the schema metadata under ``worldloop.features``.
    """
    metadata = {b"worldloop.features": to_json(features).encode()} if features else None
    return pa.schema([
        ("frame_id", pa.string()), ("episode_id", pa.string()), ("world", pa.string()),
        ("step", pa.int32()), ("timestamp_ns", pa.int64()),
        ("image", IMAGE), ("height", pa.int32()), ("width", pa.int32()),
        ("action", pa.list_(pa.float32())), ("label", pa.list_(pa.float32())),
        ("label_source", pa.string()), ("state", pa.list_(pa.float32())),
        ("reward", pa.float32()), ("intervention", pa.bool_()), ("signals", pa.list_(pa.string())),
        ("task", pa.string()), ("origin", pa.string()), ("split", pa.string()), ("turn", pa.int64()),
        ("flags", pa.list_(pa.string())),
    ], metadata=metadata)


def features_of(spec) -> dict[str, Any]:
    """What a frames table records about its world: names of actions, state and signals, rate."""
    return {"world": spec.name, "camera": spec.camera, "actions": list(spec.action_names),
            "action_low": spec.action_low.tolist(), "action_high": spec.action_high.tolist(),
            "state": list(spec.state_names), "policy_state": list(spec.policy_state),
            "signals": list(spec.signals), "rate_hz": spec.rate_hz}


def of_world(world: str) -> str:
    """The Lance filter of the frames rows of ``world`` (its quotes escaped)."""
    return "world = '{}'".format(world.replace("'", "''"))


def to_json(value: Any) -> str:
    """Compact, key-sorted JSON for the string columns that hold small structures."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def images(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-shape tensor column of images as uint8 [N, H, W, 3] (or of clips: [N, k, H, W, 3])."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.ascontiguousarray(arr.to_numpy_ndarray(), dtype=np.uint8)


def vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list column of one width (actions, labels, states) as float32 [N, D]."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        widths = set(pc.list_value_length(arr).to_numpy(zero_copy_only=False).tolist())
        if len(widths) > 1:
            raise ValueError(f"vectors of widths {sorted(widths)} in one column; filter one world first")
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1).astype(np.float32)


# ---- tables the flows write ------------------------------------------------------------------

SOURCES = pa.schema([  # the curate manifest: one row per source unit seen
    ("source_key", pa.string()), ("source_uri", pa.string()), ("format", pa.string()),
    ("files", pa.int64()), ("size", pa.int64()), ("etag", pa.string()),
    ("content_hash", pa.string()), ("outcome", pa.string()), ("episodes", pa.int64()),
    ("spans_kept", pa.int64()), ("spans_rejected", pa.int64()), ("frames_seen", pa.int64()),
    ("frames_kept", pa.int64()), ("turn", pa.int64()), ("processed_at", _TS),
])
EVALUATIONS = pa.schema([
    ("eval_id", pa.string()), ("model_name", pa.string()), ("model_version", pa.string()),
    ("role", pa.string()), ("task", pa.string()), ("seed", pa.int64()), ("score", pa.float64()),
    ("success", pa.bool_()), ("steps", pa.int64()), ("signal_rates", pa.string()),
    ("interventions", pa.int64()), ("turn", pa.int64()), ("created_at", _TS),
])
ABLATIONS = pa.schema([  # one row per synthetic-data ablation (flows.ablate): the paired lift and its CI
    ("ablation_id", pa.string()), ("world", pa.string()), ("turn", pa.int64()), ("recipe", pa.string()),
    ("synthetic_fraction", pa.float64()), ("seeds", pa.int64()), ("scenes", pa.int64()),
    ("real_frames", pa.int64()), ("synthetic_frames", pa.int64()), ("frames_version", pa.int64()),
    ("real_mean", pa.float64()), ("mixed_mean", pa.float64()), ("mean_diff", pa.float64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("wins", pa.int64()), ("created_at", _TS),
])
TURNS = pa.schema([
    ("turn", pa.int64()), ("config", pa.string()), ("started_at", _TS),
    ("finished_at", _TS), ("candidate_version", pa.int64()),
    ("promoted", pa.bool_()), ("champion_version", pa.int64()), ("summary", pa.string()),
])

# ---- the model registry (stages.registry) ------------------------------------------------------

MODELS = pa.schema([  # one row per version; metrics, lineage and config as JSON strings
    ("name", pa.string()), ("version", pa.int64()), ("artifact_uri", pa.string()),
    ("kind", pa.string()), ("metrics", pa.string()), ("lineage", pa.string()),
    ("config", pa.string()), ("created_at", _TS),
    # JSON {relative path: {"sha256", "size"}} of every artifact file; null on versions registered
    # before manifests existed (tables without the column gain it, all null, on their next write)
    ("manifest", pa.string()),
])
ALIASES = pa.schema([  # append-only alias history; the latest row wins
    ("name", pa.string()), ("alias", pa.string()), ("version", pa.int64()), ("set_at", _TS),
    # why the alias moved, who moved it (a Prefect flow run, else the command line) and the gate's
    # decision with its numbers (JSON; "" when no gate decided); null on rows of older tables
    ("reason", pa.string()), ("flow_run", pa.string()), ("gate", pa.string()),
])
