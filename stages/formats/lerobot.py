"""LeRobot datasets (codebase v2.0, v2.1, v3.0): parquet rows plus mp4 video decoded with PyAV.

Layout, every path relative to the dataset root and found among ``unit["files"]`` by ``rel``:

- ``meta/info.json``: ``codebase_version``, ``fps``, ``robot_type``, ``chunks_size``,
  ``data_path`` and ``video_path`` (``str.format`` templates) and ``features`` = {name: {dtype,
  shape, names}}. A feature of dtype ``video`` is an mp4 stream; one of dtype ``image`` is
  encoded image bytes (PNG/JPEG) embedded in the data parquet as ``struct<bytes, path>``.
- v2.x, one data parquet and one mp4 per camera per episode: the episodes are the lines of
  ``meta/episodes.jsonl`` ({episode_index, tasks, length}); with ``chunk = episode_index //
  chunks_size`` (default 1000) the files are ``data_path.format(episode_chunk=chunk, episode_index=i)`` and
  ``video_path.format(episode_chunk=chunk, episode_index=i, video_key=camera)``; the video
  starts at time 0. Tasks: ``meta/tasks.jsonl`` ({task_index, task}).
- v3.0, many episodes per data parquet and per mp4: the rows of every
  ``meta/episodes/chunk-*/file-*.parquet`` give ``episode_index``, ``length``,
  ``data/chunk_index``, ``data/file_index`` and, per camera, ``videos/<key>/chunk_index``,
  ``videos/<key>/file_index``, ``videos/<key>/from_timestamp`` (where the episode starts inside
  the shared mp4); files are ``data_path.format(chunk_index=, file_index=)`` and
  ``video_path.format(video_key=, chunk_index=, file_index=)``. Tasks: ``meta/tasks.parquet``,
  ``task_index`` and the task text in column ``task`` (else the first string column, which is
  where pandas stores an unnamed index).
- A data parquet row: ``timestamp`` (float seconds from the episode start), ``frame_index``,
  ``episode_index``, ``index``, ``task_index``, then the features (numbers or fixed-length lists).

Rules:

- Cameras: every feature of dtype video or image, ``mapping.pick("camera", ...)`` of them
  first (only that one when the mapping configures the camera); none is ``missing_topic``. Each role of ``ROLES`` is picked from the data columns that are neither a
  camera nor bookkeeping; its values are float32 [N] for a scalar column, [N, D] for a list
  column (bools become 0/1), and a width-1 list is flattened for the scalar roles (reward,
  intervention; a signals list stays [N, D]).
- Stamps: a row's ``timestamp`` to int64 ns, rounded; float32 stamps are first read as their
  shortest round-tripping decimal (``float32(0.38)`` is 380 000 000 ns, not 379 999 995). The
  signals carry the same stamps as the frames (LeRobot rows are synchronous).
- Frames: the row at episode time t takes the decoded frame whose ``pts * time_base`` is nearest
  to t (v3.0: to ``from_timestamp + t``), when it is within half a frame period ``0.5 / fps``;
  only the episode's window is decoded (v3.0 seeks to it first). A row without such a frame is
  ``inconsistent_lengths``, so is an episode whose row count differs from its metadata length.
- Task: the texts of the episode's distinct ``task_index`` values, in row order, joined by
  ``"; "``; ``""`` when the dataset has no task table.
- Errors (``LogError``): ``missing_file`` (info.json, the episodes metadata, a data parquet or an
  mp4 that the unit does not list), ``unsupported`` (another codebase_version), ``corrupt``
  (unparsable JSON or parquet, undecodable video or image, a field missing or of the wrong
  kind), ``missing_topic``, ``inconsistent_lengths``. Errors of ``fetch`` itself (an object that
  vanished, a network failure) are not judgements on the data and propagate unchanged.

Returns one ``Streams`` per camera and episode (the cameras in turn, each's episodes in index
order), with ``source_uri`` the data parquet, ``meta`` = format (``lerobot-<version>``),
episode_index, camera_index, fps, robot_type (also as ``source``), topic.<role>, and ``names``
from each feature's ``names`` where they name every value.
"""
from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from stages import images
from stages.frames import Frames
from stages.streams import ROLES, LogError, Mapping, Streams

VERSIONS = ("v2.0", "v2.1", "v3.0")
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
SCALAR_ROLES = ("reward", "intervention")
INFO = "meta/info.json"
_V3_EPISODES = re.compile(r"meta/episodes/chunk-\d+/file-\d+\.parquet")


