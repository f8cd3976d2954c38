"""Counterfactual recovery variants: honest labels, plausibility filter, parent selection, parent
windows as a batch, and the variants' episode rows, frames tables and rejects."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from sim import worlds
from stages import images
from stages.synthesize import (LABEL_EXPERT, LABEL_GENERATOR, LABEL_IDM, LABEL_RECOVERY, Variant, counterfactual,
                               parent_batch, plausibility, relabel, select_parents, split_batch, synthesize_batch,
                               variant_states, variant_tables)

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


def neural_pair(size: int = 8):
    """A tiny random generator conditioned on a tiny random dynamics model of the car's shapes."""
    import dataclasses

    import torch

    from models.dynamics import Dynamics
    from models.dynamics import preset as dynamics_preset
    from models.world_model import WorldModel
    from models.world_model import preset as wm_preset

    spec = WORLD.spec
    torch.manual_seed(0)
    d = dataclasses.replace(dynamics_preset("tiny"), image_size=size, action_dim=len(spec.actions),
                            state_dim=len(spec.state_names), signals=spec.signals)
    g = dataclasses.replace(wm_preset("tiny"), image_size=size, action_dim=len(spec.actions), condition_dim=d.embed)
    return WorldModel(g).eval(), Dynamics(d).eval()


def neural_batch(size: int = 8, k: int = 4, horizon: int = 5) -> dict:
    rng = np.random.default_rng(0)
    parent = np.tile(np.array([0.1, 0.5, 0.0], np.float32), (2, horizon, 1))
    return {"history_BKHWC": rng.integers(0, 256, (2, k, size, size, 3), dtype=np.uint8),
            "history_actions_BKA": np.zeros((2, k, 3), np.float32),
            "history_states_BKS": rng.normal(size=(2, k, len(WORLD.spec.state_names))).astype(np.float32),
            "parent_actions_BTA": parent, "parent_labels_BTA": parent, "tasks": np.array(["drive", "drive"], object)}


def test_synthesize_batch_drives_the_neural_simulator_with_the_worlds_counterfactual():
    model, dynamics = neural_pair()
    common = {"model": model, "dynamics": dynamics, "world": WORLD, "offsets": [0.5], "drift_steps": 2,
              "max_frame_change": 255.0, "max_color_shift": 255.0, "seed": 0}
    out = synthesize_batch(neural_batch(), **common, max_idm_ratio=1e9)
    assert out["frames_BTHWC"].shape == (2, 4, 8, 8, 3) and out["frames_BTHWC"].dtype == np.uint8
    assert out["actions_BTA"].shape == out["labels_BTA"].shape == (2, 4, 3)
    assert out["states_BTS"].shape == (2, 4, len(WORLD.spec.state_names)) and np.isfinite(out["states_BTS"]).all()
    np.testing.assert_array_equal(out["offsets_B"], [0.5, 0.5])
    np.testing.assert_allclose(out["actions_BTA"][:, :, 0], [[0.6, -0.4, -0.4, 0.1]] * 2, atol=1e-6)
    assert out["label_sources_BT"][0].tolist() == [LABEL_RECOVERY] + [LABEL_GENERATOR] * 3
    assert out["reject_reasons"] == [None, None] and np.isfinite([out["idm_error_real"], out["idm_error_logged"]]).all()
    # the critic: at a ratio of 0 to the error under the logged actions, every variant is dropped
    strict = synthesize_batch(neural_batch(), **common, max_idm_ratio=0.0)
    assert all("frames do not follow their actions" in r for r in strict["reject_reasons"])
    relabelled = synthesize_batch(neural_batch(), **common, max_idm_ratio=1e9, label_after_drift=LABEL_IDM)
    # steps t+2, t+3 are read off the frames after them; step t+4 has no frame after it in the variant
    assert relabelled["label_sources_BT"][0].tolist() == [LABEL_RECOVERY, LABEL_IDM, LABEL_IDM, LABEL_GENERATOR]
    np.testing.assert_array_equal(relabelled["frames_BTHWC"], out["frames_BTHWC"])


