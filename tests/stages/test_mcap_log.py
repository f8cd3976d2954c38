"""MCAP episode logs as the fleet writes them: round trip through the reader and alignment,
and every way a log can be unreadable. Also the shared test episodes (``make_episode``)."""
from __future__ import annotations

import io
import time
from types import SimpleNamespace

import numpy as np
import pytest
from mcap_ros2.writer import Writer

from sim import worlds
from sim.worlds.base import ActionSpec, TaskSpec, WorldSpec
from stages import storage
from stages.align import align
from stages.formats.mcap import read_bytes
from stages.mcap_log import (ACTION, BOOL_MSG, CAMERA, EXPERT, FLOAT32_MULTI_ARRAY_MSG, IMAGE_MSG, INTERVENTION,
                             JOINT_STATES, REWARD, SIGNALS, STATE, TASK, episode_to_mcap_bytes, write_episode)
from stages.streams import LogError, Mapping

STEP_NS = 20_000_000
SPEC = worlds.spec("carracing")


def make_episode(length: int = 40, *, size: int = 64, seed: int = 0) -> dict:
    """A synthetic car episode in the contract of ``sim.worlds.base`` (no simulator)."""
    rng = np.random.default_rng(seed)
    expert = np.column_stack([rng.uniform(-1, 1, length), rng.uniform(0, 1, (length, 2))])
    actions = np.clip(expert + rng.normal(0, 0.05, expert.shape), [-1, 0, 0], [1, 1, 1])
    return {
        "world": "carracing", "seed": seed, "task": "drive", "instruction": SPEC.instruction("drive"),
        "driver": "expert", "policy_version": "",
        "frames": rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8),
        "actions": actions.astype(np.float32), "expert_actions": expert.astype(np.float32),
        "states": rng.normal(size=(length, 8)).astype(np.float32),
        "rewards": rng.normal(size=length).astype(np.float32),
        "interventions": rng.random(length) < 0.2, "signals": {"off_track": rng.random(length) < 0.2},
        "timestamps_ns": np.arange(length, dtype=np.int64) * STEP_NS,
    }


def assert_same_episode(a: dict, b: dict) -> None:
    for key in ("world", "seed", "driver", "policy_version"):
        assert a[key] == b[key], key
    assert b["task"] == SPEC.instruction(a["task"])  # the /task topic carries the instruction
    for key in ("frames", "actions", "expert_actions", "states", "rewards", "interventions",
                "timestamps_ns"):
        assert b[key].dtype == np.asarray(a[key]).dtype, key
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    assert set(b["signals"]) == set(a["signals"]) == set(SPEC.signals)
    for name in SPEC.signals:
        assert b["signals"][name].dtype == np.asarray(a["signals"][name]).dtype, name
        np.testing.assert_array_equal(b["signals"][name], a["signals"][name], err_msg=name)


def custom_log(*, n: int = 5, encoding: str = "rgb8", topics: tuple = (CAMERA, ACTION),
               action_stamps: list[int] | None = None, state_stamps: list[int] | None = None,
               side: int = 4, odd_last_frame: bool = False) -> bytes:
    """A hand-written MCAP with only the chosen topics, for the unhappy paths."""
    buf = io.BytesIO()
    w = Writer(buf)
    image = w.register_msgdef("sensor_msgs/msg/Image", IMAGE_MSG)
    array = w.register_msgdef("std_msgs/msg/Float32MultiArray", FLOAT32_MULTI_ARRAY_MSG)
    w.register_msgdef("std_msgs/msg/Bool", BOOL_MSG)
    for i in range(n):
        t = i * STEP_NS
        s = side + 1 if odd_last_frame and i == n - 1 else side
        if CAMERA in topics:
            w.write_message(CAMERA, image, {
                "header": {"stamp": {"sec": 0, "nanosec": t}}, "height": s, "width": s,
                "encoding": encoding, "step": 3 * s, "data": bytes([i] * (3 * s * s))}, log_time=t)
    if ACTION in topics:
        for i, t in enumerate(action_stamps if action_stamps is not None else
                              [i * STEP_NS for i in range(n)]):
            w.write_message(ACTION, array, {"data": [0.1 * i, 0.5, 0.0]}, log_time=t)
    for t in state_stamps or []:
        w.write_message(STATE, array, {"data": [float(t)] * 8}, log_time=t)
    w.finish()
    return buf.getvalue()