@contextmanager
def _parsing(what: str) -> Iterator[None]:
    """Turn the errors of parsing damaged input into ``LogError("corrupt")``."""
    try:
        yield
    except LogError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError, OSError,
            pa.ArrowException, av.FFmpegError) as err:
        raise LogError("corrupt", f"{what}: {type(err).__name__}: {err}") from err


@dataclass(frozen=True)
class _Episode:
    index: int
    length: int | None
    data_rel: str
    video_rel: str | None  # None for an image feature (frames live in the parquet)
    video_offset_s: float


class _Dataset:
    """The unit's files by relative path, fetched and parsed once each."""

    def __init__(self, unit: dict, fetch: Callable[[str], bytes]) -> None:
        self.uris = {f["rel"]: f["uri"] for f in unit["files"]}
        self._fetch = fetch
        self._bytes: dict[str, bytes] = {}
        self._groups: dict[str, tuple[pa.Table, np.ndarray, np.ndarray]] = {}

    def raw(self, rel: str) -> bytes:
        if rel not in self.uris:
            raise LogError("missing_file", rel)
        if rel not in self._bytes:
            self._bytes[rel] = self._fetch(self.uris[rel])
        return self._bytes[rel]

    def json(self, rel: str) -> dict:
        data = self.raw(rel)
        with _parsing(rel):
            value = json.loads(data)
        if not isinstance(value, dict):
            raise LogError("corrupt", f"{rel}: not a JSON object")
        return value

    def json_lines(self, rel: str) -> list[dict]:
        data = self.raw(rel)
        with _parsing(rel):
            return [json.loads(line) for line in data.decode().splitlines() if line.strip()]

    def table(self, rel: str) -> pa.Table:
        data = self.raw(rel)
        with _parsing(rel):
            return pq.read_table(io.BytesIO(data))

    def rows(self, rel: str, episode_index: int) -> pa.Table:
        """The rows of ``rel`` whose episode_index is ``episode_index``, in file order."""
        if rel not in self._groups:
            table = self.table(rel)
            with _parsing(rel):
                keys = table["episode_index"].to_numpy()
                order = np.argsort(keys, kind="stable")
                self._groups[rel] = (table, keys[order], order)
        table, keys, order = self._groups[rel]
        lo, hi = np.searchsorted(keys, episode_index, "left"), np.searchsorted(keys, episode_index, "right")
        return table.take(pa.array(order[lo:hi]))


def _stamps_ns(column: pa.ChunkedArray, *, what: str) -> np.ndarray:
    seconds = column.to_numpy()
    if seconds.dtype == np.float32:
        seconds = seconds.astype(str).astype(np.float64)  # shortest decimal that round-trips
    seconds = np.asarray(seconds, np.float64)
    if not np.isfinite(seconds).all():
        raise LogError("corrupt", f"{what}: null or non-finite timestamp")
    return np.round(seconds * 1e9).astype(np.int64)


def _numeric(column: pa.ChunkedArray, *, what: str) -> np.ndarray:
    """float32 [N] from scalars, [N, D] from equal-length lists (nested lists are flattened)."""
    arr = column.combine_chunks()
    is_list = False
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or \
            pa.types.is_fixed_size_list(arr.type):
        widths = pc.list_value_length(arr)
        if widths.null_count or len(pc.unique(widths)) > 1:
            raise LogError("corrupt", f"{what}: null or ragged lists")
        arr, is_list = arr.flatten(), True
    values = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(len(column), -1) if is_list else values


