"""Per-step event detectors that worlds compose, and the merge of their runs into events.

A detection is (condition bool[T], severity float[T], reducer of severity over an event).
Rates at step t are backward differences over (t-1, t] in real time from the span's
``timestamps_ns``; step 0, and a step whose stamp does not advance, has no rate. NaN never
satisfies a condition.

A *run* is a maximal block of consecutive steps where a condition holds; its onset is its first
step. Runs of one type are merged into events: a run whose onset is at most ``merge_gap`` steps
after the onset of the event being built joins it (extending its end); otherwise it opens a new
event. So an event's onset is always a run onset.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Detection = tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], float]]


def backward_rate(values: np.ndarray, timestamps_ns: np.ndarray) -> np.ndarray:
    """d values / dt per second at each step over (t-1, t]; NaN at step 0 and where dt <= 0."""
    rate = np.full(len(values), np.nan)
    seconds = np.diff(timestamps_ns).astype(np.float64) / 1e9
    np.divide(np.diff(values.astype(np.float64)), seconds, out=rate[1:], where=seconds > 0)
    return rate


def flag(values: np.ndarray) -> Detection:
    """A flag, true where non-zero and not NaN; severity 1 per flagged step, summed: the
    event's flagged step count."""
    mask = np.nan_to_num(np.asarray(values, np.float64)) != 0
    return mask, mask.astype(np.float64), np.sum


def threshold(level: np.ndarray, level_min: float, rate: np.ndarray, rate_min: float) -> Detection:
    """``level >= level_min`` or ``rate >= rate_min``; severity = the larger ratio to its
    threshold (>= 1 on firing steps), reduced by the max over the event."""
    mask = (level >= level_min) | (rate >= rate_min)
    return mask, np.fmax(level / level_min, rate / rate_min), np.nanmax


def low_reward(rewards: np.ndarray, window: int, below: float) -> Detection:
    """Steps whose trailing window of ``window`` steps (ending at the step) has a mean reward
    ``< below``; steps before the first full window never fire. Severity ``below - mean`` (> 0
    on firing steps), reduced by the max over the event: the deficit of its worst window."""
    steps = len(rewards)
    mask, severity = np.zeros(steps, bool), np.full(steps, np.nan)
    if steps >= window:
        means = np.lib.stride_tricks.sliding_window_view(np.asarray(rewards, np.float64), window).mean(1)
        mask[window - 1:] = means < below
        severity[window - 1:] = below - means
    return mask, severity, np.nanmax


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first step, last step) of each maximal run of True in ``mask``."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1


def merge(kind: str, detection: Detection, merge_gap: int) -> list[dict]:
    """Events ``{"event", "step" (onset), "end_step" (inclusive), "score"}`` of one detection."""
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


def events_of(detections: dict[str, Detection], merge_gap: int) -> list[dict]:
    """All events of several detections, unsorted."""
    return [e for kind, d in detections.items() for e in merge(kind, d, merge_gap)]
