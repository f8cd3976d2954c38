"""Ingest one source unit: decode it, align its streams, and tabulate the spans.

Pure stage (no Ray, Prefect or Lance): bytes come through ``fetch``, rows go out as Arrow and
dicts in an ``IngestResult``. Quality signals, events and the final keep/reject decision come after, over batches of
frame rows (``stages.quality``, ``stages.events``).

Ids are content-derived, so the same bytes always produce the same rows wherever they sit:
the unit's content hash is the sha256 over its files' (relative name, sha256) pairs, and an
episode id hashes (unit content hash, episode index within the unit, span index).
"""
from __future__ import annotations

import dataclasses
import hashlib
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from stages.align import ANY, align
from stages.curate import content_hash, episode_to_tables, expert_labels, reject_row, split_for, with_images
from stages.frames import Frames
from stages.schemas import to_json
from stages.sources import read_unit
from stages.streams import LogError, Mapping


@dataclasses.dataclass(frozen=True)
class IngestResult:
    """One unit ingested: its content hash, one episode row per span with the span's frames
    table and frames (``lazy_spans`` groups them), the rejects, and how many frames and
    episodes the unit held.

    ``without_frames`` is what travels back from a worker once the frames are written; its
    bytes (``to_bytes`` / ``from_bytes``) are what a Ray Data column holds.
    """

    content_hash: str = ""
    episodes: tuple[dict[str, Any], ...] = ()
    frames: tuple[pa.Table, ...] = ()  # without image columns
    pixels: tuple[Frames, ...] = ()  # each span's frames, decoded when read
    rejects: tuple[dict[str, Any], ...] = ()
    frames_seen: int = 0
    episodes_seen: int = 0

    @property
    def lazy_spans(self) -> list[tuple[dict[str, Any], pa.Table, Frames]]:
        """(episode row, frames table without images, its frames) per span; an error once the
        frames were dropped."""
        return list(zip(self.episodes, self.frames, self.pixels, strict=True))

    @property
    def spans(self) -> list[tuple[dict[str, Any], pa.Table]]:
        """(episode row, whole frames table) per span, every frame decoded at once."""
        return [(row, with_images(light, np.asarray(pixels))) for row, light, pixels in self.lazy_spans]

    def without_frames(self) -> IngestResult:
        return dataclasses.replace(self, frames=(), pixels=())

    def to_bytes(self) -> bytes:
        # a pickle (rows hold datetimes); it never leaves this code's own processes
        return pickle.dumps(self)

    @staticmethod
    def from_bytes(data: bytes) -> IngestResult:
        result = pickle.loads(data)
        if not isinstance(result, IngestResult):
            raise TypeError(f"not an IngestResult: {type(result).__name__}")
        return result


def _hashing(fetch: Callable[[str], bytes], seen: dict[str, str]) -> Callable[[str], bytes]:
    def fetch_and_hash(uri: str) -> bytes:
        data = fetch(uri)
        seen[uri] = content_hash(data)
        return data
    return fetch_and_hash


def unit_content_hash(unit: dict, file_hashes: dict[str, str]) -> str:
    """sha256 over (relative name, sha256) of every file the reader fetched."""
    rel = {f["uri"]: f["rel"] for f in unit["files"]}
    parts = sorted(f"{rel.get(uri, uri)}:{digest}" for uri, digest in file_hashes.items())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def episode_id_for(unit_hash: str, episode_index: int, span_index: int, camera: str = "") -> str:
    """The id of a span: the unit's content, the episode in it, the span in the episode, and the
    camera when it is not the episode's first."""
    key = f"{unit_hash}|{episode_index}|{span_index}" + (f"|{camera}" if camera else "")
    return "ep-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def log_world(meta: dict[str, str], *, world: str, adopt_undeclared: bool) -> str:
    """The world a log belongs to: the one its metadata declares; for a log that declares none,
    ``world`` with ``adopt_undeclared``, else what it is: its format and, where the format
    records it, its source (``lerobot-v3.0:so100``)."""
    declared = meta.get("world", "")
    if declared:
        return declared
    if adopt_undeclared:
        return world
    source = meta.get("source", "")
    return f"{meta.get('format', 'unknown')}:{source}" if source else meta.get("format", "unknown")


