"""Scene description vocabulary and privileged labels: tags, events, captions, clip frames.

A clip is a window [start, end) of an aligned span (one episode cut at gaps). It is described
by one value per tag of ``TAGS`` plus the event mined for it (one of ``EVENTS``), and a one-line
caption built from both. The scene reasoner (``models.reasoner``) predicts the tags from the
clip's frames; the labels it trains on come from the simulator's privileged state
(``sim.carracing.STATE_FIELDS`` = x, y, heading, vx, vy, speed, yaw_rate, on_track) by
``privileged_tags``, which returns None for logs without that state (a real robot's).

Rules of ``privileged_tags`` (CarRacing conventions: heading is the hull angle in radians,
increasing counter-clockwise, so a positive change is a left turn; speed in sim units/s):

* curvature ahead: d = wrap(heading[j] - heading[end-1]) where j is the first step at least
  ``lookahead_s`` after the clip's last step ``end-1``, clamped to the span's last step (a clip
  near the span end sees a shorter look-ahead). d > curve_rad -> "left", d < -curve_rad ->
  "right", else "straight".
* track: "off" when more than half of the clip's steps have on_track < 0.5, else "on".
* speed: mean speed over the clip; < slow -> "slow", >= fast -> "fast", else "medium".

Default thresholds were measured on 252 clips (25 steps, after the 50-step zoom-in intro) of
12 noisy-expert CarRacing episodes (600 steps, a third of them without the safety driver so
the car leaves the road): clip-mean speed terciles are 47.6 and 64.4 units/s (rounded to 45 and
65), and the 1 s heading-change magnitude has its 33rd percentile at 0.33 rad (dead band 0.3),
which makes the three bands of each tag roughly equally common.
"""
from __future__ import annotations

import numpy as np

TAGS: dict[str, tuple[str, ...]] = {
    "curvature": ("left", "straight", "right"),
    "track": ("on", "off"),
    "speed": ("slow", "medium", "fast"),
}
EVENTS = ("none", "intervention", "off_track", "hard_brake", "hard_steer", "low_reward", "novelty")
UNKNOWN = "unknown"  # a tag value a describer could not determine

_HEADING, _SPEED, _ON_TRACK = 2, 5, 7  # columns of STATE_FIELDS


def _check_clip(length: int, start: int, end: int) -> None:
    if not 0 <= start < end <= length:
        raise ValueError(f"clip [{start}, {end}) is not a non-empty window of a span of {length} steps")


def privileged_tags(states: np.ndarray, *, timestamps_ns: np.ndarray, start: int, end: int,
                    lookahead_s: float = 1.0, curve_rad: float = 0.3, slow: float = 45.0,
                    fast: float = 65.0) -> dict[str, str] | None:
    """Tags of the clip [start, end) of a span from its privileged states float[T, 8] (module rules).

    Returns None when any state value the rules read (heading from the clip's last step to the
    look-ahead step, speed and on_track over the clip) is NaN: the log has no privileged state.
    """
    states = np.asarray(states, dtype=np.float64)
    t = np.asarray(timestamps_ns, dtype=np.int64)
    if states.ndim != 2 or states.shape[1] != 8:
        raise ValueError(f"states must be [T, 8] (STATE_FIELDS), got {states.shape}")
    if len(t) != len(states):
        raise ValueError(f"{len(states)} states but {len(t)} timestamps")
    if lookahead_s < 0 or curve_rad < 0 or not slow <= fast:
        raise ValueError("need lookahead_s >= 0, curve_rad >= 0 and slow <= fast")
    _check_clip(len(states), start, end)
    last = end - 1
    ahead = min(int(np.searchsorted(t, t[last] + round(lookahead_s * 1e9), side="left")), len(t) - 1)
    clip = states[start:end]
    used = np.concatenate([states[[last, ahead], _HEADING], clip[:, _SPEED], clip[:, _ON_TRACK]])
    if np.isnan(used).any():
        return None
    turn = (states[ahead, _HEADING] - states[last, _HEADING] + np.pi) % (2 * np.pi) - np.pi
    curvature = "left" if turn > curve_rad else "right" if turn < -curve_rad else "straight"
    off = np.count_nonzero(clip[:, _ON_TRACK] < 0.5) * 2 > len(clip)
    speed = float(clip[:, _SPEED].mean())
    band = "slow" if speed < slow else "fast" if speed >= fast else "medium"
    return {"curvature": curvature, "track": "off" if off else "on", "speed": band}


def caption(tags: dict[str, str], event: str) -> str:
    """One line: "<speed>, <track phrase>, <curvature phrase>; event: <event>".

    E.g. "fast, on track, left curve ahead; event: hard_brake" or "slow, off track, straight
    ahead; event: none". A tag that is missing or "unknown" reads "speed unknown", "track
    unknown", "road ahead unknown". Values outside ``TAGS`` and events outside ``EVENTS`` are an
    error.
    """
    for key, value in tags.items():
        if key not in TAGS or value not in (*TAGS[key], UNKNOWN):
            raise ValueError(f"invalid tag {key}={value!r}; valid: {TAGS} or {UNKNOWN!r}")
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}; valid: {EVENTS}")
    speed = tags.get("speed", UNKNOWN)
    track = tags.get("track", UNKNOWN)
    curvature = tags.get("curvature", UNKNOWN)
    speed_text = "speed unknown" if speed == UNKNOWN else speed
    track_text = "track unknown" if track == UNKNOWN else f"{track} track"
    curve_text = {"straight": "straight ahead", UNKNOWN: "road ahead unknown"}.get(
        curvature, f"{curvature} curve ahead")
    return f"{speed_text}, {track_text}, {curve_text}; event: {event}"


def clip_frames(frames: np.ndarray, start: int, end: int, k: int) -> np.ndarray:
    """k frames evenly spaced over the clip [start, end), the last one always frames[end-1].

    Indices are end-1 - round(i * (end-1-start) / (k-1)) for i = k-1 .. 0 (just end-1 for
    k = 1), so the first is frames[start] when k > 1; a clip shorter than k repeats frames.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8[T, H, W, 3], got {frames.dtype}{list(frames.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_clip(len(frames), start, end)
    step = (end - 1 - start) / max(k - 1, 1)
    idx = end - 1 - np.round(step * np.arange(k - 1, -1, -1)).astype(np.int64)
    return frames[idx]
