"""Reader for ROS bags: rosbag1 (``.bag``, version 2.0) and rosbag2 (sqlite3 or MCAP storage).

Rules:

* A ``rosbag1`` unit is one ``.bag`` file; a ``rosbag2`` unit is a bag directory holding
  ``metadata.yaml`` and the storage files it lists (``relative_file_paths``, looked up by name;
  other files in the unit are not fetched). One ``Streams`` per camera of each bag.
* Files come from ``fetch`` and are written into a temporary directory for rosbags, which
  needs paths.
* rosbag1: no bytes is ``empty``; no ``#ROSBAG V2.0`` magic is ``corrupt`` (another version
  ``unsupported``); a file shorter than its 4096-byte bag header, or whose index position is 0
  (a recording never closed) or past the end of the file, is ``truncated``; an unparsable bag
  header is ``corrupt``.
* rosbag2: no ``metadata.yaml`` in the unit, unparsable metadata or a listed file missing is
  ``corrupt``; a storage identifier other than ``sqlite3``/``mcap`` is ``unsupported``; storage
  files without bytes are ``empty``; an ``.mcap`` storage file is checked like an MCAP log
  (``empty``, ``not_mcap``, ``truncated``) and its chunks opened with the MCAP reader's limits
  before rosbags sees them (``mcap.check_chunks``: a chunk declaring over 1 GiB is
  ``too_large``, a zstd or lz4 bomb stops at its declared size and is ``corrupt``).
* Any other failure inside rosbags (damaged index or database, undecodable types) is
  ``corrupt``; a message rosbags cannot deserialize is ``bad_message``.
* Types come from the bag's own definitions (ROS 2 Humble or ROS 1 Noetic types when it has
  none). The ``Mapping`` picks among the topics with messages (by the bag's index or metadata
  counts; ``collect.pick_topics``); their messages are read
  in stamp (log time) order and decoded by the rules of ``stages.formats.ros_messages``; rosbag2
  messages of the types ``cdr.cdr_parser`` knows are parsed straight from their CDR.
* ``meta``: ``format`` is ``rosbag1``, ``rosbag2-sqlite3`` or ``rosbag2-mcap``; a rosbag2's
  ``custom_data`` entries (our fleet writes world, seed, driver, policy_version there) are copied
  as they are; ``topic.<role>`` names each topic used.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from tempfile import TemporaryDirectory

from rosbags.highlevel import AnyReader
from rosbags.rosbag1.reader import Header, RecordType
from rosbags.typesys import Stores, get_typestore
from ruamel.yaml import YAML

from stages.formats.cdr import CDR_LE, cdr_parser
from stages.formats.collect import Collector, pick_topics
from stages.formats.mcap import check_chunks
from stages.streams import LogError, Mapping, Streams

ROSBAG1_MAGIC = b"#ROSBAG V2.0\n"
BAG_HEADER_SIZE = 4096  # the bag header record, padded
METADATA_FILE = "metadata.yaml"
STORAGES = ("sqlite3", "mcap")


def read(unit: dict, *, mapping: Mapping, fetch: Callable[[str], bytes]) -> list[Streams]:
    """One ``Streams`` per camera of each bag of the unit; rules in the module text."""
    if unit["format"] == "rosbag1":
        return [s for f in unit["files"] for s in _read_rosbag1(f["uri"], mapping, fetch)]
    if unit["format"] == "rosbag2":
        return _read_rosbag2(unit, mapping, fetch)
    raise LogError("unsupported", f"{unit['uri']}: format {unit['format']!r} is not a ROS bag")


def _check_rosbag1(data: bytes, uri: str) -> None:
    if not data:
        raise LogError("empty", f"{uri} has no bytes")
    if not data.startswith(ROSBAG1_MAGIC):
        if data.startswith(b"#ROSBAG V"):
            raise LogError("unsupported", f"{uri}: {data[:12].decode(errors='replace')}, "
                                          "only version 2.0 is readable")
        raise LogError("corrupt", f"{uri} does not start with the rosbag magic")
    if len(data) < len(ROSBAG1_MAGIC) + BAG_HEADER_SIZE:
        raise LogError("truncated", f"{uri}: {len(data)} bytes, shorter than the bag header")
    try:
        header = Header.read(io.BytesIO(data[len(ROSBAG1_MAGIC):]), RecordType.BAGHEADER)
        index_pos = header.get_uint64("index_pos")
    except Exception as exc:  # rosbags raises ReaderError, struct and decode errors
        raise LogError("corrupt", f"{uri}: unreadable bag header: {exc}") from exc
    if index_pos == 0 or index_pos >= len(data):
        raise LogError("truncated", f"{uri}: index at {index_pos}, file has {len(data)} bytes")


def _read_rosbag1(uri: str, mapping: Mapping, fetch: Callable[[str], bytes]) -> list[Streams]:
    data = fetch(uri)
    _check_rosbag1(data, uri)
    with TemporaryDirectory(prefix="worldloop-bag-") as tmp:
        path = Path(tmp, "log.bag")
        path.write_bytes(data)
        return _guarded(uri, lambda: _collect(path, uri, mapping, Stores.ROS1_NOETIC,
                                              {"format": "rosbag1"}))


def _bag_info(text: bytes, uri: str) -> dict:
    try:
        info = YAML(typ="safe").load(text.decode())["rosbag2_bagfile_information"]
        files = [PurePosixPath(str(p)).name for p in info["relative_file_paths"]]
        storage = str(info["storage_identifier"])
        custom = {str(k): str(v) for k, v in (info.get("custom_data") or {}).items()}
    except Exception as exc:  # YAML errors, missing keys, wrong shapes
        raise LogError("corrupt", f"{uri}/{METADATA_FILE}: {type(exc).__name__}: {exc}") from exc
    if storage not in STORAGES:
        raise LogError("unsupported", f"{uri}: storage {storage!r}; readable: {STORAGES}")
    return {"files": files, "storage": storage, "custom": custom}


def _read_rosbag2(unit: dict, mapping: Mapping, fetch: Callable[[str], bytes]) -> list[Streams]:
    uri = unit["uri"]
    by_name = {PurePosixPath(f["rel"]).name: f["uri"] for f in unit["files"]}
    if METADATA_FILE not in by_name:
        raise LogError("corrupt", f"{uri}: no {METADATA_FILE}")
    metadata = fetch(by_name[METADATA_FILE])
    info = _bag_info(metadata, uri)
    missing = [name for name in info["files"] if name not in by_name]
    if missing:
        raise LogError("corrupt", f"{uri}: storage files {missing} listed but absent")
    with TemporaryDirectory(prefix="worldloop-bag-") as tmp:
        bag = Path(tmp, "bag")
        bag.mkdir()
        (bag / METADATA_FILE).write_bytes(metadata)
        size = 0
        for name in info["files"]:
            data = fetch(by_name[name])
            if name.endswith(".mcap"):
                check_chunks(data, by_name[name])
            (bag / name).write_bytes(data)
            size += len(data)
        if size == 0:
            raise LogError("empty", f"{uri}: its storage files have no bytes")
        meta = {**info["custom"], "format": f"rosbag2-{info['storage']}"}
        return _guarded(uri, lambda: _collect(bag, uri, mapping, Stores.ROS2_HUMBLE, meta))


def _guarded(uri: str, read: Callable[[], list[Streams]]) -> list[Streams]:
    """``read()``, with any non-LogError failure (rosbags, sqlite3) turned into ``corrupt``."""
    try:
        return read()
    except LogError:
        raise
    except Exception as exc:  # rosbags and sqlite3 raise many kinds on damaged bags
        raise LogError("corrupt", f"{uri}: {type(exc).__name__}: {exc}") from exc


def _collect(path: Path, source_uri: str, mapping: Mapping, default_types: Stores,
             meta: dict[str, str]) -> list[Streams]:
    with AnyReader([path], default_typestore=get_typestore(default_types)) as reader:
        picked = pick_topics(mapping, {c.topic: c.msgtype for c in reader.connections if c.msgcount},
                             source=source_uri)
        connections = [c for c in reader.connections if picked.role_of(c.topic)]
        fast = {c.id: parser for c in connections
                if reader.is2 and (parser := cdr_parser(picked.role_of(c.topic), c.msgtype))}
        collector = Collector(picked)
        named = set()
        for connection, log_time, raw in reader.messages(connections=connections):
            parse = fast.get(connection.id)
            if parse is not None and raw[:2] == CDR_LE:
                collector.add_parsed(connection.topic, *parse(raw, log_time))
                if connection.id not in named:  # the names of its values, from its first message
                    named.add(connection.id)
                    collector.name(connection.topic, reader.deserialize(raw, connection.msgtype))
                continue
            try:
                msg = reader.deserialize(raw, connection.msgtype)
            except Exception as exc:  # rosbags raises several kinds on damaged messages
                raise LogError("bad_message", f"{source_uri}: {connection.topic} at {log_time}: "
                                              f"{type(exc).__name__}: {exc}") from exc
            collector.add(connection.topic, msg, log_time)
        return collector.streams(source_uri, meta)  # frames may be views of rosbags' buffers
