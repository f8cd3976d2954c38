"""Curation benchmark: the curate flow against a user's first script and the decode-only limit on
fleet logs of realistic shape, its peak memory, and the training sampler (Lance against
Parquet, with and without prefetching); all in one run.

Run with ``make bench-curate`` (``OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_curate``);
``--help`` lists the flags. Progress goes to stderr; stdout gets a markdown table and then, as
its LAST line, one JSON object with every figure.

Logs (``benchmarks.fleet_logs``, generated in a temporary directory): ``--mcap-logs`` ROS 2
MCAP logs of ``--mcap-seconds`` (640x480 JPEG camera at 30 Hz, 7-joint states and commands at
100 Hz) under ``landing/mcap/``, and ``--lerobot-sets`` LeRobot v3.0 datasets of
``--lerobot-episodes`` episodes of ``--lerobot-seconds`` (AV1 256x256 at 30 fps, 6-wide
action and state) under ``landing/lerobot/``. Every pipeline brings frames to the same target:
longer side at most ``--max-side`` (default 320: 640x480 -> 320x240, 256x256 stays).

1. Throughput, frames/s, of three pipelines on the same files, timed ``--runs`` times each,
   interleaved (script, curate, decode-only, script, ...), the best run of each counting:
   * curate: ``flows.curate.curate_flow(config="default", lake=<fresh lake>, landing=<landing>,
     overrides=["curate.max_image_side=<max-side>"], reasoner=<the warm-up's>)`` with the
     Prefect settings of ``worldloop curate`` (``flows.runtime.prefect_settings``). Ray is
     started first and a warm-up curate of an empty lake (4 x 200 frames of worldloop's own
     car world, its own landing) warms Prefect's ephemeral API and the Ray workers and trains
     the scene reasoner a lake trains once (``first_curate_s``). curate_fps = frames written
     (``rows_added["frames"]``) / wall seconds of the flow call.
   * script: ``benchmarks.baselines.script_mcap`` + ``script_lerobot``, one process.
   * decode-only: ``benchmarks.baselines.decode_mcap`` + ``decode_lerobot``, one thread on
     one core: the most frames/s one core can decode and resize.
   ``curate_ratio`` = curate_fps / script_fps (target >= 1.8); ``decode_bound_fraction`` =
   curate_fps / (cpu_count x decode_only_fps) (target >= 0.9). Per format: the script's and
   decode-only's seconds of each format (best of the runs), and one curate of each format's
   folder alone (``curate_fps_mcap``, ``curate_fps_lerobot``; ``--no-per-format`` skips them).
2. Memory: during every curate, a thread samples every 50 ms (``RssMonitor``) the resident
   set (RSS) of this process (the driver) and of each Ray worker process (descendants of the
   driver whose title starts with ``ray::``: task workers, idle workers, the describer actors,
   Ray Data's stats and autoscaling actors; not Ray's own services: gcs_server, raylet, its
   dashboard and runtime-env agents and log monitors, whose sum is reported apart as
   ``ray_services_rss_mb``). ``peak_rss_mb`` is the largest driver + workers sum seen in the
   timed runs; ``peak_worker_rss_mb`` the largest single worker (``peak_worker_title``: its
   title, which task or actor it ran, as last seen); ``start_rss_mb`` the sum when the run
   started (Ray reuses its workers, which keep what earlier runs left). RSS counts shared pages
   (libraries, Ray's object store) once per process; the sampling thread shares the GIL, so
   ``rss_interval_ms`` reports the mean spacing it achieved.
   Then one MCAP log ``--scale`` times as long as the others is curated alone
   (``peak_rss_mb_scale``, ``peak_worker_rss_mb_scale``): against ``peak_worker_rss_mb_mcap``
   (the MCAP folder's curate, one log per worker at a time) it shows whether a worker's memory
   grows with the length of a log.
3. The training sampler on the last timed run's frames table: ``benchmarks.bench_sampler``
   (``sample_ratio``, Lance against Parquet, target >= 10; ``prefetch_wait_ms`` against
   ``no_prefetch_wait_ms``). ``--no-sampler`` skips it.

Logs are generated before anything is timed and read from the page cache by every pipeline;
each run writes into fresh output. All data lives in a temporary directory removed at the end
(``--keep`` keeps it). Figures depend on the machine and its load: the JSON records cpu_count,
platform, the load average at the start and the git commit.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from time import perf_counter
from typing import Any

import numpy as np
import psutil

from benchmarks import baselines
from benchmarks.fleet_logs import Fleet, FramePools, car_episode, write_fleet, write_mcap

RAY_SERVICES = frozenset({"ray::DashboardAgent", "ray::RuntimeEnvAgent"})  # ray:: titled, not workers
MB = 1 << 20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class RssMonitor:
    """Peak RSS of this process and its Ray worker processes (module doc, part 2), sampled every
    ``interval_s`` in a thread; the process list is refreshed every ``refresh_s``."""

    def __init__(self, interval_s: float = 0.05, refresh_s: float = 0.5) -> None:
        self.interval_s, self.refresh_s = interval_s, refresh_s
        self.peak = {"start_rss_mb": 0.0, "peak_rss_mb": 0.0, "peak_driver_rss_mb": 0.0, "peak_workers_rss_mb": 0.0,
                     "peak_workers": 0, "peak_worker_rss_mb": 0.0, "peak_worker_title": "",
                     "ray_services_rss_mb": 0.0, "rss_samples": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)
        self._me = psutil.Process()
        self._workers: list[psutil.Process] = []
        self._titles: list[str] = []
        self._services: list[psutil.Process] = []

    def _refresh(self) -> None:
        workers, titles, services = [], [], []
        for process in self._me.children(recursive=True):
            try:
                title = (process.cmdline() or [""])[0]
            except psutil.Error:
                continue
            if title.startswith("ray::") and title.split()[0] not in RAY_SERVICES:
                workers.append(process)
                titles.append(title)
            else:
                services.append(process)
        self._workers, self._titles, self._services = workers, titles, services

    @staticmethod
    def _rss(processes: list[psutil.Process]) -> list[int]:
        out = []
        for process in processes:
            try:
                out.append(process.memory_info().rss)
            except psutil.Error:  # a worker that exited since the last refresh
                out.append(0)
        return out

    def _run(self) -> None:
        next_refresh = 0.0
        while not self._stop.is_set():
            now = perf_counter()
            if now >= next_refresh:
                self._refresh()
                next_refresh = now + self.refresh_s
            driver, workers = self._me.memory_info().rss, self._rss(self._workers)
            peak = self.peak
            peak["rss_samples"] += 1
            if peak["rss_samples"] == 1:
                peak["start_rss_mb"] = (driver + sum(workers)) / MB
            if driver + sum(workers) > peak["peak_rss_mb"] * MB:
                peak.update(peak_rss_mb=(driver + sum(workers)) / MB, peak_driver_rss_mb=driver / MB,
                            peak_workers_rss_mb=sum(workers) / MB, peak_workers=len(workers),
                            ray_services_rss_mb=sum(self._rss(self._services)) / MB)
            if workers and max(workers) > peak["peak_worker_rss_mb"] * MB:
                largest = int(np.argmax(workers))
                peak.update(peak_worker_rss_mb=workers[largest] / MB, peak_worker_title=self._titles[largest])
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssMonitor:
        self._refresh()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_curate(*, landing: str, lake: str, max_side: int, reasoner: str | None = None) -> tuple[float, dict, dict]:
    """Wall seconds, summary and peak memory (``RssMonitor``) of one ``curate_flow`` call with
    the Prefect settings ``worldloop curate`` runs it with."""
    from flows.curate import curate_flow
    from flows.runtime import prefect_settings

    with prefect_settings(), RssMonitor() as memory:
        start = perf_counter()
        summary = curate_flow(config="default", lake=lake, landing=landing, reasoner=reasoner,
                              overrides=[f"curate.max_image_side={max_side}"])
        seconds = perf_counter() - start
    interval_ms = 1e3 * seconds / max(1, memory.peak["rss_samples"])
    return seconds, summary, memory.peak | {"rss_interval_ms": interval_ms}


def _context(lake: str, landing: str) -> Any:
    from flows.runtime import Context

    return Context.create(config="default", lake=lake, landing=landing)


def warm_up(root: str, *, seed: int, max_side: int) -> tuple[str, float, str]:
    """The warm-up curate (module doc); the reasoner it trained, its seconds and the reasoner's source."""
    from flows.describe import REASONER
    from stages.mcap_log import write_episode

    landing, lake = os.path.join(root, "warmup_landing"), os.path.join(root, "warmup_lake")
    os.makedirs(landing)
    for i in range(4):
        write_episode(car_episode(i, frames=200, seed=seed + 1), os.path.join(landing, f"episode_{i:05d}.mcap"))
    seconds, summary, _ = run_curate(landing=landing, lake=lake, max_side=max_side)
    champion = _context(lake, landing).registry.get(REASONER, alias="champion")
    if champion is None:
        raise RuntimeError(f"the warm-up curate trained no reasoner: {summary.get('rejects')}")
    return champion.artifact_uri, seconds, (summary["clips"].get("describer") or {}).get("source", "")


