"""Episodes as MCAP files of ROS 2 messages (CDR-encoded, ``ros2msg`` schemas).

Topics: ``/camera/image_raw`` (sensor_msgs/msg/Image, rgb8, header stamp = sim time),
``/vehicle/action`` and ``/expert/action`` (std_msgs/msg/Float32MultiArray: steer, gas,
brake), ``/vehicle/state`` (Float32MultiArray, the fields of ``STATE_FIELDS``), ``/reward``
(std_msgs/msg/Float32), ``/intervention`` and ``/off_track`` (std_msgs/msg/Bool). The episode
metadata (world, seed, driver, policy_version) is an MCAP metadata record named ``episode``.
No ROS install is needed: mcap-ros2-support encodes from the schema text. Reading is
``stages.formats.mcap`` (any MCAP log, not only these), then ``stages.align``.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from mcap.writer import CompressionType
from mcap_ros2.writer import Writer

from stages import storage

STATE_FIELDS = ("x", "y", "heading", "vx", "vy", "speed", "yaw_rate", "on_track")
ACTION_FIELDS = ("steer", "gas", "brake")
CAMERA, ACTION, EXPERT, STATE = "/camera/image_raw", "/vehicle/action", "/expert/action", "/vehicle/state"
REWARD, INTERVENTION, OFF_TRACK = "/reward", "/intervention", "/off_track"
METADATA_NAME = "episode"
_SEP = "=" * 80

IMAGE_MSG = f"""std_msgs/Header header
uint32 height
uint32 width
string encoding
uint8 is_bigendian
uint32 step
uint8[] data
{_SEP}
MSG: std_msgs/Header
builtin_interfaces/Time stamp
string frame_id
{_SEP}
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec
"""
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
FLOAT32_MSG = "float32 data\n"
BOOL_MSG = "bool data\n"


def _layout(fields: tuple[str, ...]) -> dict[str, Any]:
    return {"dim": [{"label": ",".join(fields), "size": len(fields), "stride": len(fields)}],
            "data_offset": 0}


def episode_to_mcap_bytes(episode: dict[str, Any]) -> bytes:
    """Encode one episode (the shared contract's dict) as MCAP bytes.

    ``/expert/action`` is not written for steps whose expert action is all NaN (unavailable):
    such a step reads back as NaN.
    """
    frames = np.ascontiguousarray(episode["frames"])
    stamps = np.asarray(episode["timestamps_ns"], dtype=np.int64)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must be uint8[T,H,W,3], got {frames.dtype}{list(frames.shape)}")
    if stamps.size and stamps.min() < 0:
        raise ValueError("timestamps_ns must be non-negative")
    n, height, width, _ = frames.shape
    actions = np.asarray(episode["actions"], np.float32)
    expert = np.asarray(episode.get("expert_actions", np.full((n, 3), np.nan)), np.float32)
    states = np.asarray(episode["states"], np.float32)
    rewards = np.asarray(episode["rewards"], np.float32)
    interventions = np.asarray(episode["interventions"], bool)
    off_track = np.asarray(episode["off_track"], bool)
    for name, arr in (("actions", actions), ("expert_actions", expert), ("states", states),
                      ("rewards", rewards), ("interventions", interventions),
                      ("off_track", off_track), ("timestamps_ns", stamps)):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} steps, frames have {n}")
    action_layout, state_layout = _layout(ACTION_FIELDS), _layout(STATE_FIELDS)
    expert_ok = ~np.isnan(expert).all(axis=1)

    buf = io.BytesIO()
    writer = Writer(buf, compression=CompressionType.ZSTD)
    image_s = writer.register_msgdef("sensor_msgs/msg/Image", IMAGE_MSG)
    array_s = writer.register_msgdef("std_msgs/msg/Float32MultiArray", FLOAT32_MULTI_ARRAY_MSG)
    float_s = writer.register_msgdef("std_msgs/msg/Float32", FLOAT32_MSG)
    bool_s = writer.register_msgdef("std_msgs/msg/Bool", BOOL_MSG)
    writer.add_metadata(METADATA_NAME, {
        "world": str(episode["world"]), "seed": str(int(episode["seed"])),
        "driver": str(episode.get("driver", "")),
        "policy_version": str(episode.get("policy_version", ""))})
    for i in range(n):
        t = int(stamps[i])
        sec, nanosec = divmod(t, 1_000_000_000)
        writer.write_message(CAMERA, image_s, {
            "header": {"stamp": {"sec": sec, "nanosec": nanosec}, "frame_id": "camera"},
            "height": height, "width": width, "encoding": "rgb8", "is_bigendian": 0,
            "step": width * 3, "data": frames[i].tobytes()}, log_time=t, sequence=i)
        writer.write_message(ACTION, array_s, {"layout": action_layout,
                                               "data": actions[i].tolist()}, log_time=t, sequence=i)
        if expert_ok[i]:
            writer.write_message(EXPERT, array_s, {"layout": action_layout,
                                                   "data": expert[i].tolist()}, log_time=t, sequence=i)
        writer.write_message(STATE, array_s, {"layout": state_layout,
                                              "data": states[i].tolist()}, log_time=t, sequence=i)
        writer.write_message(REWARD, float_s, {"data": float(rewards[i])}, log_time=t, sequence=i)
        writer.write_message(INTERVENTION, bool_s, {"data": bool(interventions[i])},
                             log_time=t, sequence=i)
        writer.write_message(OFF_TRACK, bool_s, {"data": bool(off_track[i])}, log_time=t, sequence=i)
    writer.finish()
    return buf.getvalue()


def write_episode(episode: dict[str, Any], uri: str,
                  storage_options: dict[str, str] | None = None) -> str:
    """Write one episode as an MCAP file at ``uri`` (local path or s3://); returns ``uri``."""
    storage.write_bytes(uri, episode_to_mcap_bytes(episode), storage_options)
    return uri
