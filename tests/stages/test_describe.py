"""The reasoner's vocabulary of a world, the car world's privileged scene tags and captions,
clip frame sampling, and the clips of a curate run as Arrow (candidates, training set, final table)."""
from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from sim import worlds
from sim.worlds.base import WorldConfig
from stages.curate import SpanVerdict
from stages.describe import (candidate_clips, clip_counts, clip_frames, clips_table, held_out, reasoner_config_for,
                             plan_accuracy, training_clips, vocabulary)
from stages.schemas import clips_schema, images

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
    cfg = reasoner_config_for(car, "tiny")  # the preset's sizes, the world's words
    assert (cfg.tags, cfg.events) == vocabulary(car.spec) and cfg.tags != preset("tiny").tags
    assert cfg.image_size == preset("tiny").image_size
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


def clip(start: int, event: str = "none", tags: dict | None = None) -> dict:
    return {"event": event, "event_step": -1 if event == "none" else start + 2, "start_step": start,
            "end_step": start + 8, "score": 0.0 if event == "none" else 1.5, "label_tags": tags}


def verdict(episode_id: str, clips: list[dict]) -> SpanVerdict:
    """A kept span's verdict; clip i's two sampled frames are all i."""
    frames = np.stack([np.full((2, 4, 4, 3), i, np.uint8) for i in range(len(clips))]) if clips else None
    return SpanVerdict(span_id=episode_id, kept=True, reasons=(), detail="", counts={}, frames=40,
                       clips=tuple(clips), **({"clip_frames": frames} if clips else {}))


def candidates(*, label_b: bool = False) -> pa.Table:
    verdicts = {"ep-a": verdict("ep-a", [clip(0, tags={"speed": "slow"}), clip(8, "off_track", {"speed": "fast"})]),
                "ep-b": verdict("ep-b", [clip(0, tags={"speed": "slow"} if label_b else None)]),
                "ep-c": verdict("ep-c", [])}
    episodes = [{"episode_id": e, "source_uri": f"/{e}.mcap", "split": split, "task": f"task of {e}"}
                for e, split in (("ep-a", "train"), ("ep-b", "val"), ("ep-c", "train"))]
    return candidate_clips(verdicts, episodes, turn=3)


def test_candidate_clips_one_row_per_clip_with_its_frames():
    table = candidates()
    assert table.column("clip_id").to_pylist() == ["ep-a:00000-00008:none", "ep-a:00008-00016:off_track",
                                                   "ep-b:00000-00008:none"]
    assert table.column("label_tags").to_pylist() == ['{"speed":"slow"}', '{"speed":"fast"}', ""]
    assert table.column("source_uri").to_pylist() == ["/ep-a.mcap", "/ep-a.mcap", "/ep-b.mcap"]
    assert table.column("turn").to_pylist() == [3, 3, 3]
    frames = images(table.column("frames"))
    assert frames.shape == (3, 2, 4, 4, 3) and frames[:, 0, 0, 0, 0].tolist() == [0, 1, 0]
    assert candidate_clips({}, [], turn=0).num_rows == 0


def test_held_out_prefers_val_episodes_else_whole_episodes():
    table = pa.table({"split": ["train", "val", "train"], "episode_id": ["a", "b", "c"]})
    assert held_out(table).tolist() == [False, True, False]
    table = pa.table({"split": ["train"] * 4, "episode_id": ["a", "a", "b", "b"]})
    held = held_out(table)
    assert held.any() and not held.all() and held[0] == held[1] and held[2] == held[3]


def test_training_clips_need_labelled_clips_of_two_episodes():
    assert training_clips(candidates()) is None  # only ep-a's clips have labels
    data = training_clips(candidates(label_b=True))
    assert data.frames.shape == (3, 2, 4, 4, 3) and data.events == ["none", "off_track", "none"]
    assert data.tags == [{"speed": "slow"}, {"speed": "fast"}, {"speed": "slow"}]
    assert data.held.tolist() == [False, False, True]  # ep-b is the val episode
    assert data.tasks == ["task of ep-a", "task of ep-a", "task of ep-b"]


def test_plan_accuracy_compares_plans_from_predicted_and_true_tags_on_known_tasks():
    def plan(task, tags):  # a plan that ignores the "held" tag
        return f"{task}: {tags['phase']}"
    names = {"push": "push", "Push the puck.": "push"}
    true = [{"phase": "reach", "held": "no"}] * 4
    pred = [{"phase": "reach", "held": "yes"}, {"phase": "grasp", "held": "no"}, true[0], true[0]]
    out = plan_accuracy(plan, names, ["push", "Push the puck.", "Push the puck.", "unknown task"], pred, true)
    assert out == {"n": 3, "accuracy": 2 / 3}  # a wrong tag the plan ignores is no wrong plan
    assert plan_accuracy(plan, names, [""], pred[:1], true[:1]) == {"n": 0, "accuracy": None}


NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
TABLE_ARGS = {"weights": {"off_track": 3.0, "novelty": 2.0, "none": 1.0}, "dedup_threshold": 0.1,
              "novelty_threshold": 0.3, "created_at": NOW}


def test_clips_table_without_a_reasoner():
    out = clips_table(candidates(), described=None, bank=None, describer="", **TABLE_ARGS)
    assert out.schema == clips_schema()
    assert out.column("event").to_pylist() == ["none", "off_track", "none"]
    assert out.column("weight").to_pylist() == [1.0, 3.0, 1.0]
    assert out.column("embedding").to_pylist() == [[], [], []] and out.column("tags").to_pylist() == [""] * 3
    assert out.column("novelty").to_pylist() == [-1.0] * 3 and out.column("describer").to_pylist() == [""] * 3
    assert out.column("created_at").to_pylist() == [NOW] * 3
    assert clip_counts(out) == {"events": {"none": 2, "off_track": 1}, "duplicates": 0}


def test_clips_table_with_a_reasoner_marks_duplicates_and_novelty():
    clips = candidates()
    ids = clips.column("clip_id").to_pylist()
    described = pa.table({"clip_id": ids[::-1], "embedding": [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
                          "tags": ['{"t":"c"}', '{"t":"b"}', '{"t":"a"}'], "caption": ["c", "b", "a"]})
    bank = pa.table({"clip_id": ["old", "wide"], "event": ["none", "none"],
                     "embedding": pa.array([[0.6, 0.8], [1.0, 0.0, 0.0]], pa.list_(pa.float32()))})
    out = clips_table(clips, described=described, bank=bank, describer='{"source":"config"}', **TABLE_ARGS)
    assert out.column("caption").to_pylist() == ["a", "b", "c"]  # in the clips' order
    assert out.column("embedding").to_pylist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    # ep-b's routine clip repeats ep-a's (same event type); "wide" has another width: left out
    assert out.column("duplicate_of").to_pylist() == ["", "", ids[0]]
    # distance to "old": 0.4, 0.2, 0.4 -> routine clips past 0.3 are novelty; event clips stay
    assert out.column("novelty").to_pylist() == pytest.approx([0.4, 0.2, 0.4])
    assert out.column("event").to_pylist() == ["novelty", "off_track", "novelty"]
    assert out.column("weight").to_pylist() == [2.0, 3.0, 2.0]
    assert clip_counts(out) == {"events": {"novelty": 2, "off_track": 1}, "duplicates": 1}
