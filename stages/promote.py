"""The promotion gate: a pure decision over paired evaluation rows.

A candidate is promoted only on evidence. It is compared with the reference (the current champion,
or, when there is none yet, a random policy) under one rule:

1. Comparable: both of one world and one policy interface (``setup``: the keys both sides give
   must agree), and both driven on exactly the required held-out scenes, (task, seed) pairs.
2. Better: the 95% bootstrap lower bound of the mean paired score difference (candidate minus
   reference, scene by scene) is above ``margin`` (default 0). A mean above zero is not enough:
   a candidate that won 1 of 10 seeds by a lot and lost the other 9 has a negative lower bound.
3. No guard regresses: the failure rate (1 - success rate), the interventions the safety driver
   would have made per episode, and the share of steps of each guarded signal (the world's bad
   ones, e.g. leaving the track; named by configuration, never here) may rise by at most their
   tolerance.

The decision holds every number it used, so it can be stored (alias history, the candidate's
metrics) and shown.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stages.evaluate import paired

BUILTIN_GUARDS = ("failure_rate", "interventions")


def guard_values(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, float]:
    """Mean of each guard over evaluation rows: ``failure_rate``, ``interventions`` (per episode),
    or a signal's share of steps (from the rows' ``signal_rates``, a JSON string or a dict)."""
    rates = [json.loads(r["signal_rates"]) if isinstance(r["signal_rates"], str) else dict(r["signal_rates"])
             for r in rows]
    out = {}
    for name in names:
        if name == "failure_rate":
            out[name] = float(np.mean([not bool(r["success"]) for r in rows]))
        elif name == "interventions":
            out[name] = float(np.mean([r["interventions"] for r in rows]))
        elif any(name in r for r in rates):
            out[name] = float(np.mean([r.get(name, 0.0) for r in rates]))
        else:
            raise ValueError(f"guard {name!r} is neither one of {BUILTIN_GUARDS} nor a signal the evaluations "
                             f"measured ({sorted({k for r in rates for k in r})})")
    return out


def _scenes(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], float]:
    return {(r["task"], int(r["seed"])): float(r["score"]) for r in rows}


def gate(*, candidate: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]], reference_role: str,
         scenes: Sequence[tuple[str, int]], margin: float = 0.0, tolerances: Mapping[str, float] | None = None,
         candidate_setup: Mapping[str, Any] | None = None, reference_setup: Mapping[str, Any] | None = None,
         enforce_guards: bool = True, resamples: int = 10_000) -> dict:
    """Decide whether the candidate replaces the reference; returns the decision and its numbers.

    ``candidate`` and ``reference`` are evaluation rows (task, seed, score, success, interventions,
    signal_rates); ``scenes`` the (task, seed) pairs both must cover; ``tolerances`` guard name ->
    the largest rise allowed (default: failure rate and interventions, 0 each). With
    ``enforce_guards=False`` (a reference that is no driver to keep up with, as the random policy,
    which often needs no takeover because it barely moves) the guards are measured and reported only.
    """
    tolerances = dict(tolerances if tolerances is not None else {g: 0.0 for g in BUILTIN_GUARDS})
    decision: dict[str, Any] = {"promote": False, "reference_role": reference_role, "margin": float(margin),
                                "mean_diff": None, "ci95": None, "n": 0, "wins": 0, "losses": 0, "guards": {}}
    cs, rs = candidate_setup or {}, reference_setup or {}
    differ = {k: (cs[k], rs[k]) for k in sorted(set(cs) & set(rs)) if cs[k] != rs[k]}
    if differ:
        what = ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differ.items())
        return decision | {"reason": f"not comparable with the {reference_role}: {what}", "setup_differs": differ}
    wanted = {(t, int(s)) for t, s in scenes}
    cand, ref = _scenes(candidate), _scenes(reference)
    short = {who: sorted(wanted - set(got)) for who, got in (("candidate", cand), (reference_role, ref))
             if wanted - set(got)}
    if not wanted or short:
        gaps = "; ".join(f"{who} lacks {len(miss)} ({miss[:3]}{'...' if len(miss) > 3 else ''})"
                         for who, miss in short.items()) or "no scenes given"
        return decision | {"reason": f"not evaluated on the same {len(wanted)} held-out scenes: {gaps}"}
    comparison = paired({s: cand[s] for s in wanted}, {s: ref[s] for s in wanted}, resamples=resamples)
    diff, (lo, hi) = comparison["mean_diff"], comparison["ci95"]
    in_scope = [r for r in candidate if (r["task"], int(r["seed"])) in wanted]
    ref_scope = [r for r in reference if (r["task"], int(r["seed"])) in wanted]
    mine, theirs = guard_values(in_scope, list(tolerances)), guard_values(ref_scope, list(tolerances))
    guards = {g: {"candidate": mine[g], "reference": theirs[g], "tolerance": float(tol),
                  "ok": mine[g] - theirs[g] <= float(tol) + 1e-12, "enforced": bool(enforce_guards)}
              for g, tol in tolerances.items()}
    better = lo > margin
    regressed = [g for g, v in guards.items() if v["enforced"] and not v["ok"]]
    numbers = (f"mean paired difference {diff:+.4g} (95% CI {lo:+.4g} .. {hi:+.4g}; lower bound must be above "
               f"{margin:g}) over {comparison['n']} scenes, {comparison['wins']} won, {comparison['losses']} lost")
    if not better:
        reason = f"candidate does not beat {reference_role}: {numbers}"
    elif regressed:
        reason = f"candidate beats {reference_role} on score but regresses: " + ", ".join(
            f"{g} {guards[g]['candidate']:.2f} vs {guards[g]['reference']:.2f} (tolerance {guards[g]['tolerance']:g})"
            for g in regressed) + f"; {numbers}"
    else:
        held = ", ".join(f"{g} {v['candidate']:.2f} vs {v['reference']:.2f}" for g, v in guards.items())
        reason = (f"candidate beats {reference_role}: {numbers}; guards "
                  f"{'held' if enforce_guards else 'reported, not enforced'} ({held or 'none'})")
    return decision | {"promote": bool(better and not regressed), "reason": reason, "mean_diff": diff,
                       "ci95": [lo, hi], "n": comparison["n"], "wins": comparison["wins"],
                       "losses": comparison["losses"], "guards": guards}
