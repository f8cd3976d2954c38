"""Curation: one raw log in, one curated episode (a row + its frames) or one reject row out.

Pure functions over bytes, NumPy and Arrow: no Ray, Prefect or Lance. The row schemas of the
tables curation produces (episodes, frames, rejects) live here; ``stages.lake`` re-exports them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from stages.mcap_log import STATE_FIELDS, LogError, read_episode

PRIVILEGED_EXPERT, EXECUTED, MIXED = "privileged_expert", "executed", "mixed"
_TS = pa.timestamp("us", tz="UTC")

EPISODES = pa.schema([
    ("episode_id", pa.string()), ("source_uri", pa.string()), ("content_hash", pa.string()),
    ("world", pa.string()), ("seed", pa.int64()), ("length", pa.int64()),
    ("episode_return", pa.float64()), ("interventions", pa.int64()),
    ("intervention_steps", pa.int64()), ("off_track_steps", pa.int64()), ("split", pa.string()),
    ("turn", pa.int64()), ("origin", pa.string()), ("parent_episode_id", pa.string()),
    ("generator_version", pa.string()), ("driver", pa.string()), ("policy_version", pa.string()),
    ("label_source", pa.string()), ("created_at", _TS),
])
REJECTS = pa.schema([
    ("reject_id", pa.string()), ("source_uri", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("turn", pa.int64()), ("created_at", _TS),
])


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    height, width = image_size
    return int(height), int(width)


def frames_schema(image_size: int | Sequence[int]) -> pa.Schema:
    """Schema of the frames table for images of ``image_size`` (int or (H, W))."""
    height, width = _hw(image_size)
    return pa.schema([
        ("frame_id", pa.string()), ("episode_id", pa.string()), ("step", pa.int32()),
        ("timestamp_ns", pa.int64()),
        ("image", pa.fixed_shape_tensor(pa.uint8(), [height, width, 3])),
        ("action", pa.list_(pa.float32(), 3)), ("label", pa.list_(pa.float32(), 3)),
        ("label_source", pa.string()), ("state", pa.list_(pa.float32(), len(STATE_FIELDS))),
        ("reward", pa.float32()), ("intervention", pa.bool_()), ("off_track", pa.bool_()),
        ("origin", pa.string()), ("split", pa.string()), ("turn", pa.int64()),
    ])


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


def reject_row(source_uri: str, *, stage: str, reason: str, detail: str, turn: int) -> dict[str, Any]:
    """A rejects-table row; its id is a hash of (source, stage, reason) so re-runs dedupe."""
    rid = hashlib.sha256(f"{source_uri}\n{stage}\n{reason}".encode()).hexdigest()[:32]
    return {"reject_id": rid, "source_uri": source_uri, "stage": stage, "reason": reason,
            "detail": detail, "turn": int(turn), "created_at": now_utc()}


def _check_range(name: str, values: np.ndarray, problems: list[str], *, allow_nan: bool) -> None:
    finite = np.isfinite(values)
    bad = ~finite if not allow_nan else np.isinf(values)
    if bad.any():
        problems.append(f"nonfinite_{name}: {int(bad.any(axis=1).sum())} steps have "
                        f"{'inf' if allow_nan else 'NaN/inf'} values")
    v = np.where(finite, values, 0.0)
    lo, hi = np.array([-1.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0])
    out = ((v < lo) | (v > hi)).any(axis=1)
    if out.any():
        problems.append(f"range_{name}: {int(out.sum())} steps outside steer[-1,1] gas/brake[0,1]")


def validate_episode(episode: dict[str, Any], *, image_size: int | Sequence[int],
                     min_length: int = 1) -> list[str]:
    """Problems with an episode, each "code: detail"; empty when it is fit for the lake."""
    problems: list[str] = []
    frames = np.asarray(episode["frames"])
    height, width = _hw(image_size)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (height, width, 3):
        problems.append(f"image_shape: frames {frames.dtype}{list(frames.shape)}, "
                        f"expected uint8[T,{height},{width},3]")
    n = len(frames)
    shapes = {"actions": (3,), "expert_actions": (3,), "states": (len(STATE_FIELDS),),
              "rewards": (), "interventions": (), "off_track": (), "timestamps_ns": ()}
    for key, tail in shapes.items():
        if key not in episode:
            problems.append(f"missing_field: {key}")
            continue
        arr = np.asarray(episode[key])
        if arr.shape != (n, *tail):
            problems.append(f"length_mismatch: {key} has shape {list(arr.shape)}, "
                            f"expected {[n, *tail]}")
    if problems:
        return problems
    if n < min_length:
        problems.append(f"too_short: {n} steps < min_length {min_length}")
    _check_range("action", np.asarray(episode["actions"], np.float64), problems, allow_nan=False)
    _check_range("expert_action", np.asarray(episode["expert_actions"], np.float64), problems,
                 allow_nan=True)
    stamps = np.asarray(episode["timestamps_ns"], np.int64)
    if (np.diff(stamps) <= 0).any():
        problems.append(f"timestamps: {int((np.diff(stamps) <= 0).sum())} non-increasing steps")
    return problems


def expert_labels(episode: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Training labels: the privileged expert's action where finite, else the executed action.

    Returns (labels float32[T,3], label_source str[T] of "privileged_expert"/"executed").
    """
    expert = np.asarray(episode["expert_actions"], np.float32)
    actions = np.asarray(episode["actions"], np.float32)
    use_expert = np.isfinite(expert).all(axis=1)
    labels = np.where(use_expert[:, None], expert, actions).astype(np.float32)
    return labels, np.where(use_expert, PRIVILEGED_EXPERT, EXECUTED)


