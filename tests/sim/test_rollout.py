"""The rollout loop: episode contract, the safety driver's takeovers (edge and stall), shadow mode."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from sim import worlds
from sim.rollout import PolicyDriver, RandomDriver, run_episode
from sim.worlds.base import WorldConfig
from sim.worlds.carracing_expert import INTRO_STEPS, SafetyConfig

STEP_NS = 20_000_000  # 50 Hz
WORLD = worlds.get(WorldConfig(name="carracing", image_size=64, max_steps=150))


class ConstantDriver:
    """A bad driver: the same action every step."""

    policy_version = ""

    def __init__(self, action, name: str) -> None:
        self.action, self.name = np.asarray(action, dtype=np.float32), name

    def reset(self, env, seed=None) -> None:
        pass

    def act(self, env, obs) -> np.ndarray:
        return self.action


HARD_LEFT = ConstantDriver([-1.0, 0.5, 0.0], "hard_left")
BRAKER = ConstantDriver([0.0, 0.0, 1.0], "braker")


def test_episode_contract_and_determinism():
    driver = WORLD.expert(noisy=True)
    ep, summary = run_episode(world=WORLD, seed=11, driver=driver)
    T = summary["steps"]
    assert T == WORLD.max_steps == 150
    assert ep["world"] == "carracing" and ep["seed"] == 11 and ep["driver"] == "noisy_expert"
    assert ep["task"] == "drive" and ep["instruction"] == WORLD.spec.instruction("drive")
    assert ep["policy_version"] == ""
    shapes = {"frames": ((T, 64, 64, 3), np.uint8), "actions": ((T, 3), np.float32),
              "expert_actions": ((T, 3), np.float32), "states": ((T, 8), np.float32),
              "rewards": ((T,), np.float32), "interventions": ((T,), np.bool_),
              "timestamps_ns": ((T,), np.int64)}
    for key, (shape, dtype) in shapes.items():
        assert ep[key].shape == shape and ep[key].dtype == dtype, key
    assert set(ep["signals"]) == {"off_track"}
    assert ep["signals"]["off_track"].shape == (T,) and ep["signals"]["off_track"].dtype == np.bool_
    np.testing.assert_array_equal(ep["signals"]["off_track"], ep["states"][:, 7] == 0.0)
    assert np.all(np.diff(ep["timestamps_ns"]) == STEP_NS) and WORLD.spec.step_ns == STEP_NS
    assert not np.isnan(ep["expert_actions"]).any()
    assert summary["score"] == pytest.approx(float(ep["rewards"].sum()), abs=1e-3)
    assert summary["score"] == summary["episode_return"]  # the car's score is the episode return
    assert summary["task"] == "drive" and summary["success"] is False  # no lap in 150 steps
    assert summary["off_track_rate"] == pytest.approx(ep["signals"]["off_track"].mean())
    assert set(summary) >= {"seed", "task", "score", "success", "episode_return", "steps", "off_track_rate",
                            "interventions", "intervention_steps"}
    again, _ = run_episode(world=WORLD, seed=11, driver=WORLD.expert(noisy=True))
    for key in ("frames", "actions", "expert_actions", "interventions"):
        np.testing.assert_array_equal(ep[key], again[key])


def test_clean_expert_needs_no_help_and_its_label_is_its_action():
    ep, summary = run_episode(world=WORLD, seed=1000, driver=WORLD.expert(), safety="active")
    np.testing.assert_array_equal(ep["actions"], ep["expert_actions"])
    assert summary["interventions"] == 0 and not ep["interventions"].any()
    assert not ep["signals"]["off_track"].any()


def test_safety_driver_takes_over_from_a_driver_steering_off_the_road():
    active, s_active = run_episode(world=WORLD, seed=2, driver=HARD_LEFT, safety="active")
    flags = active["interventions"]
    assert s_active["interventions"] >= 1 and flags.any()
    assert s_active["intervention_steps"] == int(flags.sum())
    np.testing.assert_array_equal(active["actions"][flags], active["expert_actions"][flags])
    np.testing.assert_array_equal(active["actions"][~flags], np.tile(HARD_LEFT.action, ((~flags).sum(), 1)))
    first = int(np.argmax(flags))
    assert not active["signals"]["off_track"][: first + 1].any()  # it took over before the car left the road

    shadow, s_shadow = run_episode(world=WORLD, seed=2, driver=HARD_LEFT, safety="shadow")
    assert s_shadow["interventions"] >= 1 and s_shadow["intervention_steps"] > 0  # needed, counted
    assert not shadow["interventions"].any()  # ... but nobody took over
    np.testing.assert_array_equal(shadow["actions"], np.tile(HARD_LEFT.action, (len(shadow["actions"]), 1)))
    assert shadow["signals"]["off_track"].mean() > active["signals"]["off_track"].mean()
    assert s_shadow["off_track_rate"] > s_active["off_track_rate"]

    _, s_off = run_episode(world=WORLD, seed=2, driver=HARD_LEFT, safety="off", record=False)
    assert s_off["interventions"] == 0 and s_off["intervention_steps"] == 0


def test_safety_driver_takes_over_on_a_stall(monkeypatch):
    monitors = []
    build = WORLD.safety_monitor

    def capture(env):
        monitors.append(build(env))
        return monitors[-1]

    monkeypatch.setattr(WORLD, "safety_monitor", capture)
    cfg = SafetyConfig()
    ep, summary = run_episode(world=WORLD, seed=4, driver=BRAKER, safety="active")
    assert len(monitors) == 1 and monitors[0].stalled and summary["interventions"] >= 1
    flags = ep["interventions"]
    first = int(np.argmax(flags))
    assert first == INTRO_STEPS + cfg.stall_steps - 1  # stopped since the start: the stall is exactly this late
    assert ep["actions"][first, 1] > 0.5  # the expert steps on the gas
    assert ep["states"][first:, 5].max() > 10  # and gets the car moving again


def test_bad_inputs_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="safety"):
        run_episode(world=WORLD, seed=0, driver=RandomDriver(WORLD.spec), safety="sometimes")
    with pytest.raises(ValueError, match="invalid action"):
        run_episode(world=WORLD, seed=0, driver=ConstantDriver([np.nan, 0, 0], "nan"))
    with pytest.raises(ValueError, match="invalid action"):
        run_episode(world=WORLD, seed=0, driver=ConstantDriver([0.0, 0.5], "short"))
    with pytest.raises(ValueError, match="no task"):
        run_episode(world=WORLD, seed=0, task="fly", driver=RandomDriver(WORLD.spec))
    small = worlds.get(WorldConfig(name="carracing", image_size=32, max_steps=5))
    monkeypatch.setattr(WORLD, "make_env", small.make_env)  # an env rendering another size
    with pytest.raises(ValueError, match="renders"):
        run_episode(world=WORLD, seed=0, driver=RandomDriver(WORLD.spec))


def test_policy_driver_stacks_history_and_drivers_pickle():
    seen, states, tasks = [], [], []

    def act_fn(frames_BKHWC: np.ndarray, state_BS: np.ndarray, task_B: list) -> np.ndarray:
        seen.append(frames_BKHWC.copy())
        states.append(state_BS.copy())
        tasks.append(list(task_B))
        return np.array([[0.0, 0.5, 0.0]], dtype=np.float32)

    world = worlds.get(WorldConfig(name="carracing", image_size=64, max_steps=5))
    driver = PolicyDriver(act_fn, history=3, name="stub", policy_version="v7")
    ep, summary = run_episode(world=world, seed=0, driver=driver, safety="off")
    assert ep["policy_version"] == "v7" and ep["driver"] == "stub" and len(seen) == 5
    assert seen[0].shape == (1, 3, 64, 64, 3) and seen[0].dtype == np.uint8
    assert states[0].shape == (1, len(world.spec.policy_state)) == (1, 0)  # the car's policy reads pixels only
    assert states[0].dtype == np.float32
    assert tasks[0] == [world.spec.instruction("drive")]
    np.testing.assert_array_equal(seen[0][0, 0], ep["frames"][0])  # padded by repeating the first frame
    np.testing.assert_array_equal(seen[4][0], ep["frames"][2:5])  # oldest first, current last
    with pytest.raises(ValueError, match=r"\[1, A\]"):
        run_episode(world=world, seed=0, driver=PolicyDriver(lambda f, s, t: np.zeros(3), history=2))
    with pytest.raises(ValueError, match="history"):
        PolicyDriver(act_fn, history=0)
    for d in (WORLD.expert(noisy=True), WORLD.expert(), RandomDriver(WORLD.spec)):
        assert type(pickle.loads(pickle.dumps(d))) is type(d)


def test_random_driver_is_seeded_and_within_bounds():
    world = worlds.get(WorldConfig(name="carracing", image_size=64, max_steps=20))
    a, _ = run_episode(world=world, seed=3, driver=RandomDriver(world.spec), safety="off")
    b, _ = run_episode(world=world, seed=3, driver=RandomDriver(world.spec), safety="off")
    c, _ = run_episode(world=world, seed=4, driver=RandomDriver(world.spec), safety="off")
    np.testing.assert_array_equal(a["actions"], b["actions"])
    assert not np.array_equal(a["actions"], c["actions"])
    assert (a["actions"] >= world.spec.action_low).all() and (a["actions"] <= world.spec.action_high).all()
    assert a["driver"] == "random"


@pytest.mark.parametrize("name", ["carracing", "metaworld-mt10"])
def test_replaying_the_logged_actions_gives_back_the_logged_expert_labels(name):
    """Both worlds reproduce a logged state from the seed and the actions so far, so the expert's
    labels along a counterfactual are the labels it would have logged there; driven by the logged
    actions themselves, the replay must give back the logged labels exactly."""
    from sim.rollout import replay_labels

    world = worlds.get(WorldConfig(name=name, image_size=32, max_steps=60))
    task = world.spec.task_names[-1]
    ep, _ = run_episode(world=world, seed=7, task=task, driver=world.expert(noisy=True, seed=1))
    t = 40
    labels = replay_labels(world=world, seed=7, task=task, prefix=ep["actions"][:t], logged_state=ep["states"][t],
                           actions=ep["actions"][t:t + 5])
    np.testing.assert_allclose(labels, ep["expert_actions"][t + 1:t + 6], atol=1e-6)
    pushed = ep["actions"][t:t + 5] + np.float32(0.3)  # a counterfactual: labels from the states it reaches
    other = replay_labels(world=world, seed=7, task=task, prefix=ep["actions"][:t], logged_state=ep["states"][t],
                          actions=np.clip(pushed, world.spec.action_low, world.spec.action_high))
    assert other.shape == (5, len(world.spec.actions)) and not np.allclose(other, labels)
    wrong = ep["states"][t] + 1.0  # not the state this seed and these actions reach: no labels
    assert replay_labels(world=world, seed=7, task=task, prefix=ep["actions"][:t], logged_state=wrong,
                         actions=ep["actions"][t:t + 5]) is None
