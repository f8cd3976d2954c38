"""Synthesize: counterfactual recovery variants rolled out by the world model from real histories.

For a real window (K history frames ending at step t and the parent's next T actions), the
world model is driven with the parent's actions under the world's counterfactual perturbation
(``World.counterfactual``: for the car a steer offset, then the counter-steer; for the arm a push
of the hand) for `drift_steps`, then recovers. Every generated frame is labelled honestly, per
frame, in `label_source`:
  * during the drift the label is the world's recovery label (e.g. PilotNet's corrective steer,
    Bojarski et al., 2016), with the source the world names ("recovery_heuristic");
  * afterwards the label is the action the world model was conditioned on: "generator_action".
`action` always holds what the generator was conditioned on. A variant whose frames change too
abruptly or drift in colour from the real frame is implausible and becomes a reject, not a row.

Pure functions over NumPy batches; `WorldModelActor` is the thin Ray adapter holding the model.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

LABEL_RECOVERY, LABEL_GENERATOR = "recovery_heuristic", "generator_action"


def select_parents(frames: pa.Table, *, n: int, horizon: int, min_step: int, seed: int) -> list[tuple[str, int]]:
    """Pick `n` (episode_id, start_step) windows from light frame columns (episode_id, step).

    A start step leaves `horizon` parent actions after it; interventions and frames that raised
    a world signal (``signals``, e.g. off track) are preferred, so variants cluster around what
    went wrong.
    The picks depend on the rows and `seed` only, not on their order: a table's scan order is
    the order its fragments were written in, which parallel writers vary from run to run.
    """
    frames = frames.take(np.lexsort((frames.column("step").to_numpy(),
                                     np.asarray(frames.column("episode_id").to_pylist(), dtype=object))))
    ids = np.asarray(frames.column("episode_id").to_pylist(), dtype=object)
    steps = frames.column("step").to_numpy()
    last = {}
    for e, s in zip(ids, steps):
        last[e] = max(last.get(e, -1), int(s))
    ok = np.array([min_step <= s <= last[e] - horizon for e, s in zip(ids, steps)], dtype=bool)
    if not ok.any():
        return []
    weight = ok.astype(np.float64)
    if "intervention" in frames.column_names:
        weight += 4.0 * (ok & frames.column("intervention").to_numpy(zero_copy_only=False))
    if "signals" in frames.column_names:
        raised = np.array([bool(r) for r in frames.column("signals").to_pylist()])
        weight += 4.0 * (ok & raised)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(ids), size=min(n, int(ok.sum())), replace=False, p=weight / weight.sum())
    return [(str(ids[i]), int(steps[i])) for i in sorted(picks)]


def counterfactual(world, parent_actions_BTA: np.ndarray, parent_labels_BTA: np.ndarray, offsets_B: np.ndarray,
                   *, drift_steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Actions to condition on, training labels and per-step label sources for each variant."""
    rng = np.random.default_rng(seed)
    horizon = parent_actions_BTA.shape[1]
    actions, labels, sources = [], [], []
    for a, l, offset in zip(parent_actions_BTA, parent_labels_BTA, offsets_B):
        act, lab, source = world.counterfactual(a, l, offset=float(offset), drift_steps=drift_steps, rng=rng)
        drift = min(drift_steps, horizon)
        lab[drift:] = act[drift:]
        actions.append(act)
        labels.append(lab)
        sources.append(np.where(np.arange(horizon) < drift, source, LABEL_GENERATOR))
    return np.stack(actions).astype(np.float32), np.stack(labels).astype(np.float32), np.stack(sources)


def plausibility(frames_BTHWC: np.ndarray, parent_last_BHWC: np.ndarray, *, max_frame_change: float,
                 max_color_shift: float) -> list[str | None]:
    """None for a plausible variant, else the reason it is not."""
    x = frames_BTHWC.astype(np.float32)
    prev = np.concatenate([parent_last_BHWC[:, None].astype(np.float32), x[:, :-1]], axis=1)
    change = np.abs(x - prev).mean(axis=(2, 3, 4)).max(axis=1)
    color = np.abs(x.mean(axis=(2, 3)) - parent_last_BHWC.astype(np.float32).mean(axis=(1, 2))[:, None])
    shift = color.max(axis=(1, 2))
    reasons: list[str | None] = []
    for c, s in zip(change, shift):
        if not np.isfinite(c) or c > max_frame_change:
            reasons.append(f"implausible: frame-to-frame change {c:.1f} > {max_frame_change}")
        elif s > max_color_shift:
            reasons.append(f"implausible: colour drift {s:.1f} > {max_color_shift}")
        else:
            reasons.append(None)
    return reasons


def synthesize_batch(batch: dict[str, np.ndarray], *, model, world, offsets: Sequence[float], drift_steps: int,
                     max_frame_change: float, max_color_shift: float, seed: int) -> dict:
    """Roll the world model out for a batch of parent windows.

    `batch`: history_BKHWC uint8 (frames t-K+1..t), parent_actions_BTA and parent_labels_BTA
    float32 for steps t..t+H (H+1 of them), and tasks (the parents' instructions) when the
    world model reads tasks. The model is driven with the first H counterfactual
    actions and generates frames t+1..t+H; row i of a variant is frame t+1+i with the action and
    label of step t+1+i (what is done after seeing it). Returns frames_BHHWC, actions, labels,
    label_sources, offsets_B and a reject reason (None = plausible) per variant.
    """
    import torch

    history = batch["history_BKHWC"]
    rng = np.random.default_rng(seed)
    offsets_B = rng.choice(np.asarray(offsets, dtype=np.float32), size=len(history))
    actions, labels, sources = counterfactual(world, batch["parent_actions_BTA"], batch["parent_labels_BTA"],
                                              offsets_B, drift_steps=drift_steps, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    tasks = list(batch["tasks"]) if getattr(model.config, "task_vocab", ()) else None
    kwargs = {"tasks": tasks} if tasks is not None else {}
    frames = np.asarray(model.rollout(history, actions[:, :-1], generator=generator, **kwargs))
    reasons = plausibility(frames, history[:, -1], max_frame_change=max_frame_change,
                           max_color_shift=max_color_shift)
    return {"frames_BTHWC": frames, "actions_BTA": actions[:, 1:], "labels_BTA": labels[:, 1:],
            "label_sources_BT": sources[:, 1:], "offsets_B": offsets_B, "reject_reasons": reasons}


class WorldModelActor:
    """Ray actor adapter: holds one world model and synthesizes batches with it."""

    def __init__(self, model_dir: str, world: dict, threads: int = 1):
        import torch

        from models import world_model
        from sim import worlds
        from sim.worlds.base import WorldConfig

        torch.set_num_threads(threads)
        self.model = world_model.load(model_dir).eval()
        self.world = worlds.get(WorldConfig(**world))

    def synthesize(self, batch: dict[str, np.ndarray], **params) -> dict:
        return synthesize_batch(batch, model=self.model, world=self.world, **params)
