"""Curation benchmark: ingest + curate throughput and training-sampler throughput, each against
a straightforward baseline measured in the same run on the same data.

Run with ``make bench-curate`` (``.venv/bin/python -m benchmarks.bench_curate``); ``--help``
lists the flags. Progress goes to stderr; stdout gets a markdown table and then, as its LAST
line, one JSON object with every figure.

1. Ingest + curate (frames/s). ``--episodes`` synthetic episodes of ``--frames`` 64x64 frames
   (``synthetic_episode``: moving sine gradients plus noise, actions and states in range; not
   the simulator) are written as MCAP with ``stages.mcap_log.write_episode`` into a landing
   directory.

   * Baseline (``baseline_mcap_to_parquet``): the single-process script a user writes first:
     ``mcap`` reader with the ROS 2 decoder, ``iter_decoded_messages()`` over every message,
     camera bytes + header stamps + ``/vehicle/action`` values into one Arrow table per file,
     ``pyarrow.parquet.write_table`` with default settings. baseline_fps = frames / seconds.
   * worldloop: ``flows.curate.curate_flow(config="default", lake=<fresh lake>, landing=...,
     reasoner=<the warm-up's reasoner>)`` with the Prefect settings of ``worldloop curate``
     (``flows.runtime.prefect_settings``: in ephemeral mode no flow-run heartbeats). Ray is
     started and a first curate of an empty lake (4 x 200 frames, its own landing) runs first:
     it warms Prefect's ephemeral API and the Ray workers and trains the scene reasoner, which
     a lake does once (its seconds are reported as
     ``first_curate_s``). The timed runs describe clips with that reasoner, as every later
     curate of a lake does. curate_fps = frames written (``rows_added["frames"]``) / wall
     seconds of the flow call.
   * Pure stages (``stages_one_core``): ``ingest_unit`` + ``judge_batch`` over the same files
     in this process, no Ray or Prefect: the per-frame work of curation on one core, so
     ``curate_ratio_bound`` = cores x stages_one_core_fps / baseline_fps is the ratio the flow
     could reach with no orchestration overhead at all.

   Fairness: both are timed ``--runs`` times (default 3), interleaved (baseline, curate,
   baseline, curate, ...), each run
   reading the same landing files (in the page cache after generation) into a fresh output;
   the best run of each is reported (the pure stages too: best of as many runs), since other
   tenants of a shared machine slow single runs down. curate_ratio = curate_fps / baseline_fps.

2. Training sampler (samples/s). Random batches (``--batch``, default 128) of frame histories
   (``--history``, default 3) from the ``frames`` table the last curate run wrote:

   * worldloop: ``stages.sampler.HistorySampler(frames_uri, history=K).batch(B)`` (Lance
     ``take`` of the unique rows of a batch).
   * Parquet (``ParquetHistorySampler``): the same table written with ``pq.write_table``
     (default row groups), the same window index (``history_windows``), and per batch the
     unique rows fetched by random access, two ways: ``pyarrow.dataset.dataset(path).take``
     and ``ParquetFile.read_row_groups`` of only the row groups holding them. The faster one
     is the Parquet figure (both are reported). A check asserts Parquet and Lance return the
     same images for the same row offsets.

   Each sampler gets one warm-up batch, then ``--batches`` timed batches (default 30);
   sample_ratio = lance samples/s / parquet samples/s.

All data lives in a temporary directory removed at the end (``--keep`` keeps it). The figures
depend on the machine and its load: the JSON records cpu_count, platform and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from time import perf_counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory

from stages.mcap_log import ACTION, CAMERA, write_episode

SAMPLE_COLUMNS = ["episode_id", "step", "image", "label", "action"]
STEP_NS = 20_000_000  # 50 Hz, CarRacing's frame rate


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synthetic_episode(index: int, *, frames: int, size: int = 64, seed: int = 0) -> dict[str, Any]:
    """A fast synthetic episode dict (the codebase's keys), distinct for each ``index``.

    Frames: a sine gradient with a per-episode direction, spatial frequency, colour and drift
    speed, shifted each step, plus integer noise in [-4, 4]. Actions: smooth steer in
    [-0.7, 0.7], gas and brake in [0, 1]; the expert is the action plus small noise, NaN for
    every 4th episode. States follow a kinematic integration of speed and steer (on track).
    Episodes with index % 3 == 1 have one 10-step intervention. Stamps are 50 Hz.
    """
    rng = np.random.default_rng([seed, index])
    t = np.arange(frames, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle, cycles = rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 4.0)
    wave = 2 * np.pi * cycles * (np.cos(angle) * xx + np.sin(angle) * yy)
    phase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    amplitude = rng.uniform(40, 100, 3).astype(np.float32)
    base = rng.uniform(80, 170, 3).astype(np.float32)
    drift = np.float32(rng.uniform(0.05, 0.2))  # radians per step
    image = base + amplitude * np.sin(wave[None, :, :, None] + drift * t[:, None, None, None] + phase)
    image += rng.integers(-4, 5, image.shape, dtype=np.int8)
    period = rng.uniform(60, 200)
    steer = 0.7 * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    gas = 0.5 + 0.4 * np.sin(2 * np.pi * t / (1.7 * period))
    brake = np.clip(-0.8 * np.sin(2 * np.pi * t / (1.7 * period)), 0.0, 1.0)
    actions = np.stack([steer, gas, brake], axis=1).astype(np.float32)
    expert = np.clip(actions + rng.normal(0, 0.02, actions.shape), [-1, 0, 0], 1).astype(np.float32)
    if index % 4 == 3:
        expert[:] = np.nan
    dt = STEP_NS / 1e9
    speed = 10.0 + 20.0 * gas
    yaw_rate = 2.0 * steer
    heading = np.cumsum(yaw_rate * dt)
    vx, vy = speed * np.cos(heading), speed * np.sin(heading)
    states = np.stack([np.cumsum(vx * dt), np.cumsum(vy * dt), heading, vx, vy, speed, yaw_rate,
                       np.ones(frames)], axis=1).astype(np.float32)
    interventions = np.zeros(frames, bool)
    if index % 3 == 1:
        interventions[frames // 3:frames // 3 + 10] = True
    return {
        "frames": np.clip(image, 0, 255).astype(np.uint8),
        "timestamps_ns": 1_700_000_000_000_000_000 + index * 10**12 + np.arange(frames, dtype=np.int64) * STEP_NS,
        "actions": actions, "expert_actions": expert, "states": states,
        "rewards": (0.1 * speed / 30.0).astype(np.float32), "interventions": interventions,
        "off_track": np.zeros(frames, bool), "world": "bench-synthetic", "seed": seed * 100_000 + index,
        "driver": "bench", "policy_version": "",
    }


def write_landing(landing: str, *, episodes: int, frames: int, seed: int) -> list[str]:
    """Write ``episodes`` synthetic episodes as MCAP files into ``landing``; their paths."""
    os.makedirs(landing, exist_ok=True)
    return [write_episode(synthetic_episode(i, frames=frames, seed=seed),
                          os.path.join(landing, f"episode_{i:05d}.mcap")) for i in range(episodes)]


def baseline_mcap_to_parquet(paths: list[str], out_dir: str) -> int:
    """BASELINE (not worldloop): MCAP -> Parquet the way a user writes it first; frames written.

    One process, one file at a time: decode every message with the ROS 2 decoder, keep camera
    bytes, header stamps and ``/vehicle/action`` values, build one Arrow table per file and write
    it with ``pq.write_table`` (default compression). No validation, alignment or resizing.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for path in paths:
        images, stamps, actions = [], [], []
        with open(path, "rb") as stream:
            reader = make_reader(stream, decoder_factories=[DecoderFactory()])
            for _, channel, _, msg in reader.iter_decoded_messages():
                if channel.topic == CAMERA:
                    images.append(bytes(msg.data))
                    stamps.append(msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)
                elif channel.topic == ACTION:
                    actions.append(list(msg.data))
        name = os.path.splitext(os.path.basename(path))[0]
        table = pa.table({"episode": [name] * len(images), "step": list(range(len(images))),
                          "timestamp_ns": stamps, "image": images, "action": actions})
        pq.write_table(table, os.path.join(out_dir, f"{name}.parquet"))
        written += table.num_rows
    return written


def run_curate(*, landing: str, lake: str, reasoner: str | None = None) -> tuple[float, dict]:
    """Wall seconds of one ``curate_flow`` call on ``landing`` into ``lake``, and its summary;
    with the Prefect settings ``worldloop curate`` runs it with (``flows.runtime.prefect_settings``)."""
    from flows.curate import curate_flow
    from flows.runtime import prefect_settings

    with prefect_settings():
        start = perf_counter()
        summary = curate_flow(config="default", lake=lake, landing=landing, reasoner=reasoner)
        return perf_counter() - start, summary


def stages_one_core(paths: list[str], root: str) -> float:
    """Seconds of the pure stages alone on one core, no Ray or Prefect: ``ingest_unit`` and
    ``judge_batch`` (quality, events, clips, Lance fragment writes) over every file in turn.

    Not a competitor: it bounds what the flow can reach on this machine. With N cores and no
    overhead at all, curate_fps <= N * frames / these seconds.
    """
    from flows.config import preset
    from flows.curate import stage_params
    from stages import sources, storage
    from stages.curate_ray import judge_batch
    from stages.ingest import ingest_unit
    from stages.lake import Lake
    from stages.streams import Mapping

    params = stage_params(preset("default"), turn=0)  # what curate_flow gives the stages
    mapping = Mapping.from_dict(params["mapping"])
    units = sources.discover([{"uri": p, "size": os.path.getsize(p), "etag": ""} for p in paths],
                             root=os.path.dirname(paths[0]))
    lake = Lake(os.path.join(root, "stages_lake"))
    start = perf_counter()
    for unit in units:
        result = ingest_unit(unit, fetch=storage.read_bytes, mapping=mapping, **params["ingest"])
        for _, table in result.spans:
            judge_batch(table, lake=lake, **params["judge"])
    return perf_counter() - start


def history_windows(episode_ids: np.ndarray, steps: np.ndarray, history: int) -> np.ndarray:
    """Row offsets [W, history] of the windows of consecutive steps of one episode ending at each row.

    The same rule as ``HistorySampler``: rows are ordered by (episode_id, step); a window that
    reaches before its episode's first row repeats that row; windows spanning a gap in the
    steps are left out.
    """
    order = np.lexsort((steps, episode_ids))
    episode, step = episode_ids[order], steps[order]
    rows = np.arange(len(order))
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    first = starts[np.searchsorted(starts, rows, side="right") - 1]
    back = np.arange(history - 1, -1, -1)
    slots = np.maximum(rows[:, None] - back[None, :], first[:, None])
    expected = np.maximum(step[:, None] - back[None, :], step[first][:, None])
    return order[slots[(step[slots] == expected).all(axis=1)]]


class ParquetHistorySampler:
    """The Parquet comparison: ``HistorySampler``'s batches by random access into one Parquet file.

    ``method`` is ``"dataset.take"`` (``pyarrow.dataset`` take of the unique rows of a batch)
    or ``"read_row_groups"`` (read only the row groups holding them, then take within).
    Windows are drawn uniformly without replacement within a batch.
    """

    METHODS = ("dataset.take", "read_row_groups")

    def __init__(self, path: str, *, history: int, method: str, seed: int = 0) -> None:
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        self.file = pq.ParquetFile(path)
        self.dataset = ds.dataset(path, format="parquet")
        self.method = method
        light = self.file.read(columns=["episode_id", "step"])
        self.windows = history_windows(np.asarray(light.column("episode_id").to_pylist(), object),
                                       light.column("step").to_numpy(), history)
        meta = self.file.metadata
        self.group_starts = np.cumsum([0] + [meta.row_group(i).num_rows
                                             for i in range(meta.num_row_groups)])
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
        """frames_BKHWC uint8, label_B3 and action_B3 float32, as ``HistorySampler.batch``."""
        rows = self.windows[self.rng.choice(len(self.windows), batch_size, replace=False)]
        unique, inverse = np.unique(rows.reshape(-1), return_inverse=True)
        fetched = self.fetch(unique)
        images = fetched.column("image").combine_chunks().to_numpy_ndarray()
        slot = inverse.reshape(rows.shape)
        end = slot[:, -1]
        return {"frames_BKHWC": images[slot], "label_B3": _vectors(fetched.column("label"))[end],
                "action_B3": _vectors(fetched.column("action"))[end]}


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1).astype(np.float32)


