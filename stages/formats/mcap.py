"""Reader for MCAP logs of ROS 2 (CDR) or Foxglove protobuf messages: one ``Streams`` per file.

Rules:

* Bytes: none is ``empty``; not starting with the MCAP magic is ``not_mcap``; not ending with
  it (a recording cut short) is ``truncated``; any other failure of the mcap library (bad chunk
  CRC, broken records) is ``corrupt``; a message its decoder rejects is ``bad_message``.
* One linear pass over the data section (the summary is not read; every chunk is opened and
  its CRC checked; a chunk's messages are found through the message index records after it
  when those index them all, else by walking its records) collects schemas, channels, the
  metadata record named ``episode`` and the messages, in file order. The ``Mapping`` then
  picks among the topics with messages (``collect.pick_topics``: no camera topic is
  ``missing_topic``) and only their messages are decoded. Messages stay offsets into the
  decompressed chunks until decoded: memory is about the decompressed size.
* Each channel is decoded by the decoder for its message encoding: mcap_ros2 for ``cdr`` with
  a ``ros2msg``/``ros2idl`` schema, mcap_protobuf for ``protobuf``; a channel neither decodes is
  ``unsupported``. Little-endian CDR messages of the types ``cdr.cdr_parser`` knows
  (camera ``sensor_msgs/msg/Image`` and ``CompressedImage``; std_msgs Float32/64, Bool,
  Float32/64MultiArray and ``sensor_msgs/msg/JointState`` signals)
  are parsed straight from their bytes instead, a channel's messages at once where they share
  one length and layout (``cdr.cdr_batch``): same result, many times quicker. Frames,
  stamps, signal values and task text follow the rules of ``stages.formats.ros_messages``.
* ``meta``: ``format`` is ``mcap-ros2`` or ``mcap-protobuf`` by the camera channel's message
  encoding (another encoding is ``unsupported``); the entries of the metadata record named
  ``episode`` (world, seed, driver, policy_version, ...) are copied as they are; ``topic.<role>``
  names each topic used.
"""
from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lz4.frame
import numpy as np
import zstandard
from mcap.data_stream import ReadDataStream
from mcap.opcode import Opcode
from mcap.records import Channel, Metadata, Schema
from mcap_protobuf.decoder import DecoderFactory as ProtobufDecoderFactory
from mcap_ros2.decoder import DecoderFactory as Ros2DecoderFactory

from stages.formats.cdr import CDR_LE, cdr_batch, cdr_parser
from stages.formats.collect import Collector, pick_topics
from stages.streams import LogError, Mapping, Streams

MAGIC = b"\x89MCAP0\r\n"
EPISODE_METADATA = "episode"
FORMATS = {"cdr": "mcap-ros2", "protobuf": "mcap-protobuf"}
_RECORD = struct.Struct("<BQ")      # opcode, content length
_RECORD_MESSAGE = struct.Struct("<BQHIQQ")  # a message record: opcode, length, channel id,
# sequence, log time, publish time; then data
MAX_CHUNK_BYTES = 1 << 30  # a chunk declaring more decompressed bytes is too_large (writers use a few MB)
_CHUNK_HEADER = struct.Struct("<QQQII")  # a chunk: start, end time, uncompressed size, CRC, name length
_INDEX_HEADER = struct.Struct("<HI")  # a message index record: channel id, bytes of entries
_MESSAGE_DTYPE = np.dtype([("opcode", "u1"), ("length", "<u8"), ("channel", "<u2"), ("sequence", "<u4"),
                           ("log_time", "<u8"), ("publish_time", "<u8")])  # _RECORD_MESSAGE as NumPy
_PARSED = {Opcode.CHANNEL: Channel, Opcode.SCHEMA: Schema,
           Opcode.METADATA: Metadata}


def check_bytes(data: bytes, uri: str) -> None:
    """Raise ``empty``, ``not_mcap`` or ``truncated`` for bytes that cannot be a whole MCAP."""
    if not data:
        raise LogError("empty", f"{uri} has no bytes")
    if not data.startswith(MAGIC):
        raise LogError("not_mcap", f"{uri} does not start with the MCAP magic")
    if len(data) < 2 * len(MAGIC) or not data.endswith(MAGIC):
        raise LogError("truncated", f"{uri} does not end with the MCAP magic")


def check_chunks(data: bytes, uri: str) -> None:
    """``check_bytes``, then every chunk opened with the limits ``_chunk_records`` keeps
    (declared sizes, bounded decompression, CRC): for MCAP files another library will read
    (rosbag2's MCAP storage), so no compression bomb reaches it."""
    check_bytes(data, uri)
    try:
        _Contents().walk(memoryview(data)[len(MAGIC):-len(MAGIC)])
    except LogError:
        raise
    except Exception as exc:  # the same failures read_bytes reports as corrupt
        raise LogError("corrupt", f"{uri}: {type(exc).__name__}: {exc}") from exc


