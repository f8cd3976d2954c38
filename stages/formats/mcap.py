"""Reader for MCAP logs of ROS 2 (CDR) or Foxglove protobuf messages: one ``Streams`` per file.

Rules:

* Bytes: none is ``empty``; not starting with the MCAP magic is ``not_mcap``; not ending with
  it (a recording cut short) is ``truncated``; any other failure of the mcap library (bad chunk
  CRC, broken records) is ``corrupt``; a message its decoder rejects is ``bad_message``.
* One linear pass over the data section (the summary is not read; every chunk is opened and
  its CRC checked) collects schemas, channels, the metadata record named ``episode`` and the
  messages, in file order. The ``Mapping`` then picks among the topics with messages
  (``ros_messages.pick_topics``: no camera topic is ``missing_topic``) and only their messages
  are decoded. Messages stay
  views into the decompressed chunks until decoded: memory is about the decompressed size.
* Each channel is decoded by the decoder for its message encoding: mcap_ros2 for ``cdr`` with
  a ``ros2msg``/``ros2idl`` schema, mcap_protobuf for ``protobuf``; a channel neither decodes is
  ``unsupported``. Little-endian CDR messages of the types ``ros_messages.cdr_parser`` knows
  (camera ``sensor_msgs/msg/Image``; std_msgs Float32/64, Bool, Float32/64MultiArray signals)
  are parsed straight from their bytes instead, a channel's messages at once where they share
  one length and layout (``ros_messages.cdr_batch``): same result, many times quicker. Frames,
  stamps, signal values and task text follow the rules of ``stages.formats.ros_messages``.
* ``meta``: ``format`` is ``mcap-ros2`` or ``mcap-protobuf`` by the camera channel's message
  encoding (another encoding is ``unsupported``); the entries of the metadata record named
  ``episode`` (world, seed, driver, policy_version, ...) are copied as they are; ``topic.<role>``
  names each topic used.
"""
from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mcap.data_stream import ReadDataStream
from mcap.opcode import Opcode
from mcap.records import Channel, Chunk, Metadata, Schema
from mcap.stream_reader import get_chunk_data_stream
from mcap_protobuf.decoder import DecoderFactory as ProtobufDecoderFactory
from mcap_ros2.decoder import DecoderFactory as Ros2DecoderFactory

from stages.formats.ros_messages import CDR_LE, Collector, cdr_batch, cdr_parser, pick_topics
from stages.streams import LogError, Mapping, Streams

MAGIC = b"\x89MCAP0\r\n"
EPISODE_METADATA = "episode"
FORMATS = {"cdr": "mcap-ros2", "protobuf": "mcap-protobuf"}
_RECORD = struct.Struct("<BQ")      # opcode, content length
_RECORD_MESSAGE = struct.Struct("<BQHIQQ")  # a message record: opcode, length, channel id,
# sequence, log time, publish time; then data
_PARSED = {Opcode.CHUNK: Chunk, Opcode.CHANNEL: Channel, Opcode.SCHEMA: Schema,
           Opcode.METADATA: Metadata}


def check_bytes(data: bytes, uri: str) -> None:
    """Raise ``empty``, ``not_mcap`` or ``truncated`` for bytes that cannot be a whole MCAP."""
    if not data:
        raise LogError("empty", f"{uri} has no bytes")
    if not data.startswith(MAGIC):
        raise LogError("not_mcap", f"{uri} does not start with the MCAP magic")
    if len(data) < 2 * len(MAGIC) or not data.endswith(MAGIC):
        raise LogError("truncated", f"{uri} does not end with the MCAP magic")


def read(unit: dict, *, mapping: Mapping, fetch: Callable[[str], bytes]) -> list[Streams]:
    """One ``Streams`` per file of the unit (an MCAP unit has one); rules in the module text."""
    return [read_bytes(fetch(f["uri"]), source_uri=f["uri"], mapping=mapping)
            for f in unit["files"]]


def read_bytes(data: bytes, *, source_uri: str, mapping: Mapping) -> Streams:
    """Decode one MCAP file's bytes; raises ``LogError`` for anything unreadable."""
    check_bytes(data, source_uri)
    try:
        return _read(data, source_uri, mapping)
    except LogError:
        raise
    except Exception as exc:  # the mcap readers raise many kinds on damaged bytes
        raise LogError("corrupt", f"{source_uri}: {type(exc).__name__}: {exc}") from exc