def ingest_unit(unit: dict, *, fetch: Callable[[str], bytes], mapping: Mapping, turn: int, max_bytes: int,
                max_frames: int | None = None, max_side: int, world: str, adopt_undeclared: bool, action_dim: int, state_dim: int,
                signal_names: tuple[str, ...] = (), features: dict | None = None, min_length: int,
                gap_factor: float, hold_factor: float, val_fraction: float,
                lineage: dict[str, str]) -> IngestResult:
    """Decode and align one unit.

    Returns an ``IngestResult``: an episode row and frames table per span, reject rows. A unit
    that cannot be decoded is one reject row of stage ``read``; an episode whose streams cannot
    be aligned is one of stage ``align``; a span too short to keep is one of stage ``align``
    with its time span. Spans are not yet judged on quality: their frames carry no flags.
    An episode of ``world`` (``log_world``) must have its widths (``action_dim``,
    ``state_dim``) and gets its boolean ``signal_names``; any other log keeps the widths and
    names it has. Frames keep their resolution up to ``max_side`` (``stages.align``).
    Any other exception while reading the unit, or aligning and tabulating one of its episodes,
    is that unit's (or episode's) reject of reason ``error``, its type and message in the detail:
    one bad log never stops a run. A unit whose listed size is over ``max_bytes`` is rejected
    unread (``too_large``), so is an episode of more than ``max_frames`` camera frames.
    """
    size = sum(int(f["size"]) for f in unit["files"])
    if size > max_bytes:
        return IngestResult(rejects=(reject_row(unit["uri"], stage="read", reason="too_large",
                                                detail=f"{size} bytes, over the limit of {max_bytes} "
                                                       "(curate.max_log_bytes)", turn=turn),))
    hashes: dict[str, str] = {}
    try:
        streams_list = read_unit(unit, mapping=mapping, fetch=_hashing(fetch, hashes))
    except LogError as err:
        return IngestResult(rejects=(reject_row(unit["uri"], stage="read", reason=err.reason,
                                                detail=err.detail, turn=turn),))
    except OSError as err:  # an object that vanished or cannot be read: a reject, not a crash
        return IngestResult(rejects=(reject_row(unit["uri"], stage="read", reason="unreadable",
                                                detail=str(err), turn=turn),))
    except Exception as err:  # a reader's bug or an input no check foresaw: this unit's reject
        return IngestResult(rejects=(reject_row(unit["uri"], stage="read", reason="error",
                                                detail=f"{type(err).__name__}: {err}", turn=turn),))
    unit_hash = unit_content_hash(unit, hashes)
    episodes, frames, pixels, rejects, frames_seen, episodes_seen = [], [], [], [], 0, 0
    file_index = -1
    for streams in streams_list:
        camera_index = int(streams.meta.get("camera_index", 0))
        file_index += camera_index == 0  # readers give a file's (or episode's) first camera first
        episode_index = int(streams.meta.get("episode_index", file_index))
        camera = streams.meta.get("topic.camera", "") if camera_index else ""
        source_uri = streams.source_uri or unit["uri"]
        episodes_seen += 1
        frames_seen += len(streams.frames)
        try:
            if max_frames is not None and len(streams.frames) > max_frames:
                raise LogError("too_large", f"{len(streams.frames)} frames in one episode, over the limit of "
                                            f"{max_frames} (curate.max_episode_frames)")
            name = log_world(streams.meta, world=world, adopt_undeclared=adopt_undeclared)
            own = name == world
            spans, short = align(streams, max_side=max_side, action_dim=action_dim if own else ANY,
                                 state_dim=state_dim if own else ANY,
                                 signal_names=tuple(signal_names) if own else (), gap_factor=gap_factor,
                                 hold_factor=hold_factor, min_length=min_length)
            spans = [{**span, "world": name} for span in spans]
            tabulated = [_tabulate(span, unit=unit, unit_hash=unit_hash, episode_index=episode_index,
                                   camera=camera, source_uri=source_uri, turn=turn, features=features,
                                   val_fraction=val_fraction, lineage=lineage) for span in spans]
        except Exception as err:
            reason, detail = (err.reason, err.detail) if isinstance(err, LogError) else \
                ("error", f"{type(err).__name__}: {err}")
            span = (int(streams.camera_t.min()), int(streams.camera_t.max())) if len(streams.camera_t) else (-1, -1)
            rejects.append(reject_row(source_uri, stage="align", reason=reason, detail=detail,
                                      turn=turn, span=span, frames=len(streams.frames)))
            continue
        for s in short:
            n = int(np.count_nonzero((streams.camera_t >= s["start_ns"]) & (streams.camera_t <= s["end_ns"])))
            rejects.append(reject_row(source_uri, stage="align", reason=s["reason"],
                                      detail=s.get("detail", ""), turn=turn,
                                      span=(s["start_ns"], s["end_ns"]), frames=n))
        for span, (row, table) in zip(spans, tabulated):
            episodes.append(row)
            frames.append(table)
            pixels.append(span["frames"])
    return IngestResult(content_hash=unit_hash, episodes=tuple(episodes), frames=tuple(frames),
                        pixels=tuple(pixels), rejects=tuple(rejects), frames_seen=frames_seen, episodes_seen=episodes_seen)


def _tabulate(span: dict, *, unit: dict, unit_hash: str, episode_index: int, camera: str, source_uri: str,
              turn: int, features: dict | None, val_fraction: float,
              lineage: dict[str, str]) -> tuple[dict, pa.Table]:
    """One aligned span's episode row and frames table."""
    episode_id = episode_id_for(unit_hash, episode_index, span["span_index"], camera)
    labels, label_sources = expert_labels(span)
    h, w = span["source_shape"]
    return episode_to_tables(
        {**span, "labels": labels}, episode_id=episode_id, source_uri=source_uri,
        content_hash=unit_hash, turn=turn, origin="real", parent_episode_id="",
        generator_version="", label_source=label_sources,
        split=split_for(episode_id, val_fraction=val_fraction), features=features,
        lineage={"format": span.get("format", unit["format"]),
                 "span_index": int(span["span_index"]), "start_ns": int(span["start_ns"]),
                 "end_ns": int(span["end_ns"]), "split_reason": span.get("split_reason", ""),
                 "task": span.get("task", ""), "topics": to_json(span.get("topics", {})),
                 "source_shape": f"{h}x{w}", **lineage})
