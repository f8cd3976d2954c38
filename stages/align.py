"""Time alignment: resample a ``Streams`` onto its camera frames and cut it into spans.

Pure NumPy (plus ``stages.images`` for shrinking frames over the maximum side). The rules are stated in ``align``'s docstring; the
helpers below implement one rule each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stages import images
from stages.frames import Frames
from stages.streams import LogError, Streams

_VECTOR_ROLES = ("action", "expert_action", "state", "signals")
_SCALAR_ROLES = ("reward", "intervention")
ANY = -1  # a vector width that takes whatever width the log has


@dataclass(frozen=True)
class _Resampled:
    """A signal sampled at the frame times: ``index`` into its samples where ``fresh``."""

    index: np.ndarray   # int64[T], meaningful where fresh
    fresh: np.ndarray   # bool[T]
    age_ns: np.ndarray  # int64[T]: frame stamp - sample stamp (negative: sample after frame)
    lerp: np.ndarray    # bool[T]: both bracketing samples are within hold
    weight: np.ndarray  # float64[T]: interpolation weight of the next sample where lerp


def _median_period(stamps: np.ndarray) -> float | None:
    steps = np.diff(stamps)
    steps = steps[steps > 0]
    return float(np.median(steps)) if steps.size else None


def _dedupe_camera(t: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept mask, duplicates dropped after each kept frame); raises on out-of-order stamps."""
    same = np.flatnonzero(np.diff(t) == 0)
    dup = np.zeros(len(t), bool)
    if same.size:
        dup[same + 1] = (frames[same + 1] == frames[same]).all(axis=(1, 2, 3))
    kept = ~dup
    bad = np.diff(t[kept]) <= 0
    if bad.any():
        first = int(np.flatnonzero(kept)[np.argmax(bad) + 1])
        raise LogError("timestamps_out_of_order",
                       f"{int(bad.sum())} camera stamps are not after the previous frame's "
                       f"(first at frame {first})")
    owner = np.cumsum(kept) - 1
    dropped = np.bincount(owner[dup], minlength=int(kept.sum()))
    return kept, dropped