@dataclass
class _Contents:
    """What one pass over an MCAP's data section found; messages by channel id, in file order."""

    schemas: dict[int, Schema] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    messages: dict[int, tuple[list[int], list[memoryview]]] = field(default_factory=dict)  # channel: times, data

    def walk(self, body: memoryview) -> None:
        """Read the records in ``body`` (the data section, or a chunk's decompressed records).

        Messages are kept as views (lighter than ``mcap``'s records); chunks are opened, their
        CRC checked; schemas, channels and metadata are parsed with ``mcap``'s record classes;
        other records (indexes, attachments) are skipped; the walk ends at the DataEnd record.
        """
        pos, size, messages = 0, len(body), self.messages
        while pos < size:
            if body[pos] == Opcode.MESSAGE and pos + _RECORD_MESSAGE.size <= size:  # the common case, one unpack
                _, length, channel_id, _, log_time, _ = _RECORD_MESSAGE.unpack_from(body, pos)
                start, pos = pos + _RECORD_MESSAGE.size, pos + _RECORD.size + length
                if pos > size or start > pos:
                    raise ValueError("a message record overruns its container")
                times, data = messages.get(channel_id) or messages.setdefault(channel_id, ([], []))
                times.append(log_time)
                data.append(body[start:pos])
                continue
            opcode, length = _RECORD.unpack_from(body, pos)
            start, pos = pos + _RECORD.size, pos + _RECORD.size + length
            if pos > size:
                raise ValueError(f"a record of opcode {opcode} overruns its container")
            if opcode == Opcode.MESSAGE:
                raise ValueError("a message record is shorter than its header")
            elif opcode == Opcode.DATA_END:
                return
            elif opcode in _PARSED:
                record = _PARSED[opcode].read(ReadDataStream(io.BytesIO(body[start:pos])))
                if isinstance(record, Chunk):
                    stream, length = get_chunk_data_stream(record, validate_crc=True)
                    self.walk(memoryview(stream.read(length)))
                elif isinstance(record, Channel):
                    self.channels[record.id] = record
                elif isinstance(record, Schema):
                    self.schemas[record.id] = record
                elif record.name == EPISODE_METADATA:
                    self.metadata.update({k: str(v) for k, v in record.metadata.items()})


def _decoder(channel: Channel, schema: Schema | None) -> Callable[[bytes], Any]:
    for factory in (Ros2DecoderFactory(), ProtobufDecoderFactory()):
        decoder = factory.decoder_for(channel.message_encoding, schema)
        if decoder is not None:
            return decoder
    raise LogError("unsupported", f"{channel.topic}: no decoder for message encoding "
                                  f"{channel.message_encoding!r}, schema encoding "
                                  f"{schema.encoding if schema else None!r}")


def _read(data: bytes, source_uri: str, mapping: Mapping) -> Streams:
    contents = _Contents()
    contents.walk(memoryview(data)[len(MAGIC):-len(MAGIC)])
    channels = contents.channels
    used = set(contents.messages)
    if used - channels.keys():
        raise LogError("corrupt", f"{source_uri}: messages of unknown channels "
                                  f"{sorted(used - channels.keys())}")
    picked = pick_topics(mapping, (channels[i].topic for i in used), source=source_uri)
    camera = [c for c in channels.values() if c.topic == picked["camera"]]
    fmt = FORMATS.get(camera[0].message_encoding)
    if fmt is None:
        raise LogError("unsupported", f"{source_uri}: camera message encoding "
                                      f"{camera[0].message_encoding!r}, readable: {list(FORMATS)}")
    roles = {topic: role for role, topic in picked.items()}
    collector = Collector(picked)
    for channel_id, (times, bodies) in contents.messages.items():
        channel = channels[channel_id]
        if channel.topic not in roles:
            continue
        parse = cdr_parser(roles[channel.topic], getattr(contents.schemas.get(channel.schema_id), "name", "")) \
            if channel.message_encoding == "cdr" else None
        batch = cdr_batch(parse, bodies, times) if parse is not None else None
        if batch is not None:
            collector.add_batch(channel.topic, *batch)
            continue
        decode = None
        for log_time, body in zip(times, bodies):
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
