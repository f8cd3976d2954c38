"""Describing clips, for any world: clip frame sampling and the scene reasoner's vocabulary.

A clip is a window [start, end) of an aligned span (one episode cut at gaps). The scene reasoner
(``models.reasoner``) describes it by one value per tag of the world's ``spec.tags``, given the
event mined for it (``"none"``, one of the world's ``spec.events``, or ``"novelty"``, mined at
description time), and a one-line caption (the world's ``caption``). Its training labels are
the world's ``privileged_tags`` (None for logs without privileged state, a real robot's); its
mirror augmentation maps tags by the spec's ``mirror`` (none when the world is not mirror-symmetric).
Everything world-specific is read from the world (``sim.worlds``) here, so the reasoner's
config carries the vocabulary and ``models`` never import a world.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from stages.events import NONE

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
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_clip(len(frames), start, end)
    step = (end - 1 - start) / max(k - 1, 1)
    idx = end - 1 - np.round(step * np.arange(k - 1, -1, -1)).astype(np.int64)
    return frames[idx]
