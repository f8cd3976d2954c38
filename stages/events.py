"""Event mining: the triggers of the data engine, clips around them, and oversampling weights.

Pure NumPy over one episode dict (a "span": the aligned, gap-free piece of a log). The triggers
are the world's (``World.detect_events``, composed from ``sim.worlds.detectors``): which events
exist, what fires them, and how much a clip around each weighs in training all come from the
world's spec. This module merges them into clips and weights, for any world.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

NONE = "none"
NOVELTY_WEIGHT = 2.0  # ``novelty`` is mined at description time: a routine clip far from the lake's clips


@dataclass(frozen=True)
class EventConfig:
    """Clip geometry (steps are steps of the span, i.e. frames).

    clip_len: steps per clip. pre: steps before an event onset included in its clip.
    merge_gap: onsets of one type at most this many steps after an event's onset join it.
    """

    clip_len: int = 32
    pre: int = 16
    merge_gap: int = 16

    def __post_init__(self) -> None:
        if self.clip_len <= 0 or self.pre < 0 or self.merge_gap < 0:
            raise ValueError("EventConfig: clip_len must be > 0, pre and merge_gap >= 0")

    @classmethod
    def split(cls, params: Mapping) -> tuple["EventConfig", dict]:
        """(clip geometry, the world's threshold overrides) from one ``curate.events`` dict."""
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in params.items() if k in names})
        return config, {**{k: v for k, v in params.items() if k not in names}, "merge_gap": config.merge_gap}


def mine_events(span: dict, *, world, config: EventConfig, params: Mapping | None = None) -> list[dict]:
    """The world's events of one span, sorted by onset step then the spec's priority order.

    Each event is ``{"event", "step" (onset), "end_step" (inclusive), "score"}``.
    """
    order = {name: i for i, name in enumerate(world.spec.event_weights)}
    found = world.detect_events(span, params={**(params or {}), "merge_gap": config.merge_gap})
    unknown = {e["event"] for e in found} - set(order)
    if unknown:
        raise ValueError(f"world {world.spec.name!r} detected events {sorted(unknown)} not in its spec")
    return sorted(found, key=lambda e: (e["step"], order[e["event"]]))


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


def oversample(spec) -> dict[str, float]:
    """Training weight of a clip by its event type: the world's event weights, novelty 2, routine 1."""
    return {**spec.event_weights, "novelty": NOVELTY_WEIGHT, NONE: 1.0}


def sample_weights(events: Sequence[str], *, weights: Mapping[str, float]) -> np.ndarray:
    """Training weight (float64[N]) of each clip from its event type via ``weights``
    (``oversample(spec)``); a type missing from it weighs 1. The weights are relative: a sampler
    draws clip i with probability ``w[i] / w.sum()``."""
    return np.array([float(weights.get(event, 1.0)) for event in events], np.float64)
