"""The `gpu` presets on a CUDA device: each model learns there, and its checkpoint loads on the CPU.

Marked `gpu` (skipped by the default run and without CUDA): `pytest -m gpu tests/models/test_gpu.py`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models import dynamics, policy, reasoner, world_model
from models.text import build_vocab

TAGS = {"speed": ("slow", "medium", "fast"), "side": ("left", "right")}  # a vocabulary for the test

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = "cuda"


def fit(model: torch.nn.Module, loss_fn, steps: int, lr: float) -> tuple[float, float]:
    """(first, last) loss of ``steps`` AdamW steps on one fixed batch, the gradient norm clipped to 1 as
    ``stages.train`` does."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses[0], float(np.mean(losses[-5:]))


def test_policy_gpu_preset_fits_on_cuda_and_loads_on_cpu(tmp_path):
    torch.manual_seed(0)
    tasks = ("pick up the cube", "open the drawer")
    cfg = dataclasses.replace(policy.preset("gpu"), action_low=(-1.0, -1.0, 0.0, 0.0),
                              action_high=(1.0, 1.0, 1.0, 0.5), state_dim=5, task_vocab=build_vocab(tasks))
    model = policy.Policy(cfg).to(CUDA)
    g = torch.Generator(device=CUDA).manual_seed(0)
    frames = torch.randint(0, 256, (64, cfg.history, cfg.image_size, cfg.image_size, 3),
                           device=CUDA, dtype=torch.uint8, generator=g)
    state = torch.randn(64, cfg.state_dim, device=CUDA, generator=g)
    rows = [tasks[i % 2] for i in range(64)]
    low, high = (torch.tensor(b, device=CUDA) for b in (cfg.action_low, cfg.action_high))
    target = low + (high - low) * torch.rand(64, 4, device=CUDA, generator=g)
    first, last = fit(model, lambda: model.loss(frames, target, state, rows), steps=60, lr=1e-3)
    assert last < 0.2 * first
    policy.save(model, tmp_path)
    on_cpu = policy.load(tmp_path, device="cpu")
    model.eval()
    acts = model.act(frames[:8].cpu().numpy(), state[:8].cpu().numpy(), rows[:8])
    assert acts.shape == (8, 4) and (acts >= cfg.action_low).all() and (acts <= cfg.action_high).all()
    with torch.no_grad():
        np.testing.assert_allclose(on_cpu(frames.cpu(), state.cpu(), on_cpu.tokenize(rows)).numpy(),
                                   model(frames, state, model.tokenize(rows)).cpu().numpy(), atol=2e-2)


def test_world_model_gpu_preset_fits_and_rolls_out_on_cuda(tmp_path):
    torch.manual_seed(0)
    cfg = world_model.preset("gpu")
    model = world_model.WorldModel(cfg).to(CUDA)
    g = torch.Generator(device=CUDA).manual_seed(1)
    size = cfg.image_size
    # grey frames; the next one is 20 levels brighter than the last with gas 1, darker with gas 0
    levels = torch.randint(64, 192, (16, cfg.history, 1, 1, 1), device=CUDA, dtype=torch.uint8, generator=g)
    history = levels.expand(16, cfg.history, size, size, 3).contiguous()
    gas = (torch.arange(16, device=CUDA) % 2).float()
    action = torch.stack([torch.zeros_like(gas), gas, torch.zeros_like(gas)], dim=1)
    target = (history[:, -1].int() + 20 * (2 * gas[:, None, None, None].int() - 1)).to(torch.uint8)

    def seeded_loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return model.loss(history, action, target).item()

    before = seeded_loss()
    # at the preset's own rate: at a constant 1e-3 without warm-up (3.3x it) the gradient norm reaches
    # 1e11 within 50 steps and the mid-block attention's backward returns NaN (H200, TF32 on or off)
    fit(model, lambda: model.loss(history, action, target), steps=200, lr=cfg.lr)
    assert seeded_loss() < 0.5 * before
    frames = model.rollout(history[:2], torch.rand(2, 3, 3, device=CUDA, generator=g))
    assert frames.shape == (2, 3, size, size, 3) and frames.dtype == torch.uint8 and frames.is_cuda
    tasks = ["go", "stop"]
    conditioned = world_model.WorldModel(dataclasses.replace(cfg, task_vocab=tuple(sorted(tasks)))).to(CUDA)
    conditioned.loss(history[:2], action[:2], target[:2], tasks).backward()
    assert conditioned.rollout(history[:2], action[:2, None], tasks=tasks).is_cuda
    world_model.save(model, tmp_path)
    on_cpu = world_model.load(tmp_path, device="cpu")
    x, sigma = torch.randn(2, 3, size, size, device=CUDA, generator=g), torch.full((2,), 1.0, device=CUDA)
    context = history[:2].permute(0, 1, 4, 2, 3).float() / 127.5 - 1
    model.eval()
    with torch.no_grad():
        gpu_out = model.denoise(x, sigma, context, action[:2]).cpu()
        cpu_out = on_cpu.denoise(x.cpu(), sigma.cpu(), context.cpu(), action[:2].cpu())
    np.testing.assert_allclose(cpu_out.numpy(), gpu_out.numpy(), atol=2e-2)


