"""Fast paths for ROS 2 messages in little-endian CDR: parsed straight from their bytes, one
message or a channel's messages at once, with the same result as the generic decoders of
``stages.formats.ros_messages`` (the tests check both ways agree).

``cdr_parser(role, type)`` gives the parser of a role's messages of a type where there is one:
raw images (``CdrImage``), compressed images kept compressed (``CdrCompressedImage``), std_msgs
scalars and multi-arrays (``CdrSignal``) and ``sensor_msgs/msg/JointState`` positions
(``CdrJointState``); ``cdr_batch`` runs one over a channel's messages at once when they share a
layout.
"""
from __future__ import annotations

import struct

import numpy as np

from stages.formats.ros_messages import raw_rows_to_rgb, raw_to_rgb
from stages.streams import ROLES, LogError

_CDR_HEAD = struct.Struct("<iII")   # header.stamp.sec, header.stamp.nanosec, frame_id length
_CDR_SIZE = struct.Struct("<III")   # height, width, encoding length
_CDR_STEP = struct.Struct("<II")    # step, data length
_U32 = struct.Struct("<I")
CDR_LE = b"\x00\x01"                # encapsulation kind of little-endian plain CDR


def _align(pos: int, size: int) -> int:
    return (pos + size - 1) & ~(size - 1)


def _same_bytes(rows: np.ndarray, start: int, end: int) -> bool:
    """Every row of uint8[N, L] has row 0's bytes in [start, end)."""
    return bool((rows[:, start:end] == rows[0, start:end]).all())


