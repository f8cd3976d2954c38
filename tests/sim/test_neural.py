"""The neural simulator: batched stepping, scoring by the world's rule, the Gymnasium contract."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from models.dynamics import Dynamics
from models.dynamics import preset as dynamics_preset
from models.world_model import WorldModel
from models.world_model import preset as wm_preset
from sim import worlds
from sim.neural import NeuralSim, NeuralSimEnv, Start, run_policy

SIZE = 16


def models_for(spec, seed: int = 0) -> tuple[WorldModel, Dynamics]:
    torch.manual_seed(seed)
    vocab = ()
    d = dataclasses.replace(dynamics_preset("tiny"), image_size=SIZE, action_dim=len(spec.actions),
                            state_dim=len(spec.state_names), signals=spec.signals, task_vocab=vocab)
    generator = WorldModel(dataclasses.replace(wm_preset("tiny"), image_size=SIZE, action_dim=len(spec.actions),
                                               condition_dim=d.embed))  # the reasoner instructs the generator
    return generator.eval(), Dynamics(d).eval()


def starts_for(spec, n: int, k: int = 3) -> list[Start]:
    rng = np.random.default_rng(0)
    return [Start(frames=rng.integers(0, 256, (k, SIZE, SIZE, 3), dtype=np.uint8),
                  actions=np.zeros((k, len(spec.actions)), np.float32),
                  states=rng.normal(size=(k, len(spec.state_names))).astype(np.float32),
                  instruction=spec.tasks[0].instruction, episode_id=f"ep{i}", step=10 + i, seed=i,
                  task=spec.tasks[0].name) for i in range(n)]


def test_steps_a_batch_and_scores_by_return():
    spec = worlds.spec("carracing")
    sim = NeuralSim(*models_for(spec), spec)
    starts = starts_for(spec, 3)
    obs = sim.reset(starts)
    assert obs["image"].shape == (3, SIZE, SIZE, 3) and obs["state"].shape == (3, 0)
    np.testing.assert_array_equal(obs["image"], np.stack([s.frames[-1] for s in starts]))
    obs, out = sim.step(np.tile(spec.action_high, (3, 1)))
    assert obs["image"].dtype == np.uint8 and obs["frames"].shape[1] == sim.context
    assert out["state"].shape == (3, len(spec.state_names)) and out["signals"].shape == (3, len(spec.signals))
    with pytest.raises(ValueError, match="actions must be finite"):
        sim.step(np.full((3, len(spec.actions)), np.nan))

    calls = []

    def act(batch):
        calls.append(batch["frames"].shape)
        return np.zeros((len(batch["tasks"]), len(spec.actions)), np.float32)

    rows = run_policy(sim, starts, act, horizon=4)
    assert [r["episode_id"] for r in rows] == ["ep0", "ep1", "ep2"]
    assert all(1 <= r["steps"] <= 4 and r["score"] == r["episode_return"] for r in rows)
    assert {f"{name}_rate" for name in spec.signals} <= set(rows[0])
    assert len(calls) == max(r["steps"] for r in rows)
    again = run_policy(sim, starts, act, horizon=4)
    assert [r["score"] for r in again] == [r["score"] for r in rows]  # seeded sampling noise


def test_success_worlds_score_the_success_signal():
    spec = worlds.spec("metaworld-mt10")
    generator, dynamics = models_for(spec)
    with torch.no_grad():  # the success signal always fires: every episode succeeds on its first step
        head = dynamics.head[-1]
        head.bias[len(spec.state_names) + 1 + spec.signals.index(spec.success_signal)] = 50.0
    rows = run_policy(NeuralSim(generator, dynamics, spec), starts_for(spec, 2), lambda b: np.zeros((2, 4)), horizon=5)
    assert [(r["score"] > 0.99, r["success"], r["steps"]) for r in rows] == [(True, True, 1)] * 2


def test_rejects_models_of_another_world():
    car, arm = worlds.spec("carracing"), worlds.spec("metaworld-mt10")
    with pytest.raises(ValueError, match="actions"):
        NeuralSim(*models_for(car), arm)


@pytest.mark.filterwarnings("ignore:.*infinity:UserWarning")  # a state is unbounded
def test_gymnasium_env_contract():
    spec = worlds.spec("metaworld-mt10")
    env = NeuralSimEnv(*models_for(spec), spec, starts_for(spec, 2), max_steps=3)
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=1, options={"start": 1})
    assert info["episode_id"] == "ep1" and obs["state"].shape == (len(spec.policy_state),)
    for t in range(3):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert isinstance(reward, float) and set(info["signals"]) == set(spec.signals)
        if terminated:
            break
    assert truncated or terminated
    assert env.render().shape == (SIZE, SIZE, 3)


def test_open_loop_rollout_pairs_the_generator_with_its_reasoner():
    spec = worlds.spec("carracing")
    generator, dynamics = models_for(spec)
    sim = NeuralSim(generator, dynamics, spec)
    starts = starts_for(spec, 2, k=sim.context)
    actions = np.tile(spec.action_high, (2, 5, 1))
    out = sim.rollout(starts, actions)
    assert out["frames"].shape == (2, 5, SIZE, SIZE, 3) and out["frames"].dtype == np.uint8
    assert out["states"].shape == (2, 5, len(spec.state_names)) and np.isfinite(out["states"]).all()
    assert out["signals"].shape == (2, 5, len(spec.signals)) and out["done"].shape == (2, 5)
    again = NeuralSim(generator, dynamics, spec).rollout(starts, actions)
    np.testing.assert_array_equal(out["frames"], again["frames"])  # seeded
    with pytest.raises(ValueError, match=r"actions must be \[2, T >= 1, A\]"):
        sim.rollout(starts, actions[0])
    other = Dynamics(dataclasses.replace(dynamics.config, embed=64, heads=2))
    with pytest.raises(ValueError, match="pair it with the dynamics model it was trained with"):
        NeuralSim(generator, other, spec)
