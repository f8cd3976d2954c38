"""Training-sampler benchmark, part 2 of ``benchmarks.bench_curate``: random batches of frame
histories from a curated ``frames`` table, Lance against Parquet, and with prefetching.

The rows sampled are those of one world of the table (``filter`` ``world = '<name>'``; by
default the world holding the most image bytes, as one training run reads one robot's rows,
whose action and state widths agree). Frames come at their curated resolution, or resized to
``size`` x ``size`` when given (a table whose frames differ in size needs one).

1. ``sample_ratio``: ``stages.sampler.HistorySampler(frames_uri, history=K, filter=...,
   image_size=size).batch(B)`` (Lance ``take`` of the unique rows of a batch) against
   ``ParquetHistorySampler``: the same table written with ``pq.write_table`` (default row
   groups), the same filter and window rule (``history_windows``), per batch the unique rows
   fetched by random access two ways, ``pyarrow.dataset.dataset(path).take`` and
   ``ParquetFile.read_row_groups`` of only the row groups holding them, decoded by the same
   ``stages.images.decode``. The faster way is the Parquet figure (both are reported). A
   check asserts that both return the same images for the same rows. Each sampler gets one
   warm-up batch, then timed batches; sample_ratio = Lance samples/s / Parquet samples/s.
2. Prefetching (``stages.prefetch.Prefetcher``, one thread, depth 2): a consumer that stands
   for a training loop takes a batch, then sleeps ``step_ms`` (the accelerator's step; by
   default the Lance batch time just measured, so loading and stepping take as long). Without
   prefetching it waits the whole load of every batch; with it, only for what the background
   thread has not made yet. ``prefetch_wait_ms`` and ``no_prefetch_wait_ms``: mean wait per
   batch (the prefetcher's first batch, made while the consumer waits from a cold start, is
   left out and reported as ``prefetch_first_wait_ms``).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from time import perf_counter
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from stages.images import decode
from stages.prefetch import Prefetcher
from stages.sampler import HistorySampler, history_slots
from stages.schemas import vectors

SAMPLE_COLUMNS = ["episode_id", "step", "image", "height", "width", "label", "action"]


def history_windows(episode_ids: np.ndarray, steps: np.ndarray, history: int) -> np.ndarray:
    """Row offsets [W, history] of the windows of consecutive steps of one episode ending at each row.

    The rule of ``HistorySampler`` (``stages.sampler.history_slots``): rows ordered by
    (episode_id, step); a window that reaches before its episode's first row repeats that row;
    windows spanning a gap in the steps are left out.
    """
    order = np.lexsort((steps, episode_ids))
    slots, valid = history_slots(episode_ids[order], steps[order], history)
    return order[slots[valid]]


class ParquetHistorySampler:
    """``HistorySampler``'s batches by random access into one Parquet file (the rows of ``world``).

    ``method``: ``"dataset.take"`` or ``"read_row_groups"`` (read only the row groups holding
    a batch's rows, then take within). Windows are drawn uniformly without replacement within
    a batch.
    """

    METHODS = ("dataset.take", "read_row_groups")

    def __init__(self, path: str, *, history: int, world: str, method: str, size: int | None,
                 seed: int = 0) -> None:
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        self.file = pq.ParquetFile(path)
        self.dataset = ds.dataset(path, format="parquet")
        self.method, self.size = method, size
        light = self.file.read(columns=["episode_id", "step", "world"])
        mine = pc.equal(light.column("world"), world).to_numpy(zero_copy_only=False)
        offsets = np.flatnonzero(mine)
        windows = history_windows(np.asarray(light.column("episode_id").to_pylist(), object)[offsets],
                                  light.column("step").to_numpy()[offsets], history)
        self.windows = offsets[windows]
        meta = self.file.metadata
        self.group_starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self.rng = np.random.default_rng(seed)

    def fetch(self, offsets: np.ndarray) -> pa.Table:
        """The rows at sorted unique file ``offsets``, in that order (``SAMPLE_COLUMNS``)."""
        if self.method == "dataset.take":
            return self.dataset.take(pa.array(offsets), columns=SAMPLE_COLUMNS)
        groups = np.searchsorted(self.group_starts, offsets, side="right") - 1
        needed = np.unique(groups)
        sizes = np.diff(self.group_starts)[needed]
        base = np.r_[0, np.cumsum(sizes)[:-1]]  # where each needed group starts in the read table
        local = offsets - self.group_starts[groups] + base[np.searchsorted(needed, groups)]
        return self.file.read_row_groups(needed.tolist(), columns=SAMPLE_COLUMNS).take(pa.array(local))

    def batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """frames_BKHWC uint8, label_BA and action_BA float32, as ``HistorySampler.batch``."""
        rows = self.windows[self.rng.choice(len(self.windows), batch_size, replace=False)]
        unique, inverse = np.unique(rows.reshape(-1), return_inverse=True)
        fetched = self.fetch(unique)
        slot = inverse.reshape(rows.shape)
        end = slot[:, -1]
        return {"frames_BKHWC": decode(fetched, self.size)[slot],
                "label_BA": vectors(fetched.column("label"))[end],
                "action_BA": vectors(fetched.column("action"))[end]}


def batch_seconds(batch: Callable[[int], dict[str, np.ndarray]], *, batches: int, batch_size: int,
                  history: int) -> float:
    """Mean seconds per batch over ``batches`` timed batches after one warm-up; shapes checked."""
    batch(batch_size)
    start = perf_counter()
    for _ in range(batches):
        out = batch(batch_size)
        if out["frames_BKHWC"].shape[:2] != (batch_size, history):
            raise RuntimeError(f"batch of shape {out['frames_BKHWC'].shape}")
    return (perf_counter() - start) / batches


def busiest_world(frames_uri: str) -> tuple[str, int]:
    """The world of the table holding the most image bytes, and its rows."""
    table = lance.dataset(frames_uri).to_table(columns=["world", "height", "width"])
    pixels = pc.multiply(pc.cast(table.column("height"), pa.int64()), pc.cast(table.column("width"), pa.int64()))
    sums = pa.table({"world": table.column("world"), "pixels": pixels}).group_by("world").aggregate(
        [("pixels", "sum"), ("pixels", "count")]).sort_by([("pixels_sum", "descending"), ("world", "ascending")])
    return sums.column("world")[0].as_py(), sums.column("pixels_count")[0].as_py()


def consumer_waits(batches: Any, *, count: int, step_s: float) -> list[float]:
    """Seconds a training loop waits for each of ``count`` batches of the iterator ``batches``,
    sleeping ``step_s`` (its step) after each."""
    waits = []
    for _ in range(count):
        start = perf_counter()
        next(batches)
        waits.append(perf_counter() - start)
        time.sleep(step_s)
    return waits


def bench_prefetch(make_sampler: Callable[[], HistorySampler], *, batch_size: int, batches: int,
                   step_ms: float) -> dict[str, Any]:
    """Mean wait per batch of a consumer stepping ``step_ms``, without and with a ``Prefetcher``."""
    plain = make_sampler()

    def unprefetched():
        while True:
            yield plain.batch(batch_size)
    plain.batch(batch_size)  # warm, as the prefetcher's left-out first batch
    start = perf_counter()
    without = consumer_waits(unprefetched(), count=batches, step_s=step_ms / 1e3)
    without_wall = perf_counter() - start
    sampler = make_sampler()
    with Prefetcher(lambda: sampler.batch(batch_size), depth=2, count=batches + 1) as prefetched:
        first = consumer_waits(prefetched, count=1, step_s=step_ms / 1e3)[0]
        start = perf_counter()
        with_ = consumer_waits(prefetched, count=batches, step_s=step_ms / 1e3)
        with_wall = perf_counter() - start
    return {"step_ms": step_ms, "prefetch_batches": batches,
            "no_prefetch_wait_ms": 1e3 * float(np.mean(without)), "prefetch_wait_ms": 1e3 * float(np.mean(with_)),
            "prefetch_wait_p90_ms": 1e3 * float(np.percentile(with_, 90)), "prefetch_first_wait_ms": 1e3 * first,
            "prefetch_speedup": without_wall / with_wall}


def bench_sampler(frames_uri: str, parquet_path: str, *, batches: int, parquet_batches: int,
                  batch_size: int, history: int, size: int | None, step_ms: float | None,
                  seed: int) -> dict[str, Any]:
    """Both parts on the table at ``frames_uri`` (the module doc); figures for the JSON."""
    world, world_rows = busiest_world(frames_uri)
    where = "world = '" + world.replace("'", "''") + "'"
    table = lance.dataset(frames_uri).to_table()
    pq.write_table(table, parquet_path)

    def make_sampler() -> HistorySampler:
        return HistorySampler(frames_uri, history=history, filter=where, image_size=size, seed=seed)
    start = perf_counter()
    lance_sampler = make_sampler()
    lance_index_s = perf_counter() - start
    lance_s = batch_seconds(lance_sampler.batch, batches=batches, batch_size=batch_size, history=history)
    frame_shape = list(lance_sampler.batch(1)["frames_BKHWC"].shape[2:])
    parquet_s, parquet_index_s = {}, {}
    for method in ParquetHistorySampler.METHODS:
        start = perf_counter()
        sampler = ParquetHistorySampler(parquet_path, history=history, world=world, method=method, size=size,
                                        seed=seed)
        parquet_index_s[method] = perf_counter() - start
        if len(sampler.windows) != len(lance_sampler):
            raise RuntimeError(f"{len(sampler.windows)} Parquet windows, {len(lance_sampler)} Lance")
        probe = np.unique(sampler.windows[:: max(1, len(sampler.windows) // 64)].reshape(-1))
        if not np.array_equal(decode(sampler.fetch(probe), size), decode(table.take(pa.array(probe)), size)):
            raise RuntimeError(f"Parquet {method} returned other images than the Lance table")
        parquet_s[method] = batch_seconds(sampler.batch, batches=parquet_batches, batch_size=batch_size,
                                          history=history)
    best = min(parquet_s, key=parquet_s.get)
    figures = {
        "sample_world": world, "sample_world_rows": world_rows, "sample_frame_shape": frame_shape,
        "lance_batch_ms": 1e3 * lance_s, "lance_samples_per_s": batch_size / lance_s,
        "parquet_samples_per_s": batch_size / parquet_s[best], "sample_ratio": parquet_s[best] / lance_s,
        "parquet_method": best, "parquet_samples_per_s_by_method": {m: batch_size / s for m, s in parquet_s.items()},
        "parquet_row_groups": pq.ParquetFile(parquet_path).metadata.num_row_groups,
        "parquet_bytes": os.path.getsize(parquet_path), "sampler_windows": len(lance_sampler),
        "lance_index_s": lance_index_s, "parquet_index_s": parquet_index_s}
    del table
    return figures | bench_prefetch(make_sampler, batch_size=batch_size, batches=batches,
                                    step_ms=step_ms if step_ms is not None else round(1e3 * lance_s, 1))
