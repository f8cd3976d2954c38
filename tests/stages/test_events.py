"""Event mining: each trigger fires at its onset, NaN never fires, merging, clip geometry.

The triggers are the car world's (``CarRacing.detect_events`` with its ``EventThresholds``);
``stages.events`` merges, orders, clips and weighs them.
"""
from __future__ import annotations

import numpy as np
import pytest

from sim import worlds
from sim.worlds.carracing import EventThresholds
from stages.events import NONE, EventConfig, event_clips, mine_events, oversample, sample_weights

CONFIG = EventConfig()
WORLD = worlds.get("carracing")
STEP_NS = 20_000_000  # 50 Hz


def mine(span: dict, config: EventConfig = CONFIG, **params) -> list[dict]:
    """The car world's events of a span; ``params`` override its thresholds."""
    return mine_events(span, world=WORLD, config=config, params=params)


def quiet_span(steps: int = 120, step_ns: int = STEP_NS) -> dict:
    """A span where nothing happens: gentle gas, constant speed, zero reward, no flags."""
    actions = np.zeros((steps, 3), np.float32)
    actions[:, 1] = 0.3
    states = np.zeros((steps, 8), np.float32)
    states[:, 5] = 20.0
    return {"timestamps_ns": np.arange(steps, dtype=np.int64) * step_ns, "actions": actions,
            "states": states, "rewards": np.zeros(steps, np.float32),
            "interventions": np.zeros(steps, bool), "signals": {"off_track": np.zeros(steps, bool)}}


def kinds_and_steps(span: dict, config: EventConfig = CONFIG, **params) -> list[tuple[str, int, int]]:
    return [(e["event"], e["step"], e["end_step"]) for e in mine(span, config, **params)]


def test_quiet_span_has_no_events():
    assert mine(quiet_span()) == []
    no_signals = quiet_span()
    del no_signals["signals"]  # absent signals are all False
    assert mine(no_signals) == []


@pytest.mark.parametrize("flag", ["interventions", "off_track"])
def test_flags_fire_at_their_rising_edge_with_their_length_as_score(flag):
    span = quiet_span()
    values = span[flag] if flag == "interventions" else span["signals"][flag]
    values[30:40] = True
    values[0:3] = True  # true at step 0: onset 0
    events = mine(span)
    kind = "intervention" if flag == "interventions" else "off_track"
    assert [(e["event"], e["step"], e["end_step"], e["score"]) for e in events] == [
        (kind, 0, 2, 3.0), (kind, 30, 39, 10.0)]


def test_hard_brake_by_command_is_inclusive_at_the_threshold():
    span = quiet_span()
    span["actions"][50, 2] = 0.8
    span["actions"][51:53, 2] = 0.96
    span["actions"][90, 2] = 0.79
    [event] = mine(span)
    assert (event["event"], event["step"], event["end_step"]) == ("hard_brake", 50, 52)
    assert event["score"] == pytest.approx(0.96 / 0.8)


def test_hard_brake_by_deceleration_uses_real_time():
    span = quiet_span()
    span["states"][60:, 5] = 19.5  # -0.5 m/s in 20 ms = 25 m/s^2
    assert kinds_and_steps(span) == [("hard_brake", 60, 60)]
    assert mine(span)[0]["score"] == pytest.approx(25 / 15)
    span["timestamps_ns"][60:] += 80_000_000  # the same drop over 100 ms: 5 m/s^2
    assert mine(span) == []


def test_hard_steer_by_angle_and_by_rate():
    span = quiet_span()
    span["actions"][20, 0] = -0.95
    span["actions"][70:, 0] = 0.2  # +0.2 in 20 ms = 10 /s, then steady
    assert kinds_and_steps(span) == [("hard_steer", 20, 21), ("hard_steer", 70, 70)]
    # step 21 fires too: back from -0.95 to 0 in 20 ms is 47.5 /s
    slow = quiet_span(step_ns=50_000_000)
    slow["actions"][70:, 0] = 0.2  # 4 /s
    assert mine(slow) == []