def window_rows(steps: list[int], task: str = "drive") -> pa.Table:
    """Frames rows of steps: image, action and state all hold the step; labels the step + 100."""
    def vec(values, width: int) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(np.asarray(values, np.float32), width)), width)

    frames = np.asarray(steps, np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    image, height, width = images.to_columns(frames)
    return pa.table({"step": pa.array(steps, pa.int32()), "image": image, "height": height, "width": width,
                     "action": vec(steps, 3), "label": vec(np.asarray(steps) + 100, 3), "state": vec(steps, 2),
                     "task": [task] * len(steps)})


def test_parent_batch_cuts_history_and_the_steps_after_the_start():
    windows = [window_rows([7, 3, 5, 4, 9, 6, 8]), window_rows(list(range(10, 17)), task="push")]  # any order
    batch, states = parent_batch(windows, starts=[5, 12], history=3, image_size=2)  # the model's size
    assert batch["history_BKHWC"].shape == (2, 3, 2, 2, 3)
    assert batch["history_BKHWC"][:, :, 0, 0, 0].tolist() == [[3, 4, 5], [10, 11, 12]]
    assert batch["history_actions_BKA"][:, :, 0].tolist() == [[3, 4, 5], [10, 11, 12]]  # logged at those frames
    assert batch["history_states_BKS"][:, :, 1].tolist() == [[3, 4, 5], [10, 11, 12]]
    assert batch["parent_actions_BTA"][:, :, 0].tolist() == [[5, 6, 7, 8, 9], [12, 13, 14, 15, 16]]
    assert batch["parent_labels_BTA"][0, :, 0].tolist() == [105, 106, 107, 108, 109]
    assert batch["tasks"].tolist() == ["drive", "push"]
    assert [s[:, 0].tolist() for s in states] == [[6, 7, 8, 9], [13, 14, 15, 16]]
    assert parent_batch([], starts=[], history=3, image_size=2) == ({}, [])
    parts = split_batch(batch, 3)  # no more parts than rows
    assert [len(p["tasks"]) for p in parts] == [1, 1] and parts[1]["tasks"].tolist() == ["push"]


def test_variant_states_are_predicted_and_keep_the_static_state():
    spec = SimpleNamespace(state_names=("x", "goal"), static_state=("goal",))
    parent = np.array([[1.0, 7.0], [2.0, 8.0]], np.float32)
    predicted = np.array([[3.0, 0.0], [4.0, 0.0], [5.0, 0.0]], np.float32)
    states = variant_states(spec, predicted, parent)
    assert states[:, 0].tolist() == [3.0, 4.0, 5.0] and states[:, 1].tolist() == [7.0, 8.0, 8.0]
    assert predicted[:, 1].tolist() == [0.0] * 3  # the prediction is not changed in place


def test_variant_tables_keep_plausible_variants_and_reject_the_rest():
    rng = np.random.default_rng(0)
    out = {"frames_BTHWC": rng.integers(0, 256, (2, 4, 8, 8, 3), dtype=np.uint8),
           "actions_BTA": np.zeros((2, 4, 3), np.float32), "labels_BTA": np.ones((2, 4, 3), np.float32),
           "label_sources_BT": np.array([[LABEL_RECOVERY] + [LABEL_GENERATOR] * 3] * 2),
           "offsets_B": np.array([0.5, -0.5], np.float32), "reject_reasons": [None, "implausible: colour drift"],
           "states_BTS": np.ones((2, 4, 8), np.float32), "idm_error_B": np.array([0.1, 0.2]),
           "driven_BTA": np.zeros((2, 4, 3), np.float32)}
    variants = Variant.split(out)
    assert [v.offset for v in variants] == [0.5, -0.5] and variants[1].reject_reason == "implausible: colour drift"
    spec = worlds.spec("carracing")
    episodes, frames, rejects = variant_tables(
        variants, parents=[("ep-a", 10), ("ep-b", 20)], tasks=["drive", "drive"],
        parent_states=[np.zeros((4, 8), np.float32)] * 2, spec=spec, turn=2, generator_version="world_model:v3")
    assert len(episodes) == len(frames) == len(rejects) == 1
    row, table = episodes[0], frames[0]
    assert row["source_uri"] == "worldmodel://world_model:v3?parent=ep-a&step=10&offset=+0.50&turn=2"
    assert row["episode_id"] == "syn-" + row["content_hash"][:24] and row["origin"] == "synthetic"
    assert (row["parent_episode_id"], row["generator_version"], row["split"]) == ("ep-a", "world_model:v3", "train")
    assert row["label_source"] == "mixed" and row["length"] == 4
    assert table.column("timestamp_ns").to_pylist() == [(11 + i) * spec.step_ns for i in range(4)]
    assert table.column("label_source").to_pylist() == [LABEL_RECOVERY] + [LABEL_GENERATOR] * 3
    assert (rejects[0]["stage"], rejects[0]["reason"], rejects[0]["detail"]) == \
        ("synthesize", "implausible", "implausible: colour drift")
    # the expert's labels where the world replayed the parent: as many steps as the replay gave
    expert = relabel(variants[0], np.full((3, 3), 0.5, np.float32))
    assert expert.label_sources.tolist() == [LABEL_EXPERT] * 3 + [LABEL_GENERATOR]
    assert expert.labels[:3].tolist() == [[0.5] * 3] * 3 and expert.labels[3].tolist() == [1.0] * 3
    assert relabel(variants[0], None) is variants[0] and variants[0].labels[0].tolist() == [1.0] * 3
    assert "parent=ep-b&step=20&offset=-0.50" in rejects[0]["source_uri"]
