"""A fleet of foreign logs, written by the real libraries with names, rates, widths and cameras
unlike the project's own, and what curating each must give back.

Each ``write_*`` writes one log into a directory and returns an ``Expected``: per camera the
frames and their stamps as the reader must decode them, the action (and state) values at those
frames by the alignment rules (the latest command at or before a frame; state interpolated
linearly between its samples), their names, and the world the log must be recorded as.

* ``write_arm_mcap``: ROS 2 MCAP (``mcap_ros2``) of a 7-joint arm: a JPEG ``CompressedImage``
  ``/front_cam/image/compressed`` and a raw ``/wrist/image_raw`` at 30 Hz, ``JointState``
  ``/arm/joint_states`` and ``Float64MultiArray`` ``/arm/joint_commands`` at 100 Hz.
* ``write_base_bag``: rosbag1 (``rosbags``, ROS 1 Noetic) of a mobile base: a bgr8 ``Image`` at
  10 Hz, ``Twist`` ``/base/cmd_vel`` at 20 Hz, ``Odometry`` ``/base/odom`` at 50 Hz.
* ``write_teleop_protobuf``: Foxglove protobuf MCAP (``mcap_protobuf`` with
  ``foxglove_schemas_protobuf``): a PNG ``foxglove.CompressedImage`` ``/cam_left`` at 15 Hz and
  ``google.protobuf.Struct`` commands ``/teleop/command`` {gripper, vx} at 30 Hz.
* ``write_car_bag2``: rosbag2 (sqlite3) of a car: raw ``/car/front/image_raw`` at 20 Hz and
  ``TwistStamped`` ``/car/cmd`` at 40 Hz, no state.
* ``write_so100_lerobot``: LeRobot v3.0 of robot type ``so100``: two ffv1 cameras, 6 named
  joints of action and state (``tests.stages.lerobot_logs``).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage
from google.protobuf.struct_pb2 import Struct
from mcap_protobuf.writer import Writer as ProtobufWriter
from mcap_ros2.writer import Writer as Ros2Writer
from PIL import Image
from rosbags.rosbag1 import Writer as Rosbag1Writer
from rosbags.rosbag2 import StoragePlugin
from rosbags.rosbag2 import Writer as Rosbag2Writer

from tests.stages.lerobot_logs import write_lerobot
from tests.stages.ros_logs import ROS1_TYPES, ROS2_TYPES, _plain

T0 = 1_700_000_000_000_000_000
TWIST = ("linear.x", "linear.y", "linear.z", "angular.x", "angular.y", "angular.z")
ODOMETRY = ("position.x", "position.y", "position.z", "linear.x", "linear.y", "angular.z")


@dataclass
class Expected:
    """What curating one log must give: per camera (topic or feature) the frames and stamps,
    and the values at those frames."""

    world: str
    cameras: dict[str, tuple[np.ndarray, np.ndarray]]  # camera -> (frames uint8[T,H,W,3], stamps int64[T])
    actions: np.ndarray  # float32[T, A] at the frames
    action_names: list[str]
    states: np.ndarray  # float32[T, S] at the frames (S may be 0)
    state_names: list[str]
    episodes: int = 1  # episodes per camera
    extra: dict = field(default_factory=dict)


def scene(n: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    """n frames of moving gradients and a square: content a JPEG keeps near, but not exactly."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = np.arange(n, dtype=np.float32)[:, None, None]
    r = 128 + 100 * np.sin((xx / w + t / 17 + seed) * 2 * np.pi)
    g = 128 + 100 * np.cos((yy / h - t / 23) * 2 * np.pi)
    b = np.broadcast_to(255 * (xx / w) * (yy / h), r.shape)
    frames = np.stack([r, g, b], axis=-1).round().astype(np.uint8)
    for i in range(n):
        y, x = (3 * i) % (h - 6), (5 * i) % (w - 6)
        frames[i, y:y + 6, x:x + 6] = (255, 255, 0)
    return frames