def test_low_reward_fires_when_the_trailing_mean_crosses():
    span = quiet_span()
    span["rewards"][40:65] = -0.1  # trailing means: 13 such steps of 25 give -0.052 < -0.05
    [event] = mine(span)
    assert (event["event"], event["step"], event["end_step"]) == ("low_reward", 52, 76)
    assert event["score"] == pytest.approx(0.05)  # worst window: all 25 steps at -0.1
    mild = quiet_span()
    mild["rewards"][40:52] = -0.1  # 12 steps: best trailing mean -0.048, not below -0.05
    assert mine(mild) == []
    exact = quiet_span()
    exact["rewards"][:] = -0.25  # every mean is exactly -0.25: not strictly below -0.25
    assert mine(exact, low_reward=-0.25) == []
    exact["rewards"][60] = -0.5
    assert kinds_and_steps(exact, low_reward=-0.25) == [("low_reward", 60, 84)]
    early = quiet_span()
    early["rewards"][:20] = -1.0  # first full window ends at 24; at t the mean is -(44 - t) / 25
    assert kinds_and_steps(early) == [("low_reward", 24, 42)]


def test_nan_never_triggers():
    span = quiet_span()
    span["states"][:] = np.nan
    span["rewards"][:] = np.nan
    span["actions"][10:20] = np.nan
    assert mine(span) == []
    flags = quiet_span()
    flags["interventions"] = np.full(120, np.nan)  # flags given as numbers
    flags["signals"]["off_track"] = np.full(120, np.nan)
    assert mine(flags) == []


def test_onsets_within_merge_gap_of_an_event_onset_join_it():
    span = quiet_span()
    for step in (10, 20, 30, 40, 57):  # 20 joins 10; 30 is 20 after 10: new event; 40 joins 30
        span["actions"][step, 2] = 1.0
    assert kinds_and_steps(span) == [("hard_brake", 10, 20), ("hard_brake", 30, 40),
                                     ("hard_brake", 57, 57)]
    assert kinds_and_steps(span, EventConfig(merge_gap=0)) == [
        ("hard_brake", s, s) for s in (10, 20, 30, 40, 57)]


def test_events_are_sorted_by_step_then_priority():
    span = quiet_span()
    span["actions"][30, 2] = 1.0
    span["signals"]["off_track"][30:33] = True
    span["interventions"][31] = True
    assert [e["event"] for e in mine(span)] == [
        "off_track", "hard_brake", "intervention"]
    span["interventions"][30] = True  # the same step: the spec's order decides
    assert [e["event"] for e in mine(span)] == [
        "intervention", "off_track", "hard_brake"]
    assert [e.name for e in WORLD.spec.events] == [
        "intervention", "off_track", "hard_brake", "hard_steer", "low_reward"]


def test_thresholds_are_the_worlds_and_params_override_them():
    assert EventThresholds() == EventThresholds(hard_brake=0.8, decel_mps2=15.0, hard_steer=0.9, steer_rate=8.0,
                                                low_reward_window=25, low_reward=-0.05)
    span = quiet_span()
    span["actions"][50, 2] = 0.6
    assert mine(span) == []
    assert kinds_and_steps(span, hard_brake=0.5) == [("hard_brake", 50, 50)]
    span["actions"][60, 0] = 0.7
    assert kinds_and_steps(span, hard_steer=0.7) == [("hard_steer", 60, 61)]  # back to 0: 35 /s


def test_events_outside_the_spec_are_an_error():
    class Rogue:
        spec = WORLD.spec

        @staticmethod
        def detect_events(span, *, params):
            return [{"event": "explosion", "step": 3, "end_step": 3, "score": 1.0}]

    with pytest.raises(ValueError, match="explosion"):
        mine_events(quiet_span(), world=Rogue(), config=CONFIG)