def _fixed_list(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _rising_edges(flags: np.ndarray) -> int:
    return int(np.count_nonzero(np.diff(flags.astype(np.int8), prepend=0) == 1))


def episode_to_tables(episode: dict[str, Any], *, episode_id: str, source_uri: str,
                      content_hash: str, turn: int, origin: str, parent_episode_id: str,
                      generator_version: str, label_source: str | Sequence[str],
                      split: str) -> tuple[dict[str, Any], pa.Table]:
    """An episode dict as (episodes-table row, frames table).

    ``episode["labels"]`` (float32[T,3]) are the training labels; ``label_source`` is one
    string for the whole episode or one per step (the row then says "mixed" if they differ).
    Optional keys default for synthetic episodes: states NaN, rewards NaN, flags False.
    """
    if "labels" not in episode:
        raise ValueError("episode needs 'labels' float32[T,3] (see expert_labels)")
    frames = np.ascontiguousarray(episode["frames"], np.uint8)
    n = len(frames)
    actions = np.asarray(episode["actions"], np.float32).reshape(n, 3)
    labels = np.asarray(episode["labels"], np.float32).reshape(n, 3)
    states = np.asarray(episode.get("states", np.full((n, len(STATE_FIELDS)), np.nan)), np.float32)
    rewards = np.asarray(episode.get("rewards", np.full(n, np.nan)), np.float32)
    interventions = np.asarray(episode.get("interventions", np.zeros(n, bool)), bool)
    off_track = np.asarray(episode.get("off_track", np.zeros(n, bool)), bool)
    sources = np.broadcast_to(np.asarray(label_source, dtype=object), (n,))
    distinct = set(sources.tolist())
    row = {
        "episode_id": episode_id, "source_uri": source_uri, "content_hash": content_hash,
        "world": str(episode.get("world", "unknown")), "seed": int(episode.get("seed", -1)),
        "length": n, "episode_return": float(rewards.astype(np.float64).sum()),
        "interventions": _rising_edges(interventions),
        "intervention_steps": int(interventions.sum()), "off_track_steps": int(off_track.sum()),
        "split": split, "turn": int(turn), "origin": origin,
        "parent_episode_id": parent_episode_id, "generator_version": generator_version,
        "driver": str(episode.get("driver", "")),
        "policy_version": str(episode.get("policy_version", "")),
        "label_source": distinct.pop() if len(distinct) == 1 else MIXED,
        "created_at": now_utc(),
    }
    steps = np.arange(n, dtype=np.int32)
    schema = frames_schema(frames.shape[1:3])
    columns = [
        pa.array([f"{episode_id}:{s:05d}" for s in range(n)], pa.string()),
        pa.array([episode_id] * n, pa.string()), pa.array(steps),
        pa.array(np.asarray(episode["timestamps_ns"], np.int64)),
        pa.FixedShapeTensorArray.from_numpy_ndarray(frames),
        _fixed_list(actions, 3), _fixed_list(labels, 3), pa.array(sources.tolist(), pa.string()),
        _fixed_list(states, len(STATE_FIELDS)), pa.array(rewards), pa.array(interventions),
        pa.array(off_track), pa.array([origin] * n, pa.string()),
        pa.array([split] * n, pa.string()), pa.array(np.full(n, turn, np.int64)),
    ]
    return row, pa.Table.from_arrays(columns, schema=schema)


def curate_log(data: bytes, *, source_uri: str, turn: int, image_size: int | Sequence[int],
               min_length: int, val_fraction: float) -> dict[str, Any]:
    """Read, validate and tabulate one MCAP log.

    Returns ``{"episode", "frames", "reject"}``: either an episodes row and its frames table
    (reject None), or a rejects row (episode and frames None). The episode id is derived from
    the content hash, so the same bytes always curate to the same id.
    """
    digest = content_hash(data)
    try:
        episode = read_episode(data, source_uri=source_uri)
    except LogError as exc:
        return _rejected(reject_row(source_uri, stage="read", reason=exc.reason,
                                    detail=exc.detail, turn=turn))
    problems = validate_episode(episode, image_size=image_size, min_length=min_length)
    if problems:
        reason = ",".join(sorted({p.split(":", 1)[0] for p in problems}))
        return _rejected(reject_row(source_uri, stage="validate", reason=reason,
                                    detail="; ".join(problems), turn=turn))
    episode_id = f"ep-{digest[:24]}"
    labels, sources = expert_labels(episode)
    row, frames = episode_to_tables(
        {**episode, "labels": labels}, episode_id=episode_id, source_uri=source_uri,
        content_hash=digest, turn=turn, origin="real", parent_episode_id="",
        generator_version="", label_source=sources,
        split=split_for(episode_id, val_fraction=val_fraction))
    return {"episode": row, "frames": frames, "reject": None}


def _rejected(row: dict[str, Any]) -> dict[str, Any]:
    return {"episode": None, "frames": None, "reject": row}