def read(unit: dict, *, mapping: Mapping, fetch: Callable[[str], bytes]) -> list[Streams]:
    """One ``Streams`` per camera of each file of the unit (an MCAP unit has one file); rules in
    the module text."""
    return [s for f in unit["files"] for s in read_bytes(fetch(f["uri"]), source_uri=f["uri"], mapping=mapping)]


def read_bytes(data: bytes, *, source_uri: str, mapping: Mapping) -> list[Streams]:
    """Decode one MCAP file's bytes, a ``Streams`` per camera; raises ``LogError`` for anything
    unreadable."""
    check_bytes(data, source_uri)
    try:
        return _read(data, source_uri, mapping)
    except LogError:
        raise
    except Exception as exc:  # the mcap readers raise many kinds on damaged bytes
        raise LogError("corrupt", f"{source_uri}: {type(exc).__name__}: {exc}") from exc


@dataclass
class _Messages:
    """One channel's messages in file order: their log times, and where their bytes are, as runs
    of (uint8 buffer, start offsets, end offsets): no Python object per message until asked."""

    times: list[int] = field(default_factory=list)
    runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def bodies(self) -> list[memoryview]:
        """Each message's bytes."""
        return [memoryview(buf)[s:e] for buf, starts, ends in self.runs
                for s, e in zip(starts.tolist(), ends.tolist())]

    def first(self) -> memoryview:
        """The first message's bytes."""
        buf, starts, ends = self.runs[0]
        return memoryview(buf)[int(starts[0]):int(ends[0])]

    def rows(self) -> np.ndarray | None:
        """uint8[N, L] of the messages when all have one length L, else None. An evenly spaced
        run (a camera's frames between fixed-size signals) is read as a strided view."""
        lengths = {int(n) for _, starts, ends in self.runs for n in np.unique(ends - starts)}
        if len(lengths) != 1:
            return None
        width, parts = lengths.pop(), []
        for buf, starts, _ in self.runs:
            step = np.diff(starts)
            if len(starts) > 1 and (step == step[0]).all():
                parts.append(np.lib.stride_tricks.as_strided(buf[starts[0]:], (len(starts), width),
                                                             (int(step[0]), 1), writeable=False))
            else:
                parts.append(np.stack([buf[s:s + width] for s in starts.tolist()]))
        return np.concatenate(parts)


