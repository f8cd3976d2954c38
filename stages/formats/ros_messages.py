"""Decoded ROS 1 / ROS 2 / Foxglove protobuf messages to frames, stamps, signal values and text.

Shared by the MCAP and rosbag readers. Everything works on decoded message objects through
attribute access, whichever library decoded them (mcap_ros2's dynamic classes, rosbags'
dataclasses, protobuf messages), plus ``cdr_parser``, fast paths that parse little-endian CDR
images and std_msgs signals straight from their bytes, one message or a channel's messages at
once, live in ``stages.formats.cdr``; ``stages.formats.collect`` picks the topics and gathers
their messages.

Rules:

* Raw images (``sensor_msgs/msg/Image``, ``foxglove.RawImage``): encodings ``rgb8``, ``bgr8``,
  ``rgba8``, ``bgra8`` (alpha dropped) and ``mono8`` (grey repeated into R, G, B); any other
  encoding is ``bad_encoding``. Rows are ``step`` bytes apart (padding past ``width`` pixels
  is skipped); height or width 0, ``step`` shorter than a row, or fewer than ``height*step``
  data bytes is ``bad_message``.
* Compressed images (``sensor_msgs/msg/CompressedImage``, ``foxglove.CompressedImage``): the
  ``format`` must contain ``jpeg``, ``jpg`` or ``png`` and not ``compressedDepth``
  (else ``bad_encoding``); Pillow decodes, 8-bit grey/palette/RGB(A)/CMYK/YCbCr images become
  RGB, other modes (16-bit, float) are ``bad_encoding``, undecodable bytes ``bad_message``. A
  header declaring more than ``MAX_PIXELS`` pixels is ``too_large``, checked before decoding
  (a decompression bomb never expands).
* Stamps: ``header.stamp`` (``sec * 1e9 + nanosec``) where the message has a header, else a
  protobuf ``timestamp`` (``seconds * 1e9 + nanos``); a missing or zero stamp falls back to
  the message's log time.
* Signal values (float32[D]), by the first rule that fits: a protobuf message gives its repeated
  numeric field named ``data`` or ``values``, else all its non-repeated numeric (and bool)
  fields in declaration order, else every numeric leaf of its nested messages depth first
  (stamps left out; a ``google.protobuf.Struct`` by sorted key, its lists in order);
  ``*MultiArray`` gives ``data`` as is; ``nav_msgs/Odometry`` gives [pose.position.x, y, z, twist.linear.x, twist.linear.y, twist.angular.z];
  ``TwistStamped`` and ``Twist`` give [linear.x, y, z, angular.x, y, z];
  ``sensor_msgs/JointState`` gives ``position``; ``trajectory_msgs/JointTrajectory`` its first
  point's ``positions``; ``sensor_msgs/Joy`` ``axes`` then ``buttons``; ``geometry_msgs/Pose``
  and ``PoseStamped`` [position.x, y, z, orientation.x, y, z, w]; a numeric or bool ``data``
  field (std_msgs Float32/64, Bool, Int*, UInt*) gives [data]. Anything else is ``bad_message``.
* Scalar roles (reward, intervention) need one value per message and give
  float32[M]; vector roles give float32[M,D] and need the same D in every message.
* Task text: the ``data`` string of the first message on the task topic.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from PIL import Image

from stages.streams import ROLES, LogError

TOPIC_ROLES = ("camera", *ROLES, "task")
SCALAR_ROLES = frozenset({"reward", "intervention"})
# encoding -> (bytes per pixel, channel indices giving R, G, B)
RAW_ENCODINGS = {"rgb8": (3, (0, 1, 2)), "bgr8": (3, (2, 1, 0)), "rgba8": (4, (0, 1, 2)),
                 "bgra8": (4, (2, 1, 0)), "mono8": (1, (0, 0, 0))}
_PIL_COLOUR_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})
MAX_PIXELS = 50_000_000  # a compressed frame declaring more pixels is too_large (an 8K frame is 33 million)
_PB_NUMERIC = frozenset({FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64,
                         FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64,
                         FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT,
                         FieldDescriptor.CPPTYPE_BOOL})


def type_name(msg: Any) -> str:
    """The message type for error texts: ROS name (rosbags), protobuf full name, or class name."""
    descriptor = getattr(msg, "DESCRIPTOR", None)
    return (getattr(msg, "__msgtype__", None) or getattr(descriptor, "full_name", None)
            or type(msg).__name__)


def raw_to_rgb(*, height: int, width: int, step: int, encoding: str, data: Any) -> np.ndarray:
    """uint8[height,width,3] RGB (often a view of ``data``) from raw image bytes; rules above."""
    buf = (np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview))
           else np.asarray(data, np.uint8).reshape(-1))
    return raw_rows_to_rgb(height=height, width=width, step=step, encoding=encoding, rows=buf[None])[0]


def raw_rows_to_rgb(*, height: int, width: int, step: int, encoding: str, rows: np.ndarray) -> np.ndarray:
    """uint8[N,height,width,3] RGB from uint8[N, bytes]: N raw images of one size and encoding."""
    spec = RAW_ENCODINGS.get(str(encoding).lower())
    if spec is None:
        raise LogError("bad_encoding", f"image encoding {encoding!r}; readable: "
                                       f"{', '.join(RAW_ENCODINGS)}")
    channels, order = spec
    if height <= 0 or width <= 0 or step < width * channels or rows.shape[1] < height * step:
        raise LogError("bad_message", f"{encoding} image {height}x{width}, step {step}, "
                                      f"{rows.shape[1]} data bytes")
    pixels = rows[:, :height * step].reshape(len(rows), height, step)[:, :, :width * channels]
    pixels = pixels.reshape(len(rows), height, width, channels)
    if channels == 1:
        return np.repeat(pixels, 3, axis=3)
    return pixels[..., list(order)] if order != (0, 1, 2) else pixels[..., :3]


def compressed_size(fmt: str, data: Any) -> tuple[int, int]:
    """(height, width) of a JPEG or PNG image from its header, checked by the rules above
    (format, mode, pixel count) without decoding it."""
    _check_format(fmt)
    with _pillow(fmt, data) as image:  # reads the header only
        return image.size[1], image.size[0]


def compressed_to_rgb(fmt: str, data: Any, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8[H,W,3] RGB of a JPEG or PNG image; rules above. With ``size`` (H, W) smaller than
    the image, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) not below it (libjpeg's
    draft mode), then shrunk to it with Pillow's BOX filter: about 2.5x quicker than decoding it
    whole first, as Pillow's ``thumbnail`` does."""
    _check_format(fmt)
    with _pillow(fmt, data) as image:
        if size is None or (size[1], size[0]) == image.size:
            return np.asarray(image.convert("RGB"))
        height, width = size
        if image.format == "JPEG" and width <= image.size[0] and height <= image.size[1]:
            image.draft("RGB", (width, height))
        image = image.convert("RGB")
        if image.size != (width, height):
            shrink = width <= image.size[0] and height <= image.size[1]
            image = image.resize((width, height), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
        return np.asarray(image)


def _check_format(fmt: str) -> None:
    lowered = str(fmt).lower()
    if "compresseddepth" in lowered or not any(k in lowered for k in ("jpeg", "jpg", "png")):
        raise LogError("bad_encoding", f"compressed image format {fmt!r}; readable: jpeg, png")


class _pillow:
    """``Image.open`` of image bytes whose size and mode were checked, Pillow's errors as
    ``LogError`` (``too_large`` for a decompression bomb, ``bad_message`` for damaged bytes)."""

    def __init__(self, fmt: str, data: Any) -> None:
        self.fmt, self.data = fmt, data

    def __enter__(self):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self.image = Image.open(io.BytesIO(bytes(self.data)))
                width, height = self.image.size
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise LogError("too_large", f"{self.fmt} image: {exc}") from exc
        except Exception as exc:  # Pillow raises many kinds on damaged bytes
            raise LogError("bad_message", f"{self.fmt} image does not decode: {exc}") from exc
        if width * height > MAX_PIXELS:
            raise LogError("too_large", f"{self.fmt} image of {width}x{height} pixels, over {MAX_PIXELS}")
        if self.image.mode not in _PIL_COLOUR_MODES:
            raise LogError("bad_encoding", f"{self.fmt} image of mode {self.image.mode}")
        return self.image

    def __exit__(self, kind, exc, tb) -> bool:
        self.image.close()
        if exc is not None and not isinstance(exc, LogError):
            raise LogError("bad_message", f"{self.fmt} image does not decode: {exc}") from exc
        return False


def image_to_rgb(msg: Any) -> np.ndarray:
    """RGB of a raw (has ``encoding``) or compressed (has ``format``) image message."""
    if hasattr(msg, "encoding"):
        return raw_to_rgb(height=int(msg.height), width=int(msg.width), step=int(msg.step),
                          encoding=str(msg.encoding), data=msg.data)
    if hasattr(msg, "format"):
        return compressed_to_rgb(str(msg.format), msg.data)
    raise LogError("bad_message", f"a {type_name(msg)} on the camera topic is not an image")


def stamp_ns(msg: Any, log_time: int) -> int:
    """The message's own stamp (header, else protobuf timestamp) in ns; ``log_time`` if zero."""
    stamp = getattr(getattr(msg, "header", None), "stamp", None)
    if stamp is not None:
        t = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
    else:
        ts = getattr(msg, "timestamp", None)
        t = (int(ts.seconds) * 1_000_000_000 + int(ts.nanos)) if hasattr(ts, "seconds") else 0
    return t or int(log_time)


def _floats(values: Any) -> np.ndarray:
    if isinstance(values, (bytes, bytearray, memoryview)):
        return np.frombuffer(values, np.uint8).astype(np.float32)
    return np.asarray(list(values) if not isinstance(values, np.ndarray) else values,
                      np.float32).reshape(-1)


_PB_STAMPS = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration"})
_PB_JSON = frozenset({"google.protobuf.Struct", "google.protobuf.ListValue", "google.protobuf.Value"})


def _protobuf_fields(msg: Any) -> list[tuple[str, float]]:
    """(name, value) of the values ``signal_values`` takes from a protobuf message; a repeated
    ``data`` / ``values`` field's values are named by index."""
    fields = msg.DESCRIPTOR.fields
    if msg.DESCRIPTOR.full_name not in _PB_JSON:
        for f in fields:
            if f.name in ("data", "values") and f.is_repeated and f.cpp_type in _PB_NUMERIC:
                return [(f"{f.name}.{i}", v) for i, v in enumerate(_floats(getattr(msg, f.name)).tolist())]
        scalars = [(f.name, float(getattr(msg, f.name))) for f in fields
                   if not f.is_repeated and f.cpp_type in _PB_NUMERIC]
        if scalars:
            return scalars
    leaves = _protobuf_leaves(msg, "")
    if not leaves:
        raise LogError("bad_message", f"{type_name(msg)} has no numeric fields")
    return leaves


def _protobuf_leaves(msg: Any, path: str) -> list[tuple[str, float]]:
    """Every numeric (and bool) leaf of a protobuf message with its dotted path, depth first in
    declaration order, stamps left out; a ``google.protobuf.Struct`` by sorted key, a
    ``ListValue`` in order (its items named by index)."""
    def under(name: str) -> str:
        return f"{path}.{name}" if path else name
    kind = msg.DESCRIPTOR.full_name
    if kind == "google.protobuf.Struct":
        return [x for key in sorted(msg.fields) for x in _protobuf_leaves(msg.fields[key], under(key))]
    if kind == "google.protobuf.ListValue":
        return [x for i, item in enumerate(msg.values) for x in _protobuf_leaves(item, under(str(i)))]
    if kind == "google.protobuf.Value":
        which = msg.WhichOneof("kind")
        if which in ("number_value", "bool_value"):
            return [(path, float(getattr(msg, which)))]
        return _protobuf_leaves(getattr(msg, which), path) if which in ("list_value", "struct_value") else []
    out: list[tuple[str, float]] = []
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.cpp_type in _PB_NUMERIC:
            out += [(under(f"{f.name}.{i}"), float(v)) for i, v in enumerate(value)] if f.is_repeated \
                else [(under(f.name), float(value))]
        elif f.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE and f.message_type.full_name not in _PB_STAMPS \
                and not f.message_type.GetOptions().map_entry:
            items = list(value) if f.is_repeated else [value] if msg.HasField(f.name) else []
            for i, item in enumerate(items):
                out += _protobuf_leaves(item, under(f"{f.name}.{i}" if f.is_repeated else f.name))
    return out


def _twist(twist: Any) -> list[float]:
    return [twist.linear.x, twist.linear.y, twist.linear.z,
            twist.angular.x, twist.angular.y, twist.angular.z]


def signal_values(msg: Any) -> np.ndarray:
    """float32[D] values of a signal message by the first fitting rule above."""
    if hasattr(msg, "DESCRIPTOR"):
        return np.asarray([v for _, v in _protobuf_fields(msg)], np.float32)
    if hasattr(msg, "layout") and hasattr(msg, "data"):
        return _floats(msg.data)
    if hasattr(msg, "pose") and hasattr(msg, "twist"):
        position, twist = msg.pose.pose.position, msg.twist.twist
        return np.asarray([position.x, position.y, position.z, twist.linear.x, twist.linear.y,
                           twist.angular.z], np.float32)  # named ODOMETRY_NAMES
    if hasattr(msg, "twist"):
        return np.asarray(_twist(msg.twist), np.float32)
    if hasattr(msg, "linear") and hasattr(msg, "angular"):
        return np.asarray(_twist(msg), np.float32)
    if hasattr(msg, "position") and hasattr(msg, "name"):
        return _floats(msg.position)
    if hasattr(msg, "joint_names") and hasattr(msg, "points"):  # a trajectory: its first point
        if not len(msg.points):
            raise LogError("bad_message", f"a {type_name(msg)} without points")
        return _floats(msg.points[0].positions)
    if hasattr(msg, "axes") and hasattr(msg, "buttons"):
        return np.concatenate([_floats(msg.axes), _floats(msg.buttons)])
    pose = msg.pose if hasattr(msg, "pose") and hasattr(msg.pose, "orientation") else msg
    if hasattr(pose, "position") and hasattr(pose, "orientation"):
        p, q = pose.position, pose.orientation
        return np.asarray([p.x, p.y, p.z, q.x, q.y, q.z, q.w], np.float32)  # named POSE_NAMES
    data = getattr(msg, "data", None)
    if isinstance(data, (bool, int, float, np.number, np.bool_)):
        return np.asarray([data], np.float32)
    raise LogError("bad_message", f"no signal values in a {type_name(msg)}")


TWIST_NAMES = ("linear.x", "linear.y", "linear.z", "angular.x", "angular.y", "angular.z")
ODOMETRY_NAMES = ("position.x", "position.y", "position.z", "linear.x", "linear.y", "angular.z")
POSE_NAMES = ("position.x", "position.y", "position.z", "orientation.x", "orientation.y", "orientation.z",
         "orientation.w")


def signal_names(msg: Any) -> tuple[str, ...] | None:
    """The names of ``signal_values(msg)``, where the message gives them: a protobuf message's
    field paths, a multi-array's one dimension label holding one comma-separated name per value,
    Odometry's and Twist's fields, JointState's ``name``; else None."""
    if hasattr(msg, "DESCRIPTOR"):
        return tuple(name for name, _ in _protobuf_fields(msg))
    if hasattr(msg, "layout") and hasattr(msg, "data"):
        dims = list(msg.layout.dim)
        labels = dims[0].label.split(",") if len(dims) == 1 else []
        return tuple(labels) if len(labels) == len(msg.data) and all(labels) else None
    if hasattr(msg, "pose") and hasattr(msg, "twist"):
        return ODOMETRY_NAMES
    if hasattr(msg, "twist") or (hasattr(msg, "linear") and hasattr(msg, "angular")):
        return TWIST_NAMES
    if hasattr(msg, "position") and hasattr(msg, "name"):
        names = tuple(str(n) for n in msg.name)
        return names if len(names) == len(msg.position) and all(names) else None
    if hasattr(msg, "joint_names") and hasattr(msg, "points"):
        names = tuple(str(n) for n in msg.joint_names)
        return names if len(msg.points) and len(names) == len(msg.points[0].positions) and all(names) else None
    if hasattr(msg, "axes") and hasattr(msg, "buttons"):
        return tuple(f"axes.{i}" for i in range(len(msg.axes))) + tuple(f"buttons.{i}" for i in range(len(msg.buttons)))
    pose = msg.pose if hasattr(msg, "pose") and hasattr(msg.pose, "orientation") else msg
    if hasattr(pose, "position") and hasattr(pose, "orientation"):
        return POSE_NAMES
    return None


def task_text(msg: Any) -> str:
    """The ``data`` string of a task message (std_msgs/String or a protobuf ``data`` string)."""
    data = getattr(msg, "data", None)
    if not isinstance(data, str):
        raise LogError("bad_message", f"a {type_name(msg)} on the task topic has no text data")
    return data


IMAGE_TYPES = frozenset({"sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage", "sensor_msgs/Image",
                         "sensor_msgs/CompressedImage", "foxglove.RawImage", "foxglove.CompressedImage"})


def is_image_type(msgtype: str) -> bool:
    """A ROS 1 / ROS 2 ``sensor_msgs`` image or a Foxglove image, by its type (schema) name."""
    return msgtype.replace("::", "/") in IMAGE_TYPES
