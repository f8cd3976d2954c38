"""The promotion gate: a pure decision over paired evaluation results.

A candidate is promoted only if it beats the reference on the same held-out scenes: the current
champion, or, when there is none yet, a random policy. "Beats" means a positive mean paired
difference; the bootstrap interval is reported beside the decision so that a reader can see how
sure it is (a stricter statistical gate is configurable with `require_ci_above_zero`).
"""
from __future__ import annotations


def gate(comparison: dict, *, reference_role: str, require_ci_above_zero: bool = False) -> dict:
    """Decide from `stages.evaluate.paired(candidate, reference)`; returns decision and reason."""
    diff, (lo, hi) = comparison["mean_diff"], comparison["ci95"]
    beats = diff > 0 and (lo > 0 if require_ci_above_zero else True)
    verdict = "beats" if beats else "does not beat"
    reason = (f"candidate {verdict} {reference_role}: mean paired difference {diff:+.1f} "
              f"(95% CI {lo:+.1f} .. {hi:+.1f}) over {comparison['n']} scenes, "
              f"{comparison['wins']} wins")
    return {"promote": bool(beats), "reference_role": reference_role, "reason": reason,
            "mean_diff": diff, "ci95": [lo, hi]}