class CdrImage:
    """(stamp ns, RGB) of a ``sensor_msgs/msg/Image`` serialized as little-endian CDR.

    Layout after the 4-byte encapsulation header (offsets relative to its end, each uint32
    4-aligned): stamp sec int32, nanosec uint32, frame_id (uint32 length including NUL, bytes),
    height, width, encoding (string), is_bigendian uint8, step, data (uint32 length, bytes).
    A short message is ``bad_message``.
    """

    @staticmethod
    def _header(view: memoryview) -> tuple[int, int, int, int, str, int, int, int]:
        """sec, nanosec, height, width, encoding, step, data offset, data length."""
        try:
            sec, nanosec, n = _CDR_HEAD.unpack_from(view, 4)
            pos = _align(12 + n, 4)
            height, width, n = _CDR_SIZE.unpack_from(view, 4 + pos)
            encoding = bytes(view[4 + pos + 12:4 + pos + 12 + n]).rstrip(b"\0").decode("ascii")
            pos = _align(pos + 12 + n + 1, 4)
            step, size = _CDR_STEP.unpack_from(view, 4 + pos)
        except (struct.error, UnicodeDecodeError) as exc:
            raise LogError("bad_message", f"CDR image header: {exc}") from exc
        return sec, nanosec, height, width, encoding, step, 4 + pos + 8, size

    def __call__(self, data: bytes | memoryview, log_time: int) -> tuple[int, np.ndarray]:
        view = memoryview(data)
        sec, nanosec, height, width, encoding, step, start, size = self._header(view)
        pixels = view[start:start + size]
        if len(pixels) != size:
            raise LogError("bad_message", f"CDR image has {len(pixels)} of {size} data bytes")
        t = sec * 1_000_000_000 + nanosec
        return (t or int(log_time)), raw_to_rgb(height=height, width=width, step=step,
                                                encoding=encoding, data=pixels)

    def batch(self, rows: np.ndarray, log_times: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Stamps int64[N] and RGB [N,H,W,3] of N messages (uint8[N, L]) that share every byte but
        the stamp and the pixels; None when they do not."""
        _, _, height, width, encoding, step, start, size = self._header(memoryview(rows[0]))
        if start + size > rows.shape[1] or not (_same_bytes(rows, 0, 4) and _same_bytes(rows, 12, start)):
            return None
        sec = np.ascontiguousarray(rows[:, 4:8]).view("<i4")[:, 0].astype(np.int64)
        nanosec = np.ascontiguousarray(rows[:, 8:12]).view("<u4")[:, 0].astype(np.int64)
        stamps = sec * 1_000_000_000 + nanosec
        return (np.where(stamps != 0, stamps, log_times),
                raw_rows_to_rgb(height=height, width=width, step=step, encoding=encoding,
                                rows=rows[:, start:start + size]))


class CdrSignal:
    """float32[D] values (stamped by log time: these types have no header) of a std_msgs scalar
    (Float32, Float64, Bool: one ``data`` field) or *MultiArray (layout: dims of label, size,
    stride; data_offset; then data) in little-endian CDR."""

    def __init__(self, dtype: str, *, multiarray: bool) -> None:
        self.dtype, self.multiarray = np.dtype(dtype), multiarray

    def _locate(self, data: bytes | memoryview) -> tuple[int, int]:
        """Byte offset and count of the values."""
        if not self.multiarray:
            return 4, 1
        (dims,) = _U32.unpack_from(data, 4)
        pos = 4
        for _ in range(dims):
            (n,) = _U32.unpack_from(data, 4 + pos)
            pos = _align(pos + 4 + n, 4) + 8
        (count,) = _U32.unpack_from(data, 4 + pos + 4)
        return 4 + _align(pos + 8, self.dtype.itemsize), count

    def _error(self, exc: Exception) -> LogError:
        kind = "multi-array" if self.multiarray else "scalar"
        return LogError("bad_message", f"CDR {self.dtype.str} {kind}: {exc}")

    def __call__(self, data: bytes | memoryview, log_time: int) -> tuple[int, np.ndarray]:
        try:
            start, count = self._locate(data)
            return int(log_time), np.frombuffer(data, self.dtype, count, start).astype(np.float32)
        except (struct.error, ValueError) as exc:
            raise self._error(exc) from exc

    def batch(self, rows: np.ndarray, log_times: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Stamps int64[N] and values float32[N, D] of N messages (uint8[N, L]) that share every
        byte before the values; None when they do not."""
        try:
            start, count = self._locate(rows[0].tobytes())
        except struct.error as exc:
            raise self._error(exc) from exc
        end = start + count * self.dtype.itemsize
        if end > rows.shape[1] or not _same_bytes(rows, 0, start):
            return None
        values = np.ascontiguousarray(rows[:, start:end]).view(self.dtype).astype(np.float32)
        return log_times, values.reshape(len(rows), count)


class CdrJointState:
    """(header stamp ns, ``position`` float32[D]) of a ``sensor_msgs/msg/JointState`` in
    little-endian CDR: stamp sec int32, nanosec uint32, frame_id (string), name (uint32 count,
    strings, each 4-aligned), position (uint32 count, float64 8-aligned), then velocity and
    effort (not read)."""

    @staticmethod
    def _locate(data: bytes | memoryview) -> tuple[int, int]:
        """Byte offset and count of the positions."""
        (n,) = _U32.unpack_from(data, 12)
        pos = _align(12 + n, 4)
        (names,) = _U32.unpack_from(data, 4 + pos)
        pos += 4
        for _ in range(names):
            (n,) = _U32.unpack_from(data, 4 + pos)
            pos = _align(pos + 4 + n, 4)
        (count,) = _U32.unpack_from(data, 4 + pos)
        return 4 + _align(pos + 4, 8), count

    def __call__(self, data: bytes | memoryview, log_time: int) -> tuple[int, np.ndarray]:
        try:
            sec, nanosec, _ = _CDR_HEAD.unpack_from(data, 4)
            start, count = self._locate(data)
            values = np.frombuffer(data, "<f8", count, start).astype(np.float32)
        except (struct.error, ValueError) as exc:
            raise LogError("bad_message", f"CDR joint state: {exc}") from exc
        return (sec * 1_000_000_000 + nanosec) or int(log_time), values

    def batch(self, rows: np.ndarray, log_times: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Stamps int64[N] and positions float32[N, D] of N messages (uint8[N, L]) that share every
        byte but the stamp up to the positions; None when they do not."""
        try:
            start, count = self._locate(rows[0].tobytes())
        except struct.error as exc:
            raise LogError("bad_message", f"CDR joint state: {exc}") from exc
        end = start + 8 * count
        if end > rows.shape[1] or not (_same_bytes(rows, 0, 4) and _same_bytes(rows, 12, start)):
            return None
        sec = np.ascontiguousarray(rows[:, 4:8]).view("<i4")[:, 0].astype(np.int64)
        nanosec = np.ascontiguousarray(rows[:, 8:12]).view("<u4")[:, 0].astype(np.int64)
        stamps = sec * 1_000_000_000 + nanosec
        values = np.ascontiguousarray(rows[:, start:end]).view("<f8").astype(np.float32)
        return np.where(stamps != 0, stamps, log_times), values.reshape(len(rows), count)


CDR_SIGNALS: dict[str, CdrSignal | CdrJointState] = {
    "sensor_msgs/msg/JointState": CdrJointState(),
    "std_msgs/msg/Float32": CdrSignal("<f4", multiarray=False),
    "std_msgs/msg/Float64": CdrSignal("<f8", multiarray=False),
    "std_msgs/msg/Bool": CdrSignal("u1", multiarray=False),
    "std_msgs/msg/Float32MultiArray": CdrSignal("<f4", multiarray=True),
    "std_msgs/msg/Float64MultiArray": CdrSignal("<f8", multiarray=True)}


class CdrCompressedImage:
    """(stamp ns, (format, bytes)) of a ``sensor_msgs/msg/CompressedImage`` in little-endian CDR:
    the image stays compressed (curation decodes it when it reads the frame, ``stages.frames``).

    Layout after the 4-byte encapsulation header: stamp sec int32, nanosec uint32, frame_id
    (uint32 length including NUL, bytes), format (string, 4-aligned), data (uint32 length,
    bytes). A short message is ``bad_message``.
    """

    def __call__(self, data: bytes | memoryview, log_time: int) -> tuple[int, tuple[str, bytes]]:
        view = memoryview(data)
        try:
            sec, nanosec, n = _CDR_HEAD.unpack_from(view, 4)
            pos = _align(12 + n, 4)
            (n,) = _U32.unpack_from(view, 4 + pos)
            fmt = bytes(view[4 + pos + 4:4 + pos + 4 + n]).rstrip(b"\0").decode("ascii")
            pos = _align(pos + 4 + n, 4)
            (size,) = _U32.unpack_from(view, 4 + pos)
        except (struct.error, UnicodeDecodeError) as exc:
            raise LogError("bad_message", f"CDR compressed image: {exc}") from exc
        image = bytes(view[4 + pos + 4:4 + pos + 4 + size])
        if len(image) != size:
            raise LogError("bad_message", f"CDR compressed image has {len(image)} of {size} data bytes")
        return (sec * 1_000_000_000 + nanosec) or int(log_time), (fmt, image)

    def batch(self, rows: np.ndarray, log_times: np.ndarray) -> None:
        return None  # compressed images differ in length: one at a time


CdrParser = CdrImage | CdrCompressedImage | CdrSignal | CdrJointState


def cdr_parser(role: str, schema_name: str) -> CdrParser | None:
    """The fast parser for a role's messages of this ROS 2 type in little-endian CDR, if any.

    Called on one message it returns (stamp ns, payload): RGB for a raw camera (``CdrImage``),
    (format, bytes) for a compressed one (``CdrCompressedImage``), float32[D] values for signals
    (``CdrSignal``); callers check ``data[:2] == CDR_LE`` and
    decode other messages generically; both ways give the same result. ``cdr_batch`` runs it
    over all the messages of a channel at once.
    """
    if role == "camera":
        return {"sensor_msgs/msg/Image": CdrImage(),
                "sensor_msgs/msg/CompressedImage": CdrCompressedImage()}.get(schema_name)
    return CDR_SIGNALS.get(schema_name) if role in ROLES else None


def cdr_batch(parse: CdrParser, bodies: list | np.ndarray, log_times: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """``parse`` over the messages of one channel at once: (stamps int64[N], payloads [N, ...]).

    ``bodies``: each message's bytes, or all of them as uint8[N, L]. Applies when every message
    is little-endian CDR of one length and they differ only in stamp and payload bytes (a
    camera's frames of one size and encoding, fixed-width signals): then the result is the
    same as parsing message by message. Otherwise None.
    """
    if isinstance(bodies, np.ndarray):
        rows = bodies
    elif not bodies or len({len(b) for b in bodies}) != 1:
        return None
    else:
        rows = np.frombuffer(b"".join(bodies), np.uint8).reshape(len(bodies), -1)
    if not len(rows):
        return None
    if rows.shape[1] < 4 or bytes(rows[0, :2]) != CDR_LE:
        return None
    return parse.batch(rows, np.asarray(log_times, np.int64))
