"""Synthesize: counterfactual recovery variants rolled out by the world model from real histories.

For a real window (K history frames ending at step t and the parent's next T actions), the
world model is driven with the parent's actions plus a steer offset for `drift_steps` (the car
drifts off the parent's line), then with the counter-steer (it comes back). Every generated frame
is labelled honestly, per frame, in `label_source`:
  * during the drift the label is the parent's expert label minus `gain * offset` — the corrective
    steer of NVIDIA's PilotNet recovery augmentation (Bojarski et al., 2016): "recovery_heuristic";
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

    A start step leaves `horizon` parent actions after it; interventions and off-track frames
    (mined events) are preferred when present, so variants cluster around what went wrong.
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
    for name in ("intervention", "off_track"):
        if name in frames.column_names:
            weight += 4.0 * (ok & frames.column(name).to_numpy(zero_copy_only=False))
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(ids), size=min(n, int(ok.sum())), replace=False, p=weight / weight.sum())
    return [(str(ids[i]), int(steps[i])) for i in sorted(picks)]


def counterfactual(parent_actions_BTA: np.ndarray, parent_labels_BTA: np.ndarray, offsets_B: np.ndarray,
                   *, drift_steps: int, gain: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Actions to condition on, training labels and per-step label sources for each variant."""
    actions = parent_actions_BTA.astype(np.float32).copy()
    labels = parent_labels_BTA.astype(np.float32).copy()
    horizon = actions.shape[1]
    drift = slice(0, min(drift_steps, horizon))
    back = slice(drift.stop, min(2 * drift.stop, horizon))
    actions[:, drift, 0] += offsets_B[:, None]
    actions[:, back, 0] -= gain * offsets_B[:, None]
    labels[:, drift, 0] -= gain * offsets_B[:, None]
    labels[:, drift.stop:] = actions[:, drift.stop:]
    np.clip(actions[..., 0], -1.0, 1.0, out=actions[..., 0])
    np.clip(labels[..., 0], -1.0, 1.0, out=labels[..., 0])
    sources = np.where(np.arange(horizon) < drift.stop, LABEL_RECOVERY, LABEL_GENERATOR)
    return actions, labels, np.broadcast_to(sources, actions.shape[:2]).copy()


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


def synthesize_batch(batch: dict[str, np.ndarray], *, model, offsets: Sequence[float], drift_steps: int,
                     gain: float, max_frame_change: float, max_color_shift: float, seed: int) -> dict:
    """Roll the world model out for a batch of parent windows.

    `batch`: history_BKHWC uint8 (frames t-K+1..t), parent_actions_BTA and parent_labels_BTA
    float32 for steps t..t+H (H+1 of them). The model is driven with the first H counterfactual
    actions and generates frames t+1..t+H; row i of a variant is frame t+1+i with the action and
    label of step t+1+i (what is done after seeing it). Returns frames_BHHWC, actions, labels,
    label_sources, offsets_B and a reject reason (None = plausible) per variant.
    """
    import torch

    history = batch["history_BKHWC"]
    rng = np.random.default_rng(seed)
    offsets_B = rng.choice(np.asarray(offsets, dtype=np.float32), size=len(history))
    actions, labels, sources = counterfactual(batch["parent_actions_BTA"], batch["parent_labels_BTA"],
                                              offsets_B, drift_steps=drift_steps, gain=gain)
    generator = torch.Generator().manual_seed(seed)
    frames = np.asarray(model.rollout(history, actions[:, :-1], generator=generator))
    reasons = plausibility(frames, history[:, -1], max_frame_change=max_frame_change,
                           max_color_shift=max_color_shift)
    return {"frames_BTHWC": frames, "actions_BTA": actions[:, 1:], "labels_BTA": labels[:, 1:],
            "label_sources_BT": sources[:, 1:], "offsets_B": offsets_B, "reject_reasons": reasons}


class WorldModelActor:
    """Ray actor adapter: holds one world model and synthesizes batches with it."""

    def __init__(self, model_dir: str, threads: int = 1):
        import torch

        from models import world_model

        torch.set_num_threads(threads)
        self.model = world_model.load(model_dir).eval()

    def synthesize(self, batch: dict[str, np.ndarray], **params) -> dict:
        return synthesize_batch(batch, model=self.model, **params)