def _timed(fn: Callable[[], int]) -> tuple[int, float]:
    start = perf_counter()
    frames = fn()
    return frames, perf_counter() - start


def _written(summary: dict) -> int:
    written = int(summary["rows_added"]["frames"])
    if written == 0:
        raise RuntimeError(f"curate wrote no frames: {summary.get('rejects')}")
    return written


def bench_pipelines(root: str, fleet: Fleet, *, runs: int, max_side: int, reasoner: str) -> dict[str, Any]:
    """Part 1 and the timed runs' memory: script, curate and decode-only, ``runs`` times, interleaved."""
    landing = os.path.join(root, "landing")
    script: dict[str, list[float]] = {"mcap": [], "lerobot": []}
    decode: dict[str, list[float]] = {"mcap": [], "lerobot": []}
    curate_s, peaks, counts = [], [], {}
    for run in range(1, runs + 1):
        out = os.path.join(root, f"script_{run}")
        for fmt, script_fn in (("mcap", baselines.script_mcap), ("lerobot", baselines.script_lerobot)):
            counts[f"script_{fmt}"], s = _timed(partial(script_fn, getattr(fleet, fmt), out, max_side=max_side))
            script[fmt].append(s)
        shutil.rmtree(out)
        seconds, summary, peak = run_curate(landing=landing, lake=os.path.join(root, f"lake_{run}"),
                                            max_side=max_side, reasoner=reasoner)
        curate_s.append(seconds)
        peaks.append(peak)
        with baselines.one_core():
            for fmt, decode_fn in (("mcap", baselines.decode_mcap), ("lerobot", baselines.decode_lerobot)):
                counts[f"decode_{fmt}"], s = _timed(partial(decode_fn, getattr(fleet, fmt), max_side=max_side))
                decode[fmt].append(s)
        log(f"run {run}: script {script['mcap'][-1] + script['lerobot'][-1]:.2f} s, curate {seconds:.2f} s "
            f"(kept {summary['kept']}, rejected {summary['rejected']}, rows {summary['rows_added']}, "
            f"peak RSS {peak['peak_rss_mb']:.0f} MB), decode-only {decode['mcap'][-1] + decode['lerobot'][-1]:.2f} s")
        if summary["rejects"]:
            log(f"  rejects: {summary['rejects'][:4]}")
        if run < runs:
            shutil.rmtree(os.path.join(root, f"lake_{run}"))
    frames = fleet.count(fleet.mcap + fleet.lerobot)
    for name, n in counts.items():
        fmt = name.split("_")[1]
        if n != fleet.count(getattr(fleet, fmt)):
            raise RuntimeError(f"{name} handled {n} frames, the {fmt} logs hold {fleet.count(getattr(fleet, fmt))}")
    script_total = [a + b for a, b in zip(script["mcap"], script["lerobot"], strict=True)]
    decode_total = [a + b for a, b in zip(decode["mcap"], decode["lerobot"], strict=True)]
    written = _written(summary)
    cores = os.cpu_count() or 1
    curate_fps, script_fps, decode_fps = written / min(curate_s), frames / min(script_total), frames / min(decode_total)
    peak = max(peaks, key=lambda p: p["peak_rss_mb"])  # the run of the largest sum, the largest worker of any
    peak |= {k: v for k, v in max(peaks, key=lambda p: p["peak_worker_rss_mb"]).items() if "peak_worker_" in k}
    return {
        "curate_fps": curate_fps, "script_fps": script_fps, "decode_only_fps": decode_fps,
        "curate_ratio": curate_fps / script_fps, "decode_bound_fraction": curate_fps / (cores * decode_fps),
        "curate_seconds": min(curate_s), "script_seconds": min(script_total), "decode_only_seconds": min(decode_total),
        "curate_runs_s": curate_s, "script_runs_s": script_total, "decode_only_runs_s": decode_total,
        **{f"script_fps_{f}": fleet.count(getattr(fleet, f)) / min(s) for f, s in script.items()},
        **{f"decode_only_fps_{f}": fleet.count(getattr(fleet, f)) / min(s) for f, s in decode.items()},
        "timing": f"best of {runs} runs each, interleaved script/curate/decode-only",
        "frames_written": written, "kept": summary["kept"], "rejected": summary["rejected"],
        "seen": summary["seen"], "rejects": summary["rejects"], "clips_written": int(summary["rows_added"]["clips"]),
        **peak, "peak_rss_mb_runs": [p["peak_rss_mb"] for p in peaks],
        "frames_uri": _context(os.path.join(root, f"lake_{runs}"), landing).lake.table_uri("frames"),
    }