def encode(frame: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def stamps(n: int, hz: float, start: int = T0) -> np.ndarray:
    return start + np.round(np.arange(n) * 1e9 / hz).astype(np.int64)


def held(values: np.ndarray, at: np.ndarray, frames_t: np.ndarray) -> np.ndarray:
    """The latest sample at or before each frame."""
    return values[np.searchsorted(at, frames_t, side="right") - 1].astype(np.float32)


def lerp(values: np.ndarray, at: np.ndarray, frames_t: np.ndarray) -> np.ndarray:
    """Each column interpolated linearly at the frames."""
    x = (at - at[0]).astype(np.float64)
    return np.stack([np.interp((frames_t - at[0]).astype(np.float64), x, values[:, k])
                     for k in range(values.shape[1])], axis=1).astype(np.float32)


def _header(types, stamp: int, frame_id: str):
    T = types.types
    sec, nanosec = divmod(int(stamp), 1_000_000_000)
    extra = {"seq": 0} if "seq" in T["std_msgs/msg/Header"].__dataclass_fields__ else {}
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                                    frame_id=frame_id, **extra)


def _raw(types, stamp: int, frame: np.ndarray, encoding: str = "rgb8"):
    data = frame[..., ::-1] if encoding == "bgr8" else frame
    h, w = frame.shape[:2]
    return types.types["sensor_msgs/msg/Image"](
        header=_header(types, stamp, "cam"), height=h, width=w, encoding=encoding, is_bigendian=0,
        step=3 * w, data=np.ascontiguousarray(data).reshape(-1))


def _twist(types, values: np.ndarray):
    T = types.types
    v = [float(x) for x in values]
    return T["geometry_msgs/msg/Twist"](linear=T["geometry_msgs/msg/Vector3"](x=v[0], y=v[1], z=v[2]),
                                        angular=T["geometry_msgs/msg/Vector3"](x=v[3], y=v[4], z=v[5]))


def _write_bag(writer, messages: list, types, serialize) -> None:
    """(log time, topic, type, message) tuples into a rosbags writer, in log-time order."""
    connections = {}
    for log_time, topic, kind, msg in sorted(messages, key=lambda m: m[0]):
        if topic not in connections:
            connections[topic] = writer.add_connection(topic, kind, typestore=types)
        writer.write(connections[topic], int(log_time), serialize(msg, kind))


def write_arm_mcap(path: Path, *, n: int = 45, seed: int = 0, poison: str = "") -> Expected:
    """``poison``: "nan" puts a NaN into one command; "no_camera" writes no camera at all."""
    T, rng = ROS2_TYPES.types, np.random.default_rng(seed)
    cam_t, joint_t = stamps(n, 30), stamps(int(n * 100 / 30) + 2, 100)
    front, wrist = scene(n, (48, 64), seed), scene(n, (24, 32), seed + 1)
    jpegs = [encode(f, "JPEG") for f in front]
    commands = rng.uniform(-2, 2, (len(joint_t), 7))
    if poison == "nan":
        commands[len(joint_t) // 2, 3] = np.nan
    joints = 0.1 + (joint_t - T0)[:, None] / 1e9 * np.arange(1, 8) + rng.normal(size=(len(joint_t), 7))
    names = [f"joint_{k + 1}" for k in range(7)]
    messages = []  # (log time, topic, type, message)
    for i, t in enumerate(cam_t if poison != "no_camera" else ()):
        messages.append((t + 2_000_000, "/front_cam/image/compressed", "sensor_msgs/msg/CompressedImage",
                         T["sensor_msgs/msg/CompressedImage"](header=_header(ROS2_TYPES, t, "front"), format="jpeg",
                                                              data=np.frombuffer(jpegs[i], np.uint8))))
        messages.append((t + 1_000_000, "/wrist/image_raw", "sensor_msgs/msg/Image", _raw(ROS2_TYPES, t, wrist[i])))
    for j, t in enumerate(joint_t):
        messages.append((t, "/arm/joint_states", "sensor_msgs/msg/JointState", T["sensor_msgs/msg/JointState"](
            header=_header(ROS2_TYPES, t, "base"), name=names, position=joints[j], velocity=np.zeros(0),
            effort=np.zeros(0))))
        messages.append((t, "/arm/joint_commands", "std_msgs/msg/Float64MultiArray", T["std_msgs/msg/Float64MultiArray"](
            layout=T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0), data=commands[j])))
    with open(path, "wb") as f:
        writer, schemas = Ros2Writer(f), {}
        for log_time, topic, kind, msg in sorted(messages, key=lambda m: m[0]):
            if kind not in schemas:
                schemas[kind] = writer.register_msgdef(kind, ROS2_TYPES.generate_msgdef(kind, ros_version=2)[0])
            writer.write_message(topic, schemas[kind], _plain(msg), log_time=int(log_time), publish_time=int(log_time))
        writer.finish()
    return Expected(world="mcap-ros2",
                    cameras={"/front_cam/image/compressed": (np.stack([decoded(j) for j in jpegs]), cam_t),
                             "/wrist/image_raw": (wrist, cam_t)},
                    actions=held(commands, joint_t, cam_t), action_names=[f"action_{k}" for k in range(7)],
                    states=lerp(joints, joint_t, cam_t), state_names=names)


