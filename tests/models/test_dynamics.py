"""The dynamics model (the world model's next-sensor-output transformer and inverse dynamics): shapes
and contracts, learning a toy world's state, reward, signals and end, inferring actions, checkpoints."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.dynamics import Dynamics, Targets, config_from_dict, load, preset, save
from models.text import build_vocab

TASKS = ("Move right.", "Move left!")
CFG = dataclasses.replace(preset("tiny"), image_size=16, history=4, action_dim=2, state_dim=2,
                          signals=("edge",), lr=3e-3, task_vocab=build_vocab(TASKS), task_hidden=8)


def toy_windows(batch: int, seed: int) -> tuple[np.ndarray, ...]:
    """A bright column at x = state[0] on a 16-px frame; the action's first value moves it by -1, 0 or
    +1 column, the reward is that move, the "edge" signal is raised at x in {0, 15}, and an
    episode ends when the column reaches x = 15. state[1] is a constant (the scene's)."""
    rng = np.random.default_rng(seed)
    K = CFG.history + 1
    x = np.zeros((batch, K), int)
    x[:, 0] = rng.integers(0, 16, batch)
    move = rng.integers(-1, 2, (batch, K))
    for k in range(1, K):
        x[:, k] = np.clip(x[:, k - 1] + move[:, k - 1], 0, 15)
    frames = np.zeros((batch, K, 16, 16, 3), np.uint8)
    for b in range(batch):
        frames[b, np.arange(K), :, x[b]] = 255
    actions = np.stack([move, rng.uniform(-1, 1, (batch, K))], -1).astype(np.float32)
    states = np.stack([x, np.broadcast_to(rng.uniform(0, 5, (batch, 1)), (batch, K))], -1).astype(np.float32)
    reward = (x[:, 1:] - x[:, :-1]).astype(np.float32)
    edge = ((x == 0) | (x == 15)).astype(np.float32)[..., None]
    done = (x[:, :-1] == 15).astype(np.float32)
    targets = Targets(next_state_BKS=torch.from_numpy(states[:, 1:]), reward_BK=torch.from_numpy(reward),
                      next_signals_BKG=torch.from_numpy(edge[:, 1:]), done_BK=torch.from_numpy(done),
                      has_next_BK=torch.ones(batch, K - 1, dtype=torch.bool))
    tasks = [TASKS[i % 2] for i in range(batch)]
    return frames, actions, states, targets, tasks


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of heads"):
        dataclasses.replace(CFG, embed=30, heads=4)
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(CFG, image_size=18)
    with pytest.raises(ValueError, match="repeat"):
        dataclasses.replace(CFG, signals=("a", "a"))
    with pytest.raises(ValueError, match="state_noise"):
        dataclasses.replace(CFG, state_noise=-0.1)
    assert config_from_dict(dataclasses.asdict(CFG)) == CFG


def test_inputs_are_checked():
    model = Dynamics(CFG)
    frames, actions, states, _, tasks = toy_windows(2, 0)
    with pytest.raises(ValueError, match="frames must be uint8"):
        model.predict(frames[:, :4].astype(np.float32), actions[:, :4], states[:, :4], tasks)
    with pytest.raises(ValueError, match="actions must be"):
        model.predict(frames[:, :4], actions[:, :4, :1], states[:, :4], tasks)
    with pytest.raises(ValueError, match="states must be"):
        model.predict(frames[:, :4], actions[:, :4], None, tasks)
    with pytest.raises(ValueError, match="1 to 4 steps"):
        model.predict(frames, actions, states, tasks)
    with pytest.raises(ValueError, match="reads a task"):
        model.predict(frames[:, :4], actions[:, :4], states[:, :4], None)


def fit(model: Dynamics, steps: int) -> dict[str, torch.Tensor]:
    """``steps`` optimiser steps on fresh toy windows; the last step's losses."""
    opt, K = model.make_optimizer(), model.config.history
    model.train()
    for step in range(steps):
        frames, actions, states, targets, tasks = toy_windows(32, step)
        targets = Targets(**{f.name: getattr(targets, f.name)[:, :K] for f in dataclasses.fields(Targets)})
        losses = model.loss(frames[:, :K], actions[:, :K], states[:, :K], targets, tasks)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    return losses


def test_learns_state_reward_signals_end_and_inverse_dynamics():
    torch.manual_seed(0)
    model = Dynamics(CFG)
    val = toy_windows(64, 99)
    K = CFG.history

    def errors() -> dict:
        model.eval()
        frames, actions, states, targets, tasks = val
        pred = model.predict(frames[:, :K], actions[:, :K], states[:, :K], tasks)
        idm = model.infer_actions(frames)
        model.train()
        return {"state": float((pred.next_state[:, 0] - targets.next_state_BKS[:, -1, 0]).abs().mean()),
                "reward": float((pred.reward - targets.reward_BK[:, -1]).abs().mean()),
                "edge": float(((pred.signals[:, 0] > 0.5).float() != targets.next_signals_BKG[:, -1, 0]).float().mean()),
                "idm": float(np.abs(idm[..., 0] - actions[:, :-1, 0]).mean())}

    before = errors()
    losses = fit(model, 300)
    after = errors()
    assert set(losses) == {"reward", "done", "signals", "state", "idm", "loss"}
    assert after["state"] < 0.35 < before["state"], (before, after)
    assert after["reward"] < 0.35 < before["reward"], (before, after)
    assert after["edge"] < 0.1, (before, after)
    assert after["idm"] < 0.3 < before["idm"], (before, after)


def test_state_noise_teaches_it_to_correct_a_state_that_is_off():
    """Fed its own slightly wrong state (as in a neural-simulator rollout), the model trained with
    noisy input states reads the frame and pulls the state back; without the noise it trusts the
    state. Evaluation itself is noise-free."""
    K, errors = CFG.history, {}
    frames, actions, states, targets, tasks = toy_windows(64, 99)
    off = states[:, :K].copy()
    off[:, -1, 0] += 2.0  # the column is 2 px from where the state says
    for noise in (0.0, 0.5):
        torch.manual_seed(0)
        model = Dynamics(dataclasses.replace(CFG, state_noise=noise))
        fit(model, 300)
        model.eval()
        once = model.predict(frames[:, :K], actions[:, :K], off, tasks).next_state
        torch.testing.assert_close(once, model.predict(frames[:, :K], actions[:, :K], off, tasks).next_state)
        errors[noise] = float((once[:, 0] - targets.next_state_BKS[:, K - 1, 0]).abs().mean())
    assert errors[0.5] < 0.6 * errors[0.0], errors


def test_unknown_states_are_masked_and_unread():
    model = Dynamics(CFG)
    frames, actions, states, targets, tasks = toy_windows(4, 1)
    K = CFG.history
    states = states.copy()
    states[0] = np.nan  # a row whose state was never logged (a synthetic variant)
    targets.next_state_BKS[1] = float("nan")
    cut = Targets(**{f.name: getattr(targets, f.name)[:, :K] for f in dataclasses.fields(Targets)})
    losses = model.loss(frames[:, :K], actions[:, :K], states[:, :K], cut, tasks)
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.isfinite(model.predict(frames[:, :K], actions[:, :K], states[:, :K], tasks).next_state).all()


def test_checkpoint_round_trip(tmp_path):
    model = Dynamics(CFG)
    frames, actions, states, targets, tasks = toy_windows(3, 2)
    model.train()
    model.loss(frames[:, :4], actions[:, :4], states[:, :4],
               Targets(**{f.name: getattr(targets, f.name)[:, :4] for f in dataclasses.fields(Targets)}), tasks)
    model.eval()  # the state statistics moved: they are saved too
    before = model.predict(frames[:, 1:], actions[:, 1:], states[:, 1:], tasks)
    again = load(save(model, tmp_path / "dyn"))
    after = again.predict(frames[:, 1:], actions[:, 1:], states[:, 1:], tasks)
    for name in ("next_state", "reward", "signals", "done", "condition"):
        torch.testing.assert_close(getattr(before, name), getattr(after, name))
    assert again.config == CFG