def read_episode(data: bytes, *, source_uri: str, signal_names: tuple[str, ...] = SPEC.signals) -> dict:
    """Decode and align a log into one episode dict (its single span)."""
    (streams,) = read_bytes(data, source_uri=source_uri, mapping=Mapping())
    spans, rejected = align(streams, action_dim=len(SPEC.actions),
                            state_dim=len(SPEC.state_names), signal_names=signal_names)
    assert len(spans) == 1 and not rejected, rejected
    return spans[0]


def test_round_trip_is_exact(tmp_path):
    episode = make_episode(40)
    episode["expert_actions"][[3, 7]] = np.nan  # steps without an expert label read back as NaN
    uri = write_episode(episode, str(tmp_path / "logs" / "ep.mcap"))
    back = read_episode(storage.read_bytes(uri), source_uri=uri)
    assert_same_episode(episode, back)
    assert back["format"] == "mcap-ros2"
    assert back["topics"] == {"topic.camera": CAMERA, "topic.action": ACTION, "topic.expert_action": EXPERT,
                              "topic.state": STATE, "topic.reward": REWARD, "topic.intervention": INTERVENTION,
                              "topic.signals": SIGNALS, "topic.task": TASK}
    (streams,) = read_bytes(storage.read_bytes(uri), source_uri=uri, mapping=Mapping())
    assert {k: streams.meta[k] for k in ("world", "seed", "task", "driver", "policy_version")} == {
        "world": "carracing", "seed": "0", "task": "drive", "driver": "expert", "policy_version": ""}


def test_episode_needs_a_registered_world_and_its_widths():
    episode = make_episode(5)
    with pytest.raises(ValueError, match="unknown world"):
        episode_to_mcap_bytes({**episode, "world": "CarRacing-v3"})
    with pytest.raises(ValueError, match="states"):
        episode_to_mcap_bytes({**episode, "states": episode["states"][:, :6]})
    with pytest.raises(ValueError, match="signals"):
        episode_to_mcap_bytes({**episode, "signals": {"off_track": episode["signals"]["off_track"][:4]}})
    with pytest.raises(ValueError, match="no task"):
        episode_to_mcap_bytes({**episode, "task": "fly"})


def test_absent_signals_and_task_default():
    episode = make_episode(6)
    del episode["signals"], episode["task"]
    back = read_episode(episode_to_mcap_bytes(episode), source_uri="mem")
    assert not back["signals"]["off_track"].any()  # an episode without signals logs them all False
    assert back["task"] == SPEC.instruction(SPEC.task_names[0])  # the world's first task


ARM = WorldSpec(
    name="test-arm", description="a two-joint arm (test only)", camera="corner", image_size=16,
    state_names=("shoulder", "elbow", "goal_x"), policy_state=("shoulder", "elbow"),
    actions=(ActionSpec("dx", -1.0, 1.0), ActionSpec("dy", -1.0, 1.0)),
    tasks=(TaskSpec("reach", "Reach the goal."), TaskSpec("push", "Push the puck to the goal.")),
    rate_hz=12.5, warmup_steps=0, max_steps=100, score="success", signals=("success", "grasped"), success_signal="success",
    events=(), tags={}, mirror={}, eval_seeds=(1, 2), state_message="sensor_msgs/msg/JointState")


def test_joint_state_world_round_trip(monkeypatch):
    monkeypatch.setitem(worlds._REGISTRY, ARM.name, SimpleNamespace(spec=ARM))  # a spec is all logging reads
    rng = np.random.default_rng(5)
    n = 9
    episode = {"world": ARM.name, "seed": 3, "task": "push", "driver": "expert", "policy_version": "v1",
               "frames": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
               "actions": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
               "expert_actions": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
               "states": rng.normal(size=(n, 3)).astype(np.float32),
               "rewards": rng.normal(size=n).astype(np.float32), "interventions": np.zeros(n, bool),
               "signals": {"success": np.arange(n) >= 6, "grasped": np.arange(n) % 2 == 1},
               "timestamps_ns": np.arange(n, dtype=np.int64) * ARM.step_ns}
    data = episode_to_mcap_bytes(episode)
    (streams,) = read_bytes(data, source_uri="mem", mapping=Mapping())
    assert streams.meta["topic.state"] == JOINT_STATES and STATE not in streams.meta.values()
    assert (streams.meta["world"], streams.meta["task"]) == ("test-arm", "push")
    assert streams.task == "Push the puck to the goal."
    assert streams.names == {"action": ("dx", "dy"), "expert_action": ("dx", "dy"),  # from the log
                             "state": tuple(ARM.state_names), "signals": ARM.signals}
    [back], _ = align(streams, action_dim=2, state_dim=3, signal_names=ARM.signals)
    for key in ("frames", "actions", "expert_actions", "states", "rewards", "timestamps_ns"):
        np.testing.assert_array_equal(back[key], episode[key], err_msg=key)
    for name in ARM.signals:
        np.testing.assert_array_equal(back["signals"][name], episode["signals"][name], err_msg=name)


