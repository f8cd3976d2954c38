"""Evaluation statistics and the promotion gate."""
from __future__ import annotations

import pytest

from stages.evaluate import bootstrap_ci, paired, summarize
from stages.promote import gate


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    values = [100.0, 300.0, 500.0, 700.0, 900.0]
    lo, hi = bootstrap_ci(values, resamples=2000)
    assert lo < 500.0 < hi
    assert (lo, hi) == bootstrap_ci(values, resamples=2000)
    assert bootstrap_ci([42.0]) == (42.0, 42.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_summarize_reports_score_and_safety():
    rows = [{"score": s, "off_track_rate": 0.1, "interventions": 2, "steps": 1000} for s in (800, 900)]
    out = summarize(rows, resamples=500)
    assert out["mean"] == 850 and out["n"] == 2 and out["interventions_per_episode"] == 2
    assert out["ci95"][0] <= 850 <= out["ci95"][1]


def test_paired_uses_only_common_seeds():
    out = paired({1: 10.0, 2: 20.0, 3: 99.0}, {1: 5.0, 2: 25.0, 4: 0.0}, resamples=500)
    assert out["seeds"] == [1, 2] and out["mean_diff"] == 0.0 and out["wins"] == 1
    with pytest.raises(ValueError, match="no common seeds"):
        paired({1: 1.0}, {2: 1.0})


def test_gate_promotes_only_a_better_candidate():
    better = paired({s: 600.0 + s for s in range(10)}, {s: -30.0 for s in range(10)}, resamples=500)
    worse = paired({s: 500.0 for s in range(10)}, {s: 600.0 for s in range(10)}, resamples=500)
    assert gate(better, reference_role="random policy")["promote"]
    decision = gate(worse, reference_role="champion")
    assert not decision["promote"] and "does not beat champion" in decision["reason"]
    noisy = paired({0: 900.0, 1: 100.0}, {0: 400.0, 1: 550.0}, resamples=500)  # +25 on average
    assert gate(noisy, reference_role="champion")["promote"]
    assert not gate(noisy, reference_role="champion", require_ci_above_zero=True)["promote"]
