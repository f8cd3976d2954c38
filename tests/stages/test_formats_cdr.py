"""The CDR fast paths (``stages.formats.cdr``) against the generic ROS 2 decoder: the same
stamps and values, message by message and a channel at once."""
from __future__ import annotations

import numpy as np
import pytest
from mcap.records import Schema
from mcap_ros2.decoder import DecoderFactory

from stages.formats.cdr import CDR_SIGNALS, cdr_batch, cdr_parser
from stages.formats.ros_messages import image_to_rgb, signal_values, stamp_ns
from stages.streams import LogError
from tests.stages import ros_logs
from tests.stages.ros_logs import ROS2_TYPES

T0 = 1_700_000_000_000_000_000
STEP = 50_000_000
T2 = ROS2_TYPES.types


def generic(schema_name: str, data: bytes):
    schema = Schema(id=1, name=schema_name, encoding="ros2msg",
                    data=ROS2_TYPES.generate_msgdef(schema_name, ros_version=2)[0].encode())
    return DecoderFactory().decoder_for("cdr", schema)(data)


@pytest.mark.parametrize("frame_id", ["", "c", "cam", "came", "camera_front"])
@pytest.mark.parametrize("encoding", ["rgb8", "bgra8", "mono8"])
def test_cdr_image_fast_path_matches_the_generic_decoder(frame_id, encoding):
    frame = np.random.default_rng(len(frame_id)).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    data, step = ros_logs.raw_pixels(frame, encoding, row_padding=len(frame_id))
    for t in (T0 + 123, 0):
        sec, nanosec = divmod(t, 1_000_000_000)
        msg = T2["sensor_msgs/msg/Image"](
            header=T2["std_msgs/msg/Header"](stamp=T2["builtin_interfaces/msg/Time"](
                sec=sec, nanosec=nanosec), frame_id=frame_id),
            height=3, width=5, encoding=encoding, is_bigendian=0, step=step,
            data=np.frombuffer(data, np.uint8))
        raw = bytes(ROS2_TYPES.serialize_cdr(msg, "sensor_msgs/msg/Image"))
        decoded = generic("sensor_msgs/msg/Image", raw)
        stamp, rgb = cdr_parser("camera", "sensor_msgs/msg/Image")(raw, 77)
        assert stamp == stamp_ns(decoded, 77) == (t or 77)
        np.testing.assert_array_equal(rgb, image_to_rgb(decoded))
        with pytest.raises(LogError, match="bad_message"):
            cdr_parser("camera", "sensor_msgs/msg/Image")(raw[:-1], 77)


