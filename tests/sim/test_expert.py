"""The privileged expert drives on the road; the noisy fleet expert is seeded and bounded."""
from __future__ import annotations

import numpy as np
import pytest

from sim import worlds
from sim.worlds.base import WorldConfig
from sim.worlds.carracing_expert import Expert, NoiseConfig, NoisyExpert, is_off_track, vehicle_state


def world(**options):
    return worlds.get(WorldConfig(name="carracing", image_size=64, max_steps=400, options=options))


@pytest.fixture
def env_of():
    """Build (and close afterwards) a reset env of one seed."""
    built = []

    def _env(seed: int, w=None):
        env = (w or world()).make_env(seed, "drive")
        env.reset()
        built.append(env)
        return env

    yield _env
    for env in built:
        env.close()


def test_expert_stays_on_track_and_makes_progress(env_of):
    env = env_of(1000)
    expert = world().expert()
    assert isinstance(expert, Expert) and expert.name == "expert" and expert.policy_version == ""
    expert.reset(env)
    score, speeds = 0.0, []
    for _ in range(300):
        action = expert.act(env, None)
        assert action.shape == (3,) and action.dtype == np.float32
        assert -1 <= action[0] <= 1 and 0 <= action[1] <= 1 and 0 <= action[2] <= 1
        _, reward, done, _ = env.step(action)
        score += reward
        assert not is_off_track(env) and not env.signals()["off_track"]
        speeds.append(vehicle_state(env)[5])
        assert not done
    assert max(speeds) > 50  # it actually drives, not crawls
    assert score > 250  # ~1000/N per tile visited minus 0.1 per step


def test_expert_needs_reset():
    with pytest.raises(ValueError, match="reset"):
        Expert().act(object())


def test_noisy_expert_is_seeded_and_bounded(env_of):
    noisy_world = world(noise={"pulse_prob": 0.1, "brake_prob": 0.05, "start_step": 0})

    def actions(seed: int) -> np.ndarray:
        env = env_of(5, noisy_world)
        driver = noisy_world.expert(noisy=True)
        assert isinstance(driver, NoisyExpert) and driver.name == "noisy_expert"
        assert driver.noise == NoiseConfig(pulse_prob=0.1, brake_prob=0.05, start_step=0)
        driver.reset(env, seed)
        out = []
        for _ in range(60):
            a = driver.act(env, None)
            env.step(a)
            out.append(a)
        return np.stack(out)

    a, b, c = actions(1), actions(1), actions(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (a[:, 0] >= -1).all() and (a[:, 0] <= 1).all() and (a[:, 1:] >= 0).all() and (a[:, 1:] <= 1).all()
    assert (a[:, 2] == NoiseConfig().brake).any()  # a brake pulse happened


def test_noisy_expert_is_clean_during_intro(env_of):
    env = env_of(5)
    clean, noisy = world().expert(), world().expert(noisy=True)
    clean.reset(env)
    noisy.reset(env, seed=0)
    for _ in range(NoiseConfig().start_step):
        a = noisy.act(env, None)
        np.testing.assert_array_equal(a, clean.act(env, None))
        env.step(a)


@pytest.mark.slow
def test_expert_scores_on_held_out_seeds():
    from sim.rollout import run_episode

    w = worlds.get("carracing")
    scores = [run_episode(world=w, seed=s, driver=w.expert(), safety="off", record=False)[1]["score"]
              for s in w.spec.eval_seeds]
    assert list(w.spec.eval_seeds) == list(range(1000, 1010))
    assert np.mean(scores) >= 850
