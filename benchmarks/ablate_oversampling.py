"""Ablation: does drawing policy windows by clip weight (event oversampling) change the score?

Run ``make ablate-oversampling LAKE=./lake`` on a lake that a turn has filled (``make demo``);
``--help`` lists the flags. The lake is copied to a temporary directory first, so its registry
and evaluations are left alone. On the copy, the policy is trained from scratch (no warm start)
with the preset's recipe in two arms that differ only in how training windows are drawn:

* ``uniform``: every window equally often (``clips_uri=None``), as before event weighting;
* ``weighted``: by ``stages.sampler.window_weights`` over the lake's ``clips`` table (event
  clips by their ``weight``, near-duplicate clips by ``train.duplicate_weight``).

Each arm is trained once per ``--seeds`` training seed (the same seeds in both arms), and every
candidate is driven on the preset's held-out evaluation seeds in one shared Ray pool. Stdout: a
markdown table (per run: mean score, 95% CI, off-track rate; per arm: the mean over its runs)
and the paired difference weighted - uniform over (training seed, evaluation seed) pairs, then
as the last line one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import warnings
from time import perf_counter
from typing import Any

import numpy as np

from benchmarks.bench_curate import configure_env, log

ARMS = ("uniform", "weighted")


def _configure_env(root: str) -> None:
    """``bench_curate.configure_env`` (private Prefect home, quiet logs), plus a private work dir."""
    configure_env(root)
    os.environ["WORLDLOOP_WORK_DIR"] = os.path.join(root, "work")
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    warnings.filterwarnings("ignore", message="lance is not fork-safe")  # as `worldloop` does


def train_arm(ctx, arm: str, seed: int) -> tuple[int, dict]:
    """Train one policy from scratch in ``arm`` with the train flow's own task (the preset's recipe,
    ``train.oversample_events`` set by the arm); register it in the copy; (version, metrics)."""
    from flows.runtime import POLICY
    from flows.train import run_training

    train = dataclasses.replace(ctx.config.train, oversample_events=arm == "weighted")
    arm_ctx = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, train=train))
    start = perf_counter()
    result = run_training.fn(arm_ctx, POLICY, seed, None, run_name=f"ablation-{arm}-{seed}")
    metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    metrics["train_s"] = perf_counter() - start
    mv = ctx.registry.register(POLICY, result["checkpoint_dir"], kind=POLICY, metrics=metrics,
                               lineage={"ablation": arm, "seed": seed},
                               config=dataclasses.asdict(ctx.config.policy))
    return mv.version, metrics


def ablate(lake: str, *, config: str, seeds: list[int]) -> dict[str, Any]:
    from flows.evaluate import evaluate_drivers
    from flows.runtime import POLICY, Context, ensure_ray
    from stages.evaluate import paired, summarize

    ctx = Context.create(config=config, lake=lake, landing=lake)
    if not ctx.lake.exists("clips"):
        raise SystemExit(f"no clips table in {lake}: curate logs (make demo) first")
    ensure_ray()
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for seed in seeds:
        for arm in ARMS:
            log(f"training {arm} seed {seed}")
            version, metrics = train_arm(ctx, arm, seed)
            runs[(arm, seed)] = {"arm": arm, "seed": seed, "version": version, **metrics}
    log(f"driving {len(runs)} candidates on {len(ctx.config.eval.seeds)} held-out seeds")
    start = perf_counter()
    drivers = {f"{arm}-{seed}": (POLICY, str(r["version"])) for (arm, seed), r in runs.items()}
    rows = evaluate_drivers.fn(ctx, drivers, turn=0)
    resamples = ctx.config.eval.bootstrap
    for (arm, seed), r in runs.items():
        s = summarize(rows[f"{arm}-{seed}"], resamples=resamples)
        r.update(score=s["mean"], ci95=s["ci95"], off_track_rate=s["off_track_rate"],
                 scores=[row["score"] for row in rows[f"{arm}-{seed}"]])
    score = {(arm, seed, row["seed"]): row["score"] for (arm, seed) in runs for row in rows[f"{arm}-{seed}"]}
    pairs = sorted({(seed, es) for (_, seed, es) in score})
    comparison = paired({i: score[("weighted", *p)] for i, p in enumerate(pairs)},
                        {i: score[("uniform", *p)] for i, p in enumerate(pairs)}, resamples=resamples)
    comparison.pop("seeds")
    diffs = [score[("weighted", *p)] - score[("uniform", *p)] for p in pairs]
    comparison |= {"median_diff": float(np.median(diffs)), "losses": int(sum(d < 0 for d in diffs))}
    arms = {arm: sum(r["score"] for r in runs.values() if r["arm"] == arm) / len(seeds) for arm in ARMS}
    return {"runs": list(runs.values()), "arm_mean": arms, "weighted_minus_uniform": comparison,
            "eval_seeds": list(ctx.config.eval.seeds), "train_seeds": seeds, "config": config,
            "duplicate_weight": ctx.config.train.duplicate_weight, "eval_s": perf_counter() - start}


def _table(figures: dict[str, Any]) -> str:
    lines = ["| arm | training seed | score | 95% CI | off-track | event share of draws (natural) |",
             "|---|---|---|---|---|---|"]
    for r in figures["runs"]:
        share = (f"{r['event_share']:.2f} ({r['event_share_natural']:.2f})" if "event_share" in r else "-")
        lines.append(f"| {r['arm']} | {r['seed']} | {r['score']:.1f} | [{r['ci95'][0]:.1f}, "
                     f"{r['ci95'][1]:.1f}] | {r['off_track_rate']:.2f} | {share} |")
    for arm, mean in figures["arm_mean"].items():
        lines.append(f"| {arm}, mean of runs | | {mean:.1f} | | | |")
    c = figures["weighted_minus_uniform"]
    lines.append(f"\nweighted - uniform, paired over {c['n']} (training seed, evaluation seed) pairs: "
                 f"mean {c['mean_diff']:+.1f} (95% CI {c['ci95'][0]:+.1f} .. {c['ci95'][1]:+.1f}), "
                 f"median {c['median_diff']:+.1f}; weighted better on {c['wins']}, worse on {c['losses']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", default="./lake", help="a local lake that a turn has filled")
    parser.add_argument("--config", default="default", choices=["tiny", "default", "gpu"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds per arm")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.lake):
        raise SystemExit(f"{args.lake} is not a local lake directory: run `make demo` first")
    root = tempfile.mkdtemp(prefix="worldloop-ablate-")
    _configure_env(root)
    try:
        copy = shutil.copytree(args.lake, os.path.join(root, "lake"))
        figures = ablate(copy, config=args.config, seeds=args.seeds)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    figures |= {"lake": os.path.abspath(args.lake), "cpu_count": os.cpu_count(),
                "platform": platform.platform()}
    print(_table(figures))
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