def test_event_clips_are_placed_and_shifted_as_specified():
    events = [{"event": "hard_brake", "step": 40, "score": 2.0},
              {"event": "off_track", "step": 5, "score": 3.0},
              {"event": "intervention", "step": 95, "score": 1.0}]
    clips = [c for c in event_clips(100, events, config=CONFIG) if c["event"] != "none"]
    assert [(c["event"], c["event_step"], c["start_step"], c["end_step"]) for c in clips] == [
        ("off_track", 5, 0, 32), ("hard_brake", 40, 24, 56), ("intervention", 95, 68, 100)]
    assert [c["score"] for c in clips] == [3.0, 2.0, 1.0]
    [short] = [c for c in event_clips(20, events[1:2], config=CONFIG) if c["event"] != "none"]
    assert (short["start_step"], short["end_step"]) == (0, 20)


@pytest.mark.parametrize("span_len, tiles", [
    (96, [(0, 32), (32, 64), (64, 96)]),
    (80, [(0, 32), (32, 64), (64, 80)]),          # remainder 16 >= 16: kept partial
    (100, [(0, 32), (32, 64), (64, 96), (68, 100)]),  # remainder 4: a full window at the end
    (20, [(0, 20)]),
    (10, []),                                     # shorter than clip_len // 2
])
def test_routine_tiles(span_len, tiles):
    clips = event_clips(span_len, [], config=CONFIG)
    assert [(c["start_step"], c["end_step"]) for c in clips] == tiles
    assert all(c["event"] == "none" and c["event_step"] == -1 for c in clips)


@pytest.mark.parametrize("span_len", [16, 31, 33, 47, 48, 64, 250])
def test_clips_cover_the_span_and_are_ordered(span_len):
    events = [{"event": "hard_steer", "step": s, "score": 1.0} for s in range(0, span_len, 13)]
    clips = event_clips(span_len, events, config=CONFIG)
    covered = np.zeros(span_len, bool)
    for clip in clips:
        assert 0 <= clip["start_step"] < clip["end_step"] <= span_len
        assert clip["end_step"] - clip["start_step"] == min(CONFIG.clip_len, span_len) \
            or clip["event"] == "none"
        covered[clip["start_step"]:clip["end_step"]] = True
    assert covered.all()
    keys = [(c["start_step"], c["event"], c["event_step"]) for c in clips]
    assert keys == sorted(keys)


def test_mined_events_feed_clips_and_weights():
    span = quiet_span()
    span["interventions"][50:60] = True
    clips = event_clips(120, mine(span), config=CONFIG)
    assert [(c["event"], c["start_step"]) for c in clips if c["event"] != "none"] == [
        ("intervention", 34)]
    weights = sample_weights([c["event"] for c in clips], weights=oversample(WORLD.spec))
    assert sorted(weights.tolist()) == [1.0] * (len(clips) - 1) + [4.0]
    assert sample_weights(["none", "hard_brake", "low_reward", "off_track", "novelty"],
                          weights=oversample(WORLD.spec)).tolist() == [1.0, 2.0, 2.0, 4.0, 2.0]
    assert oversample(WORLD.spec) == {"intervention": 4.0, "off_track": 4.0, "hard_brake": 2.0,
                                      "hard_steer": 2.0, "low_reward": 2.0, "novelty": 2.0, NONE: 1.0}
    assert sample_weights(["none", "hard_brake", "new"], weights={"hard_brake": 8.0}).tolist() \
        == [1.0, 8.0, 1.0]


def test_config_is_validated():
    with pytest.raises(ValueError, match="clip_len"):
        EventConfig(clip_len=0)
    with pytest.raises(ValueError, match="pre"):
        EventConfig(pre=-1)
    with pytest.raises(ValueError, match="merge_gap"):
        EventConfig(merge_gap=-1)


def test_config_split_separates_geometry_from_thresholds():
    config, params = EventConfig.split({"clip_len": 16, "merge_gap": 4, "hard_brake": 0.5})
    assert config == EventConfig(clip_len=16, pre=16, merge_gap=4)
    assert params == {"hard_brake": 0.5, "merge_gap": 4}
    assert EventConfig.split({}) == (EventConfig(), {"merge_gap": 16})
