"""Write LeRobot datasets (v2.1 and v3.0 layouts) from episode dicts, with pyarrow and PyAV.

Follows the published layout (see ``stages.formats.lerobot``) without the ``lerobot`` package:
``meta/info.json``; v2.1 ``meta/episodes.jsonl``, ``meta/tasks.jsonl``,
``meta/episodes_stats.jsonl``, one parquet and one mp4 per episode; v3.0
``meta/episodes/chunk-000/file-000.parquet``, ``meta/tasks.parquet`` (pandas-style, the task
text as the index named ``task``), ``episodes_per_file`` episodes per data parquet and per mp4,
each episode's video starting at ``from_timestamp`` (frame pts count on across the file).

Rows: ``observation.state`` (the car world's 8 state names) and ``action`` as fixed-size lists of float32
(v3.0: variable-size lists, which converted datasets hold), ``next.reward``, ``timestamp`` =
frame_index / fps as float32, ``frame_index``, ``episode_index``, ``index`` (over the dataset),
``task_index``. Camera ``observation.images.front``: codec ``ffv1`` (pix_fmt bgr0, lossless),
``libsvtav1`` (yuv420p, crf 30, g 2: what LeRobot records, lossy) or ``png`` (dtype ``image``:
PNG bytes embedded in the parquet, no mp4).
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per encoder otherwise

CAMERA = "observation.images.front"
CODECS = {"ffv1": ("ffv1", "bgr0", {}), "libsvtav1": ("libsvtav1", "yuv420p", {"crf": "30", "g": "2"})}
STATE_NAMES = ["x", "y", "heading", "vx", "vy", "speed", "yaw_rate", "on_track"]
CHUNKS_SIZE = 1000


def make_episode(length: int, *, size: int = 64, seed: int = 0, smooth: bool = False) -> dict:
    """A synthetic car episode dict (the contract of ``sim.worlds.base``); ``smooth`` frames are
    moving gradients (fit for lossy codecs)."""
    rng = np.random.default_rng(seed)
    if smooth:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        t = np.arange(length, dtype=np.float32)[:, None, None] / max(length, 1)
        frames = np.stack([128 + 100 * np.sin(2 * np.pi * (xx + t + seed / 7)),
                           128 + 100 * np.cos(2 * np.pi * (yy - t)),
                           np.broadcast_to(255 * xx * yy, (length, size, size))], axis=-1)
        frames = frames.round().astype(np.uint8)
    else:
        frames = rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8)
    actions = np.column_stack([rng.uniform(-1, 1, length), rng.uniform(0, 1, (length, 2))])
    return {"world": "carracing", "seed": seed, "task": "drive", "driver": "expert", "policy_version": "",
            "frames": frames, "actions": actions.astype(np.float32),
            "expert_actions": np.full((length, 3), np.nan, np.float32),
            "states": rng.normal(size=(length, 8)).astype(np.float32),
            "rewards": rng.normal(size=length).astype(np.float32),
            "interventions": np.zeros(length, bool), "signals": {"off_track": np.zeros(length, bool)},
            "timestamps_ns": np.arange(length, dtype=np.int64) * 20_000_000}


def encode_video(frames: np.ndarray, path: Path, *, fps: int, codec: str) -> None:
    """An mp4 of ``frames`` (uint8[T,H,W,3] RGB) with frame i at pts i / fps."""
    name, pix_fmt, options = CODECS[codec]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(name, rate=fps, options=dict(options))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def cameras(episode: dict) -> dict[str, np.ndarray]:
    """An episode's cameras: its ``cameras`` ({feature: frames}), else its frames as ``CAMERA``."""
    return episode.get("cameras") or {CAMERA: episode["frames"]}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _rows(episode: dict, *, episode_index: int, start: int, fps: int, fixed: bool,
          images: bool) -> pa.Table:
    n = len(episode["frames"])

    def vectors(values: np.ndarray) -> pa.Array:
        flat = pa.array(np.asarray(values, np.float32).ravel())
        width = values.shape[1]
        if fixed:
            return pa.FixedSizeListArray.from_arrays(flat, width)
        return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * width), flat)

    columns = {"observation.state": vectors(episode["states"]), "action": vectors(episode["actions"]),
               "next.reward": pa.array(np.asarray(episode["rewards"], np.float32)),
               "timestamp": pa.array((np.arange(n) / fps).astype(np.float32)),
               "frame_index": pa.array(np.arange(n, dtype=np.int64)),
               "episode_index": pa.array(np.full(n, episode_index, np.int64)),
               "index": pa.array(np.arange(start, start + n, dtype=np.int64)),
               "task_index": pa.array(np.zeros(n, np.int64))}
    for key, frames in cameras(episode).items() if images else ():
        columns[key] = pa.array([{"bytes": _png(f), "path": None} for f in frames],
                                pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    return pa.table(columns)


def _camera(frames: np.ndarray, *, fps: int, codec: str) -> dict:
    h, w = frames.shape[1:3]
    camera = {"dtype": "image" if codec == "png" else "video", "shape": [h, w, 3],
              "names": ["height", "width", "channels"]}
    if codec != "png":
        camera["info"] = {"video.fps": fps, "video.height": h, "video.width": w,
                          "video.codec": "av1" if codec == "libsvtav1" else codec,
                          "video.pix_fmt": CODECS[codec][1], "video.is_depth_map": False,
                          "has_audio": False}
    return camera


def _info(episodes: list[dict], *, version: str, fps: int, codec: str, robot_type: str) -> dict:
    first = episodes[0]
    v3 = version == "v3.0"
    state_names = first.get("state_names", STATE_NAMES)
    action_names = first.get("action_names", ["steer", "gas", "brake"])
    return {
        "codebase_version": version, "robot_type": robot_type, "fps": fps,
        "total_episodes": len(episodes), "total_frames": sum(len(e["frames"]) for e in episodes),
        "total_tasks": 1, "chunks_size": CHUNKS_SIZE, "splits": {"train": f"0:{len(episodes)}"},
        "data_path": ("data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet" if v3 else
                      "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"),
        "video_path": None if codec == "png" else (
            "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if v3 else
            "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"),
        "features": {
            **{key: _camera(frames, fps=fps, codec=codec) for key, frames in cameras(first).items()},
            "observation.state": {"dtype": "float32", "shape": [len(state_names)], "names": list(state_names)},
            "action": {"dtype": "float32", "shape": [len(action_names)], "names": {"motors": list(action_names)}},
            "next.reward": {"dtype": "float32", "shape": [1], "names": None},
            **{k: {"dtype": "float32" if k == "timestamp" else "int64", "shape": [1], "names": None}
               for k in ("timestamp", "frame_index", "episode_index", "index", "task_index")}},
    }


def _stats(episode: dict) -> dict:
    return {key: {"min": v.min(0).tolist(), "max": v.max(0).tolist(), "mean": v.mean(0).tolist(),
                  "std": v.std(0).tolist(), "count": [len(v)]}
            for key, v in (("observation.state", episode["states"]), ("action", episode["actions"]))}


def _write_jsonl(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _write_v21(episodes: list[dict], root: Path, *, fps: int, codec: str, task: str) -> None:
    start = 0
    for i, episode in enumerate(episodes):
        chunk = i // CHUNKS_SIZE
        path = root / f"data/chunk-{chunk:03d}/episode_{i:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_rows(episode, episode_index=i, start=start, fps=fps, fixed=True,
                             images=codec == "png"), path)
        for key, frames in cameras(episode).items() if codec != "png" else ():
            encode_video(frames, root / f"videos/chunk-{chunk:03d}/{key}/episode_{i:06d}.mp4", fps=fps, codec=codec)
        start += len(episode["frames"])
    _write_jsonl(root / "meta/episodes.jsonl", [{"episode_index": i, "tasks": [task], "length": len(e["frames"])}
                                                for i, e in enumerate(episodes)])
    _write_jsonl(root / "meta/tasks.jsonl", [{"task_index": 0, "task": task}])
    _write_jsonl(root / "meta/episodes_stats.jsonl", [{"episode_index": i, "stats": _stats(e)}
                                                      for i, e in enumerate(episodes)])


