"""Counterfactual recovery variants: honest labels, plausibility filter, parent selection."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from sim import worlds
from stages.synthesize import (LABEL_GENERATOR, LABEL_RECOVERY, counterfactual, plausibility,
                               select_parents, synthesize_batch)

WORLD = worlds.get("carracing")


def test_counterfactual_drifts_then_counter_steers_and_says_so():
    parent_actions = np.tile(np.array([0.1, 0.5, 0.0], np.float32), (2, 6, 1))
    parent_labels = np.tile(np.array([0.0, 0.6, 0.0], np.float32), (2, 6, 1))
    actions, labels, sources = counterfactual(WORLD, parent_actions, parent_labels, np.array([0.5, -0.5], np.float32),
                                              drift_steps=2, seed=0)
    np.testing.assert_allclose(actions[0, :, 0], [0.6, 0.6, -0.4, -0.4, 0.1, 0.1], atol=1e-6)
    np.testing.assert_allclose(labels[0, :2, 0], [-0.5, -0.5])  # the corrective steer while drifting
    np.testing.assert_allclose(labels[0, 2:], actions[0, 2:])   # afterwards: what the generator drove
    np.testing.assert_allclose(actions[1, :2, 0], [-0.4, -0.4])
    assert sources[0].tolist() == [LABEL_RECOVERY] * 2 + [LABEL_GENERATOR] * 4
    np.testing.assert_array_equal(parent_actions[0, 0], np.array([0.1, 0.5, 0.0], np.float32))  # inputs untouched
    assert actions.dtype == labels.dtype == np.float32 and actions.shape == labels.shape == (2, 6, 3)


def test_counterfactual_stays_within_the_action_bounds():
    parent = np.tile(np.array([0.9, 0.5, 0.0], np.float32), (1, 4, 1))
    actions, labels, _ = counterfactual(WORLD, parent, parent, np.array([0.5], np.float32), drift_steps=2, seed=0)
    assert (actions >= WORLD.spec.action_low).all() and (actions <= WORLD.spec.action_high).all()
    np.testing.assert_allclose(actions[0, :, 0], [1.0, 1.0, 0.4, 0.4], atol=1e-6)
    np.testing.assert_allclose(labels[0, :2, 0], [0.4, 0.4], atol=1e-6)


def test_plausibility_rejects_blowups_and_colour_drift():
    rng = np.random.default_rng(0)
    parent = rng.integers(90, 110, (3, 8, 8, 3)).astype(np.uint8)
    calm = np.repeat(parent[:, None], 4, axis=1)
    noise = calm.copy()
    noise[1] = rng.integers(0, 256, noise[1].shape)
    drift = 15 * np.arange(1, 5)[:, None, None, None]  # gradual: each step small, the sum large
    noise[2] = np.clip(noise[2].astype(int) + drift, 0, 255)
    reasons = plausibility(noise, parent, max_frame_change=40.0, max_color_shift=30.0)
    assert reasons[0] is None
    assert "frame-to-frame" in reasons[1] and "colour drift" in reasons[2]


def test_select_parents_respects_bounds_and_prefers_events():
    ids = ["a"] * 100 + ["b"] * 30
    steps = list(range(100)) + list(range(30))
    flags = [False] * 130
    flags[80] = True
    raised = [["off_track"] if i == 60 else [] for i in range(130)]
    light = pa.table({"episode_id": ids, "step": steps, "intervention": flags,
                      "signals": pa.array(raised, pa.list_(pa.string()))})
    picks = select_parents(light, n=5, horizon=10, min_step=50, seed=0)
    assert len(picks) == 5 and all(e == "a" and 50 <= s <= 89 for e, s in picks)
    assert select_parents(light, n=5, horizon=200, min_step=0, seed=0) == []
    assert select_parents(light, n=5, horizon=10, min_step=50, seed=0) == picks
    # the same rows in another scan order (fragments written by parallel workers) pick the same
    shuffled = light.take(np.random.default_rng(1).permutation(light.num_rows))
    assert select_parents(shuffled, n=5, horizon=10, min_step=50, seed=0) == picks
    # an intervention or a raised signal weighs 5, any other start 1: of 40 starts, each is drawn
    # about 5 / 48 of the time instead of 1 / 40
    drawn = [select_parents(light, n=1, horizon=10, min_step=50, seed=s)[0][1] for s in range(400)]
    assert drawn.count(80) > 25 and drawn.count(60) > 25
    assert max(drawn.count(s) for s in range(50, 90) if s not in (60, 80)) < 25


class StubWorldModel:
    """Frames that repeat the last history frame; records what it was driven with."""

    config = SimpleNamespace(task_vocab=())

    def __init__(self) -> None:
        self.calls = []

    def rollout(self, history_BKHWC, actions_BTA, *, generator=None, **kwargs):
        self.calls.append((np.asarray(actions_BTA).copy(), kwargs))
        return np.repeat(history_BKHWC[:, -1:], actions_BTA.shape[1], axis=1)


def test_synthesize_batch_drives_the_world_model_with_the_worlds_counterfactual():
    rng = np.random.default_rng(0)
    history = rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    parent = np.tile(np.array([0.1, 0.5, 0.0], np.float32), (2, 5, 1))
    batch = {"history_BKHWC": history, "parent_actions_BTA": parent, "parent_labels_BTA": parent,
             "tasks": np.array(["drive", "drive"], object)}
    model = StubWorldModel()
    out = synthesize_batch(batch, model=model, world=WORLD, offsets=[0.5], drift_steps=2,
                           max_frame_change=40.0, max_color_shift=30.0, seed=0)
    assert out["frames_BTHWC"].shape == (2, 4, 8, 8, 3)
    assert out["actions_BTA"].shape == out["labels_BTA"].shape == (2, 4, 3)
    np.testing.assert_array_equal(out["offsets_B"], [0.5, 0.5])
    driven, kwargs = model.calls[0]
    np.testing.assert_allclose(driven[:, :, 0], [[0.6, 0.6, -0.4, -0.4]] * 2, atol=1e-6)
    assert kwargs == {}  # a world model without a task vocabulary is not given tasks
    assert out["label_sources_BT"][0].tolist() == [LABEL_RECOVERY] + [LABEL_GENERATOR] * 3
    assert out["reject_reasons"] == [None, None]
