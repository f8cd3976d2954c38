"""Counterfactual recovery variants: honest labels, plausibility filter, parent selection."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from stages.synthesize import (LABEL_GENERATOR, LABEL_RECOVERY, counterfactual, plausibility,
                               select_parents)


def test_counterfactual_drifts_then_counter_steers_and_says_so():
    parent_actions = np.tile(np.array([0.1, 0.5, 0.0], np.float32), (2, 6, 1))
    parent_labels = np.tile(np.array([0.0, 0.6, 0.0], np.float32), (2, 6, 1))
    actions, labels, sources = counterfactual(parent_actions, parent_labels, np.array([0.5, -0.5], np.float32),
                                              drift_steps=2, gain=1.0)
    np.testing.assert_allclose(actions[0, :, 0], [0.6, 0.6, -0.4, -0.4, 0.1, 0.1], atol=1e-6)
    np.testing.assert_allclose(labels[0, :2, 0], [-0.5, -0.5])  # the corrective steer while drifting
    np.testing.assert_allclose(labels[0, 2:], actions[0, 2:])   # afterwards: what the generator drove
    np.testing.assert_allclose(actions[1, :2, 0], [-0.4, -0.4])
    assert sources[0].tolist() == [LABEL_RECOVERY] * 2 + [LABEL_GENERATOR] * 4
    np.testing.assert_array_equal(parent_actions[0, 0], np.array([0.1, 0.5, 0.0], np.float32))  # inputs untouched


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
    light = pa.table({"episode_id": ids, "step": steps, "intervention": flags, "off_track": [False] * 130})
    picks = select_parents(light, n=5, horizon=10, min_step=50, seed=0)
    assert len(picks) == 5 and all(e == "a" and 50 <= s <= 89 for e, s in picks)
    assert select_parents(light, n=5, horizon=200, min_step=0, seed=0) == []
    assert select_parents(light, n=5, horizon=10, min_step=50, seed=0) == picks
    # the same rows in another scan order (fragments written by parallel workers) pick the same
    shuffled = light.take(np.random.default_rng(1).permutation(light.num_rows))
    assert select_parents(shuffled, n=5, horizon=10, min_step=50, seed=0) == picks
