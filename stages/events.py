"""Event mining: the triggers of the data engine, clips around them, and oversampling weights.

Pure NumPy over one episode dict (a "span": the aligned, gap-free piece of a log). Five
triggers, each a per-step boolean condition:

* ``intervention`` / ``off_track``: the flag of that name is true.
* ``hard_brake``: brake command ``>= hard_brake``, or the speed (state column 5) dropped at
  ``>= decel_mps2`` m/s^2.
* ``hard_steer``: ``|steer| >= hard_steer``, or ``|d steer / dt| >= steer_rate`` per second.
* ``low_reward``: the mean reward over the trailing window of ``low_reward_window`` steps
  ending at the step is ``< low_reward`` (causal, as an on-vehicle trigger: the onset is when
  the mean crosses, about half a window after the rewards drop; a window with any NaN reward
  has a NaN mean and never fires; steps before the first full window never fire).

Rates at step t are backward differences over (t-1, t] in real time from ``timestamps_ns``;
step 0, and a step whose stamp does not advance, has no rate. NaN never satisfies a condition.

A *run* is a maximal block of consecutive steps where a condition holds; its onset is its first
step (a condition true at step 0 has onset 0). Runs of one type are merged into events: a run
whose onset is at most ``merge_gap`` steps after the onset of the event being built joins it
(extending its end); otherwise it opens a new event. So an event's onset is always a run onset,
and every onset merged into it lies within ``merge_gap`` steps of it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

SPEED = 5  # column of "speed" in STATE_FIELDS
NONE = "none"
EVENT_PRIORITY = ("intervention", "off_track", "hard_brake", "hard_steer", "low_reward", NONE)
"""Event types, most important first: the tie-break order of events mined at the same step."""
OVERSAMPLE: Mapping[str, float] = MappingProxyType({
    "intervention": 4.0, "off_track": 4.0, "hard_brake": 2.0, "hard_steer": 2.0,
    "low_reward": 2.0, "novelty": 2.0, NONE: 1.0})
"""Default training weight of a clip by its event type (routine clips weigh 1; ``novelty`` is
mined at description time, from a routine clip far from every clip the lake holds)."""


@dataclass(frozen=True)
class EventConfig:
    """Trigger thresholds and clip geometry (steps are steps of the span, i.e. frames).

    clip_len: steps per clip. pre: steps before an event onset included in its clip.
    hard_brake: brake command at or above which a step is a hard brake.
    decel_mps2: speed drop per second (m/s^2) at or above which a step is a hard brake.
    hard_steer: |steer| at or above which a step is a hard steer.
    steer_rate: |d steer / dt| per second at or above which a step is a hard steer.
    low_reward_window, low_reward: a step whose trailing window of that many steps has a mean
    reward per step strictly below ``low_reward`` is in a low-reward span.
    merge_gap: onsets of one type at most this many steps after an event's onset join it.
    """

    clip_len: int = 32
    pre: int = 16
    hard_brake: float = 0.8
    decel_mps2: float = 15.0
    hard_steer: float = 0.9
    steer_rate: float = 8.0
    low_reward_window: int = 25
    low_reward: float = -0.05
    merge_gap: int = 16

    def __post_init__(self) -> None:
        positive = ("clip_len", "hard_brake", "decel_mps2", "hard_steer", "steer_rate",
                    "low_reward_window")
        bad = [name for name in positive if not getattr(self, name) > 0]
        bad += [name for name in ("pre", "merge_gap") if getattr(self, name) < 0]
        if bad:
            raise ValueError(f"EventConfig: {bad} out of range (thresholds and sizes must be > 0, "
                             "pre and merge_gap >= 0)")


# A detector gives (condition per step, severity per step, reducer of severity over an event).
_Detection = tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], float]]


def _backward_rate(values: np.ndarray, timestamps_ns: np.ndarray) -> np.ndarray:
    """d values / dt per second at each step over (t-1, t]; NaN at step 0 and where dt <= 0."""
    rate = np.full(len(values), np.nan)
    seconds = np.diff(timestamps_ns).astype(np.float64) / 1e9
    np.divide(np.diff(values.astype(np.float64)), seconds, out=rate[1:], where=seconds > 0)
    return rate


def _flag(values: np.ndarray) -> _Detection:
    """A flag, true where non-zero and not NaN; severity 1 per flagged step, summed: the
    event's flagged step count."""
    mask = np.nan_to_num(np.asarray(values, np.float64)) != 0
    return mask, mask.astype(np.float64), np.sum


def _threshold(level: np.ndarray, level_min: float, rate: np.ndarray, rate_min: float) -> _Detection:
    """``level >= level_min`` or ``rate >= rate_min``; severity = the larger ratio to its
    threshold (>= 1 on firing steps), reduced by the max over the event."""
    mask = (level >= level_min) | (rate >= rate_min)
    return mask, np.fmax(level / level_min, rate / rate_min), np.nanmax


def _low_reward(rewards: np.ndarray, window: int, below: float) -> _Detection:
    """Steps whose trailing window of ``window`` steps (ending at the step) has a mean reward
    ``< below``; steps before the first full window never fire. Severity ``below - mean`` (> 0
    on firing steps), reduced by the max over the event: the deficit of its worst window."""
    steps = len(rewards)
    mask, severity = np.zeros(steps, bool), np.full(steps, np.nan)
    if steps >= window:
        means = np.lib.stride_tricks.sliding_window_view(rewards.astype(np.float64), window).mean(1)
        mask[window - 1:] = means < below
        severity[window - 1:] = below - means
    return mask, severity, np.nanmax


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first step, last step) of each maximal run of True in ``mask``."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1