def write_base_bag(path: Path, *, n: int = 30, seed: int = 1, backwards: bool = False) -> Expected:
    """``backwards``: two camera stamps swapped (the camera's stamps run backwards)."""
    T, rng = ROS1_TYPES.types, np.random.default_rng(seed)
    cam_t, cmd_t, odom_t = stamps(n, 10), stamps(2 * n, 20), stamps(5 * n, 50)
    frames = scene(n, (40, 40), seed)
    header_t = cam_t.copy()
    if backwards:
        header_t[[10, 11]] = header_t[[11, 10]]
    commands, odom = rng.uniform(-1, 1, (len(cmd_t), 6)), rng.normal(size=(len(odom_t), 6))
    messages = [(t, "/base/cam/image_raw", "sensor_msgs/msg/Image", _raw(ROS1_TYPES, header_t[i], frames[i], "bgr8"))
                for i, t in enumerate(cam_t)]
    messages += [(t, "/base/cmd_vel", "geometry_msgs/msg/Twist", _twist(ROS1_TYPES, commands[j]))
                 for j, t in enumerate(cmd_t)]
    for j, t in enumerate(odom_t):
        o = [float(x) for x in odom[j]]
        pose = T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=o[0], y=o[1], z=o[2]),
                                           orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0))
        twist = _twist(ROS1_TYPES, np.array([o[3], o[4], 0.0, 0.0, 0.0, o[5]]))
        messages.append((t, "/base/odom", "nav_msgs/msg/Odometry", T["nav_msgs/msg/Odometry"](
            header=_header(ROS1_TYPES, t, "odom"), child_frame_id="base",
            pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
            twist=T["geometry_msgs/msg/TwistWithCovariance"](twist=twist, covariance=np.zeros(36)))))
    with Rosbag1Writer(path) as writer:
        _write_bag(writer, messages, ROS1_TYPES, ROS1_TYPES.serialize_ros1)
    return Expected(world="rosbag1", cameras={"/base/cam/image_raw": (frames, cam_t)},
                    actions=held(commands, cmd_t, cam_t), action_names=list(TWIST),
                    states=lerp(odom, odom_t, cam_t), state_names=list(ODOMETRY))