def test_thousand_frames_write_and_read_fast():
    episode = make_episode(1000)
    start = time.perf_counter()
    back = read_episode(episode_to_mcap_bytes(episode), source_uri="mem")
    assert time.perf_counter() - start < 5.0  # ~0.1 s measured on 2 loaded cores
    np.testing.assert_array_equal(back["frames"], episode["frames"])


def test_missing_expert_topic_reads_as_nan():
    episode = make_episode(10)
    episode["expert_actions"][:] = np.nan
    back = read_episode(episode_to_mcap_bytes(episode), source_uri="mem")
    assert np.isnan(back["expert_actions"]).all()
    np.testing.assert_array_equal(back["actions"], episode["actions"])


@pytest.mark.parametrize("mutate, reason", [
    (lambda b: b"", "empty"),
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b"PK\x03\x04 not an mcap" * 4, "not_mcap"),
    (lambda b: b[:2000] + b"\xff" * 64 + b[2064:], "corrupt"),
])
def test_unreadable_bytes_raise_log_error(mutate, reason):
    data = episode_to_mcap_bytes(make_episode(20))
    with pytest.raises(LogError) as err:
        read_episode(mutate(data), source_uri="bad.mcap")
    assert err.value.reason == reason


@pytest.mark.parametrize("kwargs, reason", [
    ({"topics": (ACTION,)}, "missing_topic"),
    ({"topics": (CAMERA,)}, "missing_topic"),
    ({"encoding": "16UC1"}, "bad_encoding"),
    ({"odd_last_frame": True}, "bad_message"),
])
def test_bad_logs_raise_log_error(kwargs, reason):
    with pytest.raises(LogError) as err:
        read_episode(custom_log(**kwargs), source_uri="x.mcap")
    assert err.value.reason == reason


def test_optional_topics_fill_and_metadata_defaults():
    data = custom_log(state_stamps=[0, 2 * STEP_NS])  # state only near frames 0..2 (hold 2 periods)
    episode = read_episode(data, source_uri="x.mcap")
    np.testing.assert_allclose(episode["actions"][:, 0], [0.0, 0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    assert episode["states"][0, 0] == 0 and episode["states"][2, 0] == 2 * STEP_NS
    assert episode["states"][1, 0] == STEP_NS  # interpolated between the two samples
    assert np.isnan(episode["rewards"]).all() and not episode["interventions"].any()
    assert not episode["signals"]["off_track"].any() and episode["task"] == ""  # no /signals, no /task
    assert episode["world"] == "unknown" and episode["seed"] == -1  # no metadata record


def test_bgr8_is_converted_to_rgb():
    episode = read_episode(custom_log(encoding="bgr8"), source_uri="x.mcap")
    assert episode["frames"].shape == (5, 4, 4, 3)
    raw = custom_log(encoding="rgb8")
    np.testing.assert_array_equal(episode["frames"], read_episode(raw, source_uri="y")["frames"][..., ::-1])


def test_round_trip_through_s3(s3_server):
    _, options = s3_server
    episode = make_episode(12, seed=3)
    uri = write_episode(episode, "s3://lake/landing/mcap-test/ep-0.mcap", options)
    listed = storage.list_objects("s3://lake/landing/mcap-test/", storage_options=options)
    assert [o["uri"] for o in listed] == [uri]
    assert_same_episode(episode, read_episode(storage.read_bytes(uri, options), source_uri=uri))
