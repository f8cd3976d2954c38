"""Episodes as MCAP files of ROS 2 messages (CDR-encoded, ``ros2msg`` schemas).

Topics: ``/camera/image_raw`` (sensor_msgs/msg/Image, rgb8, header stamp = sim time),
``/vehicle/action`` and ``/expert/action`` (std_msgs/msg/Float32MultiArray: steer, gas,
brake), ``/vehicle/state`` (Float32MultiArray, the fields of ``STATE_FIELDS``), ``/reward``
(std_msgs/msg/Float32), ``/intervention`` and ``/off_track`` (std_msgs/msg/Bool). The episode
metadata (world, seed, driver, policy_version) is an MCAP metadata record named ``episode``.
No ROS install is needed: mcap-ros2-support encodes and decodes from the schema text.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from mcap.reader import make_reader
from mcap.writer import CompressionType
from mcap_ros2.decoder import DecoderFactory
from mcap_ros2.writer import Writer

from stages import storage

STATE_FIELDS = ("x", "y", "heading", "vx", "vy", "speed", "yaw_rate", "on_track")
ACTION_FIELDS = ("steer", "gas", "brake")
CAMERA, ACTION, EXPERT, STATE = "/camera/image_raw", "/vehicle/action", "/expert/action", "/vehicle/state"
REWARD, INTERVENTION, OFF_TRACK = "/reward", "/intervention", "/off_track"
METADATA_NAME = "episode"
_MAGIC = b"\x89MCAP0\r\n"
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


class LogError(ValueError):
    """A log that cannot be read as an episode; ``reason`` is a short code, ``detail`` free text."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


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


def _image_layout(msg: Any) -> tuple[int, int, int, str]:
    """(height, width, row step, encoding) of an Image message, checked against its data."""
    encoding = str(msg.encoding).lower()
    if encoding not in ("rgb8", "bgr8"):
        raise LogError("bad_encoding", f"{CAMERA} encoding {msg.encoding!r}, expected rgb8 or bgr8")
    layout = (int(msg.height), int(msg.width), int(msg.step), encoding)
    if layout[2] < layout[1] * 3 or len(msg.data) != layout[0] * layout[2]:
        raise LogError("bad_message", f"{CAMERA} data size {len(msg.data)} for {layout}")
    return layout


def _array_values(msg: Any, fields: tuple[str, ...], topic: str) -> list[float]:
    values = list(msg.data)
    dims = list(msg.layout.dim)
    labels = dims[0].label.split(",") if len(dims) == 1 and dims[0].label else []
    if sorted(labels) == sorted(fields) and len(values) == len(fields):
        return [values[labels.index(f)] for f in fields]
    if len(values) != len(fields):
        raise LogError("bad_message", f"{topic} has {len(values)} values, expected {len(fields)}")
    return values


def _align(frame_t: np.ndarray, msg_t: np.ndarray, values: np.ndarray, *, topic: str,
           tolerance: int, required: bool, fill: Any) -> np.ndarray:
    """Pick, for each frame, the message stamped at or just before it (else just after).

    A message matches a frame when its stamp is within ``tolerance`` ns of the frame stamp.
    A required topic must match every frame with a distinct message and have exactly one
    message per frame; an optional topic's unmatched frames get ``fill``.
    """
    n = len(frame_t)
    out = np.empty((n,) + values.shape[1:], dtype=values.dtype)
    out[...] = fill
    if len(msg_t) == 0:
        if required:
            raise LogError("missing_topic", f"no messages on {topic}")
        return out
    order = np.argsort(msg_t, kind="stable")
    msg_t, values = msg_t[order], values[order]
    after = np.searchsorted(msg_t, frame_t, side="right")
    before = np.clip(after - 1, 0, len(msg_t) - 1)
    after = np.clip(after, 0, len(msg_t) - 1)
    d_before, d_after = np.abs(frame_t - msg_t[before]), np.abs(msg_t[after] - frame_t)
    best = np.where(d_before <= d_after, before, after)
    ok = np.minimum(d_before, d_after) <= tolerance
    if required and (not ok.all() or len(msg_t) != n or len(np.unique(best)) != n):
        raise LogError("inconsistent_lengths",
                       f"{n} frames, {len(msg_t)} messages on {topic}: {int(ok.sum())} frames "
                       f"matched within {tolerance} ns, by {len(np.unique(best[ok]))} distinct messages")
    out[ok] = values[best[ok]]
    return out