def cdr_image(t: int, frame: np.ndarray, *, frame_id: str = "cam", encoding: str = "rgb8") -> bytes:
    data, step = ros_logs.raw_pixels(frame, encoding, row_padding=2)
    sec, nanosec = divmod(t, 1_000_000_000)
    return bytes(ROS2_TYPES.serialize_cdr(T2["sensor_msgs/msg/Image"](
        header=T2["std_msgs/msg/Header"](stamp=T2["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                                         frame_id=frame_id),
        height=frame.shape[0], width=frame.shape[1], encoding=encoding, is_bigendian=0, step=step,
        data=np.frombuffer(data, np.uint8)), "sensor_msgs/msg/Image"))


@pytest.mark.parametrize("encoding", ["rgb8", "bgra8", "mono8"])
def test_a_channel_of_cdr_images_parses_at_once_as_message_by_message(encoding):
    frames = np.random.default_rng(1).integers(0, 256, (6, 3, 5, 3), dtype=np.uint8)
    if encoding == "mono8":
        frames[..., 1] = frames[..., 2] = frames[..., 0]
    stamps = [T0 + i * STEP for i in range(6)]
    stamps[2] = 0  # no stamp: the log time stands in
    raws = [cdr_image(t, f, encoding=encoding) for t, f in zip(stamps, frames)]
    parse, log_times = cdr_parser("camera", "sensor_msgs/msg/Image"), [500 + i for i in range(6)]
    at_once = cdr_batch(parse, [memoryview(r) for r in raws], log_times)
    one_by_one = [parse(r, t) for r, t in zip(raws, log_times)]
    assert at_once[0].tolist() == [t for t, _ in one_by_one] and at_once[0][2] == 502
    np.testing.assert_array_equal(at_once[1], np.stack([rgb for _, rgb in one_by_one]))
    # messages that differ in more than stamp and pixels are left to the message-by-message path
    other_id = raws[:3] + [cdr_image(stamps[3], frames[3], frame_id="mac", encoding=encoding)]
    assert cdr_batch(parse, other_id, log_times[:4]) is None
    assert cdr_batch(parse, raws[:2] + [cdr_image(1, frames[0][:2], encoding=encoding)], log_times[:3]) is None
    assert cdr_batch(parse, [r[:1] + b"\x00" + r[2:] for r in raws], log_times) is None  # big-endian
    with pytest.raises(LogError, match="bad_message"):
        cdr_batch(parse, [r[:20] for r in raws], log_times)


def joint_state(stamp: int, names: list[str], position: np.ndarray):
    sec, nanosec = divmod(stamp, 1_000_000_000)
    header = T2["std_msgs/msg/Header"](stamp=T2["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id="b")
    return T2["sensor_msgs/msg/JointState"](header=header, name=names, position=np.asarray(position, np.float64),
                                            velocity=np.zeros(len(position)), effort=np.zeros(0))


@pytest.mark.parametrize("name", sorted(CDR_SIGNALS))
def test_a_channel_of_cdr_signals_parses_at_once_as_message_by_message(name):
    rng = np.random.default_rng(2)
    if "JointState" in name:  # stamped by its header, a stamp of 0 by the log time
        msgs = [joint_state(T0 + i * STEP if i != 1 else 0, ["shoulder", "elbow_a"], rng.normal(size=2))
                for i in range(5)]
        raws = [bytes(ROS2_TYPES.serialize_cdr(m, name)) for m in msgs]
        parse = cdr_parser("state", name)
        stamps, values = cdr_batch(parse, raws, list(range(5)))
        assert stamps.tolist() == [T0, 1, T0 + 2 * STEP, T0 + 3 * STEP, T0 + 4 * STEP]
        np.testing.assert_array_equal(values, np.stack([m.position for m in msgs]).astype(np.float32))
        np.testing.assert_array_equal(values, np.stack([parse(r, 1)[1] for r in raws]))
        renamed = bytes(ROS2_TYPES.serialize_cdr(joint_state(T0, ["shoulder", "elbow_b"], [0.0, 1.0]), name))
        assert cdr_batch(parse, raws + [renamed], list(range(6))) is None  # other names: one by one
        return
    if "MultiArray" in name:
        dtype = np.float64 if "64" in name else np.float32
        layout = T2["std_msgs/msg/MultiArrayLayout"](
            dim=[T2["std_msgs/msg/MultiArrayDimension"](label="steer,gas", size=2, stride=2)], data_offset=0)
        msgs = [T2[name](layout=layout, data=rng.normal(size=2).astype(dtype)) for _ in range(5)]
        longer = T2[name](layout=layout, data=rng.normal(size=3).astype(dtype))
    else:
        msgs = [T2[name](data=bool(i % 2) if "Bool" in name else float(rng.normal())) for i in range(5)]
        longer = None
    raws = [bytes(ROS2_TYPES.serialize_cdr(m, name)) for m in msgs]
    parse = cdr_parser("action", name)
    stamps, values = cdr_batch(parse, raws, list(range(5)))
    assert stamps.tolist() == list(range(5)) and values.dtype == np.float32
    np.testing.assert_array_equal(values, np.stack([parse(r, 0)[1] for r in raws]))
    if longer is not None:  # a message of another width: not one layout
        assert cdr_batch(parse, raws + [bytes(ROS2_TYPES.serialize_cdr(longer, name))], list(range(6))) is None


@pytest.mark.parametrize("name", sorted(CDR_SIGNALS))
def test_cdr_signal_fast_paths_match_the_generic_decoder(name):
    for labels in ([], ["steer"], ["steer,gas,brake"], ["ab", "c"]):
        if "JointState" in name:
            msg = joint_state(T0 + 7, labels, np.arange(len(labels)) * 0.3 - 1)
            raw = bytes(ROS2_TYPES.serialize_cdr(msg, name))
            stamp, values = cdr_parser("state", name)(raw, 42)
            assert stamp == stamp_ns(generic(name, raw), 42) == T0 + 7
            np.testing.assert_array_equal(values, signal_values(generic(name, raw)))
            continue
        if "MultiArray" in name:
            dims = [T2["std_msgs/msg/MultiArrayDimension"](label=label, size=3, stride=3)
                    for label in labels]
            dtype = np.float64 if "64" in name else np.float32
            msg = T2[name](layout=T2["std_msgs/msg/MultiArrayLayout"](dim=dims, data_offset=0),
                           data=np.array([0.1, -2.5, 3e7][:len(labels) + 1], dtype))
        else:
            msg = T2[name](data=True if "Bool" in name else 0.1 * len(labels))
        raw = bytes(ROS2_TYPES.serialize_cdr(msg, name))
        stamp, values = cdr_parser("action", name)(raw, 42)
        assert stamp == 42 and values.dtype == np.float32
        np.testing.assert_array_equal(values, signal_values(generic(name, raw)))
    assert cdr_parser("camera", name) is None and cdr_parser("task", name) is None