def test_dynamics_gpu_preset_fits_in_bf16_on_cuda_and_loads_on_cpu(tmp_path):
    """The world model's reasoner learns next state = state + action under bf16 autocast."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(dynamics.preset("gpu"), action_dim=2, state_dim=2, signals=("success",))
    model = dynamics.Dynamics(cfg).to(CUDA)
    g = torch.Generator(device=CUDA).manual_seed(2)
    b, k, s = 64, cfg.history, cfg.image_size
    frames = torch.randint(0, 256, (b, k, s, s, 3), device=CUDA, dtype=torch.uint8, generator=g)
    actions = torch.rand(b, k, 2, device=CUDA, generator=g) - 0.5
    states = torch.randn(b, k, 2, device=CUDA, generator=g)
    targets = dynamics.Targets(next_state_BKS=states + actions, reward_BK=actions.sum(-1),
                               next_signals_BKG=(actions[..., :1] > 0).float(), done_BK=torch.zeros(b, k, device=CUDA),
                               has_next_BK=torch.ones(b, k, dtype=torch.bool, device=CUDA))

    def bf16_loss() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model.loss(frames, actions, states, targets)["loss"]

    first, last = fit(model, bf16_loss, steps=150, lr=1e-3)
    assert last < 0.3 * first
    dynamics.save(model, tmp_path)
    on_cpu = dynamics.load(tmp_path, device="cpu")
    model.eval()
    got = model.predict(frames[:8], actions[:8], states[:8]).next_state.cpu()
    np.testing.assert_allclose(on_cpu.predict(frames[:8].cpu(), actions[:8].cpu(), states[:8].cpu()).next_state.numpy(),
                               got.numpy(), atol=2e-2)


def test_reasoner_gpu_preset_trains_on_cuda():
    cfg = reasoner.preset("gpu")
    cfg = dataclasses.replace(cfg, steps=150, batch_size=64, tags=TAGS, events=("none",), mirror={})
    rng = np.random.default_rng(0)
    n, k, s = 96, cfg.frames_per_clip, cfg.image_size
    # the speed band is written into the brightness of the clip: learnable from pixels
    bands = list(TAGS["speed"])
    speed = rng.integers(0, len(bands), n)
    clips = np.clip(speed[:, None, None, None, None] * 60 + rng.integers(0, 20, (n, k, s, s, 3)), 0, 255)
    clips = clips.astype(np.uint8)
    tags = [{key: values[0] for key, values in TAGS.items()} | {"speed": bands[i]} for i in speed]
    model, metrics = reasoner.train_reasoner(clips[:64], ["none"] * 64, tags[:64], config=cfg,
                                             val_clips=clips[64:], val_events=["none"] * 32,
                                             val_tags=tags[64:], device=CUDA)
    assert model.device.type == "cuda"
    assert metrics["val"]["accuracy"]["speed"] >= 0.9
