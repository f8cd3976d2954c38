"""The world model: shapes and contracts, training signal, action and task conditioning, checkpoints,
metrics."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.text import build_vocab
from models.world_model import (
    WorldModel,
    WorldModelConfig,
    config_from_dict,
    copy_last_baseline,
    frame_metrics,
    load,
    preset,
    rollout_metrics,
    save,
)

CFG = preset("tiny")
S = CFG.image_size
TASKS = ("Make it brighter.", "Make it darker!")
# a world with 4 actions whose next frame depends on the task instruction, not on the action
TASK_CFG = dataclasses.replace(CFG, action_dim=4, task_vocab=build_vocab(TASKS), task_hidden=16, lr=1e-2)


def random_history(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, CFG.history, S, S, 3), dtype=np.uint8)


def gas_task(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A transition set by the action: uniform grey frames, the next one 20 levels brighter than the
    last with gas 1, 20 levels darker with gas 0."""
    levels = np.random.default_rng(seed).integers(64, 192, (batch, CFG.history, 1, 1, 1), dtype=np.uint8)
    history = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(levels, (batch, CFG.history, S, S, 3))))
    gas = (torch.arange(batch) % 2).float()
    action = torch.stack([torch.zeros(batch), gas, torch.zeros(batch)], dim=1)
    target = (history[:, -1].int() + 20 * (2 * gas[:, None, None, None].int() - 1)).to(torch.uint8)
    return history, action, target


def seeded_loss(model: WorldModel, batch) -> float:
    torch.manual_seed(123)  # the same noise levels and noise before and after training
    with torch.no_grad():
        return model.loss(*batch).item()


@pytest.fixture(scope="module")
def trained():
    """A tiny model overfitted on one batch of the gas task; (model, batch, loss before, loss after)."""
    return overfit(dataclasses.replace(CFG, lr=1e-2), gas_task)


def overfit(config, make_batch):
    """(model, batch, loss before, loss after) for 40 optimizer steps on one batch of 8."""
    torch.manual_seed(0)
    model = WorldModel(config)
    batch = make_batch(8, seed=1)
    before = seeded_loss(model, batch)
    opt = model.make_optimizer()
    for _ in range(80):
        loss = model.loss(*batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), batch, before, seeded_loss(model, batch)


def test_presets_derive_and_validate():
    assert preset("default") == WorldModelConfig()
    assert preset("tiny").image_size == preset("gpu").image_size == 64
    assert config_from_dict(dataclasses.asdict(preset("gpu"))) == preset("gpu")
    with pytest.raises(ValueError, match="unknown world-model preset"):
        preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(CFG, image_size=31)
    with pytest.raises(ValueError, match="unknown WorldModelConfig fields"):
        config_from_dict({"image_size": 64, "bogus": 1})


