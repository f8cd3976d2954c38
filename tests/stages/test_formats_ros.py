"""MCAP (ROS 2, Foxglove protobuf) and ROS bag (rosbag1, rosbag2 sqlite3/MCAP) readers."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from foxglove_schemas_protobuf.JointState_pb2 import JointState as PbJointState
from foxglove_schemas_protobuf.Vector3_pb2 import Vector3 as PbVector3
from mcap.records import MessageIndex
from PIL import Image
from rosbags.rosbag2 import Writer as Rosbag2Writer

from sim import worlds
from stages.formats import mcap, rosbag
from stages.formats.collect import Collector, Topics, pick_topics
from stages.formats.ros_messages import compressed_to_rgb, image_to_rgb, signal_names, signal_values, stamp_ns
from stages.mcap_log import episode_to_mcap_bytes
from stages.streams import LogError, Mapping
from tests.stages import ros_logs
from tests.stages.foreign_logs import ODOMETRY, TWIST
from tests.stages.ros_logs import ROS1_TYPES, ROS2_TYPES, Entry, ros_message

T0 = 1_700_000_000_000_000_000
STEP = 50_000_000
T2 = ROS2_TYPES.types


def episode(length: int = 12, size: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    expert = rng.uniform(-1, 1, (length, 3)).astype(np.float32)
    expert[length // 2] = np.nan
    return {"world": "carracing", "seed": seed, "task": "drive", "driver": "human", "policy_version": "p7",
            "frames": rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8),
            "actions": rng.uniform(-1, 1, (length, 3)).astype(np.float32),
            "expert_actions": expert, "states": rng.normal(size=(length, 8)).astype(np.float32),
            "rewards": rng.normal(size=length).astype(np.float32),
            "interventions": rng.random(length) < 0.5, "signals": {"off_track": rng.random(length) < 0.5},
            "timestamps_ns": T0 + np.arange(length, dtype=np.int64) * STEP}


def fetch(uri: str) -> bytes:
    return Path(uri).read_bytes()


def unit(path: Path, fmt: str) -> dict:
    paths = sorted(path.iterdir()) if path.is_dir() else [path]
    return {"uri": str(path), "format": fmt,
            "files": [{"uri": str(p), "rel": p.name, "size": p.stat().st_size, "etag": "e"}
                      for p in paths]}


# (writer, unit format, writer options, expected meta format)
FORMATS = {
    "mcap-ros2": (ros_logs.write_mcap_ros2, "mcap", {}, "mcap-ros2"),
    "mcap-ros2-png": (ros_logs.write_mcap_ros2, "mcap", {"compressed": True}, "mcap-ros2"),
    "mcap-protobuf": (ros_logs.write_mcap_protobuf, "mcap", {}, "mcap-protobuf"),
    "mcap-protobuf-png": (ros_logs.write_mcap_protobuf, "mcap", {"compressed": True},
                          "mcap-protobuf"),
    "rosbag2-sqlite3": (ros_logs.write_rosbag2, "rosbag2", {}, "rosbag2-sqlite3"),
    "rosbag2-mcap": (ros_logs.write_rosbag2, "rosbag2", {"storage": "mcap"}, "rosbag2-mcap"),
    "rosbag1": (ros_logs.write_rosbag1, "rosbag1", {}, "rosbag1"),
}


def write_and_read(tmp_path: Path, name: str, ep: dict, mapping: Mapping = Mapping(),
                   **options):
    write, fmt, fixed, _ = FORMATS[name]
    path = tmp_path / (name + {"mcap": ".mcap", "rosbag1": ".bag", "rosbag2": ""}[fmt])
    write(ep, path, **fixed, **options)
    reader = rosbag if fmt.startswith("rosbag") else mcap
    return reader.read(unit(path, fmt), mapping=mapping, fetch=fetch)


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_reads_back_what_was_written(tmp_path, name):
    ep = episode()
    (s,) = write_and_read(tmp_path, name, ep, action_every=3, action_offset_ns=7_000_000,
                          camera_delay_ns=1_000_000, task="lap the track")
    t = ep["timestamps_ns"]
    np.testing.assert_array_equal(s.frames, ep["frames"])
    np.testing.assert_array_equal(s.camera_t, t)  # header stamps, not the delayed log times
    action_t, action = s.signals["action"]
    np.testing.assert_array_equal(action_t, t[::3] + 7_000_000)
    np.testing.assert_array_equal(action, ep["actions"][::3])
    has_expert = ~np.isnan(ep["expert_actions"]).all(axis=1)
    np.testing.assert_array_equal(s.signals["expert_action"][0], t[has_expert])
    np.testing.assert_array_equal(s.signals["expert_action"][1], ep["expert_actions"][has_expert])
    signals = np.stack([ep["signals"][k] for k in ros_logs.SIGNAL_FIELDS], axis=1)  # one column per name
    for role, want in (("state", ep["states"]), ("reward", ep["rewards"]),
                       ("intervention", ep["interventions"]), ("signals", signals)):
        stamps, values = s.signals[role]
        assert values.dtype == np.float32, role
        np.testing.assert_array_equal(stamps, t, err_msg=role)
        np.testing.assert_array_equal(values, np.asarray(want, np.float32), err_msg=role)
    assert s.signals["reward"][1].shape == (12,) and s.signals["state"][1].shape == (12, 8)
    assert s.signals["signals"][1].shape == (12, 1)
    assert s.task == "lap the track"
    assert s.meta["format"] == FORMATS[name][3]
    camera = "/camera/image_raw/compressed" if "png" in name else "/camera/image_raw"
    assert s.meta["topic.camera"] == camera and s.meta["topic.action"] == "/action"
    assert (s.meta["topic.state"], s.meta["topic.signals"], s.meta["topic.task"]) == ("/state", "/signals", "/task")
    if name != "rosbag1":  # a rosbag1 has nowhere to keep the episode metadata
        assert {k: s.meta[k] for k in ("world", "seed", "task", "driver", "policy_version")} == {
            "world": "carracing", "seed": "0", "task": "drive", "driver": "human", "policy_version": "p7"}


def test_reads_the_fleet_mcap_writer_and_mcaps_without_summary(tmp_path):
    ep = episode(8)
    data = episode_to_mcap_bytes(ep)
    for raw in (data, ros_logs.strip_summary(data)):
        (s,) = mcap.read_bytes(raw, source_uri="mem", mapping=Mapping())
        np.testing.assert_array_equal(s.frames, ep["frames"])
        np.testing.assert_array_equal(s.signals["state"][1], ep["states"])
        np.testing.assert_array_equal(s.signals["signals"][1][:, 0], ep["signals"]["off_track"])
        assert s.task == worlds.spec("carracing").instruction("drive")
        assert s.meta["seed"] == "0" and s.meta["format"] == "mcap-ros2"
        assert (s.meta["world"], s.meta["task"]) == ("carracing", "drive")
    assert len(ros_logs.strip_summary(data)) < len(data)


def test_message_indexes_read_as_the_record_walk(monkeypatch):
    """A chunk's messages are found through its message index records when those index every
    message; a missing, partial or wrong index falls back to walking the records, alike."""
    ep = episode(700, size=24)  # two chunks
    data = episode_to_mcap_bytes(ep)
    shifted = lambda ix: [MessageIndex(ix[0].channel_id, [(t, o + 1) for t, o in ix[0].records]), *ix[1:]]
    overlapping = lambda ix: [MessageIndex(ix[0].channel_id, ix[0].records * 2), *ix[1:]]
    variants = {"indexed": data, "no index": ros_logs.strip_summary(data, lambda ix: []),
                "one index missing": ros_logs.strip_summary(data, lambda ix: [None, *ix[1:]]),
                "shifted offsets": ros_logs.strip_summary(data, shifted),
                "repeated entries": ros_logs.strip_summary(data, overlapping)}
    seen = []
    indexed = mcap._Contents._indexed
    monkeypatch.setattr(mcap._Contents, "_indexed", lambda self, *a: seen.append(indexed(self, *a)) or seen[-1])
    read = {}
    for name, raw in variants.items():
        seen.clear()
        (read[name],) = mcap.read_bytes(raw, source_uri=name, mapping=Mapping())
        # each edit touches the first chunk's first index record only: the second chunk stays indexed
        assert seen == {"indexed": [True, True], "no index": [False, False]}.get(name, [False, True]), name
    np.testing.assert_array_equal(read["indexed"].frames, ep["frames"])
    for name, s in read.items():
        np.testing.assert_array_equal(s.frames, ep["frames"], err_msg=name)
        np.testing.assert_array_equal(s.camera_t, read["indexed"].camera_t, err_msg=name)
        assert s.signals.keys() == read["indexed"].signals.keys() and s.meta == read["indexed"].meta, name
        for role, (t, v) in s.signals.items():
            np.testing.assert_array_equal(t, read["indexed"].signals[role][0], err_msg=name)
            np.testing.assert_array_equal(v, read["indexed"].signals[role][1], err_msg=name)


@pytest.mark.parametrize("name", ["mcap-ros2", "mcap-protobuf", "rosbag1"])
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_raw_encodings_and_row_padding(tmp_path, name, encoding):
    ep = episode(3, size=6)
    (s,) = write_and_read(tmp_path, name, ep, encoding=encoding, row_padding=5)
    want = np.repeat(ep["frames"][..., :1], 3, axis=3) if encoding == "mono8" else ep["frames"]
    np.testing.assert_array_equal(s.frames, want)


@pytest.mark.parametrize("name", ["mcap-ros2", "mcap-protobuf", "rosbag2-mcap", "rosbag1"])
@pytest.mark.parametrize("encoding", ["16UC1", "yuv422"])
def test_unreadable_encodings_are_bad_encoding(tmp_path, name, encoding):
    with pytest.raises(LogError) as err:
        write_and_read(tmp_path, name, episode(2, size=4), encoding=encoding)
    assert err.value.reason == "bad_encoding"


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_camera_is_found_by_its_type_when_no_name_matches(tmp_path, name):
    """No camera candidate names a topic of the log: the topic of a sensor_msgs or Foxglove image
    type is the camera, whatever its name, and the streams say which topic it was."""
    ep = episode(2, size=4)
    (s,) = write_and_read(tmp_path, name, ep, Mapping(camera=("/front/*",)))
    np.testing.assert_array_equal(s.frames, ep["frames"])
    assert s.meta["topic.camera"] == ("/camera/image_raw/compressed" if "png" in name else "/camera/image_raw")


def test_pick_topics_by_name_then_by_type():
    types = {"/a/cam": "sensor_msgs/msg/CompressedImage", "/b/cam": "sensor_msgs/Image", "/action": "std_msgs/msg/X",
             "/image": "foxglove.RawImage"}
    # a name first, then every image by type, by name
    assert pick_topics(Mapping(), types, source="u") == Topics(("/image", "/a/cam", "/b/cam"), {"action": "/action"})
    del types["/image"]
    assert pick_topics(Mapping(), types, source="u").cameras == ("/a/cam", "/b/cam")
    configured = Mapping.from_dict({"camera": "/b/cam"})  # a configured camera is the only one
    assert pick_topics(configured, types, source="u").cameras == ("/b/cam",)
    with pytest.raises(LogError, match="missing_topic") as err:
        pick_topics(Mapping(), {"/action": "std_msgs/msg/X", "/odom": "nav_msgs/msg/Odometry"}, source="u")
    assert "nav_msgs/msg/Odometry" in str(err.value)  # the error lists what the log holds


def test_damaged_mcap_files(tmp_path):
    data = (ros_logs.write_mcap_ros2(episode(), tmp_path / "a.mcap")).read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 3:len(data) // 3 + 64] = bytes(64)  # inside a chunk: CRC mismatch
    cases = {"empty": b"", "not_mcap": np.random.default_rng(0).bytes(5000),
             "truncated": data[:len(data) // 2], "corrupt": bytes(flipped)}
    for reason, raw in cases.items():
        path = tmp_path / f"{reason}.mcap"
        path.write_bytes(raw)
        with pytest.raises(LogError) as err:
            mcap.read(unit(path, "mcap"), mapping=Mapping(), fetch=fetch)
        assert err.value.reason == reason, (reason, err.value)


def test_mutated_logs_fail_only_with_log_errors(tmp_path):
    """Random damage anywhere in an MCAP or rosbag1 either still reads or raises LogError."""
    rng = np.random.default_rng(1)
    sources = {"mcap": ros_logs.write_mcap_ros2(episode(6, size=8), tmp_path / "a.mcap"),
               "rosbag1": ros_logs.write_rosbag1(episode(6, size=8), tmp_path / "a.bag")}
    for fmt, path in sources.items():
        data = path.read_bytes()
        for i in range(25):
            damaged = bytearray(data)
            at = int(rng.integers(0, len(data) - 16))
            damaged[at:at + 16] = rng.bytes(16)
            target = tmp_path / f"m{i}{path.suffix}"
            target.write_bytes(bytes(damaged))
            reader = mcap if fmt == "mcap" else rosbag
            try:
                reader.read(unit(target, fmt), mapping=Mapping(), fetch=fetch)
            except LogError:
                pass


def test_damaged_rosbag1_files(tmp_path):
    data = ros_logs.write_rosbag1(episode(), tmp_path / "a.bag").read_bytes()
    cases = {"empty": b"", "truncated": data[:len(data) // 2],
             "corrupt": np.random.default_rng(0).bytes(3000),
             "unsupported": b"#ROSBAG V1.2\n" + bytes(100)}
    for reason, raw in cases.items():
        path = tmp_path / f"{reason}.bag"
        path.write_bytes(raw)
        with pytest.raises(LogError) as err:
            rosbag.read(unit(path, "rosbag1"), mapping=Mapping(), fetch=fetch)
        assert err.value.reason == reason, (reason, err.value)


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_damaged_rosbag2_directories(tmp_path, storage):
    bag = ros_logs.write_rosbag2(episode(), tmp_path / "bag", storage=storage)
    (store,) = [p for p in bag.iterdir() if p.name != "metadata.yaml"]
    original = store.read_bytes()
    middle = len(original) // 2
    damaged = original[:middle] + np.random.default_rng(0).bytes(4096) + original[middle + 4096:]
    cases = {"corrupt": damaged, "empty": b""}
    if storage == "mcap":
        cases["truncated"] = original[:len(original) // 2]
    for reason, raw in cases.items():
        store.write_bytes(raw)
        with pytest.raises(LogError) as err:
            rosbag.read(unit(bag, "rosbag2"), mapping=Mapping(), fetch=fetch)
        assert err.value.reason == reason, (reason, err.value)
    store.unlink()  # listed in metadata.yaml but gone
    with pytest.raises(LogError, match="listed but absent"):
        rosbag.read(unit(bag, "rosbag2"), mapping=Mapping(), fetch=fetch)
    (bag / "metadata.yaml").write_text("rosbag2_bagfile_information: [")
    with pytest.raises(LogError) as err:
        rosbag.read(unit(bag, "rosbag2"), mapping=Mapping(), fetch=fetch)
    assert err.value.reason == "corrupt"


def header(t: int) -> object:
    sec, nanosec = divmod(t, 1_000_000_000)
    stamp = T2["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)
    return T2["std_msgs/msg/Header"](stamp=stamp, frame_id="base")


def vector3(x: float, y: float, z: float) -> object:
    return T2["geometry_msgs/msg/Vector3"](x=x, y=y, z=z)


def twist(v: list[float]) -> object:
    return T2["geometry_msgs/msg/Twist"](linear=vector3(*v[:3]), angular=vector3(*v[3:]))


def odometry(t: int, position: list[float], velocity: list[float]) -> object:
    pose = T2["geometry_msgs/msg/Pose"](
        position=T2["geometry_msgs/msg/Point"](x=position[0], y=position[1], z=position[2]),
        orientation=T2["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0))
    return T2["nav_msgs/msg/Odometry"](
        header=header(t), child_frame_id="base",
        pose=T2["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
        twist=T2["geometry_msgs/msg/TwistWithCovariance"](twist=twist(velocity),
                                                          covariance=np.zeros(36)))


POSE = ("position.x", "position.y", "position.z", "orientation.x", "orientation.y", "orientation.z", "orientation.w")


def test_signal_rules_for_common_message_types():
    v = [0.5, -1.0, 2.0, 0.25, 3.0, -4.0]
    joint = T2["sensor_msgs/msg/JointState"](header=header(0), name=["a", "b"],
                                             position=np.array([1.5, -2.5]),
                                             velocity=np.zeros(2), effort=np.zeros(2))
    joy = T2["sensor_msgs/msg/Joy"](header=header(0), axes=np.array([0.5, -1.0], np.float32),
                                    buttons=np.array([1, 0, 1], np.int32))
    point = T2["trajectory_msgs/msg/JointTrajectoryPoint"](
        positions=np.array([0.1, 0.2]), velocities=np.zeros(0), accelerations=np.zeros(0), effort=np.zeros(0),
        time_from_start=T2["builtin_interfaces/msg/Duration"](sec=0, nanosec=0))
    trajectory = T2["trajectory_msgs/msg/JointTrajectory"](header=header(0), joint_names=["shoulder", "elbow"],
                                                           points=[point])
    pose = T2["geometry_msgs/msg/Pose"](position=T2["geometry_msgs/msg/Point"](x=1.0, y=2.0, z=3.0),
                                        orientation=T2["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.5, w=0.5))
    cases = [
        (twist(v), v),
        (T2["geometry_msgs/msg/TwistStamped"](header=header(5), twist=twist(v)), v),
        (odometry(5, [1.0, 2.0, 3.0], v), [1.0, 2.0, 3.0, 0.5, -1.0, -4.0]),
        (joint, [1.5, -2.5]),
        (T2["std_msgs/msg/Float64"](data=2.5), [2.5]),
        (T2["std_msgs/msg/Int32"](data=-7), [-7.0]),
        (T2["std_msgs/msg/Bool"](data=True), [1.0]),
        (PbVector3(x=1.0, y=2.0, z=3.0), [1.0, 2.0, 3.0]),
        (PbJointState(name="j", position=0.5, velocity=1.5), [0.5, 1.5, 0.0, 0.0]),
        (ros_logs.PROTOBUF["Vector"](data=[4.0, 5.0]), [4.0, 5.0]),
        (joy, [0.5, -1.0, 1.0, 0.0, 1.0]),
        (trajectory, [0.1, 0.2]),
        (pose, [1.0, 2.0, 3.0, 0.0, 0.0, 0.5, 0.5]),
        (T2["geometry_msgs/msg/PoseStamped"](header=header(5), pose=pose), [1.0, 2.0, 3.0, 0.0, 0.0, 0.5, 0.5]),
    ]
    names = {id(joint): ("a", "b"), id(joy): ("axes.0", "axes.1", "buttons.0", "buttons.1", "buttons.2"),
             id(trajectory): ("shoulder", "elbow"), id(cases[1][0]): TWIST, id(cases[2][0]): ODOMETRY,
             id(pose): POSE, id(cases[-1][0]): POSE}
    for msg, want in cases:
        got = signal_values(msg)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.asarray(want, np.float32), err_msg=str(msg))
        if id(msg) in names:  # what the values are called, stored beside them
            assert signal_names(msg) == names[id(msg)], str(msg)
    for unreadable in (T2["std_msgs/msg/String"](data="x"), T2["std_msgs/msg/Empty"]()):
        with pytest.raises(LogError, match="bad_message"):
            signal_values(unreadable)


def test_stamps_prefer_the_header_and_fall_back_to_log_time():
    stamped = T2["geometry_msgs/msg/TwistStamped"]
    assert stamp_ns(stamped(header=header(T0 + 9), twist=twist([0] * 6)), 123) == T0 + 9
    assert stamp_ns(stamped(header=header(0), twist=twist([0] * 6)), 123) == 123
    assert stamp_ns(twist([0] * 6), 123) == 123
    flag = ros_logs.PROTOBUF["Flag"](data=True)
    assert stamp_ns(flag, 123) == 123
    flag.timestamp.FromNanoseconds(T0 + 4)
    assert stamp_ns(flag, 123) == T0 + 4


def test_a_robot_bag_with_common_types_and_default_mapping(tmp_path):
    """rosbag2 with a bgr8 colour camera, TwistStamped commands, joint states and odometry."""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (4, 5, 7, 3), dtype=np.uint8)
    with Rosbag2Writer(tmp_path / "bag", version=9) as writer:
        conns = {topic: writer.add_connection(topic, kind, typestore=ROS2_TYPES)
                 for topic, kind in (("/camera/color/image_raw", "sensor_msgs/msg/Image"),
                                     ("/cmd_vel", "geometry_msgs/msg/TwistStamped"),
                                     ("/odom", "nav_msgs/msg/Odometry"),
                                     ("/joint_states", "sensor_msgs/msg/JointState"))}
        for i, frame in enumerate(frames):
            t = T0 + i * STEP
            data, step = ros_logs.raw_pixels(frame, "bgr8")
            msgs = {"/camera/color/image_raw": T2["sensor_msgs/msg/Image"](
                        header=header(t), height=5, width=7, encoding="bgr8", is_bigendian=0,
                        step=step, data=np.frombuffer(data, np.uint8)),
                    "/cmd_vel": T2["geometry_msgs/msg/TwistStamped"](header=header(t + 1),
                                                                      twist=twist([i] * 6)),
                    "/odom": odometry(t + 2, [i, 0, 0], [0] * 6)}
            for topic, msg in msgs.items():
                writer.write(conns[topic], t + 100, ROS2_TYPES.serialize_cdr(msg, msg.__msgtype__))
    (s,) = rosbag.read(unit(tmp_path / "bag", "rosbag2"), mapping=Mapping(), fetch=fetch)
    np.testing.assert_array_equal(s.frames, frames)
    np.testing.assert_array_equal(s.signals["action"][0], T0 + np.arange(4) * STEP + 1)
    np.testing.assert_array_equal(s.signals["action"][1][:, 0], np.arange(4))
    assert s.signals["state"][1].shape == (4, 6)  # /odom: /joint_states has no messages
    assert s.meta["topic.state"] == "/odom" and s.meta["topic.camera"] == "/camera/color/image_raw"


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels, with one tiny data chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.timeout(30)
def test_an_image_declaring_too_many_pixels_is_too_large_before_decoding():
    """A decompression bomb: a few hundred bytes that declare a 100,000 x 100,000 frame (30 GB
    decoded) or just over the limit are rejected from the header, never decoded."""
    for width, height in ((100_000, 100_000), (10_000, 5_001)):
        with pytest.raises(LogError) as err:
            compressed_to_rgb("png", png_header(width, height))
        assert err.value.reason == "too_large", err.value


def test_compressed_image_rules():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)

    def encoded(array: np.ndarray, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt, **kw)
        return buf.getvalue()

    np.testing.assert_array_equal(compressed_to_rgb("rgb8; png compressed bgr8",
                                                    encoded(rgb, "PNG")), rgb)
    grey = compressed_to_rgb("jpeg", encoded(rgb[..., 0], "JPEG", quality=95))
    assert grey.shape == (4, 6, 3) and (grey[..., 0] == grey[..., 2]).all()
    depth = encoded(np.arange(24, dtype=np.uint16).reshape(4, 6) * 1000, "PNG")
    for fmt, data, reason in (("png", depth, "bad_encoding"),
                              ("16UC1; compressedDepth png", encoded(rgb, "PNG"), "bad_encoding"),
                              ("webp", encoded(rgb, "PNG"), "bad_encoding"),
                              ("jpeg", b"\xff\xd8 not really", "bad_message")):
        with pytest.raises(LogError) as err:
            compressed_to_rgb(fmt, data)
        assert err.value.reason == reason, fmt


def test_a_jpeg_shrunk_while_decoding_matches_decoding_then_shrinking():
    """Asked for a smaller size, a JPEG is decoded at a DCT scale (libjpeg's draft mode) and
    shrunk with BOX: the same picture as decoding it whole, then shrinking (a PNG is not scaled)."""
    yy, xx = np.mgrid[0:480, 0:640]
    rgb = np.stack([xx * 255 // 640, yy * 255 // 480, (xx + yy) % 256], axis=-1).astype(np.uint8)
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt)
        whole = compressed_to_rgb(fmt.lower(), buf.getvalue())
        expected = np.asarray(Image.fromarray(whole).resize((200, 150), Image.Resampling.BOX)).astype(int)
        for size in ((150, 200), (240, 320)):
            small = compressed_to_rgb(fmt.lower(), buf.getvalue(), size)
            assert small.shape == (*size, 3)
        small = compressed_to_rgb(fmt.lower(), buf.getvalue(), (150, 200)).astype(int)
        assert np.abs(small - expected).mean() < (2.0 if fmt == "JPEG" else 1e-9), fmt
    np.testing.assert_array_equal(compressed_to_rgb("jpeg", buf.getvalue(), (480, 640)), whole)  # its own size


def test_collector_rules():
    picked = Topics(("/c",), {"reward": "/r", "action": "/a"})
    empty = Collector(picked)
    with pytest.raises(LogError, match="missing_topic"):
        empty.streams("u", {})
    odd = Collector(picked)
    odd.add_parsed("/c", 1, np.zeros((4, 4, 3), np.uint8))
    odd.add_parsed("/c", 2, np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(LogError, match="bad_message"):
        odd.streams("u", {})
    for topic, widths in (("/r", (2, 2)), ("/a", (3, 2))):
        c = Collector(picked)
        c.add_parsed("/c", 1, np.zeros((4, 4, 3), np.uint8))
        for i, width in enumerate(widths):
            c.add_parsed(topic, i, np.zeros(width, np.float32))
        with pytest.raises(LogError, match="bad_message"):
            c.streams("u", {})


def test_ros1_and_ros2_messages_decode_alike():
    entry = Entry("/camera/image_raw", "image", T0 + 5, T0,
                  ((2, 3, 3), "bgr8", *ros_logs.raw_pixels(np.arange(18, dtype=np.uint8)
                                                          .reshape(2, 3, 3), "bgr8")))
    (_, ros1), (_, ros2) = ros_message(ROS1_TYPES, entry), ros_message(ROS2_TYPES, entry)
    np.testing.assert_array_equal(image_to_rgb(ros1), image_to_rgb(ros2))
    np.testing.assert_array_equal(image_to_rgb(ros2), np.arange(18).reshape(2, 3, 3))
    assert stamp_ns(ros1, 0) == stamp_ns(ros2, 0) == T0 + 5


def test_foxglove_protobuf_log_with_foreign_names_struct_actions_and_nested_poses(tmp_path):
    """An MCAP written by mcap-protobuf-support as a robot stack might log it: a Foxglove RawImage
    camera on a topic no candidate names, ``google.protobuf.Struct`` commands, Foxglove
    ``PoseInFrame`` states. Frames, stamps and values come back exactly: the Struct's numbers by
    sorted key (strings left out), the pose's position and orientation (its stamp left out)."""
    from foxglove_schemas_protobuf.PoseInFrame_pb2 import PoseInFrame
    from foxglove_schemas_protobuf.RawImage_pb2 import RawImage
    from google.protobuf.struct_pb2 import Struct
    from mcap_protobuf.writer import Writer

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (5, 6, 8, 3), dtype=np.uint8)
    stamps = 1_700_000_000_000_000_000 + np.arange(5, dtype=np.int64) * 33_333_333
    path = tmp_path / "robot.mcap"
    with open(path, "wb") as f, Writer(f) as writer:
        for i, t in enumerate(int(s) for s in stamps):
            image = RawImage(frame_id="front", width=8, height=6, encoding="rgb8", step=24, data=frames[i].tobytes())
            image.timestamp.FromNanoseconds(t)
            writer.write_message("/sensors/front_cam", image, log_time=t + 5, publish_time=t + 5)
            command = Struct()
            command.update({"wrist": 0.5 * i, "elbow": -1.0, "gripper": bool(i % 2), "mode": "teleop"})
            writer.write_message("/action", command, log_time=t, publish_time=t)
            pose = PoseInFrame(frame_id="base")
            pose.timestamp.FromNanoseconds(t)
            pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = 0.1 * i, 0.2, 0.3
            pose.pose.orientation.w = 1.0
            writer.write_message("/state", pose, log_time=t, publish_time=t)
    (s,) = mcap.read(unit(path, "mcap"), mapping=Mapping(), fetch=fetch)
    np.testing.assert_array_equal(s.frames, frames)
    np.testing.assert_array_equal(s.camera_t, stamps)  # the image's own stamp, not its log time
    assert s.meta["topic.camera"] == "/sensors/front_cam" and s.meta["format"] == "mcap-protobuf"
    action_t, action = s.signals["action"]
    np.testing.assert_array_equal(action_t, stamps)
    np.testing.assert_array_equal(action, [[-1.0, float(i % 2), 0.5 * i] for i in range(5)])  # elbow, gripper, wrist
    np.testing.assert_allclose(s.signals["state"][1], [[0.1 * i, 0.2, 0.3, 0, 0, 0, 1] for i in range(5)], rtol=1e-6)