def _signal(streams: Streams, role: str, width: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(stamps sorted, values float64[M,width] or [M]) of ``role``, or None when absent."""
    if role not in streams.signals:
        return None
    stamps, values = streams.signals[role]
    stamps, values = np.asarray(stamps, np.int64), np.asarray(values, np.float64)
    if len(stamps) == 0:
        return None
    if width is None:  # a scalar role
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise LogError("bad_shape", f"{role} values are {list(values.shape)}, expected [M]")
    elif width == ANY:
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2:
            raise LogError("bad_shape", f"{role} values are {list(values.shape)}, expected [M,D]")
    else:
        if values.ndim == 1 and width == 1:
            values = values[:, None]
        if values.ndim != 2 or values.shape[1] != width:
            raise LogError("bad_shape",
                           f"{role} values are {list(values.shape)}, expected [M,{width}]")
    order = np.argsort(stamps, kind="stable")
    return stamps[order], values[order]


def _resample(stamps: np.ndarray, frame_t: np.ndarray, *, period: float,
              hold_factor: float, hold_ns: float | None = None) -> _Resampled:
    own = _median_period(stamps)
    hold = hold_ns if hold_ns is not None else hold_factor * (own if own is not None else period)
    last = len(stamps) - 1
    before = np.searchsorted(stamps, frame_t, side="right") - 1
    after = before + 1
    t_before = stamps[np.clip(before, 0, last)]
    t_after = stamps[np.clip(after, 0, last)]
    back_ok = (before >= 0) & (frame_t - t_before <= hold)
    ahead_ok = (after <= last) & ((t_after - frame_t) * 2 <= period)
    fresh = back_ok | ahead_ok
    index = np.where(back_ok, before, after)
    age = frame_t - stamps[np.clip(index, 0, last)]
    lerp = back_ok & (after <= last) & (t_after - frame_t <= hold)
    span = np.maximum(t_after - t_before, 1)
    weight = np.where(lerp, (frame_t - t_before) / span, 0.0)
    return _Resampled(index=index, fresh=fresh, age_ns=age, lerp=lerp, weight=weight)


def _values_at(values: np.ndarray, r: _Resampled, *, interpolate: bool) -> np.ndarray:
    """Held (or linearly interpolated) values; NaN where the signal is not fresh."""
    last = len(values) - 1
    held = values[np.clip(r.index, 0, last)]
    if interpolate:
        nxt = values[np.clip(r.index + 1, 0, last)]
        w = r.weight.reshape(-1, *([1] * (values.ndim - 1)))
        lerp = r.lerp.reshape(w.shape)
        held = np.where(lerp, held + (nxt - held) * w, held)
    fresh = r.fresh.reshape(-1, *([1] * (values.ndim - 1)))
    return np.where(fresh, held, np.nan)


def _pieces(fresh: np.ndarray, cut: np.ndarray) -> list[tuple[int, int, bool]]:
    """Runs (start, stop, has_action) of steps; runs break at camera cuts and action changes."""
    breaks = np.flatnonzero(cut[1:] | (fresh[1:] != fresh[:-1])) + 1
    bounds = [0, *breaks.tolist(), len(fresh)]
    return [(a, b, bool(fresh[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def _cut_reason(fresh: np.ndarray, cut: np.ndarray, step: int) -> str:
    """Why steps ``step - 1`` and ``step`` are in different spans ("" at the log's ends)."""
    if step <= 0 or step >= len(fresh):
        return ""
    if not (fresh[step - 1] and fresh[step]):
        return "action_gap"
    return "camera_gap" if cut[step] else ""


def align(streams: Streams, *, max_side: int = 0, action_dim: int = ANY,
          state_dim: int = ANY, signal_names: tuple[str, ...] = (), gap_factor: float = 3.0, max_gap_ns: int | None = None,
          hold_factor: float = 2.0, min_length: int = 1) -> tuple[list[dict], list[dict]]:
    """Resample one episode's streams to its camera frames and cut it into spans.

    Returns (spans, rejected_spans). Rules, exactly as implemented:

    * Camera frames define the steps, in logged order. A frame with the same stamp as the
      frame before it and identical pixels is an exact duplicate: it is dropped and counted in
      its span's ``dropped_duplicates``. After that, any stamp not strictly greater than the
      previous one raises ``LogError("timestamps_out_of_order")``. No frames at all raises
      ``LogError("missing_topic", "no camera frames")``.
    * P = median of the positive differences of the camera stamps (0 for a single frame).
      A difference larger than ``max_gap_ns`` (default ``gap_factor * P``) is a camera gap.
    * Each signal's samples are sorted by stamp (stable). Its hold = ``hold_factor`` * its own
      median positive stamp difference (P if it has fewer than 2 samples or no positive
      difference). At a frame stamp f the signal uses the latest sample with stamp <= f if
      f - stamp <= hold; else the first sample after f if stamp - f <= P/2; else it is stale.
    * expert_action is a per-step label, never held: its hold is P/2 (the sample nearest the
      frame within half a frame period, else NaN: the executed action becomes the label).
    * action and expert_action (zero-order hold, never interpolated), reward (held), state
      (componentwise linear interpolation between the latest sample <= f and the next sample
      when both are within hold of f; otherwise held as above). Stale or absent: NaN.
      intervention and signals are held the same way and True where the value > 0.5;
      stale, absent or NaN: False.
    * action is required: a log without action samples raises
      ``LogError("missing_topic", "no action")``. Steps where the action is stale belong to
      no span. Steps are cut into pieces, in time order, at camera gaps and wherever the
      action turns stale or fresh; piece k gets ``span_index`` k. A piece of stale-action
      steps goes to rejected_spans with reason "action_gap"; a piece with fresh actions
      shorter than ``min_length`` goes there with reason "short_span"; the others are spans.
      Rejected entries are {"span_index", "start_ns", "end_ns", "reason", "detail"}.
    * A span's ``split_reason`` is the reason of the cut just before it ("action_gap" when
      the step before it has a stale action, else "camera_gap"), or, for a span starting the
      log, of the cut just after it; "" when the span is the whole log.
    * action must be [M, action_dim] (1-D accepted when action_dim is 1) and expert_action as
      wide as action, state [M, state_dim], signals [M, len(signal_names)]; reward/intervention
      [M] or [M, 1]; any other shape raises ``LogError("bad_shape")``. A width of ``ANY`` takes
      the log's own (1-D values are one wide); an absent state is then 0 wide.
    * Frames keep their resolution unless their longer side is over ``max_side`` (0: no limit):
      then they shrink to fit it, aspect kept (``stages.images.fit``, Pillow BOX);
      ``source_shape`` is the original (H, W).
    * Names: ``action_names`` / ``state_names`` are the streams' names of those roles (None
      where the reader found none).

    Each span is an episode dict: frames (``Frames`` of T, decoded when read), timestamps_ns int64[T], actions and
    expert_actions float32[T,action_dim], states float32[T,state_dim], rewards float32[T],
    interventions bool[T], signals {name: bool[T]} (one per signal_names), action_age_ns int64[T] (frame stamp minus the used
    action sample's stamp; negative when the sample is after the frame), span_index,
    start_ns/end_ns (first/last frame stamp), split_reason, source_shape, dropped_duplicates,
    task, world/seed/driver/policy_version from meta (defaults "unknown", -1, "unknown", ""),
    format (meta "format") and topics (the meta entries whose key starts with "topic.").
    A non-integer meta "seed" raises ``LogError("bad_metadata")``.
    """
    if len(streams.frames) == 0:
        raise LogError("missing_topic", "no camera frames")
    action = _signal(streams, "action", action_dim)
    if action is None:
        raise LogError("missing_topic", "no action")
    action_dim = action[1].shape[1]
    state = _signal(streams, "state", state_dim)
    state_dim = state[1].shape[1] if state is not None else max(state_dim, 0)
    signals = {"action": action,
               "expert_action": _signal(streams, "expert_action", action_dim),
               "state": state,
               "signals": _signal(streams, "signals", len(signal_names)) if signal_names else None,
               **{role: _signal(streams, role, None) for role in _SCALAR_ROLES}}
    kept, dropped = _dedupe_camera(streams.camera_t, streams.frames)  # decodes only frames sharing a stamp
    frame_t = streams.camera_t[kept]
    frame_index = np.flatnonzero(kept)
    period = _median_period(frame_t) or 0.0
    max_gap = gap_factor * period if max_gap_ns is None else max_gap_ns
    cut = np.concatenate([[False], np.diff(frame_t) > max_gap])

    resampled = {role: _resample(sig[0], frame_t, period=period, hold_factor=hold_factor,
                                 hold_ns=period / 2 if role == "expert_action" else None)
                 for role, sig in signals.items() if sig is not None}
    fresh = resampled["action"].fresh
    widths = {"action": action_dim, "expert_action": action_dim, "state": state_dim, "signals": len(signal_names)}
    columns: dict[str, np.ndarray] = {}
    for role in (*_VECTOR_ROLES, *_SCALAR_ROLES):
        if signals[role] is None:
            shape = (len(frame_t), widths[role]) if role in widths else (len(frame_t),)
            columns[role] = np.full(shape, np.nan)
        else:
            columns[role] = _values_at(signals[role][1], resampled[role],
                                       interpolate=role == "state")
    meta = streams.meta
    try:
        seed = int(meta.get("seed", -1))
    except ValueError as exc:
        raise LogError("bad_metadata", f"seed {meta.get('seed')!r} is not an integer") from exc
    common = {"task": streams.task, "world": meta.get("world", "unknown"), "seed": seed,
              "driver": meta.get("driver", "unknown"),
              "policy_version": meta.get("policy_version", ""), "format": meta.get("format", ""),
              "topics": {k: v for k, v in meta.items() if k.startswith("topic.")},
              "action_names": streams.names.get("action"), "state_names": streams.names.get("state")}
    frames = streams.frames if isinstance(streams.frames, Frames) else Frames.of(streams.frames)
    size = images.fit(frames.shape[1:3], max_side)
    pieces = _pieces(fresh, cut)
    unsplit = len(pieces) == 1
    spans: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for index, (a, b, has_action) in enumerate(pieces):
        start_ns, end_ns = int(frame_t[a]), int(frame_t[b - 1])
        where = {"span_index": index, "start_ns": start_ns, "end_ns": end_ns}
        if not has_action:
            rejected.append({**where, "reason": "action_gap",
                             "detail": f"{b - a} steps without an action sample within hold"})
            continue
        if b - a < min_length:
            rejected.append({**where, "reason": "short_span",
                             "detail": f"{b - a} steps < min_length {min_length}"})
            continue
        reason = "" if unsplit else (_cut_reason(fresh, cut, a) or _cut_reason(fresh, cut, b))
        spans.append({
            **where, **common,
            "frames": frames.take(frame_index[a:b]).resized(size),
            "timestamps_ns": frame_t[a:b].copy(),
            "actions": columns["action"][a:b].astype(np.float32),
            "expert_actions": columns["expert_action"][a:b].astype(np.float32),
            "states": columns["state"][a:b].astype(np.float32),
            "rewards": columns["reward"][a:b].astype(np.float32),
            "interventions": columns["intervention"][a:b] > 0.5,
            "signals": {name: columns["signals"][a:b, k] > 0.5 for k, name in enumerate(signal_names)},
            "action_age_ns": resampled["action"].age_ns[a:b].astype(np.int64),
            "split_reason": reason, "source_shape": tuple(streams.frames.shape[1:3]),
            "dropped_duplicates": int(dropped[a:b].sum()),
        })
    return spans, rejected
