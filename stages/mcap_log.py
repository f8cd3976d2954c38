"""Episodes as MCAP files of ROS 2 messages (CDR-encoded, ``ros2msg`` schemas), for any world.

Topics: ``/camera/image_raw`` (sensor_msgs/msg/Image, rgb8, header stamp = sim time, frame_id =
the world's camera), ``/action`` and ``/expert/action`` (std_msgs/msg/Float32MultiArray, the
layout label lists the world's action names), the state (``/state`` as Float32MultiArray, or
``/joint_states`` as sensor_msgs/msg/JointState with the state names, as the world's spec says),
``/reward`` (std_msgs/msg/Float32), ``/intervention`` (std_msgs/msg/Bool), ``/signals``
(Float32MultiArray of 0/1, one per name of the spec's ``signals``) and ``/task``
(std_msgs/msg/String, the instruction, once at the start). The episode metadata (world, seed,
task, driver, policy_version) is an MCAP metadata record named ``episode``. No ROS install is
needed: mcap-ros2-support encodes from the schema text. Reading is ``stages.formats.mcap`` (any
MCAP log, not only these), then ``stages.align``.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from mcap.writer import CompressionType
from mcap_ros2.writer import Writer

from sim import worlds
from stages import storage

CAMERA, ACTION, EXPERT, STATE, JOINT_STATES = "/camera/image_raw", "/action", "/expert/action", "/state", "/joint_states"
REWARD, INTERVENTION, SIGNALS, TASK = "/reward", "/intervention", "/signals", "/task"
METADATA_NAME = "episode"
_SEP = "=" * 80

_HEADER = f"""MSG: std_msgs/Header
builtin_interfaces/Time stamp
string frame_id
{_SEP}
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec
"""  # the definitions a Header brings
IMAGE_MSG = f"""std_msgs/Header header
uint32 height
uint32 width
string encoding
uint8 is_bigendian
uint32 step
uint8[] data
{_SEP}
{_HEADER}"""
FLOAT32_MULTI_ARRAY_MSG = f"""std_msgs/MultiArrayLayout layout
float32[] data
{_SEP}
MSG: std_msgs/MultiArrayLayout
std_msgs/MultiArrayDimension[] dim
uint32 data_offset
{_SEP}
MSG: std_msgs/MultiArrayDimension
string label
uint32 size
uint32 stride
"""
JOINT_STATE_MSG = f"""std_msgs/Header header
string[] name
float64[] position
float64[] velocity
float64[] effort
{_SEP}
{_HEADER}"""
FLOAT32_MSG = "float32 data\n"
STRING_MSG = "string data\n"
BOOL_MSG = "bool data\n"


def _layout(fields: tuple[str, ...]) -> dict[str, Any]:
    return {"dim": [{"label": ",".join(fields), "size": len(fields), "stride": len(fields)}],
            "data_offset": 0}


def episode_to_mcap_bytes(episode: dict[str, Any]) -> bytes:
    """Encode one episode (the contract of ``sim.worlds.base``) as MCAP bytes.

    ``/expert/action`` is not written for steps whose expert action is all NaN (unavailable):
    such a step reads back as NaN.
    """
    spec = worlds.spec(str(episode["world"]))
    frames = np.ascontiguousarray(episode["frames"])
    stamps = np.asarray(episode["timestamps_ns"], dtype=np.int64)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must be uint8[T,H,W,3], got {frames.dtype}{list(frames.shape)}")
    if stamps.size and stamps.min() < 0:
        raise ValueError("timestamps_ns must be non-negative")
    n, height, width, _ = frames.shape
    width_a = len(spec.actions)
    actions = np.asarray(episode["actions"], np.float32).reshape(n, width_a)
    expert = np.asarray(episode.get("expert_actions", np.full((n, width_a), np.nan)), np.float32)
    states = np.asarray(episode["states"], np.float32)
    rewards = np.asarray(episode["rewards"], np.float32)
    interventions = np.asarray(episode["interventions"], bool)
    signals = np.stack([np.asarray(episode.get("signals", {}).get(k, np.zeros(n, bool)), bool)
                        for k in spec.signals], axis=1) if spec.signals else np.zeros((n, 0), bool)
    for name, arr in (("expert_actions", expert), ("states", states), ("rewards", rewards),
                      ("interventions", interventions), ("signals", signals), ("timestamps_ns", stamps)):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} steps, frames have {n}")
    if states.shape[1:] != (len(spec.state_names),):
        raise ValueError(f"states are {list(states.shape)}, world {spec.name!r} logs {len(spec.state_names)}")
    action_layout, signal_layout = _layout(spec.action_names), _layout(spec.signals)
    expert_ok = ~np.isnan(expert).all(axis=1)
    joints = spec.state_message == "sensor_msgs/msg/JointState"

    buf = io.BytesIO()
    writer = Writer(buf, compression=CompressionType.ZSTD)
    image_s = writer.register_msgdef("sensor_msgs/msg/Image", IMAGE_MSG)
    array_s = writer.register_msgdef("std_msgs/msg/Float32MultiArray", FLOAT32_MULTI_ARRAY_MSG)
    state_s = writer.register_msgdef("sensor_msgs/msg/JointState", JOINT_STATE_MSG) if joints else array_s
    float_s = writer.register_msgdef("std_msgs/msg/Float32", FLOAT32_MSG)
    bool_s = writer.register_msgdef("std_msgs/msg/Bool", BOOL_MSG)
    string_s = writer.register_msgdef("std_msgs/msg/String", STRING_MSG)
    task = str(episode.get("task", spec.task_names[0]))
    writer.add_metadata(METADATA_NAME, {
        "world": spec.name, "seed": str(int(episode["seed"])), "task": task,
        "driver": str(episode.get("driver", "")),
        "policy_version": str(episode.get("policy_version", ""))})
    if n:
        writer.write_message(TASK, string_s, {"data": spec.instruction(task)}, log_time=int(stamps[0]))
    names = list(spec.state_names)
    for i in range(n):
        t = int(stamps[i])
        sec, nanosec = divmod(t, 1_000_000_000)
        header = {"stamp": {"sec": sec, "nanosec": nanosec}, "frame_id": spec.camera}
        writer.write_message(CAMERA, image_s, {
            "header": header, "height": height, "width": width, "encoding": "rgb8", "is_bigendian": 0,
            "step": width * 3, "data": frames[i].tobytes()}, log_time=t, sequence=i)
        writer.write_message(ACTION, array_s, {"layout": action_layout,
                                               "data": actions[i].tolist()}, log_time=t, sequence=i)
        if expert_ok[i]:
            writer.write_message(EXPERT, array_s, {"layout": action_layout,
                                                   "data": expert[i].tolist()}, log_time=t, sequence=i)
        if joints:
            writer.write_message(JOINT_STATES, state_s, {
                "header": {**header, "frame_id": "base"}, "name": names,
                "position": states[i].astype(np.float64).tolist(), "velocity": [], "effort": []},
                log_time=t, sequence=i)
        else:
            writer.write_message(STATE, array_s, {"layout": _layout(spec.state_names),
                                                  "data": states[i].tolist()}, log_time=t, sequence=i)
        writer.write_message(REWARD, float_s, {"data": float(rewards[i])}, log_time=t, sequence=i)
        writer.write_message(INTERVENTION, bool_s, {"data": bool(interventions[i])},
                             log_time=t, sequence=i)
        if spec.signals:
            writer.write_message(SIGNALS, array_s, {"layout": signal_layout,
                                                    "data": signals[i].astype(np.float32).tolist()},
                                 log_time=t, sequence=i)
    writer.finish()
    return buf.getvalue()


def write_episode(episode: dict[str, Any], uri: str,
                  storage_options: dict[str, str] | None = None) -> str:
    """Write one episode as an MCAP file at ``uri`` (local path or s3://); returns ``uri``."""
    storage.write_bytes(uri, episode_to_mcap_bytes(episode), storage_options)
    return uri
