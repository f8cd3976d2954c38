"""Synthesize: counterfactual recovery variants rolled out by the world model from real histories.

For a real window (K history frames ending at step t, the actions and states logged at them, and
the parent's next T actions), the neural simulator (``sim.neural.NeuralSim``: the dynamics model
reads the window and instructs the generator) is driven with the parent's actions under the
world's counterfactual perturbation (``World.counterfactual``: an offset on the world's actions,
then the correction that undoes it) for `drift_steps`, then recovers. Every generated frame is
labelled honestly, per frame, in `label_source`:
  * during the drift the label is the world's recovery label (as PilotNet's shifted-camera
    corrections, Bojarski et al., 2016), with the source the world names ("recovery_heuristic");
  * afterwards the label is the action the world model was conditioned on ("generator_action"),
    or with ``label_after_drift="inverse_dynamics"`` the action the dynamics model's inverse-
    dynamics head reads off the generated frames ("inverse_dynamics");
  * where the world can replay the parent (its seed and logged actions reproduce the logged
    state), ``relabel`` puts the world's expert's action at each counterfactual state in its
    place ("expert_replay"): the frames come from the world model, the labels from the simulator.
`action` always holds what the generator was conditioned on; a variant's states are the dynamics
model's predictions (the world's static state kept from the parent). Two filters make a variant
a reject instead of rows: frames that change too abruptly or drift in colour from the real frame,
and frames that do not follow the actions that drove them, by the inverse-dynamics critic: its
error on the variant (the action it reads off consecutive frames against the action that drove
them, in shares of each action's range) above ``max_idm_ratio`` times its median error on the
same generator's rollouts of the same windows under their logged actions, i.e. a variant that
follows its actions worse than the generator follows what really happened. (Against real frames
the critic is far more accurate, 0.02 against about 0.1 on the car's demo lake: generated frames
blur the motion it reads, so real frames are not the reference.)

Pure functions over Arrow and NumPy batches: the parents' windows (`parent_batch`, from frames
rows the flow reads), the rollout (`synthesize_batch`, held in a Ray actor by
``stages.adapters``), and each `Variant`'s episode rows, frames table or reject (`variant_tables`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from stages.curate import episode_to_tables, reject_row
from stages import images
from stages.schemas import features_of, vectors

LABEL_RECOVERY, LABEL_GENERATOR, LABEL_IDM = "recovery_heuristic", "generator_action", "inverse_dynamics"
LABEL_EXPERT = "expert_replay"  # the world's expert at the counterfactual state, replayed in its simulator
WINDOW_COLUMNS = ("step", "image", "height", "width", "action", "label", "state", "task")  # what parent_batch reads


def select_parents(frames: pa.Table, *, n: int, horizon: int, min_step: int, seed: int) -> list[tuple[str, int]]:
    """Pick `n` (episode_id, start_step) windows from light frame columns (episode_id, step).

    A start step leaves `horizon` parent actions after it; interventions and frames that raised
    a world signal (the spec's ``signals``) are preferred, so variants cluster around what
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


def _window(rows: pa.Table, start: int, history: int, image_size: int) -> dict[str, Any]:
    rows = rows.sort_by("step")
    steps = rows.column("step").to_numpy()
    frames, actions = images.decode(rows, image_size), vectors(rows.column("action"))
    labels = vectors(rows.column("label"))
    at = int(np.searchsorted(steps, start))
    states = vectors(rows.column("state"))
    past = slice(at - history + 1, at + 1)
    return {"history": frames[past], "history_actions": actions[past], "history_states": states[past],
            "actions": actions[at:], "labels": labels[at:], "states": states[at + 1:],
            "task": rows.column("task")[at].as_py()}


def parent_batch(windows: Sequence[pa.Table], *, starts: Sequence[int], history: int,
                 image_size: int) -> tuple[dict, list[np.ndarray]]:
    """The batch ``synthesize_batch`` takes, and each parent's states after its start step.

    ``windows[i]`` holds the frames rows (``WINDOW_COLUMNS``) of one parent episode from step
    ``starts[i] - history + 1`` to ``starts[i] + horizon``, in any order; ``history`` is the context
    the neural simulator needs (``NeuralSim.context``). No windows: ({}, []).
    """
    if not windows:
        return {}, []
    cut = [_window(rows, start, history, image_size) for rows, start in zip(windows, starts, strict=True)]
    batch = {"history_BKHWC": np.stack([w["history"] for w in cut]),
             "history_actions_BKA": np.stack([w["history_actions"] for w in cut]),
             "history_states_BKS": np.stack([w["history_states"] for w in cut]),
             "parent_actions_BTA": np.stack([w["actions"] for w in cut]),
             "parent_labels_BTA": np.stack([w["labels"] for w in cut]),
             "tasks": np.array([w["task"] for w in cut], dtype=object)}
    return batch, [w["states"] for w in cut]


def split_batch(batch: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    """``batch`` cut into at most ``parts`` consecutive batches of near-equal size."""
    n = len(next(iter(batch.values())))
    return [{k: v[idx] for k, v in batch.items()}
            for idx in np.array_split(np.arange(n), max(1, parts)) if len(idx)]


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


def idm_error(inferred_BTA: np.ndarray, actions_BTA: np.ndarray, span: np.ndarray) -> np.ndarray:
    """Mean |inferred - given| action per window [B], in shares of each action's range ``span`` [A]."""
    return (np.abs(inferred_BTA - actions_BTA) / span).mean(axis=(1, 2))


def synthesize_batch(batch: dict[str, np.ndarray], *, model, dynamics, world, offsets: Sequence[float],
                     drift_steps: int, max_frame_change: float, max_color_shift: float, max_idm_ratio: float,
                     seed: int, label_after_drift: str = LABEL_GENERATOR) -> dict:
    """Roll the neural simulator (generator ``model`` + ``dynamics``) out for a batch of parent windows.

    `batch`: history_BKHWC uint8 (frames t-K+1..t) with history_actions_BKA and history_states_BKS
    logged at them, parent_actions_BTA and parent_labels_BTA float32 for steps t..t+H (H+1 of
    them), and tasks (the parents' instructions). The simulator is driven with the first H
    counterfactual actions and generates frames t+1..t+H; row i of a variant is frame t+1+i with
    the action and label of step t+1+i (what is done after seeing it) and the predicted state.
    Returns frames_BTHWC, states_BTS, driven_BTA, actions, labels, label_sources, offsets_B,
    idm_error_B, idm_error_logged (the critic's reference), idm_error_real (its error on the real
    history frames) and a reject reason (None = plausible) per variant.
    """
    from sim.neural import NeuralSim, Start

    if label_after_drift not in (LABEL_GENERATOR, LABEL_IDM):
        raise ValueError(f"label_after_drift must be {LABEL_GENERATOR!r} or {LABEL_IDM!r}, got {label_after_drift!r}")
    history = batch["history_BKHWC"]
    rng = np.random.default_rng(seed)
    offsets_B = rng.choice(np.asarray(offsets, dtype=np.float32), size=len(history))
    actions, labels, sources = counterfactual(world, batch["parent_actions_BTA"], batch["parent_labels_BTA"],
                                              offsets_B, drift_steps=drift_steps, seed=seed)
    sim = NeuralSim(model, dynamics, world.spec, seed=seed)
    starts = [Start(frames=history[i], actions=batch["history_actions_BKA"][i], states=batch["history_states_BKS"][i],
                    instruction=str(batch["tasks"][i])) for i in range(len(history))]
    logged = batch["parent_actions_BTA"][:, :-1]  # the critic's reference: the same windows, what really happened
    both = sim.rollout(starts + starts, np.concatenate([actions[:, :-1], logged]).astype(np.float32))
    B = len(history)
    out = {k: v[:B] for k, v in both.items()}
    frames = out["frames"]
    reasons = plausibility(frames, history[:, -1], max_frame_change=max_frame_change,
                           max_color_shift=max_color_shift)
    span = np.maximum(world.spec.action_high - world.spec.action_low, 1e-6)
    real = float(np.median(idm_error(dynamics.infer_actions(history), batch["history_actions_BKA"][:, :-1], span))) \
        if history.shape[1] > 1 else float("nan")
    chains = np.concatenate([np.concatenate([history[:, -1:]] * 2), both["frames"]], axis=1)
    inferred_all = dynamics.infer_actions(chains)  # steps t..t+H-1, counterfactual then logged
    inferred = inferred_all[:B]
    error = idm_error(inferred, actions[:, :-1], span)
    reference = float(np.median(idm_error(inferred_all[B:], logged, span)))
    limit = max_idm_ratio * reference
    reasons = [r if r is not None or e <= limit else
               f"implausible: frames do not follow their actions (inverse-dynamics error {e:.3f} > "
               f"{max_idm_ratio} x {reference:.3f} under the logged actions)" for r, e in zip(reasons, error)]
    sources = sources.astype(object)
    if label_after_drift == LABEL_IDM:  # steps after the drift that a generated frame follows
        later = np.arange(min(drift_steps, inferred.shape[1]), inferred.shape[1])
        labels[:, later] = inferred[:, later]
        sources[:, later] = LABEL_IDM
    return {"frames_BTHWC": frames, "states_BTS": out["states"], "driven_BTA": actions[:, :-1], "actions_BTA": actions[:, 1:],
            "labels_BTA": labels[:, 1:], "label_sources_BT": sources[:, 1:], "offsets_B": offsets_B,
            "idm_error_B": error, "idm_error_logged": reference, "idm_error_real": real, "reject_reasons": reasons}


@dataclasses.dataclass(frozen=True, eq=False)
class Variant:
    """One variant ``synthesize_batch`` generated from a parent window: the world's
    perturbation offset, frames uint8 [T, H, W, 3], predicted states [T, S], actions and labels [T, A],
    each label's source [T], the critic's inverse-dynamics error, and why it is implausible (None
    when it is not)."""

    offset: float
    frames: np.ndarray
    states: np.ndarray
    driven: np.ndarray  # [T, A]: the actions that made the frames (steps t..t+T-1)
    actions: np.ndarray
    labels: np.ndarray
    label_sources: np.ndarray
    idm_error: float
    reject_reason: str | None

    @classmethod
    def split(cls, out: dict) -> list[Variant]:
        """The variants of a ``synthesize_batch`` result, in batch order."""
        return [cls(offset=float(out["offsets_B"][i]), frames=out["frames_BTHWC"][i], states=out["states_BTS"][i],
                    driven=out["driven_BTA"][i], actions=out["actions_BTA"][i], labels=out["labels_BTA"][i],
                    label_sources=out["label_sources_BT"][i], idm_error=float(out["idm_error_B"][i]),
                    reject_reason=out["reject_reasons"][i]) for i in range(len(out["reject_reasons"]))]


def relabel(variant: Variant, labels: np.ndarray | None) -> Variant:
    """``variant`` with its first len(labels) labels replaced by the expert's at the replayed
    counterfactual states (``sim.rollout.replay_labels``), each marked ``LABEL_EXPERT``; unchanged
    when the world could not replay its parent (None)."""
    if labels is None or not len(labels):
        return variant
    n = min(len(labels), len(variant.labels))
    new, sources = variant.labels.copy(), np.array(variant.label_sources, dtype=object)
    new[:n], sources[:n] = labels[:n], LABEL_EXPERT
    return dataclasses.replace(variant, labels=new, label_sources=sources)


def variant_states(spec, predicted: np.ndarray, parent_states: np.ndarray) -> np.ndarray:
    """States of a variant [T, S]: the dynamics model's predictions, with the inputs the perturbation
    does not move (the task's goal, say: the world's ``static_state``) kept from the parent."""
    states = np.array(predicted, np.float32, copy=True)
    static = [spec.state_names.index(name) for name in spec.static_state]
    if static and len(parent_states):
        n = min(len(parent_states), len(states))
        states[:n, static] = parent_states[:n, static]
        states[n:, static] = parent_states[n - 1, static]
    return states


def variant_tables(variants: Sequence[Variant], *, parents: Sequence[tuple[str, int]], tasks: Sequence[str],
                   parent_states: Sequence[np.ndarray], spec, turn: int,
                   generator_version: str) -> tuple[list[dict], list[pa.Table], list[dict]]:
    """(episodes rows, frames tables, reject rows) of the variants of ``parents`` ((episode id,
    start step) each, with its task and states after the start: ``parent_batch``).

    A variant's source URI names the generator, parent, start step, offset and turn; its id
    hashes that URI. An implausible variant is a reject of stage ``synthesize``; a plausible one
    an episode of origin ``synthetic`` with per-frame label sources, in the "train" split.
    """
    episodes, frames, rejects = [], [], []
    for variant, (parent, start), task, states in zip(variants, parents, tasks, parent_states, strict=True):
        uri = (f"worldmodel://{generator_version}?parent={parent}&step={start}&offset={variant.offset:+.2f}"
               f"&turn={turn}")
        if variant.reject_reason is not None:
            rejects.append(reject_row(uri, stage="synthesize", reason="implausible",
                                      detail=variant.reject_reason, turn=turn))
            continue
        digest = hashlib.sha256(uri.encode()).hexdigest()
        n = len(variant.frames)
        # the parent's logged states are those of the real trajectory, not of this variant: predicted
        episode = {"world": spec.name, "seed": -1, "driver": generator_version, "policy_version": "",
                   "frames": variant.frames, "actions": variant.actions, "labels": variant.labels,
                   "instruction": task, "states": variant_states(spec, variant.states, states),
                   "timestamps_ns": (start + 1 + np.arange(n, dtype=np.int64)) * spec.step_ns}
        row, table = episode_to_tables(
            episode, episode_id=f"syn-{digest[:24]}", source_uri=uri, content_hash=digest, turn=turn,
            origin="synthetic", parent_episode_id=parent, generator_version=generator_version,
            label_source=variant.label_sources.tolist(), split="train", features=features_of(spec))
        episodes.append(row)
        frames.append(table)
    return episodes, frames, rejects