def _write_v30(episodes: list[dict], root: Path, *, fps: int, codec: str, task: str,
               episodes_per_file: int) -> None:
    meta_rows, start = [], 0
    for file_index, first in enumerate(range(0, len(episodes), episodes_per_file)):
        group = episodes[first:first + episodes_per_file]
        tables, offset = [], 0
        for i, episode in enumerate(group, start=first):
            n = len(episode["frames"])
            tables.append(_rows(episode, episode_index=i, start=start, fps=fps, fixed=False,
                                images=codec == "png"))
            row = {"episode_index": i, "tasks": [task], "length": n, "data/chunk_index": 0,
                   "data/file_index": file_index, "dataset_from_index": start,
                   "dataset_to_index": start + n, "meta/episodes/chunk_index": 0,
                   "meta/episodes/file_index": 0}
            for key in cameras(episode) if codec != "png" else ():
                row.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": file_index,
                            f"videos/{key}/from_timestamp": offset / fps,
                            f"videos/{key}/to_timestamp": (offset + n) / fps})
            meta_rows.append(row)
            start, offset = start + n, offset + n
        path = root / f"data/chunk-000/file-{file_index:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(tables), path)
        for key in cameras(group[0]) if codec != "png" else ():
            encode_video(np.concatenate([cameras(e)[key] for e in group]),
                         root / f"videos/{key}/chunk-000/file-{file_index:03d}.mp4", fps=fps, codec=codec)
    path = root / "meta/episodes/chunk-000/file-000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(meta_rows), path)
    tasks = pd.DataFrame({"task_index": [0]}, index=pd.Index([task], name="task"))
    pq.write_table(pa.Table.from_pandas(tasks), root / "meta/tasks.parquet")


