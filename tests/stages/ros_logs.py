"""Write ROS logs from episode dicts with the real libraries, for the reader tests.

Formats: MCAP of ROS 2 messages (mcap_ros2), MCAP of Foxglove protobuf messages
(mcap_protobuf), rosbag2 with sqlite3 or MCAP storage and rosbag1 (rosbags' writers and
typestores: ROS 2 Humble, ROS 1 Noetic).

Topics, the fleet's (``stages.mcap_log``) for a car episode: the camera ``/camera/image_raw``
(raw image, ``encoding`` rgb8 by default) or, with ``compressed``, ``/camera/image_raw/compressed``
(PNG); ``/action`` and ``/expert/action`` (the world's actions: steer, gas, brake; the expert only
where not all NaN), ``/state`` (the world's 8 state names) and ``/signals`` (one 0/1 per signal
name of the world: off_track) as Float32MultiArray with a one-dim layout labelled by the names;
``/reward`` Float32; ``/intervention`` Bool; ``/task`` a String written once first when ``task``
is given. Protobuf logs use foxglove.RawImage / CompressedImage and this
module's ``worldloop.Vector`` (repeated float data: arrays and Float32), ``worldloop.Flag``
(bool data) and ``worldloop.Text`` (string data), each with a ``timestamp``.

Timing, the same in every format: the camera message of frame i carries the episode stamp in
its header (protobuf: ``timestamp``) and is logged ``camera_delay_ns`` later; the action is
written for every ``action_every``-th frame, logged at the frame stamp + ``action_offset_ns``;
the other signals at each frame stamp. ROS signal messages have no header, so readers stamp
them by log time; protobuf ones carry the same stamp in ``timestamp``.

Episode metadata (world, seed, task, driver, policy_version): an MCAP metadata record
``episode``, a rosbag2's ``custom_data``; a rosbag1 has nowhere to keep it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, fields, is_dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage
from foxglove_schemas_protobuf.RawImage_pb2 import RawImage
from google.protobuf import descriptor_pb2, descriptor_pool, timestamp_pb2
from google.protobuf.message_factory import GetMessageClass
from mcap.data_stream import RecordBuilder
from mcap.records import DataEnd, Footer, MessageIndex
from mcap.stream_reader import StreamReader
from mcap_protobuf.writer import Writer as ProtobufWriter
from mcap_ros2.writer import Writer as Ros2Writer
from PIL import Image
from rosbags.rosbag1 import Writer as Rosbag1Writer
from rosbags.rosbag2 import StoragePlugin
from rosbags.rosbag2 import Writer as Rosbag2Writer
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.store import Typestore

from sim import worlds
from stages.mcap_log import ACTION, CAMERA, EXPERT, INTERVENTION, REWARD, SIGNALS, STATE, TASK

SPEC = worlds.spec("carracing")
ACTION_FIELDS, STATE_FIELDS, SIGNAL_FIELDS = SPEC.action_names, SPEC.state_names, SPEC.signals
CAMERA_COMPRESSED = CAMERA + "/compressed"
MAGIC = b"\x89MCAP0\r\n"
ROS2_TYPES, ROS1_TYPES = get_typestore(Stores.ROS2_HUMBLE), get_typestore(Stores.ROS1_NOETIC)
_RAW_CHANNELS = {"rgb8": [0, 1, 2], "bgr8": [2, 1, 0], "rgba8": [0, 1, 2, 3],
                 "bgra8": [2, 1, 0, 3], "mono8": [0]}


def _protobuf_classes() -> dict[str, Any]:
    """worldloop.Vector, Flag and Text: tiny stamped messages built from a descriptor."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="worldloop/signals.proto", package="worldloop", syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"])
    F = descriptor_pb2.FieldDescriptorProto
    for name, kind, label in (("Vector", F.TYPE_FLOAT, F.LABEL_REPEATED),
                              ("Flag", F.TYPE_BOOL, F.LABEL_OPTIONAL),
                              ("Text", F.TYPE_STRING, F.LABEL_OPTIONAL)):
        message = proto.message_type.add(name=name)
        message.field.add(name="timestamp", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                          type_name=".google.protobuf.Timestamp")
        message.field.add(name="data", number=2, type=kind, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(
        timestamp_pb2.DESCRIPTOR.serialized_pb))
    pool.Add(proto)
    return {name: GetMessageClass(pool.FindMessageTypeByName(f"worldloop.{name}"))
            for name in ("Vector", "Flag", "Text")}


PROTOBUF = _protobuf_classes()


@dataclass(frozen=True)
class Entry:
    """One message to write. ``kind`` and ``value``: image (frame shape, encoding, data, step),
    png (PNG bytes), vector (field labels, values), float, bool or text (the value itself)."""

    topic: str
    kind: str
    stamp: int
    log_time: int
    value: Any


