"""Alignment: frames define steps, signals are held/interpolated to them, gaps cut spans."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stages.align import align
from stages.streams import LogError, Streams

MS = 1_000_000


def frames_for(n: int, size: int = 8) -> np.ndarray:
    """n distinct frames (frame i is filled with i)."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                           (n, size, size, 3)).copy()


def actions_for(n: int) -> np.ndarray:
    k = np.arange(n, dtype=np.float32)
    return np.stack([k / 100, np.full(n, 0.5, np.float32), k / 1000], axis=1)


def streams_at(camera_ms, action_ms=None, **signals) -> Streams:
    """Streams with frames at ``camera_ms`` and actions at ``action_ms`` (default: the frames)."""
    camera_t = np.asarray(camera_ms, np.int64) * MS
    action_t = camera_t if action_ms is None else np.asarray(action_ms, np.int64) * MS
    return Streams(source_uri="mem://log", camera_t=camera_t, frames=frames_for(len(camera_t)),
                   signals={"action": (action_t, actions_for(len(action_t))), **signals},
                   meta={"format": "test"})


def test_resampling_rules_camera_20hz_action_10hz_state_50hz():
    camera_ms = np.arange(20) * 50
    action_ms = np.arange(10) * 100
    state_t = np.arange(50, dtype=np.int64) * 20 * MS
    state_v = (np.arange(50, dtype=np.float32)[:, None] ** 2 + np.arange(8)).astype(np.float32)
    reward_t = np.arange(10, dtype=np.int64) * 100 * MS
    streams = streams_at(camera_ms, action_ms, state=(state_t, state_v),
                         reward=(reward_t, np.arange(10, dtype=np.float32)[:, None]),
                         intervention=(np.array([0, 500]) * MS, np.array([0.0, 1.0])))
    streams.meta.update({"world": "w1", "seed": "7", "topic.camera": "/camera/image_raw"})
    spans, rejected = align(streams, signal_names=("off_track",))
    assert rejected == [] and len(spans) == 1
    span = spans[0]
    j = np.arange(20)
    np.testing.assert_array_equal(span["timestamps_ns"], camera_ms * MS)
    # action: zero-order hold of the 10 Hz samples (never interpolated)
    np.testing.assert_array_equal(span["actions"], actions_for(10)[j // 2])
    np.testing.assert_array_equal(span["action_age_ns"], (j % 2) * 50 * MS)
    # state: linear interpolation of the 50 Hz samples; frame 50 ms lies between k=2 and k=3
    assert span["states"][1, 0] == pytest.approx((2**2 + 3**2) / 2)
    assert span["states"][2, 0] == 25.0 and span["states"][1, 7] == pytest.approx(6.5 + 7)
    expected = np.interp(camera_ms * MS, state_t, state_v[:, 0].astype(np.float64))
    np.testing.assert_allclose(span["states"][:, 0], expected)
    np.testing.assert_array_equal(span["rewards"], (j // 2).astype(np.float32))
    np.testing.assert_array_equal(span["interventions"], camera_ms >= 500)
    assert set(span["signals"]) == {"off_track"} and span["signals"]["off_track"].dtype == np.bool_
    assert not span["signals"]["off_track"].any() and np.isnan(span["expert_actions"]).all()
    assert "off_track" not in span
    assert span["actions"].dtype == span["states"].dtype == np.float32
    assert (span["span_index"], span["split_reason"], span["dropped_duplicates"]) == (0, "", 0)
    assert (span["start_ns"], span["end_ns"]) == (0, 950 * MS)
    assert (span["world"], span["seed"], span["driver"], span["policy_version"]) == \
        ("w1", 7, "unknown", "")
    assert span["format"] == "test" and span["topics"] == {"topic.camera": "/camera/image_raw"}
    assert span["source_shape"] == (8, 8) and span["frames"].shape == (20, 8, 8, 3)


def test_signals_are_held_and_named_in_order():
    camera_ms = np.arange(10) * 50
    signal_t = np.array([0, 200, 400]) * MS  # 5 Hz: hold = 2 * 200 ms
    signal_v = np.array([[0.0, 1.0], [1.0, 0.0], [np.nan, 1.0]], np.float32)
    spans, _ = align(streams_at(camera_ms, signals=(signal_t, signal_v)),
                     signal_names=("off_track", "success"))
    signals = spans[0]["signals"]
    assert list(signals) == ["off_track", "success"]
    np.testing.assert_array_equal(signals["off_track"], (camera_ms >= 200) & (camera_ms < 400))  # NaN: False
    np.testing.assert_array_equal(signals["success"], (camera_ms < 200) | (camera_ms >= 400))
    # without signal names the stream is not read; absent signals are all False
    assert align(streams_at(camera_ms, signals=(signal_t, signal_v)))[0][0]["signals"] == {}
    absent = align(streams_at(camera_ms), signal_names=("off_track",))[0][0]["signals"]
    assert list(absent) == ["off_track"] and not absent["off_track"].any()
    with pytest.raises(LogError, match="bad_shape"):  # two values per sample, three names
        align(streams_at(camera_ms, signals=(signal_t, signal_v)),
              signal_names=("off_track", "success", "collision"))


def test_state_is_held_when_next_sample_is_beyond_hold():
    state_t = np.array([0, 100, 200, 1000]) * MS  # hold = 2 * 100 ms; 1000 ms is too far
    state_v = np.array([[0.0], [1.0], [2.0], [3.0]]) * np.ones(8)
    spans, _ = align(streams_at(np.arange(10) * 50, state=(state_t, state_v)))
    np.testing.assert_allclose(spans[0]["states"][:, 0],
                               [0, 0.5, 1, 1.5, 2, 2, 2, 2, 2, np.nan])


def test_one_second_camera_gap_splits_into_two_spans():
    camera_ms = np.concatenate([np.arange(10) * 50, 1450 + np.arange(10) * 50])
    spans, rejected = align(streams_at(camera_ms))
    assert rejected == [] and [s["span_index"] for s in spans] == [0, 1]
    assert [s["split_reason"] for s in spans] == ["camera_gap", "camera_gap"]
    assert [(s["start_ns"], s["end_ns"]) for s in spans] == [(0, 450 * MS), (1450 * MS, 1900 * MS)]
    np.testing.assert_array_equal(spans[1]["frames"][:, 0, 0, 0], np.arange(10, 20))
    np.testing.assert_array_equal(spans[1]["actions"], actions_for(20)[10:])
    # an explicit max_gap_ns above the hole keeps the log whole
    whole, _ = align(streams_at(camera_ms), max_gap_ns=2_000 * MS)
    assert len(whole) == 1 and len(whole[0]["frames"]) == 20 and whole[0]["split_reason"] == ""


def test_stale_action_cuts_the_span_and_rejects_the_gap():
    camera_ms = np.arange(20) * 50
    action_ms = np.delete(camera_ms, [8, 9, 10, 11])  # hold = 100 ms: frames 500, 550 stale
    spans, rejected = align(streams_at(camera_ms, action_ms))
    assert [(s["span_index"], len(s["frames"]), s["split_reason"]) for s in spans] == \
        [(0, 10, "action_gap"), (2, 8, "action_gap")]
    assert rejected == [{"span_index": 1, "start_ns": 500 * MS, "end_ns": 550 * MS,
                         "reason": "action_gap",
                         "detail": "2 steps without an action sample within hold"}]
    assert spans[0]["action_age_ns"][-1] == 100 * MS  # frame 450 holds the 350 ms action


def test_short_span_is_rejected_with_a_reason():
    camera_ms = np.concatenate([np.arange(10) * 50, 2000 + np.arange(2) * 50])
    spans, rejected = align(streams_at(camera_ms), min_length=5)
    assert len(spans) == 1 and spans[0]["span_index"] == 0
    assert rejected == [{"span_index": 1, "start_ns": 2000 * MS, "end_ns": 2050 * MS,
                         "reason": "short_span", "detail": "2 steps < min_length 5"}]


def test_out_of_order_stamps_raise_but_exact_duplicates_are_dropped():
    with pytest.raises(LogError) as info:
        align(streams_at([0, 50, 40, 100, 150]))
    assert info.value.reason == "timestamps_out_of_order" and "1 camera stamps" in info.value.detail
    streams = streams_at([0, 50, 50, 50, 100])
    frames = np.array(streams.frames)
    frames[2] = frames[3] = frames[1]
    streams.frames = frames
    spans, _ = align(streams)
    assert spans[0]["dropped_duplicates"] == 2
    np.testing.assert_array_equal(spans[0]["timestamps_ns"], np.array([0, 50, 100]) * MS)
    np.testing.assert_array_equal(spans[0]["frames"][:, 0, 0, 0], [0, 1, 4])
    with pytest.raises(LogError, match="timestamps_out_of_order"):  # same stamp, new pixels
        align(streams_at([0, 50, 50, 100]))


def test_action_stamped_just_after_the_frame_is_used():
    camera_ms = np.arange(10) * 50
    spans, _ = align(streams_at(camera_ms, camera_ms + 1))
    span = spans[0]
    assert len(span["frames"]) == 10
    np.testing.assert_array_equal(span["actions"][0], actions_for(10)[0])
    assert span["action_age_ns"][0] == -1 * MS
    # later frames hold the earlier, still fresh sample (49 ms old), as the rule says
    np.testing.assert_array_equal(span["actions"][1:], actions_for(10)[:-1])
    # beyond P/2 = 25 ms after the first frame, the sample is not accepted for it
    spans, rejected = align(streams_at(camera_ms, camera_ms + 30))
    assert rejected[0]["reason"] == "action_gap" and rejected[0]["end_ns"] == 0
    assert spans[0]["start_ns"] == 50 * MS


@pytest.mark.parametrize("source, max_side, target", [
    ((96, 72), 64, (64, 48)), ((480, 640), 320, (240, 320)), ((32, 40), 64, (32, 40)), ((96, 72), 0, (96, 72))])
def test_frames_keep_their_resolution_up_to_the_max_side(source, max_side, target):
    rng = np.random.default_rng(0)
    streams = streams_at(np.arange(3) * 50)
    streams.frames = rng.integers(0, 256, (3, *source, 3), dtype=np.uint8)
    span = align(streams, max_side=max_side)[0][0]
    assert span["frames"].shape == (3, *target, 3) and span["frames"].dtype == np.uint8
    assert span["source_shape"] == source
    height, width = target
    expected = np.asarray(Image.fromarray(streams.frames[1]).resize((width, height), Image.Resampling.BOX))
    np.testing.assert_array_equal(span["frames"][1], expected)


def test_any_width_with_names_unless_a_width_is_required():
    streams = streams_at(np.arange(5) * 50)
    joints = np.arange(35, dtype=np.float32).reshape(5, 7)
    streams.signals["action"] = (streams.camera_t, joints)
    streams.signals["state"] = (streams.camera_t, joints[:, :2])
    streams.names = {"action": tuple(f"j{i}" for i in range(7)), "state": ("x", "y")}
    span = align(streams)[0][0]
    np.testing.assert_array_equal(span["actions"], joints)
    np.testing.assert_array_equal(span["states"], joints[:, :2])
    assert span["expert_actions"].shape == (5, 7) and np.isnan(span["expert_actions"]).all()
    assert span["action_names"] == streams.names["action"] and span["state_names"] == ("x", "y")
    del streams.signals["state"]
    assert align(streams)[0][0]["states"].shape == (5, 0)  # no state: 0 wide
    with pytest.raises(LogError, match="bad_shape"):
        align(streams, action_dim=3)


def test_missing_action_and_bad_shapes_raise():
    streams = streams_at(np.arange(5) * 50)
    del streams.signals["action"]
    with pytest.raises(LogError) as info:
        align(streams)
    assert (info.value.reason, info.value.detail) == ("missing_topic", "no action")
    with pytest.raises(LogError, match="bad_shape"):
        align(streams_at(np.arange(5) * 50), action_dim=2)
    bad_state = (np.arange(5, dtype=np.int64) * 50 * MS, np.zeros((5, 6), np.float32))
    with pytest.raises(LogError, match="bad_shape"):
        align(streams_at(np.arange(5) * 50, state=bad_state), state_dim=8)
