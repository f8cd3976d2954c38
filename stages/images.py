"""Camera frames in the lake: raw RGB bytes of any resolution, and resizing them.

The frames table keeps each frame exactly as curated: ``image`` holds its RGB bytes (uint8,
height x width x 3, row-major) and ``height`` / ``width`` its shape, so logs of any camera
share one table and the training resolution is chosen when a model reads them. Frames larger
than a configured maximum side are shrunk at ingest (``fit``), keeping their aspect ratio.
Pure NumPy, Arrow and Pillow.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

IMAGE = pa.large_binary()  # a frame's bytes; large offsets: a table may hold more than 2 GiB of pixels


def hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an int (square) or a pair."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


def fit(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``shape`` (H, W) shrunk so that its longer side is at most ``max_side``, aspect kept."""
    height, width = shape
    longest = max(height, width)
    if max_side <= 0 or longest <= max_side:
        return int(height), int(width)
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(frames: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """uint8 [N, H, W, 3] frames at ``size`` (int: square): Pillow's BOX filter when neither side
    grows, BILINEAR otherwise; the frames themselves (contiguous) when already that size."""
    height, width = hw(size)
    if frames.shape[1:3] == (height, width):
        return np.ascontiguousarray(frames)
    shrink = height <= frames.shape[1] and width <= frames.shape[2]
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), method))
    return out


def to_columns(frames: np.ndarray) -> tuple[pa.Array, pa.Array, pa.Array]:
    """(image, height, width) columns of uint8 [N, H, W, 3] frames, the bytes not copied twice."""
    frames = np.ascontiguousarray(frames, np.uint8)
    n, height, width = frames.shape[:3]
    offsets = np.arange(n + 1, dtype=np.int64) * (height * width * 3)
    image = pa.LargeBinaryArray.from_buffers(IMAGE, n, [None, pa.py_buffer(offsets), pa.py_buffer(frames)])
    return (image, pa.array(np.full(n, height, np.int32)), pa.array(np.full(n, width, np.int32)))


def _binary(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64[N+1], data uint8) of a binary or large binary column without nulls."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError(f"{arr.null_count} frames have no image")
    kind = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    _, offsets, data = arr.buffers()
    offsets = np.frombuffer(offsets, kind)[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    return offsets, np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)


def decode(table: pa.Table, size: int | Sequence[int] | None = None) -> np.ndarray:
    """The frames of a table with ``image``, ``height`` and ``width`` columns as uint8
    [N, H, W, 3]; every frame resized to ``size`` when given (int: square). Without ``size`` the
    frames must share one shape. Frames of one shape are read straight from the column's buffer.
    """
    heights = table.column("height").to_numpy().astype(np.int64)
    widths = table.column("width").to_numpy().astype(np.int64)
    offsets, data = _binary(table.column("image"))
    if np.any(np.diff(offsets) != heights * widths * 3):
        raise ValueError("an image's bytes do not match its height x width x 3")
    n = len(heights)
    if n == 0:
        return np.zeros((0, *(hw(size) if size is not None else (0, 0)), 3), np.uint8)
    shapes = set(zip(heights.tolist(), widths.tolist()))
    if len(shapes) == 1:
        (height, width), = shapes
        frames = data[offsets[0]:offsets[-1]].reshape(n, height, width, 3)
        return resize(frames, size) if size is not None else frames
    if size is None:
        raise ValueError(f"frames come in {len(shapes)} sizes {sorted(shapes)[:4]}...; give a size")
    out = np.empty((n, *hw(size), 3), np.uint8)
    for i in range(n):
        frame = data[offsets[i]:offsets[i + 1]].reshape(1, heights[i], widths[i], 3)
        out[i] = resize(frame, size)[0]
    return out