def chunk_body(records: bytes, compression: str, declared: int | None = None) -> memoryview:
    """An MCAP chunk record's body holding ``records`` compressed as named ("zstd-unsized": a zstd
    frame that does not state its size); ``declared`` overrides the size its header states."""
    import lz4.frame
    import zstandard

    packed = {"zstd": lambda r: zstandard.ZstdCompressor().compress(r),
              "zstd-unsized": lambda r: zstandard.ZstdCompressor(write_content_size=False).compress(r),
              "lz4": lz4.frame.compress}.get(compression, lambda r: r)(records)
    name = compression.split("-")[0].encode()
    size = len(records) if declared is None else declared
    header = struct.pack("<QQQII", 0, 1, size, zlib.crc32(records), len(name)) + name
    return memoryview(header + struct.pack("<Q", len(packed)) + packed)


@pytest.mark.timeout(60)
def test_chunks_decompress_no_further_than_their_header_says():
    """zstd and lz4 chunks read back; a chunk whose compressed bytes expand past its declared
    size (a compression bomb: a few KB that hold 50 MB of zeros) stops at that size and is
    refused; a chunk declaring over MAX_CHUNK_BYTES is too_large unread."""
    import zstandard

    records = bytes(range(256)) * 40
    for compression in ("", "zstd", "zstd-unsized", "lz4"):
        assert bytes(mcap._chunk_records(chunk_body(records, compression))) == records, compression
    bomb = b"\0" * 50_000_000
    for compression in ("zstd", "zstd-unsized", "lz4"):
        with pytest.raises((ValueError, zstandard.ZstdError)):
            mcap._chunk_records(chunk_body(bomb, compression, declared=4096))
    with pytest.raises(LogError, match="too_large"):
        mcap._chunk_records(chunk_body(records, "zstd", declared=mcap.MAX_CHUNK_BYTES + 1))
    with pytest.raises(LogError, match="unsupported"):
        mcap._chunk_records(chunk_body(records, "brotli"))


