"""The rollout loop: episode contract, the safety driver's takeovers (edge and stall), shadow mode."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from sim.carracing import INTRO_STEPS, STEP_NS, WorldConfig, make_env
from sim.expert import NoisyExpert
from sim.rollout import ExpertDriver, PolicyDriver, RandomDriver, SafetyConfig, run_episode

WORLD = WorldConfig(max_steps=150)


class ConstantDriver:
    """A bad driver: the same action every step."""

    policy_version = ""

    def __init__(self, action, name: str) -> None:
        self.action, self.name = np.asarray(action, dtype=np.float32), name

    def reset(self, env, seed=None) -> None:
        pass

    def act(self, env, frame) -> np.ndarray:
        return self.action


HARD_LEFT = ConstantDriver([-1.0, 0.5, 0.0], "hard_left")
BRAKER = ConstantDriver([0.0, 0.0, 1.0], "braker")


@pytest.fixture(scope="module")
def env():
    e = make_env(WORLD)
    yield e
    e.close()


def test_episode_contract_and_determinism(env):
    driver = ExpertDriver(NoisyExpert())
    ep, summary = run_episode(world=WORLD, seed=11, driver=driver, env=env)
    T = summary["steps"]
    assert T == WORLD.max_steps
    assert ep["world"] == "CarRacing-v3" and ep["seed"] == 11 and ep["driver"] == "noisy_expert"
    assert ep["policy_version"] == ""
    shapes = {"frames": ((T, 64, 64, 3), np.uint8), "actions": ((T, 3), np.float32),
              "expert_actions": ((T, 3), np.float32), "states": ((T, 8), np.float32),
              "rewards": ((T,), np.float32), "interventions": ((T,), np.bool_), "off_track": ((T,), np.bool_),
              "timestamps_ns": ((T,), np.int64)}
    for key, (shape, dtype) in shapes.items():
        assert ep[key].shape == shape and ep[key].dtype == dtype, key
    assert np.all(np.diff(ep["timestamps_ns"]) == STEP_NS)
    assert not np.isnan(ep["expert_actions"]).any()
    assert summary["score"] == pytest.approx(float(ep["rewards"].sum()), abs=1e-3)
    assert set(summary) >= {"seed", "score", "steps", "off_track_rate", "interventions", "intervention_steps",
                            "stalled"}
    again, _ = run_episode(world=WORLD, seed=11, driver=ExpertDriver(NoisyExpert()), env=env)
    for key in ("frames", "actions", "expert_actions", "interventions"):
        np.testing.assert_array_equal(ep[key], again[key])


def test_clean_expert_needs_no_help_and_its_label_is_its_action(env):
    ep, summary = run_episode(world=WORLD, seed=1000, driver=ExpertDriver(), safety="active", env=env)
    np.testing.assert_array_equal(ep["actions"], ep["expert_actions"])
    assert summary["interventions"] == 0 and not ep["interventions"].any() and not ep["off_track"].any()


def test_safety_driver_takes_over_from_a_driver_steering_off_the_road(env):
    active, s_active = run_episode(world=WORLD, seed=2, driver=HARD_LEFT, safety="active", env=env)
    flags = active["interventions"]
    assert s_active["interventions"] >= 1 and flags.any()
    assert s_active["intervention_steps"] == int(flags.sum())
    np.testing.assert_array_equal(active["actions"][flags], active["expert_actions"][flags])
    np.testing.assert_array_equal(active["actions"][~flags], np.tile(HARD_LEFT.action, ((~flags).sum(), 1)))
    first = int(np.argmax(flags))
    assert not active["off_track"][: first + 1].any()  # it took over before the car left the road

    shadow, s_shadow = run_episode(world=WORLD, seed=2, driver=HARD_LEFT, safety="shadow", env=env)
    assert s_shadow["interventions"] >= 1 and s_shadow["intervention_steps"] > 0  # needed, counted
    assert not shadow["interventions"].any()  # ... but nobody took over
    np.testing.assert_array_equal(shadow["actions"], np.tile(HARD_LEFT.action, (len(shadow["actions"]), 1)))
    assert shadow["off_track"].mean() > active["off_track"].mean()

    _, s_off = run_episode(world=WORLD, seed=2, driver=HARD_LEFT, safety="off", record=False, env=env)
    assert s_off["interventions"] == 0 and s_off["intervention_steps"] == 0


def test_safety_driver_takes_over_on_a_stall(env):
    cfg = SafetyConfig()
    ep, summary = run_episode(world=WORLD, seed=4, driver=BRAKER, safety="active", env=env)
    assert summary["stalled"] and summary["interventions"] >= 1
    flags = ep["interventions"]
    first = int(np.argmax(flags))
    assert first == INTRO_STEPS + cfg.stall_steps - 1  # stopped since the start: the stall is exactly this late
    assert ep["actions"][first, 1] > 0.5  # the expert steps on the gas
    assert ep["states"][first:, 5].max() > 10  # and gets the car moving again


def test_bad_inputs_are_errors(env):
    with pytest.raises(ValueError, match="safety"):
        run_episode(world=WORLD, seed=0, driver=RandomDriver(), safety="sometimes", env=env)
    with pytest.raises(ValueError, match="invalid action"):
        run_episode(world=WORLD, seed=0, driver=ConstantDriver([np.nan, 0, 0], "nan"), env=env)
    with pytest.raises(ValueError, match="image_size"):
        run_episode(world=WorldConfig(image_size=32), seed=0, driver=RandomDriver(), env=env)


def test_policy_driver_stacks_history_and_drivers_pickle(env):
    seen = []

    def act_fn(frames_BKHWC: np.ndarray) -> np.ndarray:
        seen.append(frames_BKHWC.copy())
        return np.array([[0.0, 0.5, 0.0]], dtype=np.float32)

    world = WorldConfig(max_steps=5)
    driver = PolicyDriver(act_fn, history=3, name="stub", policy_version="v7")
    ep, summary = run_episode(world=world, seed=0, driver=driver, safety="off", env=env)
    assert ep["policy_version"] == "v7" and len(seen) == 5
    assert seen[0].shape == (1, 3, 64, 64, 3) and seen[0].dtype == np.uint8
    np.testing.assert_array_equal(seen[0][0, 0], ep["frames"][0])  # padded by repeating the first frame
    np.testing.assert_array_equal(seen[4][0], ep["frames"][2:5])  # oldest first, current last
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        run_episode(world=world, seed=0, driver=PolicyDriver(lambda f: np.zeros(3), history=2), env=env)
    for d in (ExpertDriver(NoisyExpert()), RandomDriver()):
        assert type(pickle.loads(pickle.dumps(d))) is type(d)