def bench_formats(root: str, fleet: Fleet, *, max_side: int, reasoner: str) -> dict[str, Any]:
    """One curate of each format's folder alone: frames/s and the largest worker's RSS."""
    out = {}
    for fmt in ("mcap", "lerobot"):
        seconds, summary, peak = run_curate(landing=os.path.join(root, "landing", fmt),
                                            lake=os.path.join(root, f"lake_{fmt}"), max_side=max_side,
                                            reasoner=reasoner)
        out |= {f"curate_fps_{fmt}": _written(summary) / seconds, f"curate_seconds_{fmt}": seconds,
                f"peak_rss_mb_{fmt}": peak["peak_rss_mb"], f"peak_worker_rss_mb_{fmt}": peak["peak_worker_rss_mb"],
                f"peak_worker_title_{fmt}": peak["peak_worker_title"]}
        log(f"{fmt} alone: {seconds:.2f} s, {_written(summary)} frames, peak RSS {peak['peak_rss_mb']:.0f} MB "
            f"(largest worker {peak['peak_worker_rss_mb']:.0f} MB)")
        shutil.rmtree(os.path.join(root, f"lake_{fmt}"))
    return out


def bench_scale(root: str, pools: FramePools, *, seconds: float, scale: int, max_side: int,
                reasoner: str) -> dict[str, Any]:
    """One MCAP log ``scale`` times as long as the others, curated alone: its peak memory."""
    landing = os.path.join(root, "landing_scale")
    os.makedirs(landing)
    path = os.path.join(landing, "arm_long.mcap")
    frames = write_mcap(path, seconds=seconds * scale, jpegs=pools.jpegs, seed=999)
    wall, summary, peak = run_curate(landing=landing, lake=os.path.join(root, "lake_scale"), max_side=max_side,
                                     reasoner=reasoner)
    log(f"one {scale}x log ({frames} frames, {os.path.getsize(path) / MB:.0f} MB): {wall:.2f} s, peak RSS "
        f"{peak['peak_rss_mb']:.0f} MB (largest worker {peak['peak_worker_rss_mb']:.0f} MB)")
    shutil.rmtree(os.path.join(root, "lake_scale"))
    return {"scale": scale, "scale_frames": frames, "scale_mcap_mb": os.path.getsize(path) / MB,
            "scale_frames_written": _written(summary), "curate_fps_scale": _written(summary) / wall,
            "peak_rss_mb_scale": peak["peak_rss_mb"], "peak_worker_rss_mb_scale": peak["peak_worker_rss_mb"],
            "peak_worker_title_scale": peak["peak_worker_title"]}


