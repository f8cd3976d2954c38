"""Source units: what in a landing zone is one log, and which reader reads it.

A landing-zone listing (``stages.storage.list_objects``: uri, size, etag per object) is grouped
into units, each read as a whole by one reader:

* a directory holding ``meta/info.json`` is one LeRobot dataset (``lerobot``: every object
  under it, one episode per recorded episode);
* a directory holding ``metadata.yaml`` is one rosbag2 bag (``rosbag2``: sqlite3 or MCAP
  storage, the objects directly in it);
* any other ``*.mcap`` file is one MCAP log (``mcap``), any ``*.bag`` one rosbag1 bag
  (``rosbag1``);
* anything else is a unit of format ``unsupported``, rejected with that reason; hidden files
  (a path part starting with ``.``) are ignored.

A unit's key hashes its URI and every file's (name, size, etag), so a changed or added file
changes the key and the unit is read again; the tables stay free of duplicates because rows are
keyed by content (see ``stages.ingest``).
"""
from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable

from stages.streams import LogError, Mapping, Streams

FORMATS = ("mcap", "rosbag1", "rosbag2", "lerobot", "unsupported")


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else ""


def _is_hidden(uri: str, root: str) -> bool:
    rel = uri[len(root):].lstrip("/") if uri.startswith(root) else uri
    return any(part.startswith(".") for part in rel.split("/"))


def discover(objects: list[dict], *, root: str) -> list[dict]:
    """Group a listing of objects under ``root`` into units, sorted by URI.

    Each unit is ``{"uri", "format", "files": [{"uri", "rel", "size", "etag"}], "key"}``.
    """
    root = root.rstrip("/")
    objects = [o for o in objects if not _is_hidden(o["uri"], root)]
    by_uri = {o["uri"]: o for o in objects}
    lerobot = sorted({_parent(_parent(u)) for u in by_uri if u.endswith("/meta/info.json")})
    rosbag2 = sorted({_parent(u) for u in by_uri if u.endswith("/metadata.yaml")})
    units: dict[str, dict] = {}

    def claim(unit_uri: str, fmt: str, members: list[dict]) -> None:
        files = [{"uri": o["uri"], "rel": o["uri"][len(unit_uri):].lstrip("/") or
                  posixpath.basename(o["uri"]), "size": int(o["size"]), "etag": str(o["etag"])}
                 for o in members]
        units[unit_uri] = {"uri": unit_uri, "format": fmt, "files": files}
        for o in members:
            by_uri.pop(o["uri"], None)

    for d in lerobot:  # a dataset claims everything beneath it, bags inside included
        claim(d, "lerobot", [o for u, o in sorted(by_uri.items()) if u.startswith(d + "/")])
    for d in rosbag2:
        claim(d, "rosbag2", [o for u, o in sorted(by_uri.items()) if _parent(u) == d])
    for u, o in sorted(by_uri.items()):
        fmt = "mcap" if u.endswith(".mcap") else "rosbag1" if u.endswith(".bag") else "unsupported"
        claim(u, fmt, [o])
    for unit in units.values():
        unit["key"] = unit_key(unit)
    return [units[u] for u in sorted(units)]


def unit_key(unit: dict) -> str:
    """A change detector for a unit: its URI and each file's name, size and etag, hashed."""
    parts = [unit["uri"]] + [f"{f['rel']}|{f['size']}|{f['etag']}" for f in unit["files"]]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def read_unit(unit: dict, *, mapping: Mapping, fetch: Callable[[str], bytes]) -> list[Streams]:
    """Decode a unit with the reader for its format: one ``Streams`` per episode in it.

    Raises ``LogError`` for a unit that cannot be read (``unsupported_format`` for a file no
    reader handles).
    """
    fmt = unit["format"]
    if fmt == "mcap":
        from stages.formats import mcap as reader
    elif fmt in ("rosbag1", "rosbag2"):
        from stages.formats import rosbag as reader
    elif fmt == "lerobot":
        from stages.formats import lerobot as reader
    else:
        raise LogError("unsupported_format",
                       f"{unit['uri']}: not MCAP (.mcap), rosbag1 (.bag), a rosbag2 directory "
                       "(metadata.yaml) or a LeRobot dataset (meta/info.json)")
    return reader.read(unit, mapping=mapping, fetch=fetch)