def write_teleop_protobuf(path: Path, *, n: int = 20, seed: int = 2) -> Expected:
    rng = np.random.default_rng(seed)
    cam_t, cmd_t = stamps(n, 15), stamps(2 * n, 30)
    frames = scene(n, (32, 48), seed)
    commands = np.column_stack([rng.uniform(0, 1, len(cmd_t)), rng.uniform(-1, 1, len(cmd_t))])
    messages = []
    for i, t in enumerate(cam_t):
        msg = CompressedImage(frame_id="left", format="png", data=encode(frames[i], "PNG"))
        msg.timestamp.FromNanoseconds(int(t))
        messages.append((t, "/cam_left", msg))
    for j, t in enumerate(cmd_t):
        msg = Struct()
        msg.update({"vx": float(commands[j, 1]), "gripper": float(commands[j, 0]), "mode": "teleop"})
        messages.append((t, "/teleop/command", msg))
    with open(path, "wb") as f, ProtobufWriter(f) as writer:
        for log_time, topic, msg in sorted(messages, key=lambda m: m[0]):
            writer.write_message(topic, msg, log_time=int(log_time), publish_time=int(log_time))
    return Expected(world="mcap-protobuf", cameras={"/cam_left": (frames, cam_t)},
                    actions=held(commands.astype(np.float32), cmd_t, cam_t), action_names=["gripper", "vx"],
                    states=np.zeros((n, 0), np.float32), state_names=[])


def write_car_bag2(path: Path, *, n: int = 30, seed: int = 3) -> Expected:
    T, rng = ROS2_TYPES.types, np.random.default_rng(seed)
    cam_t, cmd_t = stamps(n, 20), stamps(2 * n, 40)
    frames = scene(n, (36, 48), seed)
    commands = rng.uniform(-1, 1, (len(cmd_t), 6))
    messages = [(t, "/car/front/image_raw", "sensor_msgs/msg/Image", _raw(ROS2_TYPES, t, frames[i]))
                for i, t in enumerate(cam_t)]
    messages += [(t, "/car/cmd", "geometry_msgs/msg/TwistStamped", T["geometry_msgs/msg/TwistStamped"](
        header=_header(ROS2_TYPES, t, "car"), twist=_twist(ROS2_TYPES, commands[j]))) for j, t in enumerate(cmd_t)]
    with Rosbag2Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        _write_bag(writer, messages, ROS2_TYPES, ROS2_TYPES.serialize_cdr)
    return Expected(world="rosbag2-sqlite3", cameras={"/car/front/image_raw": (frames, cam_t)},
                    actions=held(commands, cmd_t, cam_t), action_names=list(TWIST),
                    states=np.zeros((n, 0), np.float32), state_names=[])


def write_so100_lerobot(path: Path, *, n: int = 25, seed: int = 4) -> Expected:
    rng = np.random.default_rng(seed)
    joints = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
    episodes = []
    for e in range(2):
        top, wrist = scene(n, (30, 40), seed + e), scene(n, (20, 20), seed + 10 + e)
        episodes.append({"frames": top, "cameras": {"observation.images.top": top, "observation.images.wrist": wrist},
                         "actions": rng.uniform(-90, 90, (n, 6)).astype(np.float32),
                         "states": rng.uniform(-90, 90, (n, 6)).astype(np.float32),
                         "rewards": np.zeros(n, np.float32), "action_names": joints,
                         "state_names": [f"{j}.pos" for j in joints]})
    write_lerobot(episodes, path, version="v3.0", fps=30, codec="ffv1", task="pick the cube", robot_type="so100")
    # the rows' float32 seconds, read as their shortest decimals (``stages.formats.lerobot``)
    t = np.array([round(float(str(s)) * 1e9) for s in (np.arange(n) / 30).astype(np.float32)], np.int64)
    return Expected(world="lerobot-v3.0:so100",
                    cameras={k: (np.concatenate([e["cameras"][k] for e in episodes]), np.concatenate([t, t]))
                             for k in ("observation.images.top", "observation.images.wrist")},
                    actions=np.concatenate([e["actions"] for e in episodes]), action_names=joints,
                    states=np.concatenate([e["states"] for e in episodes]),
                    state_names=[f"{j}.pos" for j in joints], episodes=2)