def configure_env(root: str) -> None:
    """Before Prefect, Ray or torch are imported: a private Prefect home, quiet logs, 1 thread."""
    os.environ["PREFECT_HOME"] = os.path.join(root, "prefect")
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _row_of(figures: dict[str, Any], key: str, label: str, fmt: str = "{:.0f}") -> list[tuple[str, str]]:
    return [(label, fmt.format(figures[key]))] if key in figures else []


def _table(f: dict[str, Any]) -> str:
    frames = f"{f['frames']} ({f['frames_mcap']} + {f['frames_lerobot']}), target longer side {f['max_side']}"
    rows = [("frames (MCAP + LeRobot)", frames),
            ("curate_fps (curate_flow)", f"{f['curate_fps']:.0f}"),
            ("script_fps (single-process script)", f"{f['script_fps']:.0f}"),
            ("decode_only_fps (one core)", f"{f['decode_only_fps']:.0f}"),
            ("curate_ratio (target >= 1.8)", f"{f['curate_ratio']:.2f}"),
            (f"decode_bound_fraction ({f['cpu_count']} cores, target >= 0.9)", f"{f['decode_bound_fraction']:.2f}"),
            *_row_of(f, "curate_fps_mcap", "curate_fps, MCAP folder alone"),
            *_row_of(f, "curate_fps_lerobot", "curate_fps, LeRobot folder alone"),
            ("peak_rss_mb (driver + Ray workers)", f"{f['peak_rss_mb']:.0f}"),
            ("peak_worker_rss_mb (largest worker)", f"{f['peak_worker_rss_mb']:.0f}"),
            *_row_of(f, "peak_worker_rss_mb_mcap", "largest worker, MCAP folder (one log at a time)"),
            *_row_of(f, "peak_worker_rss_mb_scale", f"largest worker, one {f.get('scale')}x MCAP log"),
            ("first curate of an empty lake (trains the reasoner), s", f"{f['first_curate_s']:.1f}"),
            *_row_of(f, "sample_ratio", "sample_ratio (Lance / Parquet, target >= 10)", "{:.1f}"),
            *_row_of(f, "lance_samples_per_s", "lance samples/s (HistorySampler)"),
            *_row_of(f, "no_prefetch_wait_ms", "consumer wait per batch, no prefetch, ms", "{:.1f}"),
            *_row_of(f, "prefetch_wait_ms", "prefetch_wait_ms (step as long as a batch)", "{:.1f}"),
            ("machine", f"{f['cpu_count']} CPUs, {f['platform']}, load {f['loadavg_1m']:.1f}, "
                        f"commit {f['git_commit'][:12]}")]
    return "\n".join(["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mcap-logs", type=int, default=4)
    parser.add_argument("--mcap-seconds", type=float, default=20.0)
    parser.add_argument("--lerobot-sets", type=int, default=2, help="LeRobot v3.0 datasets")
    parser.add_argument("--lerobot-episodes", type=int, default=2, help="episodes per dataset")
    parser.add_argument("--lerobot-seconds", type=float, default=20.0, help="seconds per episode")
    parser.add_argument("--max-side", type=int, default=320, help="target longer side of every pipeline")
    parser.add_argument("--scale", type=int, default=4, help="the long log is this many MCAP logs long; 0 skips it")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each pipeline (the best counts)")
    parser.add_argument("--no-per-format", action="store_true", help="skip the curate of each format alone")
    parser.add_argument("--no-sampler", action="store_true", help="skip part 3")
    parser.add_argument("--batches", type=int, default=30, help="timed Lance and prefetch batches")
    parser.add_argument("--parquet-batches", type=int, default=5, help="timed Parquet batches per method")
    parser.add_argument("--batch", type=int, default=64, help="sampler batch size")
    parser.add_argument("--history", type=int, default=3)
    parser.add_argument("--sample-size", type=int, default=0, help="square side the sampler resizes to; 0: as curated")
    parser.add_argument("--step-ms", type=float, default=None, help="simulated training step (default: a Lance batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary data")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="worldloop-bench-curate-")
    configure_env(root)
    from stages.registry import git_commit

    figures: dict[str, Any] = {
        "max_side": args.max_side, "mcap_logs": args.mcap_logs, "mcap_seconds": args.mcap_seconds,
        "lerobot_sets": args.lerobot_sets, "lerobot_episodes": args.lerobot_episodes,
        "lerobot_seconds": args.lerobot_seconds, "runs": args.runs, "batch": args.batch, "history": args.history,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0], "git_commit": git_commit() or "unknown"}
    try:
        start = perf_counter()
        pools = FramePools(seed=args.seed)
        fleet = write_fleet(os.path.join(root, "landing"), pools, mcap_logs=args.mcap_logs,
                            mcap_seconds=args.mcap_seconds, lerobot_sets=args.lerobot_sets,
                            lerobot_episodes=args.lerobot_episodes, lerobot_seconds=args.lerobot_seconds,
                            seed=args.seed)
        figures |= {"frames": fleet.count(fleet.mcap + fleet.lerobot), "frames_mcap": fleet.count(fleet.mcap),
                    "frames_lerobot": fleet.count(fleet.lerobot),
                    "mcap_mb": sum(os.path.getsize(p) for p in fleet.mcap) / MB,
                    "mean_jpeg_kb": sum(map(len, pools.jpegs)) / len(pools.jpegs) / 1024}
        log(f"wrote {figures['frames']} frames ({figures['frames_mcap']} MCAP, {figures['frames_lerobot']} LeRobot) "
            f"in {perf_counter() - start:.1f} s")
        from flows.runtime import ensure_ray

        ensure_ray()
        reasoner, figures["first_curate_s"], figures["first_curate_reasoner"] = warm_up(
            root, seed=args.seed, max_side=args.max_side)
        log(f"warm-up curate (trains the reasoner): {figures['first_curate_s']:.1f} s")
        figures |= bench_pipelines(root, fleet, runs=args.runs, max_side=args.max_side, reasoner=reasoner)
        if not args.no_per_format:
            figures |= bench_formats(root, fleet, max_side=args.max_side, reasoner=reasoner)
        if args.scale:
            figures |= bench_scale(root, pools, seconds=args.mcap_seconds, scale=args.scale,
                                   max_side=args.max_side, reasoner=reasoner)
        frames_uri = figures.pop("frames_uri")
        if not args.no_sampler:
            from benchmarks.bench_sampler import bench_sampler

            log("sampling the frames table")
            figures |= bench_sampler(frames_uri, os.path.join(root, "frames.parquet"), batches=args.batches,
                                     parquet_batches=args.parquet_batches, batch_size=args.batch,
                                     history=args.history, size=args.sample_size or None, step_ms=args.step_ms,
                                     seed=args.seed)
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