def _events(kind: str, detection: _Detection, merge_gap: int) -> list[dict]:
    mask, severity, reduce = detection
    events: list[dict] = []
    for start, end in zip(*_runs(mask)):
        if events and start - events[-1]["step"] <= merge_gap:
            events[-1]["end_step"] = int(end)
        else:
            events.append({"event": kind, "step": int(start), "end_step": int(end)})
    for event in events:
        event["score"] = float(reduce(severity[event["step"]:event["end_step"] + 1]))
    return events


def mine_events(span: dict, *, config: EventConfig) -> list[dict]:
    """The events of one span, sorted by onset step then ``EVENT_PRIORITY``.

    ``span`` needs ``timestamps_ns`` int64[T], ``actions`` [T,3] (steer, gas, brake),
    ``states`` [T,8] (column 5 = speed; may be NaN), ``rewards`` [T] (may be NaN),
    ``interventions`` bool[T] and ``off_track`` bool[T]. Each event is ``{"event", "step"
    (onset), "end_step" (last step of its last merged run, inclusive), "score"}``. Scores, by
    type: intervention / off_track, the number of steps flagged within the event;
    hard_brake / hard_steer, the peak ratio of a triggering quantity to its threshold (>= 1);
    low_reward, ``low_reward`` minus the lowest window mean (> 0).
    """
    stamps = np.asarray(span["timestamps_ns"], np.int64)
    actions = np.asarray(span["actions"])  # levels compared in their own dtype: 0.8 hits 0.8
    steer, brake = actions[:, 0], actions[:, 2]
    speed = np.asarray(span["states"], np.float64)[:, SPEED]
    detections = {
        "intervention": _flag(span["interventions"]),
        "off_track": _flag(span["off_track"]),
        "hard_brake": _threshold(brake, config.hard_brake,
                                 -_backward_rate(speed, stamps), config.decel_mps2),
        "hard_steer": _threshold(np.abs(steer), config.hard_steer,
                                 np.abs(_backward_rate(steer, stamps)), config.steer_rate),
        "low_reward": _low_reward(np.asarray(span["rewards"]), config.low_reward_window,
                                  config.low_reward),
    }
    events = [e for kind, d in detections.items() for e in _events(kind, d, config.merge_gap)]
    return sorted(events, key=lambda e: (e["step"], EVENT_PRIORITY.index(e["event"])))


def _window(start: int, span_len: int, clip_len: int) -> tuple[int, int]:
    """[start, end) of a clip from ``max(0, start)``, shifted left to stay ``clip_len`` long
    where it would pass ``span_len``."""
    end = min(span_len, max(0, start) + clip_len)
    return max(0, end - clip_len), end


def event_clips(span_len: int, events: Sequence[dict], *, config: EventConfig) -> list[dict]:
    """Clips of a span of ``span_len`` steps: one per event, plus routine tiles.

    An event clip starts ``pre`` steps before the onset (at 0 at the earliest) and is
    ``clip_len`` steps long, shifted left where it would pass the span's end (shorter only when
    the span is). Routine clips (event ``"none"``, event_step -1) tile the span from step 0 in
    ``clip_len`` windows. A last partial tile of at least ``clip_len // 2`` steps is kept as it
    is; a shorter remainder is covered by one full window ending at the span's end (overlapping
    the tile before it), so every step is in a clip unless the whole span is shorter than
    ``clip_len // 2`` (it then has event clips only). Clip fields: ``event``, ``event_step``,
    ``start_step``, ``end_step`` (exclusive), ``score`` (0 for routine clips); ordered by
    start_step, then event, then event_step.
    """
    clip_len = config.clip_len
    clips = []
    for event in events:
        start, end = _window(event["step"] - config.pre, span_len, clip_len)
        clips.append({"event": event["event"], "event_step": int(event["step"]),
                      "start_step": start, "end_step": end, "score": float(event["score"])})
    full, rest = divmod(span_len, clip_len)
    tiles = [(k * clip_len, (k + 1) * clip_len) for k in range(full)]
    if rest >= max(1, clip_len // 2):
        tiles.append((full * clip_len, span_len))
    elif rest and full:
        tiles.append((span_len - clip_len, span_len))
    clips += [{"event": NONE, "event_step": -1, "start_step": s, "end_step": e, "score": 0.0}
              for s, e in tiles]
    return sorted(clips, key=lambda c: (c["start_step"], c["event"], c["event_step"]))


def sample_weights(events: Sequence[str], *, oversample: Mapping[str, float] = OVERSAMPLE) -> np.ndarray:
    """Training weight (float64[N]) of each clip from its event type via ``oversample``.

    A type missing from ``oversample`` weighs 1. The weights are relative: a sampler draws clip
    i with probability ``w[i] / w.sum()``. Defaults (``OVERSAMPLE``): intervention and
    off_track 4, hard_brake, hard_steer, low_reward and novelty 2, routine ("none") 1.
    """
    return np.array([float(oversample.get(event, 1.0)) for event in events], np.float64)