def raw_pixels(frame: np.ndarray, encoding: str, row_padding: int = 0) -> tuple[bytes, int]:
    """(data, step) of an RGB frame as a raw image; alpha 255, mono8 = the R channel.

    An encoding not in ``_RAW_CHANNELS`` keeps the RGB bytes under that label (for tests of
    unreadable encodings). Each row is followed by ``row_padding`` zero bytes.
    """
    rgba = np.concatenate([frame, np.full(frame.shape[:2] + (1,), 255, np.uint8)], axis=2)
    pixels = rgba[..., _RAW_CHANNELS.get(encoding, [0, 1, 2])].reshape(frame.shape[0], -1)
    rows = np.pad(pixels, ((0, 0), (0, row_padding)))
    return rows.tobytes(), rows.shape[1]


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def plan(ep: dict, *, compressed: bool = False, encoding: str = "rgb8", row_padding: int = 0,
         action_every: int = 1, action_offset_ns: int = 0, camera_delay_ns: int = 0,
         task: str = "") -> list[Entry]:
    """The messages of an episode in write order (per frame: camera, then signals)."""
    stamps = np.asarray(ep["timestamps_ns"], np.int64)
    expert = np.asarray(ep["expert_actions"], np.float32)
    entries = [Entry(TASK, "text", int(stamps[0]), int(stamps[0]), task)] if task else []
    for i, t in enumerate(int(s) for s in stamps):
        frame = ep["frames"][i]
        entries.append(Entry(CAMERA_COMPRESSED, "png", t, t + camera_delay_ns, _png(frame))
                       if compressed else
                       Entry(CAMERA, "image", t, t + camera_delay_ns,
                             (frame.shape, encoding, *raw_pixels(frame, encoding, row_padding))))
        if i % action_every == 0:
            entries.append(Entry(ACTION, "vector", t + action_offset_ns, t + action_offset_ns,
                                 (ACTION_FIELDS, ep["actions"][i])))
        if not np.isnan(expert[i]).all():
            entries.append(Entry(EXPERT, "vector", t, t, (ACTION_FIELDS, expert[i])))
        entries += [Entry(STATE, "vector", t, t, (STATE_FIELDS, ep["states"][i])),
                    Entry(REWARD, "float", t, t, float(ep["rewards"][i])),
                    Entry(INTERVENTION, "bool", t, t, bool(ep["interventions"][i])),
                    Entry(SIGNALS, "vector", t, t,
                          (SIGNAL_FIELDS, [float(ep["signals"][k][i]) for k in SIGNAL_FIELDS]))]
    return entries


def episode_metadata(ep: dict) -> dict[str, str]:
    return {"world": str(ep["world"]), "seed": str(int(ep["seed"])), "task": str(ep.get("task", "")),
            "driver": str(ep.get("driver", "")),
            "policy_version": str(ep.get("policy_version", ""))}


def ros_message(types: Typestore, entry: Entry) -> tuple[str, Any]:
    """(ROS type name, message object of ``types``) for an entry."""
    T = types.types
    sec, nanosec = divmod(entry.stamp, 1_000_000_000)
    header_fields = {"stamp": T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                     "frame_id": "camera"}
    if "seq" in T["std_msgs/msg/Header"].__dataclass_fields__:  # ROS 1
        header_fields["seq"] = 0
    header = T["std_msgs/msg/Header"](**header_fields)
    if entry.kind == "image":
        (height, width, _), encoding, data, step = entry.value
        return "sensor_msgs/msg/Image", T["sensor_msgs/msg/Image"](
            header=header, height=height, width=width, encoding=encoding, is_bigendian=0,
            step=step, data=np.frombuffer(data, np.uint8))
    if entry.kind == "png":
        return "sensor_msgs/msg/CompressedImage", T["sensor_msgs/msg/CompressedImage"](
            header=header, format="png", data=np.frombuffer(entry.value, np.uint8))
    if entry.kind == "vector":
        labels, values = entry.value
        dim = T["std_msgs/msg/MultiArrayDimension"](label=",".join(labels), size=len(labels),
                                                    stride=len(labels))
        return "std_msgs/msg/Float32MultiArray", T["std_msgs/msg/Float32MultiArray"](
            layout=T["std_msgs/msg/MultiArrayLayout"](dim=[dim], data_offset=0),
            data=np.asarray(values, np.float32))
    name = {"float": "std_msgs/msg/Float32", "bool": "std_msgs/msg/Bool",
            "text": "std_msgs/msg/String"}[entry.kind]
    return name, T[name](data=entry.value)


