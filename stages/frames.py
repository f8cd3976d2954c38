"""Camera frames that are decoded when read, so a log's memory is bounded by the chunk, not the log.

A reader hands curation a ``Frames`` instead of one array of every decoded frame: pieces that
are either arrays already in memory (raw images, often views of the log's own bytes) or encoded
images (JPEG, PNG, video) with the function that decodes them. Alignment selects and resizes
lazily (``take``, ``resized``: the size reaches the decoder, so a JPEG can be decoded straight at
a smaller size); the judge then reads a span's frames a chunk at a time (``frames[a:b]``), so
only one chunk is ever decoded at once. Pure NumPy.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from stages import images

Read = Callable[[np.ndarray, tuple[int, int]], np.ndarray]  # sorted indices, output (H, W) -> uint8 [n, H, W, 3]


class Frames:
    """``len(frames)`` frames of one size; ``frames[key]`` (an int, slice or index array)
    decodes the ones asked for as uint8 [n, H, W, 3] (an int: [H, W, 3]); ``np.asarray(frames)``
    decodes them all. ``shape``, ``dtype`` and ``ndim`` read like an array's. The output size
    travels down to the decoder, which may decode straight at it (a JPEG's DCT scaling)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, count: int, size: tuple[int, int], read: Read) -> None:
        self._count, self._size, self._read = int(count), (int(size[0]), int(size[1])), read

    @classmethod
    def of(cls, array: np.ndarray) -> Frames:
        """Frames already decoded (uint8 [N, H, W, 3])."""
        array = np.asarray(array)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"frames are {array.dtype}{list(array.shape)}, expected uint8[N,H,W,3]")
        return cls(len(array), array.shape[1:3], lambda index, size: images.resize(array[index], size))

    @classmethod
    def encoded(cls, items: Sequence, size: tuple[int, int],
                decode_one: Callable[[object, tuple[int, int]], np.ndarray]) -> Frames:
        """Frames of ``size`` decoded one by one from ``items``: ``decode_one(item, out_size)``
        gives uint8 [*out_size, 3]."""
        def read(index: np.ndarray, out: tuple[int, int]) -> np.ndarray:
            frames = np.empty((len(index), *out, 3), np.uint8)
            for k, i in enumerate(index.tolist()):
                frame = decode_one(items[i], out)
                if frame.shape[:2] != tuple(out):
                    raise ValueError(f"frame {i} decoded to {frame.shape[:2]}, not {out}")
                frames[k] = frame
            return frames
        return cls(len(items), size, read)

    @classmethod
    def concat(cls, parts: Sequence[Frames]) -> Frames:
        """The frames of ``parts`` one after another (they must share one size)."""
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        sizes = {p._size for p in parts}
        if len(sizes) > 1:
            raise ValueError(f"frames of sizes {sorted(sizes)}")
        bounds = np.cumsum([0] + [len(p) for p in parts])

        def read(index: np.ndarray, out: tuple[int, int]) -> np.ndarray:
            which = np.searchsorted(bounds, index, side="right") - 1
            frames = np.empty((len(index), *out, 3), np.uint8)
            for k in np.unique(which).tolist():
                mask = which == k
                frames[mask] = parts[k]._read(index[mask] - bounds[k], out)
            return frames
        return cls(int(bounds[-1]), next(iter(sizes)) if sizes else (0, 0), read)

    def __len__(self) -> int:
        return self._count

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self._count, *self._size, 3)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):  # frames first, then within them as an array
            first = self[key[0]]
            return first[key[1:]] if np.ndim(np.arange(self._count)[key[0]]) == 0 else first[(slice(None), *key[1:])]
        index = np.arange(self._count)[key]
        if np.ndim(index) == 0:
            return self._read(np.asarray([index]), self._size)[0]
        return self._read(np.asarray(index, np.int64), self._size)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def astype(self, dtype) -> np.ndarray:
        """Every frame decoded, as ``dtype``."""
        return np.asarray(self).astype(dtype)

    def take(self, index: np.ndarray) -> Frames:
        """The frames at ``index`` (int array), still not decoded."""
        index = np.arange(self._count)[np.asarray(index, np.int64)]
        return Frames(len(index), self._size, lambda i, out: self._read(index[i], out))

    def resized(self, size: tuple[int, int]) -> Frames:
        """These frames at ``size`` (Pillow's BOX filter when shrinking, see ``stages.images``)."""
        return Frames(self._count, size, self._read)

    def chunks(self, rows: int) -> list[tuple[int, int]]:
        """(start, stop) of consecutive runs of at most ``rows`` frames."""
        return [(a, min(a + rows, self._count)) for a in range(0, self._count, max(1, rows))]