def read_episode(data: bytes, *, source_uri: str) -> dict[str, Any]:
    """Decode MCAP bytes into an episode dict (the shared contract's keys plus ``source_uri``).

    Alignment: camera frames (in file order) define the steps, stamped by their header stamp.
    Every other topic is stamped by its log time and matched to frames: a message stamped
    exactly at a frame's stamp belongs to it; otherwise the latest message at or before the
    frame, or failing that the earliest after it, within half the median frame interval.
    ``/vehicle/action`` is required: exactly one matching message per frame, or LogError.
    Optional topics fill unmatched steps: NaN for expert actions, states and rewards, False
    for the intervention and off-track flags. A missing ``episode`` metadata record reads as
    world "unknown", seed -1, driver "unknown", policy_version "".
    Raises LogError for anything that cannot be read.
    """
    if not data:
        raise LogError("empty", f"{source_uri} has no bytes")
    if not data.startswith(_MAGIC):
        raise LogError("not_mcap", f"{source_uri} does not start with the MCAP magic")
    if not data.endswith(_MAGIC):
        raise LogError("truncated", f"{source_uri} does not end with the MCAP magic")
    try:
        return _read(data, source_uri)
    except LogError:
        raise
    except Exception as exc:  # the mcap readers raise many kinds on damaged bytes
        raise LogError("corrupt", f"{source_uri}: {type(exc).__name__}: {exc}") from exc


def _read(data: bytes, source_uri: str) -> dict[str, Any]:
    reader = make_reader(io.BytesIO(data), validate_crcs=True, decoder_factories=[DecoderFactory()])
    meta: dict[str, str] = {}
    for record in reader.iter_metadata():
        if record.name == METADATA_NAME:
            meta = dict(record.metadata)
    topics: dict[str, tuple[list[int], list[Any]]] = {}
    images: list[bytes] = []
    frame_t: list[int] = []
    layouts: set[tuple[int, int, int, str]] = set()
    for _, channel, message, msg in reader.iter_decoded_messages(log_time_order=False):
        topic = channel.topic
        if topic == CAMERA:
            layouts.add(_image_layout(msg))
            images.append(msg.data)
            frame_t.append(int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec))
            continue
        if topic in (ACTION, EXPERT):
            value: Any = _array_values(msg, ACTION_FIELDS, topic)
        elif topic == STATE:
            value = _array_values(msg, STATE_FIELDS, topic)
        elif topic in (REWARD, INTERVENTION, OFF_TRACK):
            value = msg.data
        else:
            continue
        stamps, values = topics.setdefault(topic, ([], []))
        stamps.append(int(message.log_time))
        values.append(value)
    if not images:
        raise LogError("missing_topic", f"no messages on {CAMERA}")
    if len(layouts) > 1:
        raise LogError("inconsistent_shapes", f"{CAMERA} frames come in layouts {sorted(layouts)}")
    height, width, step, encoding = layouts.pop()
    n = len(images)
    frames = np.frombuffer(b"".join(images), np.uint8).reshape(n, height, step)[:, :, :width * 3]
    frames = frames.reshape(n, height, width, 3)
    frames = frames[..., ::-1].copy() if encoding == "bgr8" else frames.copy()
    t = np.asarray(frame_t, np.int64)
    gaps = np.diff(np.sort(t))
    tolerance = int(np.median(gaps[gaps > 0]) // 2) if (gaps > 0).any() else 0

    def aligned(topic: str, tail: tuple[int, ...], dtype: Any, fill: Any,
                required: bool = False) -> np.ndarray:
        stamps, values = topics.get(topic, ([], []))
        arr = np.asarray(values, dtype).reshape((len(values), *tail))
        return _align(t, np.asarray(stamps, np.int64), arr, topic=topic, tolerance=tolerance,
                      required=required, fill=fill)

    try:
        seed = int(meta.get("seed", -1))
    except ValueError as exc:
        raise LogError("bad_metadata", f"seed {meta.get('seed')!r} is not an integer") from exc
    return {
        "world": meta.get("world", "unknown"), "seed": seed,
        "driver": meta.get("driver", "unknown"), "policy_version": meta.get("policy_version", ""),
        "frames": frames,
        "actions": aligned(ACTION, (3,), np.float32, np.nan, required=True),
        "expert_actions": aligned(EXPERT, (3,), np.float32, np.nan),
        "states": aligned(STATE, (len(STATE_FIELDS),), np.float32, np.nan),
        "rewards": aligned(REWARD, (), np.float32, np.nan),
        "interventions": aligned(INTERVENTION, (), bool, False),
        "off_track": aligned(OFF_TRACK, (), bool, False),
        "timestamps_ns": t,
        "source_uri": source_uri,
    }