def protobuf_message(entry: Entry) -> Any:
    """The Foxglove / worldloop protobuf message for an entry, ``timestamp`` = its stamp."""
    if entry.kind == "image":
        (height, width, _), encoding, data, step = entry.value
        msg = RawImage(frame_id="camera", width=width, height=height, encoding=encoding,
                       step=step, data=data)
    elif entry.kind == "png":
        msg = CompressedImage(frame_id="camera", format="png", data=entry.value)
    elif entry.kind in ("vector", "float"):
        values = entry.value[1] if entry.kind == "vector" else [entry.value]
        msg = PROTOBUF["Vector"](data=[float(v) for v in values])
    else:
        msg = PROTOBUF["Flag" if entry.kind == "bool" else "Text"](data=entry.value)
    msg.timestamp.FromNanoseconds(entry.stamp)
    return msg


def _plain(value: Any) -> Any:
    """A rosbags message as the dicts, lists and bytes mcap_ros2's encoder takes."""
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)
                if f.name != "__msgtype__"}
    if isinstance(value, np.ndarray):
        return value.tobytes() if value.dtype == np.uint8 else value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def write_mcap_ros2(ep: dict, path: str | Path, **options: Any) -> Path:
    """An MCAP of ROS 2 messages (CDR, ``ros2msg`` schemas); ``options`` go to ``plan``."""
    with open(path, "wb") as f:
        writer = Ros2Writer(f)
        writer.add_metadata("episode", episode_metadata(ep))
        schemas: dict[str, Any] = {}
        for entry in plan(ep, **options):
            name, msg = ros_message(ROS2_TYPES, entry)
            if name not in schemas:
                schemas[name] = writer.register_msgdef(
                    name, ROS2_TYPES.generate_msgdef(name, ros_version=2)[0])
            writer.write_message(entry.topic, schemas[name], _plain(msg), log_time=entry.log_time,
                                 publish_time=entry.log_time)
        writer.finish()
    return Path(path)


def write_mcap_protobuf(ep: dict, path: str | Path, **options: Any) -> Path:
    """An MCAP of Foxglove / worldloop protobuf messages; ``options`` go to ``plan``."""
    with open(path, "wb") as f, ProtobufWriter(f) as writer:
        writer.add_metadata("episode", episode_metadata(ep))
        for entry in plan(ep, **options):
            writer.write_message(entry.topic, protobuf_message(entry), log_time=entry.log_time,
                                 publish_time=entry.log_time)
    return Path(path)


def write_rosbag2(ep: dict, directory: str | Path, *, storage: str = "sqlite3",
                  **options: Any) -> Path:
    """A rosbag2 directory (version 9, ``storage`` sqlite3 or mcap, episode metadata in
    ``custom_data``); ``options`` go to ``plan``."""
    plugin = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}[storage]
    with Rosbag2Writer(directory, version=9, storage_plugin=plugin) as writer:
        for key, value in episode_metadata(ep).items():
            writer.set_custom_data(key, value)
        connections: dict[str, Any] = {}
        for entry in plan(ep, **options):
            name, msg = ros_message(ROS2_TYPES, entry)
            if entry.topic not in connections:
                connections[entry.topic] = writer.add_connection(entry.topic, name,
                                                                 typestore=ROS2_TYPES)
            writer.write(connections[entry.topic], entry.log_time,
                         ROS2_TYPES.serialize_cdr(msg, name))
    return Path(directory)


def write_rosbag1(ep: dict, path: str | Path, **options: Any) -> Path:
    """A rosbag1 (v2.0) ``.bag`` file of ROS 1 Noetic messages; ``options`` go to ``plan``."""
    with Rosbag1Writer(path) as writer:
        connections: dict[str, Any] = {}
        for entry in plan(ep, **options):
            name, msg = ros_message(ROS1_TYPES, entry)
            if entry.topic not in connections:
                connections[entry.topic] = writer.add_connection(entry.topic, name,
                                                                 typestore=ROS1_TYPES)
            writer.write(connections[entry.topic], entry.log_time,
                         ROS1_TYPES.serialize_ros1(msg, name))
    return Path(path)


def strip_summary(data: bytes, indexes: Callable[[list[MessageIndex]], list[MessageIndex | None]] = list) -> bytes:
    """The same MCAP without its summary section: data records, then a footer pointing nowhere.
    ``indexes`` may edit the data section's message index records: it gets them all and returns
    what to write in their places (None: nothing)."""
    records = list(StreamReader(io.BytesIO(data), emit_chunks=True).records)
    edited = iter(indexes([r for r in records if isinstance(r, MessageIndex)]))
    builder = RecordBuilder()
    for record in records:
        if isinstance(record, MessageIndex):
            record = next(edited, None)
        if record is not None:
            record.write(builder)
        if isinstance(record, DataEnd):
            break
    Footer(summary_start=0, summary_offset_start=0, summary_crc=0).write(builder)
    return MAGIC + builder.end() + MAGIC