def test_predict_and_rollout_shapes_numpy_and_torch():
    model = WorldModel(CFG)
    history = random_history(2)
    out = model.predict(history, np.zeros((2, 3), np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (2, S, S, 3)
    frames = model.rollout(history, np.zeros((2, 5, 3)), steps=2)
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.shape == (2, 5, S, S, 3)
    frames_t = model.rollout(torch.from_numpy(history), torch.zeros(2, 3, 3))
    assert isinstance(frames_t, torch.Tensor) and frames_t.dtype == torch.uint8
    assert frames_t.shape == (2, 3, S, S, 3)


def test_bad_input_is_a_clear_error():
    model = WorldModel(CFG)
    history = random_history(2)
    with pytest.raises(ValueError, match="uint8"):
        model.predict(history.astype(np.float32), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="history must"):
        model.predict(history[:, :2], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="actions must"):
        model.predict(history, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        model.predict(history, np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="target must"):
        model.loss(torch.from_numpy(history), torch.zeros(2, 3), torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="steps"):
        model.predict(history, np.zeros((2, 3)), steps=0)


def backward_after_one_step(model: WorldModel, *batch) -> None:
    """Gradients of the loss after one optimiser step: the output conv starts at zero, so at
    initialisation nothing before it gets a gradient."""
    opt = model.make_optimizer()
    model.loss(*batch).backward()
    opt.step()
    opt.zero_grad()
    model.loss(*batch).backward()


def test_gradients_reach_the_action_mlp():
    model = WorldModel(CFG)
    backward_after_one_step(model, *gas_task(4, seed=0))
    for name, p in model.cond_mlp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_decreases_when_overfitting(trained):
    _, _, before, after = trained
    assert after < 0.5 * before, (before, after)


def test_actions_condition_the_prediction(trained):
    model, (history, _, _), _, _ = trained
    brightness = {}
    for gas in (0.0, 1.0):
        action = torch.tensor([[0.0, gas, 0.0]]).expand(len(history), 3)
        pred = model.predict(history, action, steps=1, generator=torch.Generator().manual_seed(0))
        brightness[gas] = pred.float().mean().item()
    assert brightness[1.0] - brightness[0.0] > 10, brightness  # untrained: ~0


def test_save_load_round_trip(trained, tmp_path):
    model, (history, action, _), _, _ = trained
    save(model, tmp_path / "wm")
    assert {p.name for p in (tmp_path / "wm").iterdir()} == {"model.safetensors", "config.json"}
    restored = load(tmp_path / "wm")
    assert restored.config == model.config
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(model.predict(history, action, steps=2, generator=g()),
                       restored.predict(history, action, steps=2, generator=g()))
    with pytest.raises(ValueError, match="not a world-model checkpoint"):
        load(tmp_path)


def brightness_task(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Uniform grey frames; the next one 20 levels brighter or darker, as the task says; random actions."""
    levels = np.random.default_rng(seed).integers(64, 192, (batch, CFG.history, 1, 1, 1), dtype=np.uint8)
    history = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(levels, (batch, CFG.history, S, S, 3))))
    darker = torch.arange(batch) % 2
    target = (history[:, -1].int() + 20 * (1 - 2 * darker[:, None, None, None].int())).to(torch.uint8)
    action = torch.rand(batch, 4, generator=torch.Generator().manual_seed(seed))
    return history, action, target, [TASKS[i] for i in darker.tolist()]


@pytest.fixture(scope="module")
def task_trained():
    """A tiny task-conditioned model overfitted on one batch of the brightness task."""
    return overfit(TASK_CFG, brightness_task)


def test_tasks_are_required_and_reach_the_conditioning():
    model = WorldModel(TASK_CFG)
    history, action, target, tasks = brightness_task(4, seed=0)
    with pytest.raises(ValueError, match="task instruction"):
        model.loss(history, action, target)
    with pytest.raises(ValueError, match="list of 4"):
        model.predict(history, action, tasks=tasks[:2])
    with pytest.raises(ValueError, match="actions must"):
        model.predict(history, action[:, :3], tasks=tasks)
    backward_after_one_step(model, history, action, target, tasks)
    for name, p in [*model.cond_mlp.named_parameters(), *model.task_encoder.named_parameters()]:
        if "token_type" not in name:  # one segment: its embedding is a constant offset
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    frames = model.rollout(history[:2], torch.zeros(2, 3, 4), tasks=tasks[:2])
    assert frames.shape == (2, 3, S, S, 3)
    # a model without task input ignores tasks
    plain = WorldModel(CFG)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(plain.predict(history, action[:, :3], generator=g()),
                       plain.predict(history, action[:, :3], generator=g(), tasks=tasks))


def test_tasks_condition_the_prediction(task_trained, tmp_path):
    model, (history, action, _, _), before, after = task_trained
    assert after < 0.5 * before, (before, after)
    brightness = {}
    for task in TASKS:
        pred = model.predict(history, action, steps=1, generator=torch.Generator().manual_seed(0),
                             tasks=[task] * len(history))
        brightness[task] = pred.float().mean().item()
    assert brightness[TASKS[0]] - brightness[TASKS[1]] > 10, brightness  # untrained: ~0
    save(model, tmp_path / "wm")
    restored = load(tmp_path / "wm")
    assert restored.config == TASK_CFG
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    tasks = [TASKS[0], TASKS[1]] * 4
    assert torch.equal(model.rollout(history, action[:, None].repeat(1, 2, 1), generator=g(), tasks=tasks),
                       restored.rollout(history, action[:, None].repeat(1, 2, 1), generator=g(), tasks=tasks))


def test_frame_metrics_and_copy_last_baseline():
    history = random_history(2)
    future = np.repeat(history[:, -1:], 3, axis=1)
    baseline = copy_last_baseline(history, 3)
    assert baseline.shape == (2, 3, S, S, 3) and np.array_equal(baseline, future)
    perfect = frame_metrics(baseline, future)
    assert perfect["horizon"] == [1, 2, 3] and min(perfect["psnr"]) > 100
    assert np.allclose(perfect["ssim"], 1.0)
    off = frame_metrics(np.clip(future.astype(int) + 10, 0, 255).astype(np.uint8), np.minimum(future, 245))
    assert np.allclose(off["psnr"], 10 * np.log10(255 ** 2 / 100))
    with pytest.raises(ValueError, match="pred and true"):
        frame_metrics(baseline, future[:, :2])
    with pytest.raises(ValueError, match="uint8"):
        frame_metrics(baseline.astype(np.float32), future)
    report = rollout_metrics(WorldModel(CFG), history, np.zeros((2, 3, 3)), future, steps=1)
    assert report["copy_last"] == perfect and len(report["model"]["psnr"]) == 3


def condition_task(batch: int, seed: int):
    """A transition set by the reasoner's vector alone: its first entry brightens or darkens the frame."""
    history, _, _ = gas_task(batch, seed)
    sign = (torch.arange(batch) % 2).float() * 2 - 1
    condition = torch.zeros(batch, 8)
    condition[:, 0] = sign
    target = (history[:, -1].int() + 20 * sign[:, None, None, None].int()).to(torch.uint8)
    return history, torch.zeros(batch, 3), target, None, condition


def test_the_reasoners_vector_conditions_the_generator():
    config = dataclasses.replace(CFG, condition_dim=8, lr=1e-2)
    model, (history, action, _, _, condition), before, after = overfit(config, condition_task)
    assert after < 0.5 * before
    brighter = model.predict(history, action, steps=1, condition_BD=condition.abs()).float().mean()
    darker = model.predict(history, action, steps=1, condition_BD=-condition.abs()).float().mean()
    assert brighter - darker > 10, (brighter, darker)
    with pytest.raises(ValueError, match="conditioning vector"):
        model.predict(history, action)
    with pytest.raises(ValueError, match=r"condition must be finite \[8, 8\]"):
        model.predict(history, action, condition_BD=torch.zeros(8, 3))
    with pytest.raises(ValueError, match="NeuralSim"):
        model.rollout(history, action[:, None])