def test_a_rosbag2_mcap_storage_file_is_opened_with_the_mcap_limits(tmp_path):
    """rosbags would decompress a rosbag2's MCAP chunks without limits: its storage files go
    through the MCAP reader's chunk checks first, so a chunk declaring over MAX_CHUNK_BYTES is
    too_large before rosbags reads a byte."""
    bag = ros_logs.write_rosbag2(episode(), tmp_path / "bag", storage="mcap")
    store = next(bag.glob("*.mcap"))
    data = bytearray(store.read_bytes())
    pos = len(mcap.MAGIC)
    while data[pos] != 0x06:  # the first chunk record
        pos += 9 + struct.unpack_from("<Q", data, pos + 1)[0]
    struct.pack_into("<Q", data, pos + 9 + 16, mcap.MAX_CHUNK_BYTES + 1)  # its declared records size
    store.write_bytes(bytes(data))
    with pytest.raises(LogError, match="too_large"):
        rosbag.read(unit(bag, "rosbag2"), mapping=Mapping(), fetch=fetch)


def test_default_names_match_under_any_namespace():
    """A namespaced robot (``/robot1/...``) needs no mapping: the common names match under any
    prefix, after the exact names."""
    types = {"/robot1/front/image/compressed": "sensor_msgs/msg/CompressedImage",
             "/robot1/cmd_vel": "geometry_msgs/msg/Twist", "/robot1/joint_states": "sensor_msgs/msg/JointState",
             "/robot1/diagnostics": "diagnostic_msgs/msg/DiagnosticArray"}
    assert pick_topics(Mapping(), types, source="u") == Topics(
        ("/robot1/front/image/compressed",), {"action": "/robot1/cmd_vel", "state": "/robot1/joint_states"})
    types["/cmd_vel"] = "geometry_msgs/msg/Twist"  # an exact name wins over a namespaced one
    assert pick_topics(Mapping(), types, source="u").roles["action"] == "/cmd_vel"
