"""Evaluation statistics (the promotion gate: tests/stages/test_gate.py)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from stages.evaluate import bootstrap_ci, focus_tasks, paired, summarize, task_gaps


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    values = [100.0, 300.0, 500.0, 700.0, 900.0]
    lo, hi = bootstrap_ci(values, resamples=2000)
    assert lo < 500.0 < hi
    assert (lo, hi) == bootstrap_ci(values, resamples=2000)
    assert bootstrap_ci([42.0]) == (42.0, 42.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def row(score: float, *, task: str = "drive", success: bool = False, interventions: int = 2,
        steps: int = 1000, **rates: float) -> dict:
    return {"task": task, "score": score, "success": success, "signal_rates": json.dumps(rates),
            "interventions": interventions, "steps": steps}


def test_summarize_reports_score_and_safety():
    rows = [row(s, off_track=0.1) for s in (800, 900)]
    out = summarize(rows, resamples=500)
    assert out["mean"] == 850 and out["n"] == 2 and out["interventions_per_episode"] == 2
    assert out["ci95"][0] <= 850 <= out["ci95"][1]
    assert out["signal_rates"] == pytest.approx({"off_track": 0.1}) and out["mean_steps"] == 1000
    assert out["success_rate"] == 0.0 and out["per_task"] == {"drive": 850.0}


def test_summarize_reports_success_and_per_task_means():
    rows = [row(1.0, task="reach", success=True, steps=80), row(0.0, task="reach", steps=150),
            row(1.0, task="push", success=True, steps=60, collision=0.5),
            row(1.0, task="push", success=True, steps=70)]
    out = summarize(rows, resamples=500)
    assert out["success_rate"] == 0.75 and out["mean"] == 0.75 and out["mean_steps"] == 90
    assert out["per_task"] == {"push": 1.0, "reach": 0.5}
    assert out["signal_rates"] == {"collision": 0.125}  # a row without the signal counts 0
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def test_paired_uses_only_common_seeds():
    out = paired({1: 10.0, 2: 20.0, 3: 99.0}, {1: 5.0, 2: 25.0, 4: 0.0}, resamples=500)
    assert out["seeds"] == [1, 2] and out["mean_diff"] == 0.0 and out["wins"] == 1 and out["losses"] == 1
    with pytest.raises(ValueError, match="no common scenes"):
        paired({1: 1.0}, {2: 1.0})


def test_paired_keys_may_be_task_seed_scenes():
    candidate = {("push", 1): 1.0, ("reach", 1): 1.0, ("reach", 2): 0.0, ("push", 3): 1.0}
    reference = {("push", 1): 0.0, ("reach", 1): 1.0, ("reach", 2): 1.0, ("push", 2): 1.0}
    out = paired(candidate, reference, resamples=500)
    assert out["seeds"] == [("push", 1), ("reach", 1), ("reach", 2)] and out["n"] == 3
    assert out["mean_diff"] == 0.0 and out["wins"] == 1


def test_task_gaps_are_the_shortfall_to_the_reference_on_common_scenes():
    expert = {(t, s): 1.0 for t in ("push", "reach", "door") for s in (1, 2)}
    champion = {("push", 1): 0.0, ("push", 2): 1.0, ("reach", 1): 1.0, ("reach", 2): 1.0,
                ("peg", 1): 0.0}  # no expert score for peg: not compared
    gaps = task_gaps(champion, expert)
    assert gaps == {"push": 0.5, "reach": 0.0}
    assert task_gaps(expert, champion)["push"] == 0.0 and task_gaps(champion, {}) == {}  # never below 0


def test_focus_tasks_follows_the_gaps_and_keeps_a_floor():
    tasks = [f"t{i}" for i in range(10)]
    order = focus_tasks(tasks, 80, gaps={"t0": 0.8, "t1": 0.6, "t2": 0.5, "t3": 0.3, "t9": 0.0}, focus=0.7)
    counts = Counter(order)
    assert len(order) == 80 and set(counts) == set(tasks)  # every task keeps a share
    # 24 spread evenly (3 each to the first four, 2 to the rest), 56 by the gaps' largest remainders
    assert [counts[t] for t in tasks] == [3 + 20, 3 + 15, 3 + 13, 3 + 8, 2, 2, 2, 2, 2, 2]
    assert set(order[:10]) >= {"t0", "t1", "t2"}  # interleaved: a prefix is spread too
    assert focus_tasks(tasks, 20, gaps={}, focus=0.7) == tasks * 2  # no gap anywhere: round-robin
    assert Counter(focus_tasks(tasks, 20, gaps={"t5": 0.1}, focus=1.0)) == {"t5": 20}
    assert focus_tasks(tasks, 0, gaps={"t5": 0.1}, focus=1.0) == []
    with pytest.raises(ValueError, match="focus"):
        focus_tasks(tasks, 5, gaps={}, focus=1.5)


def test_focus_tasks_spreads_the_rest_by_the_task_weights():
    tasks = ["reach", "push", "door", "peg"]
    counts = Counter(focus_tasks(tasks, 50, gaps={}, focus=0.5, weights={"push": 2, "peg": 2}))
    assert [counts[t] for t in tasks] == [8, 17, 8, 17]  # 50 by 1:2:1:2, largest remainders
    counts = Counter(focus_tasks(tasks, 40, gaps={"door": 1.0}, focus=0.5, weights={"push": 3, "peg": 0}))
    assert [counts[t] for t in tasks] == [4, 12, 4 + 20, 0]
    assert focus_tasks(tasks, 8, gaps={}, focus=0.0, weights={}) == tasks * 2
    for bad in ({"push": -1}, dict.fromkeys(tasks, 0), {"push": float("nan")}):
        with pytest.raises(ValueError, match="weights"):
            focus_tasks(tasks, 5, gaps={}, focus=0.0, weights=bad)