def batches_per_second(batch: Callable[[int], dict[str, np.ndarray]], *, batches: int,
                       batch_size: int, history: int) -> float:
    """One warm-up batch, then ``batches`` timed batches; each batch's shape is checked."""
    batch(batch_size)
    start = perf_counter()
    for _ in range(batches):
        out = batch(batch_size)
        if out["frames_BKHWC"].shape[:2] != (batch_size, history):
            raise RuntimeError(f"batch of shape {out['frames_BKHWC'].shape}")
    return batches / (perf_counter() - start)


def bench_sampler(frames_uri: str, parquet_path: str, *, batches: int, batch_size: int,
                  history: int, seed: int) -> dict[str, Any]:
    """Lance ``HistorySampler`` vs Parquet random access on the same frames table."""
    import lance

    from stages.sampler import HistorySampler

    table = lance.dataset(frames_uri).to_table()
    pq.write_table(table, parquet_path)
    start = perf_counter()
    lance_sampler = HistorySampler(frames_uri, history=history, seed=seed)
    lance_index_s = perf_counter() - start
    lance_bps = batches_per_second(lance_sampler.batch, batches=batches, batch_size=batch_size,
                                   history=history)
    parquet_bps, parquet_index_s = {}, {}
    for method in ParquetHistorySampler.METHODS:
        start = perf_counter()
        sampler = ParquetHistorySampler(parquet_path, history=history, method=method, seed=seed)
        parquet_index_s[method] = perf_counter() - start
        if len(sampler.windows) != len(lance_sampler):
            raise RuntimeError(f"{len(sampler.windows)} Parquet windows, {len(lance_sampler)} Lance")
        probe = np.unique(sampler.windows[:: max(1, len(sampler.windows) // 64)].reshape(-1))
        same = (sampler.fetch(probe).column("image").combine_chunks().to_numpy_ndarray()
                == table.column("image").take(pa.array(probe)).combine_chunks().to_numpy_ndarray())
        if not same.all():
            raise RuntimeError(f"Parquet {method} returned other images than the Lance table")
        parquet_bps[method] = batches_per_second(sampler.batch, batches=batches,
                                                 batch_size=batch_size, history=history)
    best = max(parquet_bps, key=parquet_bps.get)
    return {
        "lance_batches_per_s": lance_bps, "lance_samples_per_s": lance_bps * batch_size,
        "parquet_batches_per_s": parquet_bps[best], "parquet_samples_per_s": parquet_bps[best] * batch_size,
        "sample_ratio": lance_bps / parquet_bps[best], "parquet_method": best,
        "parquet_samples_per_s_by_method": {m: v * batch_size for m, v in parquet_bps.items()},
        "parquet_row_groups": pq.ParquetFile(parquet_path).metadata.num_row_groups,
        "parquet_bytes": os.path.getsize(parquet_path), "sampler_windows": len(lance_sampler),
        "lance_index_s": lance_index_s, "parquet_index_s": parquet_index_s,
    }


def bench_curate(root: str, *, episodes: int, frames: int, seed: int, runs: int = 3) -> dict[str, Any]:
    """Generate the landing dir, warm up Ray and Prefect, then time baseline and curate ``runs``
    times each, interleaved."""
    from flows.runtime import ensure_ray

    start = perf_counter()
    paths = write_landing(os.path.join(root, "landing"), episodes=episodes, frames=frames, seed=seed)
    log(f"wrote {episodes} x {frames} frames as MCAP in {perf_counter() - start:.1f} s")
    ensure_ray()
    write_landing(os.path.join(root, "warmup_landing"), episodes=4, frames=200, seed=seed + 1)
    warm_lake = os.path.join(root, "warmup_lake")
    warm_s, warm = run_curate(landing=os.path.join(root, "warmup_landing"), lake=warm_lake)
    reasoner = _champion_reasoner(warm_lake)
    log(f"first curate on an empty lake (4 x 200 frames, trains the reasoner): {warm_s:.1f} s")
    stages_s = min(stages_one_core(paths, os.path.join(root, f"stages_{run}")) for run in range(runs))
    log(f"pure stages on one core: {stages_s:.2f} s")
    baseline_s, curate_s, summaries = [], [], []
    for run in range(1, runs + 1):
        start = perf_counter()
        baseline_frames = baseline_mcap_to_parquet(paths, os.path.join(root, f"baseline_parquet_{run}"))
        baseline_s.append(perf_counter() - start)
        seconds, summary = run_curate(landing=os.path.join(root, "landing"), lake=os.path.join(root, f"lake_{run}"),
                                      reasoner=reasoner)
        curate_s.append(seconds)
        summaries.append(summary)
        log(f"run {run}: baseline {baseline_s[-1]:.2f} s, curate {seconds:.2f} s "
            f"(kept {summary['kept']}, rejected {summary['rejected']}, rows {summary['rows_added']})")
    summary = summaries[-1]
    written = int(summary["rows_added"]["frames"])
    if written == 0:
        raise RuntimeError(f"curate wrote no frames: {summary.get('rejects')}")
    baseline_fps, curate_fps = baseline_frames / min(baseline_s), written / min(curate_s)
    return {
        "baseline_fps": baseline_fps, "curate_fps": curate_fps, "curate_ratio": curate_fps / baseline_fps,
        "baseline_seconds": min(baseline_s), "curate_seconds": min(curate_s),
        "baseline_runs_s": baseline_s, "curate_runs_s": curate_s,
        "timing": f"best of {runs} runs each, interleaved baseline/curate/baseline/curate/...",
        "frames_written": written, "baseline_frames": baseline_frames,
        "kept": summary["kept"], "rejected": summary["rejected"], "seen": summary["seen"],
        "mcap_bytes": sum(os.path.getsize(p) for p in paths), "first_curate_s": warm_s,
        "first_curate_reasoner": (warm["clips"].get("describer") or {}).get("source", ""),
        "stages_one_core_fps": baseline_frames / stages_s,
        "curate_ratio_bound": (os.cpu_count() or 1) * min(baseline_s) / stages_s,
        "clips_written": int(summary["rows_added"]["clips"]),
        "lake": os.path.join(root, f"lake_{runs}"),  # the last run's lake: part 2 samples it
    }


def _champion_reasoner(lake: str) -> str:
    """The artifact URI of the reasoner the first curate of ``lake`` trained."""
    from flows.describe import REASONER
    from stages.registry import Registry

    champion = Registry(lake).get(REASONER, alias="champion")
    if champion is None:
        raise RuntimeError(f"the first curate of {lake} trained no reasoner")
    return champion.artifact_uri


def configure_env(root: str) -> None:
    """Before Prefect, Ray or torch are imported: a private Prefect home, quiet logs, 1 thread."""
    os.environ["PREFECT_HOME"] = os.path.join(root, "prefect")
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _table(figures: dict[str, Any]) -> str:
    rows = [("frames (episodes x frames, 64x64)", f"{figures['frames']} ({figures['episodes']} x "
                                                  f"{figures['frames_per_episode']})"),
            ("baseline_fps (MCAP -> Parquet script)", f"{figures['baseline_fps']:.0f}"),
            ("curate_fps (curate_flow)", f"{figures['curate_fps']:.0f}"),
            ("curate_ratio (target >= 3)", f"{figures['curate_ratio']:.2f}"),
            ("pure stages, one core, no Ray/Prefect (frames/s)", f"{figures['stages_one_core_fps']:.0f}"),
            (f"ratio bound: {figures['cpu_count']} cores x pure stages / baseline",
             f"{figures['curate_ratio_bound']:.2f}"),
            ("first curate of an empty lake (trains the reasoner), s", f"{figures['first_curate_s']:.1f}"),
            *([("lance samples/s (HistorySampler)", f"{figures['lance_samples_per_s']:.0f}"),
               (f"parquet samples/s ({figures['parquet_method']})", f"{figures['parquet_samples_per_s']:.0f}"),
               ("sample_ratio (target >= 10)", f"{figures['sample_ratio']:.1f}")] if "sample_ratio" in figures else []),
            ("machine", f"{figures['cpu_count']} CPUs, {figures['platform']}, "
                        f"load {figures['loadavg_1m']:.1f}")]
    return "\n".join(["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--frames", type=int, default=500, help="frames per episode")
    parser.add_argument("--batches", type=int, default=30, help="timed sampler batches")
    parser.add_argument("--batch", type=int, default=128, help="sampler batch size")
    parser.add_argument("--history", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sampler", action="store_true",
                        help="skip part 2 (at 64,000 frames its Parquet side reads a 786 MB row group per batch)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of baseline, curate and pure stages (best counts)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="worldloop-bench-curate-")
    configure_env(root)
    figures: dict[str, Any] = {
        "frames": args.episodes * args.frames, "episodes": args.episodes,
        "frames_per_episode": args.frames, "batch": args.batch, "history": args.history,
        "batches": args.batches, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "loadavg_1m": os.getloadavg()[0]}
    try:
        figures |= bench_curate(root, episodes=args.episodes, frames=args.frames, seed=args.seed, runs=args.runs)
        from stages.lake import Lake

        if not args.no_sampler:
            figures |= bench_sampler(Lake(figures["lake"]).table_uri("frames"),
                                     os.path.join(root, "frames.parquet"), batches=args.batches,
                                     batch_size=args.batch, history=args.history, seed=args.seed)
        figures.pop("lake")
    finally:
        import ray

        ray.shutdown()
        if args.keep:
            log(f"kept the data in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(_table(figures))
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
