"""The privileged expert drives on the road; the noisy fleet expert is seeded and bounded."""
from __future__ import annotations

import numpy as np
import pytest

from sim.carracing import WorldConfig, is_off_track, make_env, vehicle_state
from sim.expert import Expert, NoiseConfig, NoisyExpert


@pytest.fixture(scope="module")
def env():
    e = make_env(WorldConfig(max_steps=400))
    yield e
    e.close()


def test_expert_stays_on_track_and_makes_progress(env):
    env.reset(seed=1000)
    expert = Expert()
    expert.reset(env)
    score, speeds = 0.0, []
    for _ in range(300):
        action = expert.act(env)
        assert action.shape == (3,) and action.dtype == np.float32
        assert -1 <= action[0] <= 1 and 0 <= action[1] <= 1 and 0 <= action[2] <= 1
        _, reward, terminated, truncated, _ = env.step(action)
        score += reward
        assert not is_off_track(env)
        speeds.append(vehicle_state(env)[5])
        assert not (terminated or truncated)
    assert max(speeds) > 50  # it actually drives, not crawls
    assert score > 250  # ~1000/N per tile visited minus 0.1 per step


def test_expert_needs_reset():
    with pytest.raises(ValueError, match="reset"):
        Expert().act(object())


def test_noisy_expert_is_seeded_and_bounded(env):
    def actions(seed: int) -> np.ndarray:
        env.reset(seed=5)
        driver = NoisyExpert(NoiseConfig(pulse_prob=0.1, brake_prob=0.05, start_step=0))
        driver.reset(env, seed)
        out = []
        for _ in range(60):
            a = driver.act(env)
            env.step(a)
            out.append(a)
        return np.stack(out)

    a, b, c = actions(1), actions(1), actions(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (a[:, 0] >= -1).all() and (a[:, 0] <= 1).all() and (a[:, 1:] >= 0).all() and (a[:, 1:] <= 1).all()
    assert (a[:, 2] == NoiseConfig().brake).any()  # a brake pulse happened


def test_noisy_expert_is_clean_during_intro(env):
    env.reset(seed=5)
    clean, noisy = Expert(), NoisyExpert()
    clean.reset(env)
    noisy.reset(env, seed=0)
    for _ in range(NoiseConfig().start_step):
        a = noisy.act(env)
        np.testing.assert_array_equal(a, clean.act(env))
        env.step(a)


@pytest.mark.slow
def test_expert_scores_on_held_out_seeds():
    from sim.rollout import ExpertDriver, run_episode

    world = WorldConfig()
    scores = [run_episode(world=world, seed=s, driver=ExpertDriver(), safety="off", record=False)[1]["score"]
              for s in range(1000, 1010)]
    assert np.mean(scores) >= 850