@dataclass
class _Contents:
    """What one pass over an MCAP's data section found; messages by channel id, in file order."""

    schemas: dict[int, Schema] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    messages: dict[int, _Messages] = field(default_factory=dict)  # by channel id

    def walk(self, body: memoryview) -> bool:
        """Read the records in ``body`` (the data section, or a chunk's decompressed records);
        True if it ended at a DataEnd record.

        Messages are kept as offsets into ``body`` (lighter than ``mcap``'s records); chunks
        are opened, their CRC checked, and read with the message index records that follow
        them where those index every message (``_indexed``), else walked record by record;
        schemas, channels and metadata are parsed with ``mcap``'s record classes; other records
        (attachments, summary indexes) are skipped; the walk ends at the DataEnd record.
        """
        pos, size, ended = 0, len(body), False
        found: dict[int, tuple[list[int], list[int], list[int]]] = {}  # channel: times, starts, ends
        chunk, indexes = None, []  # a chunk waits for the message index records after it
        while pos < size:
            if body[pos] == Opcode.MESSAGE and pos + _RECORD_MESSAGE.size <= size:  # the common case, one unpack
                _, length, channel_id, _, log_time, _ = _RECORD_MESSAGE.unpack_from(body, pos)
                start, pos = pos + _RECORD_MESSAGE.size, pos + _RECORD.size + length
                if pos > size or start > pos:
                    raise ValueError("a message record overruns its container")
                times, starts, ends = found.get(channel_id) or found.setdefault(channel_id, ([], [], []))
                times.append(log_time)
                starts.append(start)
                ends.append(pos)
                continue
            opcode, length = _RECORD.unpack_from(body, pos)
            start, pos = pos + _RECORD.size, pos + _RECORD.size + length
            if pos > size:
                raise ValueError(f"a record of opcode {opcode} overruns its container")
            if opcode == Opcode.MESSAGE_INDEX and chunk is not None:
                indexes.append(body[start:pos])
                continue
            if chunk is not None:
                self._chunk(chunk, indexes)
                chunk, indexes = None, []
            if opcode == Opcode.CHUNK and found:  # messages before a chunk come first
                self._add(body, found)
                found = {}
            if opcode == Opcode.MESSAGE:
                raise ValueError("a message record is shorter than its header")
            elif opcode == Opcode.DATA_END:
                ended = True
                break
            elif opcode == Opcode.CHUNK:
                chunk = body[start:pos]
            elif opcode in _PARSED:
                record = _PARSED[opcode].read(ReadDataStream(io.BytesIO(body[start:pos])))
                if isinstance(record, Channel):
                    self.channels[record.id] = record
                elif isinstance(record, Schema):
                    self.schemas[record.id] = record
                elif record.name == EPISODE_METADATA:
                    self.metadata.update({k: str(v) for k, v in record.metadata.items()})
        if chunk is not None:
            self._chunk(chunk, indexes)
        self._add(body, found)
        return ended

    def _add(self, body: memoryview, found: dict[int, tuple[list[int], list[int], list[int]]]) -> None:
        buf = np.frombuffer(body, np.uint8)
        for channel_id, (times, starts, ends) in found.items():
            messages = self.messages.get(channel_id) or self.messages.setdefault(channel_id, _Messages())
            messages.times += times
            messages.runs.append((buf, np.asarray(starts, np.int64), np.asarray(ends, np.int64)))

    def _chunk(self, chunk: memoryview, indexes: list[memoryview]) -> None:
        records = _chunk_records(chunk)
        if not self._indexed(records, indexes):
            self.walk(records)

    def _indexed(self, records: memoryview, indexes: list[memoryview]) -> bool:
        """Collect a chunk's messages at the offsets its message index records give, with NumPy
        instead of a record-by-record walk. Only if the result is the walk's: every offset holds
        a message record of the indexed channel, the records do not overlap, and what lies
        between them parses as whole records of other kinds (channels, schemas, ...); the gaps
        are walked. Otherwise (no or partial indexes, a message in a gap) False: nothing was
        collected and the caller walks the chunk.
        """
        if not indexes:
            return False
        channel_ids, offsets = [], []
        for index in indexes:
            if len(index) < _INDEX_HEADER.size:
                return False
            channel_id, nbytes = _INDEX_HEADER.unpack_from(index)
            if nbytes % 16 or _INDEX_HEADER.size + nbytes > len(index):
                return False
            entries = np.frombuffer(index, "<u8", nbytes // 8, _INDEX_HEADER.size)
            offsets.append(entries[1::2])
            channel_ids.append(np.full(len(entries) // 2, channel_id, np.int64))
        offsets_all = np.concatenate(offsets)
        if not len(offsets_all) or offsets_all.max() > len(records) - _RECORD_MESSAGE.size:
            return False
        order = np.argsort(offsets_all, kind="stable")
        at, channel = offsets_all[order].astype(np.int64), np.concatenate(channel_ids)[order]
        data = np.frombuffer(records, np.uint8)
        head = data[at[:, None] + np.arange(_RECORD_MESSAGE.size)].view(_MESSAGE_DTYPE)[:, 0]
        ends = at + _RECORD.size + head["length"].astype(np.int64)
        if ((head["opcode"] != Opcode.MESSAGE).any() or (head["channel"] != channel).any()
                or (head["length"] < _RECORD_MESSAGE.size - _RECORD.size).any()
                or (head["length"] > len(records)).any() or ends[-1] > len(records)
                or (ends[:-1] > at[1:]).any()):
            return False
        gaps = _Contents()
        try:
            ended = any(gaps.walk(records[lo:hi]) for lo, hi in zip([0, *ends.tolist()], [*at.tolist(), len(records)])
                        if hi > lo)
        except Exception:  # a wrong index cut a record: the walk decides what the chunk holds
            return False
        if gaps.messages or ended:
            return False
        self.channels |= gaps.channels
        self.schemas |= gaps.schemas
        self.metadata |= gaps.metadata
        starts = at + _RECORD_MESSAGE.size
        for channel_id in np.unique(channel).tolist():
            mine = channel == channel_id
            messages = self.messages.get(channel_id) or self.messages.setdefault(channel_id, _Messages())
            messages.times += head["log_time"][mine].tolist()
            messages.runs.append((data, starts[mine], ends[mine]))
        return True


def _chunk_records(chunk: memoryview) -> memoryview:
    """The records of a chunk record's body, decompressed and their CRC checked (uncompressed
    chunks are read in place). A chunk declaring over ``MAX_CHUNK_BYTES`` is ``too_large``, and
    no chunk decompresses past the size its header declares: zstd and lz4 output is bounded by
    it (a compression bomb stops there and is ``corrupt``)."""
    *_, uncompressed_size, crc, name_length = _CHUNK_HEADER.unpack_from(chunk)
    at = _CHUNK_HEADER.size + name_length
    compression = bytes(chunk[_CHUNK_HEADER.size:at]).decode()
    (length,) = struct.unpack_from("<Q", chunk, at)
    if at + 8 + length > len(chunk):
        raise ValueError("a chunk's records overrun the chunk")
    if uncompressed_size > MAX_CHUNK_BYTES:
        raise LogError("too_large", f"a chunk declares {uncompressed_size} bytes of records, over {MAX_CHUNK_BYTES}")
    data = chunk[at + 8:at + 8 + length]
    if compression == "zstd":
        declared = zstandard.frame_content_size(data)  # -1: the frame does not say
        if declared > uncompressed_size:
            raise ValueError(f"a chunk's zstd frame declares {declared} bytes, its header {uncompressed_size}")
        data = memoryview(zstandard.decompress(data, max_output_size=uncompressed_size))
    elif compression == "lz4":
        frame = lz4.frame.LZ4FrameDecompressor()
        data = memoryview(frame.decompress(bytes(data), max_length=uncompressed_size))
        if not frame.eof:
            raise ValueError(f"a chunk's lz4 frame expands past the {uncompressed_size} bytes its header declares")
    elif compression:
        raise LogError("unsupported", f"chunk compression {compression!r}; readable: zstd, lz4, none")
    if len(data) != uncompressed_size:
        raise ValueError(f"a chunk holds {len(data)} bytes of records, its header says {uncompressed_size}")
    if crc and zlib.crc32(data) != crc:
        raise ValueError(f"a chunk's CRC is {zlib.crc32(data)}, its header says {crc}")
    return data


def _decoder(channel: Channel, schema: Schema | None) -> Callable[[bytes], Any]:
    for factory in (Ros2DecoderFactory(), ProtobufDecoderFactory()):
        decoder = factory.decoder_for(channel.message_encoding, schema)
        if decoder is not None:
            return decoder
    raise LogError("unsupported", f"{channel.topic}: no decoder for message encoding "
                                  f"{channel.message_encoding!r}, schema encoding "
                                  f"{schema.encoding if schema else None!r}")


def _name(collector: Collector, channel: Channel, schema: Schema | None, body: Any) -> None:
    """The names of a parsed channel's values, from its first message decoded in full."""
    try:
        collector.name(channel.topic, _decoder(channel, schema)(bytes(body)))
    except Exception:  # names are a courtesy: the values were parsed already
        pass


def _read(data: bytes, source_uri: str, mapping: Mapping) -> list[Streams]:
    contents = _Contents()
    contents.walk(memoryview(data)[len(MAGIC):-len(MAGIC)])
    channels = contents.channels
    used = set(contents.messages)
    if used - channels.keys():
        raise LogError("corrupt", f"{source_uri}: messages of unknown channels "
                                  f"{sorted(used - channels.keys())}")
    types = {channels[i].topic: getattr(contents.schemas.get(channels[i].schema_id), "name", "") for i in used}
    picked = pick_topics(mapping, types, source=source_uri)
    camera = [c for c in channels.values() if c.topic == picked.cameras[0]]
    fmt = FORMATS.get(camera[0].message_encoding)
    if fmt is None:
        raise LogError("unsupported", f"{source_uri}: camera message encoding "
                                      f"{camera[0].message_encoding!r}, readable: {list(FORMATS)}")
    collector = Collector(picked)
    for channel_id, messages in contents.messages.items():
        channel = channels[channel_id]
        role = picked.role_of(channel.topic)
        if role is None:
            continue
        parse = cdr_parser(role, getattr(contents.schemas.get(channel.schema_id), "name", "")) \
            if channel.message_encoding == "cdr" else None
        rows = messages.rows() if parse is not None else None
        batch = cdr_batch(parse, rows, messages.times) if rows is not None else None
        if batch is not None:
            collector.add_batch(channel.topic, *batch)
            if role != "camera":
                _name(collector, channel, contents.schemas.get(channel.schema_id), messages.first())
            continue
        decode = None
        for log_time, body in zip(messages.times, messages.bodies()):
            if parse is not None and body[:2] == CDR_LE:
                collector.add_parsed(channel.topic, *parse(body, log_time))
                continue
            decode = decode or _decoder(channel, contents.schemas.get(channel.schema_id))
            try:
                decoded = decode(bytes(body))
            except Exception as exc:  # decoders raise many kinds on damaged messages
                raise LogError("bad_message", f"{source_uri}: {channel.topic} at {log_time}: "
                                              f"{type(exc).__name__}: {exc}") from exc
            collector.add(channel.topic, decoded, log_time)
    return collector.streams(source_uri, {**contents.metadata, "format": fmt})
