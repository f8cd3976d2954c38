"""Synthesize: counterfactual recovery variants rolled out by the world model from real histories.

For a real window (K history frames ending at step t and the parent's next T actions), the
world model is driven with the parent's actions under the world's counterfactual perturbation
(``World.counterfactual``: an offset on the world's actions, then the correction that undoes it)
for `drift_steps`, then recovers. Every generated frame is labelled honestly, per
frame, in `label_source`:
  * during the drift the label is the world's recovery label (as PilotNet's shifted-camera
    corrections, Bojarski et al., 2016), with the source the world names ("recovery_heuristic");
  * afterwards the label is the action the world model was conditioned on: "generator_action".
`action` always holds what the generator was conditioned on. A variant whose frames change too
abruptly or drift in colour from the real frame is implausible and becomes a reject, not a row.

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

LABEL_RECOVERY, LABEL_GENERATOR = "recovery_heuristic", "generator_action"
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
    return {"history": frames[at - history + 1: at + 1], "actions": actions[at:], "labels": labels[at:],
            "states": vectors(rows.column("state"))[at + 1:], "task": rows.column("task")[at].as_py()}


def parent_batch(windows: Sequence[pa.Table], *, starts: Sequence[int], history: int,
                 image_size: int) -> tuple[dict, list[np.ndarray]]:
    """The batch ``synthesize_batch`` takes, and each parent's states after its start step.

    ``windows[i]`` holds the frames rows (``WINDOW_COLUMNS``) of one parent episode from step
    ``starts[i] - history + 1`` to ``starts[i] + horizon``, in any order. No windows: ({}, []).
    """
    if not windows:
        return {}, []
    cut = [_window(rows, start, history, image_size) for rows, start in zip(windows, starts, strict=True)]
    batch = {"history_BKHWC": np.stack([w["history"] for w in cut]),
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


@dataclasses.dataclass(frozen=True, eq=False)
class Variant:
    """One variant ``synthesize_batch`` generated from a parent window: the world's
    perturbation offset, frames uint8 [T, H, W, 3], actions and labels [T, A], each label's source [T], and
    why it is implausible (None when it is not)."""

    offset: float
    frames: np.ndarray
    actions: np.ndarray
    labels: np.ndarray
    label_sources: np.ndarray
    reject_reason: str | None

    @classmethod
    def split(cls, out: dict) -> list[Variant]:
        """The variants of a ``synthesize_batch`` result, in batch order."""
        return [cls(offset=float(out["offsets_B"][i]), frames=out["frames_BTHWC"][i], actions=out["actions_BTA"][i],
                    labels=out["labels_BTA"][i], label_sources=out["label_sources_BT"][i],
                    reject_reason=out["reject_reasons"][i]) for i in range(len(out["reject_reasons"]))]


def variant_states(spec, parent_states: np.ndarray, n: int) -> np.ndarray:
    """States of a variant: the policy's inputs that the perturbation does not move (the task's
    goal, say) are kept from the parent where the world marks them static; everything else is
    unknown (NaN), since no simulator produced it."""
    states = np.full((n, len(spec.state_names)), np.nan, np.float32)
    static = [spec.state_names.index(name) for name in spec.static_state]
    if static and len(parent_states):
        states[:len(parent_states), static] = parent_states[:, static]
        states[len(parent_states):, static] = parent_states[-1, static]
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
        # the parent's logged states are those of the real trajectory, not of this variant: NaN
        episode = {"world": spec.name, "seed": -1, "driver": generator_version, "policy_version": "",
                   "frames": variant.frames, "actions": variant.actions, "labels": variant.labels,
                   "instruction": task, "states": variant_states(spec, states[:n], n),
                   "timestamps_ns": (start + 1 + np.arange(n, dtype=np.int64)) * spec.step_ns}
        row, table = episode_to_tables(
            episode, episode_id=f"syn-{digest[:24]}", source_uri=uri, content_hash=digest, turn=turn,
            origin="synthetic", parent_episode_id=parent, generator_version=generator_version,
            label_source=variant.label_sources.tolist(), split="train", features=features_of(spec))
        episodes.append(row)
        frames.append(table)
    return episodes, frames, rejects
