"""The reasoner's vocabulary of a world, the car world's privileged scene tags and captions, and
clip frame sampling."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sim import worlds
from sim.worlds.base import WorldConfig
from stages.describe import clip_frames, reasoner_config_for, vocabulary

STEP_NS = 20_000_000  # 50 Hz


def span(T: int = 200, *, heading=None, speed=50.0, on_track=1.0) -> np.ndarray:
    """Car states float32[T, 8] (the spec's state_names) with the given heading/speed/on_track columns."""
    states = np.zeros((T, 8), np.float32)
    states[:, 2] = 0.0 if heading is None else heading
    states[:, 5] = speed
    states[:, 7] = on_track
    return states


def privileged_tags(states: np.ndarray, *, start: int, end: int, **thresholds) -> dict | None:
    """The car world's tags of the clip [start, end) of a span: its rows, then the look-ahead rows."""
    world = worlds.get(WorldConfig(name="carracing", options={"tags": thresholds} if thresholds else {}))
    rows = np.asarray(states)[start:]
    signals = {"off_track": rows[:, -1] < 0.5}  # the world's signal (the rules read on_track)
    return world.privileged_tags(rows, signals, clip_len=end - start)


def test_vocabulary():
    spec = worlds.spec("carracing")
    tags, events = vocabulary(spec)
    assert tags == {"curvature": ("left", "straight", "right"), "track": ("on", "off"),
                    "speed": ("slow", "medium", "fast")}
    assert events == ("none", "intervention", "off_track", "hard_brake", "hard_steer", "low_reward", "novelty")
    arm = SimpleNamespace(tags={"phase": ["reach", "grasp"]}, events=("grasp",))  # duck-typed, names as events
    assert vocabulary(arm) == ({"phase": ("reach", "grasp")}, ("none", "grasp", "novelty"))


def test_reasoner_config_for_a_world():
    from models.reasoner import preset

    car = worlds.get("carracing")
    assert reasoner_config_for(car, "tiny") == preset("tiny")  # the reasoner's defaults are the car's
    assert reasoner_config_for(car.spec, "tiny").mirror == {"curvature": {"left": "right", "right": "left"}}
    arm = SimpleNamespace(tags={"phase": ("reach", "grasp", "place"), "gripper": ("open", "closed")},
                          events=("grasp",))  # no ``mirror``: no mirror augmentation
    cfg = reasoner_config_for(arm, preset("tiny"), steps=7)
    assert cfg.tags == arm.tags and cfg.events == ("none", "grasp", "novelty") and cfg.mirror == {}
    assert cfg.steps == 7 and cfg.image_size == preset("tiny").image_size


@pytest.mark.parametrize("rate, want", [(0.5, "left"), (-0.5, "right"), (0.1, "straight"), (-0.1, "straight")])
def test_curvature_from_heading_change_ahead(rate, want):
    T = 200
    states = span(T, heading=rate * np.arange(T) * STEP_NS / 1e9)  # rad/s
    tags = privileged_tags(states, start=20, end=45, curve_rad=0.3)
    assert tags["curvature"] == want  # 1 s ahead: |change| 0.5 > 0.3 or 0.1 < 0.3


def test_curvature_looks_after_the_clip_not_inside_it():
    T = 200
    heading = np.where(np.arange(T) < 50, np.linspace(0, 2.0, T), 2.0 * 50 / (T - 1))  # turning, then straight
    states = span(T, heading=heading)
    assert privileged_tags(states, start=10, end=50)["curvature"] == "straight"
    assert privileged_tags(states, start=0, end=10)["curvature"] == "left"


def test_curvature_wraps_across_pi():
    T = 120
    states = span(T, heading=np.pi - 0.2 + 0.6 * np.arange(T) * STEP_NS / 1e9)  # crosses +pi leftwards
    states[60:, 2] -= 2 * np.pi  # stored wrapped, as a log might
    assert privileged_tags(states, start=30, end=50)["curvature"] == "left"


def test_lookahead_clamps_at_span_end():
    T = 60
    heading = np.zeros(T)
    heading[-1] = -1.0  # the last step of the span has turned right
    states = span(T, heading=heading)
    assert privileged_tags(states, start=30, end=40)["curvature"] == "right"  # 1 s > span
    assert privileged_tags(states, start=50, end=60)["curvature"] == "straight"  # no future
    assert privileged_tags(states, start=30, end=40, lookahead_steps=10)["curvature"] == "straight"  # 0.2 s


def test_track_is_off_when_most_clip_steps_are_off():
    on = np.ones(100)
    on[10:16] = 0.0  # 6 of the 10 clip steps off
    states = span(100, on_track=on)
    assert privileged_tags(states, start=10, end=20)["track"] == "off"
    assert privileged_tags(states, start=12, end=22)["track"] == "on"  # 4 of 10
    assert privileged_tags(states, start=11, end=21)["track"] == "on"  # 5 of 10: not most


@pytest.mark.parametrize("speed, want", [(10.0, "slow"), (44.9, "slow"), (45.0, "medium"), (64.9, "medium"),
                                         (65.0, "fast"), (90.0, "fast")])
def test_speed_bands(speed, want):
    assert privileged_tags(span(100, speed=speed), start=0, end=25)["speed"] == want


def test_speed_band_is_the_clip_mean():
    speed = np.full(100, 100.0)
    speed[:25] = np.linspace(0, 60, 25)  # mean 30 inside the clip, fast after it
    assert privileged_tags(span(100, speed=speed), start=0, end=25, slow=40, fast=70)["speed"] == "slow"


def test_nan_state_means_no_labels():
    states = span(100)
    states[:] = np.nan
    assert privileged_tags(states, start=0, end=25) is None
    states = span(100)
    states[79, 2] = np.nan  # a heading the rule reads (the look-ahead step of a clip ending at 30)
    assert privileged_tags(states, start=10, end=30) is None
    assert privileged_tags(states, start=0, end=20) is not None  # reads step 69


def test_privileged_tags_errors():
    states = span(50)
    with pytest.raises(ValueError, match=r"\[T, 8\]"):
        privileged_tags(states[:, :7], start=0, end=10)
    for start, end in [(10, 10), (-1, 5), (40, 51)]:
        with pytest.raises(ValueError, match="clip_len"):
            privileged_tags(states, start=start, end=end)


def test_caption():
    caption = worlds.get("carracing").caption
    tags = {"curvature": "left", "track": "on", "speed": "fast"}
    assert caption(tags, "hard_brake") == "fast, on track, left curve ahead; event: hard_brake"
    assert caption({"curvature": "straight", "track": "off", "speed": "slow"}, "none") == \
        "slow, off track, straight ahead; event: none"
    assert caption({"curvature": "unknown", "speed": "medium"}, "novelty") == \
        "medium, track unknown, road ahead unknown; event: novelty"


def test_clip_frames_even_spacing_last_included():
    frames = np.arange(30, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    pick = lambda *a: clip_frames(frames, *a)[:, 0, 0, 0].tolist()  # noqa: E731
    assert pick(0, 10, 4) == [0, 3, 6, 9]
    assert pick(5, 30, 5) == [5, 11, 17, 23, 29]
    assert pick(5, 30, 1) == [29]
    assert pick(7, 9, 4) == [7, 7, 8, 8]  # a clip shorter than k repeats frames
    assert clip_frames(frames, 0, 10, 4).shape == (4, 2, 2, 3)
    with pytest.raises(ValueError, match="uint8"):
        clip_frames(frames.astype(np.float32), 0, 10, 2)
    with pytest.raises(ValueError, match="k must be"):
        clip_frames(frames, 0, 10, 0)
    with pytest.raises(ValueError, match="non-empty window"):
        clip_frames(frames, 5, 31, 2)
