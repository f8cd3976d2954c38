"""Camera frames that are decoded when read, so a log's memory is bounded by the chunk, not the log.

A reader hands curation a ``Frames`` instead of one array of every decoded frame: pieces that
are either arrays already in memory (raw images, often views of the log's own bytes) or encoded
images (JPEG, PNG, video) with the function that decodes them. Alignment selects and resizes
lazily (``take``, ``resized``); the judge then reads a span's frames a chunk at a time
(``frames[a:b]``), so only one chunk is ever decoded at once. Pure NumPy.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from stages import images

Decode = Callable[[np.ndarray], np.ndarray]  # sorted indices into a piece -> uint8 [n, H, W, 3]


class Frames:
    """``len(frames)`` frames of one (H, W); ``frames[key]`` (an int, slice or index array)
    decodes the ones asked for as uint8 [n, H, W, 3] (an int: [H, W, 3]); ``np.asarray(frames)``
    decodes them all. ``shape``, ``dtype`` and ``ndim`` read like an array's."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, count: int, size: tuple[int, int], read: Decode) -> None:
        self._count, self._size, self._read = int(count), (int(size[0]), int(size[1])), read

    @classmethod
    def of(cls, array: np.ndarray) -> Frames:
        """Frames already decoded (uint8 [N, H, W, 3])."""
        array = np.asarray(array)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"frames are {array.dtype}{list(array.shape)}, expected uint8[N,H,W,3]")
        return cls(len(array), array.shape[1:3], lambda index: array[index])

    @classmethod
    def encoded(cls, items: Sequence, size: tuple[int, int], decode_one: Callable[[object], np.ndarray]) -> Frames:
        """Frames decoded one by one from ``items`` by ``decode_one`` (each must give ``size``)."""
        def read(index: np.ndarray) -> np.ndarray:
            out = np.empty((len(index), *size, 3), np.uint8)
            for k, i in enumerate(index.tolist()):
                frame = decode_one(items[i])
                if frame.shape[:2] != tuple(size):
                    raise ValueError(f"frame {i} decoded to {frame.shape[:2]}, its header said {size}")
                out[k] = frame
            return out
        return cls(len(items), size, read)

    @classmethod
    def concat(cls, parts: Sequence[Frames]) -> Frames:
        """The frames of ``parts`` one after another (they must share one size)."""
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        sizes = {p._size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"frames of sizes {sorted(sizes)}")
        bounds = np.cumsum([0] + [len(p) for p in parts])

        def read(index: np.ndarray) -> np.ndarray:
            which = np.searchsorted(bounds, index, side="right") - 1
            out = np.empty((len(index), *next(iter(sizes)), 3), np.uint8)
            for k in np.unique(which).tolist():
                mask = which == k
                out[mask] = parts[k]._read(index[mask] - bounds[k])
            return out
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
            return self._read(np.asarray([index]))[0]
        return self._read(np.asarray(index, np.int64))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def astype(self, dtype) -> np.ndarray:
        """Every frame decoded, as ``dtype``."""
        return np.asarray(self).astype(dtype)

    def take(self, index: np.ndarray) -> Frames:
        """The frames at ``index`` (int array), still not decoded."""
        index = np.arange(self._count)[np.asarray(index, np.int64)]
        return Frames(len(index), self._size, lambda i: self._read(index[i]))

    def resized(self, size: tuple[int, int]) -> Frames:
        """These frames at ``size`` (``stages.images.resize`` as they are read)."""
        size = (int(size[0]), int(size[1]))
        if size == self._size:
            return self
        return Frames(self._count, size, lambda i: images.resize(self._read(i), size))

    def chunks(self, rows: int) -> list[tuple[int, int]]:
        """(start, stop) of consecutive runs of at most ``rows`` frames."""
        return [(a, min(a + rows, self._count)) for a in range(0, self._count, max(1, rows))]