def _decode_images(column: pa.ChunkedArray, *, what: str) -> np.ndarray:
    """RGB frames from an image feature's ``struct<bytes, path>`` cells."""
    with _parsing(what):
        blobs = column.combine_chunks().field("bytes").to_pylist()
        return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def _nearest(sorted_t: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest element of ``sorted_t`` to each query, and the distance."""
    right = np.clip(np.searchsorted(sorted_t, query), 0, len(sorted_t) - 1)
    left = np.clip(right - 1, 0, len(sorted_t) - 1)
    use_left = np.abs(sorted_t[left] - query) < np.abs(sorted_t[right] - query)
    index = np.where(use_left, left, right)
    return index, np.abs(sorted_t[index] - query)


def _video_frames(data: bytes, times_s: np.ndarray, *, fps: float, what: str) -> Frames:
    """The frames of ``times_s`` (seconds in the video), decoded when read (``_decode_video``).

    The packets' stamps are checked here without decoding a frame: a row with no frame within
    half a period is ``inconsistent_lengths`` now, not when the frames are read."""
    half = 0.5 / fps
    lo, hi = float(times_s.min()) - half, float(times_s.max()) + half
    pts: list[float] = []
    with _parsing(what):
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            size = (int(stream.codec_context.height), int(stream.codec_context.width))
            if lo > 0:
                container.seek(int(lo / stream.time_base), stream=stream, backward=True)
            for packet in container.demux(stream):
                if packet.pts is None:
                    continue
                t = float(packet.pts * stream.time_base)
                if t > hi + 16 / fps:  # past the window, with room for reordered frames
                    break
                if lo <= t <= hi:
                    pts.append(t)
    if not pts:
        raise LogError("inconsistent_lengths", f"{what}: no frame in [{lo:.3f}, {hi:.3f}] s")
    _, distance = _nearest(np.sort(np.asarray(pts)), times_s)
    missing = int(np.count_nonzero(distance > half + 1e-9))
    if missing:
        raise LogError("inconsistent_lengths", f"{what}: {missing} of {len(times_s)} rows have no "
                                               f"frame within {half * 1e3:.1f} ms ({len(pts)} frames)")
    return Frames(len(times_s), size,
                  lambda index, out: images.resize(_decode_video(data, times_s[index], fps=fps, what=what), out))


def _decode_video(data: bytes, times_s: np.ndarray, *, fps: float, what: str) -> np.ndarray:
    """The frame of each time (seconds in the video): nearest pts within half a period. Only
    frames within half a period of some time are converted to RGB (a clip's few frames are)."""
    half = 0.5 / fps
    lo, hi = float(times_s.min()) - half, float(times_s.max()) + half
    wanted = np.sort(times_s)
    got_t: list[float] = []
    got_frames: list[np.ndarray] = []
    with _parsing(what):
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            if lo > 0:
                container.seek(int(lo / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is None:
                    raise LogError("corrupt", f"{what}: a frame without a timestamp")
                if frame.time > hi:
                    break
                if frame.time >= lo and _nearest(wanted, np.asarray([frame.time]))[1][0] <= half + 1e-9:
                    got_t.append(frame.time)  # a frame some row may take: to RGB while it is in cache
                    got_frames.append(frame.to_ndarray(format="rgb24"))
    if not got_t:
        raise LogError("inconsistent_lengths", f"{what}: no frame in [{lo:.3f}, {hi:.3f}] s")
    order = np.argsort(got_t, kind="stable")
    index, distance = _nearest(np.asarray(got_t)[order], times_s)
    missing = int(np.count_nonzero(distance > half + 1e-9))
    if missing:
        raise LogError("inconsistent_lengths", f"{what}: {missing} of {len(times_s)} rows have no "
                                               f"frame within {half * 1e3:.1f} ms "
                                               f"({len(got_t)} frames decoded)")
    return np.stack([got_frames[i] for i in order[index]])


def _tasks(ds: _Dataset, version: str) -> dict[int, str]:
    """task_index -> text; empty when the dataset has no task table."""
    if version == "v3.0":
        rel = "meta/tasks.parquet"
        if rel not in ds.uris:
            return {}
        table = ds.table(rel)
        with _parsing(rel):
            text = "task" if "task" in table.column_names else next(
                f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type))
            return dict(zip(table["task_index"].to_pylist(), table[text].to_pylist()))
    rel = "meta/tasks.jsonl"
    if rel not in ds.uris:
        return {}
    lines = ds.json_lines(rel)
    with _parsing(rel):
        return {int(line["task_index"]): str(line["task"]) for line in lines}


def _episodes_v2(ds: _Dataset, info: dict, camera: str, is_video: bool) -> list[_Episode]:
    lines = ds.json_lines("meta/episodes.jsonl")
    out = []
    with _parsing("meta/episodes.jsonl"):
        for line in lines:
            i = int(line["episode_index"])
            keys = {"episode_chunk": i // int(info.get("chunks_size", 1000)), "episode_index": i}
            out.append(_Episode(
                index=i, length=int(line["length"]) if "length" in line else None,
                data_rel=info["data_path"].format(**keys),
                video_rel=info["video_path"].format(video_key=camera, **keys) if is_video else None,
                video_offset_s=0.0))
    return out


def _episodes_v3(ds: _Dataset, info: dict, camera: str, is_video: bool) -> list[_Episode]:
    rels = sorted(rel for rel in ds.uris if _V3_EPISODES.fullmatch(rel))
    if not rels:
        raise LogError("missing_file", "meta/episodes/chunk-*/file-*.parquet")
    video = f"videos/{camera}/"
    columns = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    if is_video:
        columns += [video + "chunk_index", video + "file_index", video + "from_timestamp"]
    out = []
    for rel in rels:
        table = ds.table(rel)
        with _parsing(rel):
            for row in table.select(columns).to_pylist():  # not the bulky stats/* columns
                out.append(_Episode(
                    index=int(row["episode_index"]), length=int(row["length"]),
                    data_rel=info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                      file_index=row["data/file_index"]),
                    video_rel=info["video_path"].format(
                        video_key=camera, chunk_index=row[video + "chunk_index"],
                        file_index=row[video + "file_index"]) if is_video else None,
                    video_offset_s=float(row[video + "from_timestamp"]) if is_video else 0.0))
    return out


def _names(declared: object, width: int) -> tuple[str, ...] | None:
    """A feature's ``names`` (a list, or a dict of one list such as {"motors": [...]}) when they
    name each of its ``width`` values."""
    if isinstance(declared, dict) and len(declared) == 1:
        declared = next(iter(declared.values()))
    if isinstance(declared, list) and len(declared) == width and all(isinstance(n, str) for n in declared):
        return tuple(declared)
    return None


def _episode_streams(ds: _Dataset, episode: _Episode, *, camera: str, fps: float,
                     tasks: dict[int, str], mapping: Mapping, meta: dict[str, str],
                     declared: dict[str, object]) -> Streams:
    rows = ds.rows(episode.data_rel, episode.index)
    what = f"{episode.data_rel} episode {episode.index}"
    if len(rows) == 0 or (episode.length is not None and len(rows) != episode.length):
        raise LogError("inconsistent_lengths",
                       f"{what}: {len(rows)} rows, metadata length {episode.length}")
    with _parsing(what):
        stamps = _stamps_ns(rows["timestamp"], what=what)
        task_ids = pc.unique(rows["task_index"]).to_pylist() if "task_index" in rows.column_names else []
        available = [c for c in rows.column_names if c not in BOOKKEEPING and c != camera]
        signals, topics, names = {}, {"topic.camera": camera}, {}
        for role in ROLES:
            name = mapping.pick(role, available)
            if name is None:
                continue
            values = _numeric(rows[name], what=f"{what} {name}")
            if role in SCALAR_ROLES and values.ndim == 2 and values.shape[1] == 1:
                values = values[:, 0]
            signals[role] = (stamps, values)
            topics[f"topic.{role}"] = name
            if values.ndim == 2 and (found := _names(declared.get(name), values.shape[1])):
                names[role] = found
    if episode.video_rel is None:
        frames = _decode_images(rows[camera], what=f"{what} {camera}")
    else:
        frames = _video_frames(ds.raw(episode.video_rel), episode.video_offset_s + stamps / 1e9,
                               fps=fps, what=episode.video_rel)
    task = "; ".join(tasks[t] for t in task_ids if t in tasks)
    return Streams(source_uri=ds.uris[episode.data_rel], camera_t=stamps, frames=frames,
                   signals=signals, task=task, names=names,
                   meta={**meta, **topics, "episode_index": str(episode.index)})


def read(unit: dict, *, mapping: Mapping, fetch: Callable[[str], bytes]) -> list[Streams]:
    """One ``Streams`` per episode of the LeRobot dataset ``unit`` (rules in the module doc)."""
    ds = _Dataset(unit, fetch)
    info = ds.json(INFO)
    version = info.get("codebase_version")
    if version not in VERSIONS:
        raise LogError("unsupported", f"codebase_version {version!r}; supported: {VERSIONS}")
    with _parsing(INFO):
        fps = float(info["fps"])
        features = {k: str(v["dtype"]) for k, v in info["features"].items()}
        declared = {k: v.get("names") for k, v in info["features"].items()}
    if not np.isfinite(fps) or fps <= 0:
        raise LogError("corrupt", f"{INFO}: fps {info['fps']!r}")
    visual = sorted(k for k, d in features.items() if d in ("video", "image"))
    camera = mapping.pick("camera", visual)
    if camera is None:
        raise LogError("missing_topic", f"no video or image feature among {sorted(features)}")
    cameras = [camera] + ([] if mapping.configured("camera") else [k for k in visual if k != camera])
    listing = _episodes_v3 if version == "v3.0" else _episodes_v2
    tasks = _tasks(ds, version)
    robot = str(info.get("robot_type") or "")
    meta = {"format": f"lerobot-{version}", "fps": f"{info['fps']}", "robot_type": robot, "source": robot}
    out = []
    for index, cam in enumerate(cameras):
        episodes = sorted(listing(ds, info, cam, features[cam] == "video"), key=lambda e: e.index)
        out += [_episode_streams(ds, e, camera=cam, fps=fps, tasks=tasks, mapping=mapping, declared=declared,
                                 meta={**meta, "camera_index": str(index)}) for e in episodes]
    return out

