"""Closed-loop evaluation statistics: pure functions over per-seed rollout summaries.

Scores are the world's (episode return, or 1/0 task success). Candidate and champion are driven
on the same held-out scenes, (task, seed) pairs, so comparisons are paired (STACK.md: evaluation
noise is large: an episode return's std can be a quarter of its mean over 10 seeds).
Confidence intervals are percentile bootstraps over seeds, with a fixed generator so that the
same scores always give the same interval.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], *, resamples: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def summarize(rows: Sequence[dict], *, resamples: int = 10_000) -> dict:
    """Aggregate per-scene rows (task, score, success, signal_rates JSON, interventions, steps) of one
    driver: the mean score with its CI, the success rate, per-signal rates and per-task means."""
    if not rows:
        raise ValueError("summarize needs at least one rollout")
    scores = np.array([r["score"] for r in rows], dtype=np.float64)
    lo, hi = bootstrap_ci(scores, resamples=resamples)
    return {
        "n": int(scores.size),
        "mean": float(scores.mean()),
        "std": float(scores.std(ddof=1)) if scores.size > 1 else 0.0,
        "ci95": [lo, hi],
        "success_rate": float(np.mean([bool(r["success"]) for r in rows])),
        "signal_rates": {k: float(np.mean([json.loads(r["signal_rates"]).get(k, 0.0) for r in rows]))
                         for k in sorted({k for r in rows for k in json.loads(r["signal_rates"])})},
        "interventions_per_episode": float(np.mean([r["interventions"] for r in rows])),
        "mean_steps": float(np.mean([r["steps"] for r in rows])),
        "per_task": {t: float(np.mean([r["score"] for r in rows if r["task"] == t]))
                     for t in sorted({r["task"] for r in rows})},
    }


def paired(candidate: dict, reference: dict, *, resamples: int = 10_000) -> dict:
    """Paired difference candidate - reference over the scenes (keys: seeds or (task, seed)) both
    were driven on."""
    seeds = sorted(set(candidate) & set(reference))
    if not seeds:
        raise ValueError("no common scenes between candidate and reference")
    diff = np.array([candidate[s] - reference[s] for s in seeds], dtype=np.float64)
    lo, hi = bootstrap_ci(diff, resamples=resamples)
    return {"seeds": seeds, "mean_diff": float(diff.mean()), "ci95": [lo, hi],
            "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum()), "n": len(seeds)}


def task_gaps(driver: dict, reference: dict) -> dict[str, float]:
    """Per task, how far ``driver``'s mean score falls short of ``reference``'s on the scenes both
    were driven on (score per (task, seed), as ``paired`` takes them; typically the champion against
    the expert), never below 0."""
    common = sorted(set(driver) & set(reference))
    return {t: max(0.0, float(np.mean([reference[k] - driver[k] for k in common if k[0] == t])))
            for t in sorted({k[0] for k in common})}


def _apportion(n: int, weight: np.ndarray) -> np.ndarray:
    """``n`` split in proportion to ``weight`` (largest remainders; ties to the earlier entries)."""
    share = n * weight / weight.sum()
    counts = np.floor(share).astype(int)
    counts[np.argsort(-(share - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts


def focus_tasks(tasks: Sequence[str], n: int, *, gaps: dict[str, float], focus: float,
                weights: dict[str, float] | None = None) -> list[str]:
    """The task of each of ``n`` episodes: a share ``1 - focus`` spread over ``tasks`` by their
    ``weights`` (a task not named weighs 1: evenly when there are none), the share ``focus`` in
    proportion to each task's ``gaps`` (largest remainders), as a fleet data engine sends its cars
    where the model fails. With no gap anywhere, all of them by the weights. The order interleaves
    the tasks (stride scheduling), so any prefix of the list is spread too."""
    if not 0.0 <= focus <= 1.0:
        raise ValueError(f"focus must be in [0, 1], got {focus}")
    gap = np.array([max(0.0, float(gaps.get(t, 0.0))) for t in tasks])
    weight = np.array([float((weights or {}).get(t, 1.0)) for t in tasks])
    if (weight < 0).any() or not np.isfinite(weight).all() or (len(tasks) and not weight.sum() > 0):
        raise ValueError(f"task weights must be finite, >= 0 and not all 0, got {weights}")
    if not len(tasks) or n <= 0:
        return []
    focused = int(round(focus * n)) if gap.sum() > 0 else 0
    counts = _apportion(n - focused, weight)
    if focused:
        counts += _apportion(focused, gap)
    order, emitted = [], np.zeros(len(tasks))
    for _ in range(n):
        i = int(np.argmin(np.where(counts > emitted, (emitted + 0.5) / np.maximum(counts, 1), np.inf)))
        order.append(tasks[i])
        emitted[i] += 1
    return order