def write_lerobot(episodes: list[dict], root: Path, *, version: str = "v2.1", fps: int = 50,
                  codec: str = "ffv1", task: str = "drive the track",
                  episodes_per_file: int = 1000, robot_type: str = "carracing") -> Path:
    """Write ``episodes`` as a LeRobot dataset at ``root`` (``version`` "v2.1" or "v3.0");
    v3.0 packs ``episodes_per_file`` episodes into each data parquet and mp4. An episode may
    name its cameras (``cameras``: {feature: frames}) and its ``action_names`` / ``state_names``
    (the first episode's are the dataset's). Returns ``root``."""
    if version not in ("v2.1", "v3.0") or codec not in (*CODECS, "png"):
        raise ValueError(f"version {version!r} / codec {codec!r} not supported")
    root = Path(root)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    if version == "v2.1":
        _write_v21(episodes, root, fps=fps, codec=codec, task=task)
    else:
        _write_v30(episodes, root, fps=fps, codec=codec, task=task, episodes_per_file=episodes_per_file)
    info = _info(episodes, version=version, fps=fps, codec=codec, robot_type=robot_type)
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    return root


def dataset_unit(root: Path, *, scheme: str = "") -> dict:
    """The unit a lister would produce for ``root``; with ``scheme`` (e.g. ``mem://``) the URIs
    are not paths, so only a matching ``fetch`` can read them (see ``memory_fetch``)."""
    root = Path(root)
    files = [{"uri": f"{scheme}{p}" if scheme else str(p), "rel": p.relative_to(root).as_posix(),
              "size": p.stat().st_size, "etag": ""}
             for p in sorted(root.rglob("*")) if p.is_file()]
    return {"uri": f"{scheme}{root}" if scheme else str(root), "format": "lerobot", "files": files}


def memory_fetch(unit: dict, scheme: str) -> tuple[Callable[[str], bytes], list[str]]:
    """A ``fetch`` over an in-memory copy of ``unit``'s files, and the list of URIs it served."""
    store = {f["uri"]: Path(f["uri"][len(scheme):]).read_bytes() for f in unit["files"]}
    served: list[str] = []

    def fetch(uri: str) -> bytes:
        served.append(uri)
        return store[uri]
    return fetch, served
