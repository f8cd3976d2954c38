"""The policy: shapes and bounds, state and task inputs, errors, save/load (to and from S3:
tests/stages/test_model_storage.py), it can learn."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from models.policy import PRESETS, Policy, PolicyConfig, config_from_dict, load, preset, random_shift, save
from models.text import build_vocab

TASKS = ("Pick up the red cube.", "Push the blue block left!", "Open the drawer")
# a 4-action world (a gripper in [0, 1] beside three signed velocities) with a 7-d state and 3 tasks
ARM = dataclasses.replace(preset("tiny"), action_low=(-0.5, -0.5, -1.0, 0.0), action_high=(0.5, 0.5, 1.0, 1.0),
                          state_dim=7, task_vocab=build_vocab(TASKS), loss_weights=(1.0, 1.0, 1.0, 2.0))


@pytest.fixture(scope="module")
def tiny() -> Policy:
    torch.manual_seed(0)
    return Policy(preset("tiny"))


@pytest.fixture(scope="module")
def arm() -> Policy:
    torch.manual_seed(0)
    return Policy(ARM)


def frames(cfg: PolicyConfig, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, cfg.history, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)


def states(batch: int, seed: int = 0) -> np.ndarray:
    """Positions in metres around 0.4 m and a gripper opening in [0, 1]."""
    rng = np.random.default_rng(seed)
    return np.concatenate([0.4 + 0.1 * rng.normal(size=(batch, 6)), rng.uniform(0, 1, (batch, 1))],
                          axis=1).astype(np.float32)


def test_presets_derive_and_validate():
    assert set(PRESETS) == {"tiny", "default", "gpu"}
    default = preset("default")
    assert default.image_size == 64 and default.history >= 2
    assert (default.action_dim, default.action_low, default.action_high) == (3, (-1.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert default.state_dim == 0 and default.task_vocab == () and default.loss_weights == ()
    assert preset("gpu").history == default.history  # same inputs, bigger net
    with pytest.raises(ValueError, match="unknown policy preset"):
        preset("huge")
    with pytest.raises(ValueError, match="history"):
        PolicyConfig(history=0)
    with pytest.raises(ValueError, match="divisible"):
        PolicyConfig(image_size=60)
    with pytest.raises(ValueError, match="same non-zero length"):
        PolicyConfig(action_low=(0.0,), action_high=(1.0, 1.0))
    with pytest.raises(ValueError, match="below"):
        PolicyConfig(action_low=(1.0,), action_high=(1.0,))
    with pytest.raises(ValueError, match="loss_weights"):
        PolicyConfig(loss_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="task_vocab"):
        PolicyConfig(task_vocab=("Pick",))
    for cfg in (default, ARM):
        assert config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    with pytest.raises(ValueError, match="unknown PolicyConfig fields"):
        config_from_dict({"colour": "red"})
    # a checkpoint config written before the world-agnostic fields existed
    old = {k: v for k, v in dataclasses.asdict(default).items()
           if k not in ("action_low", "action_high", "state_dim", "state_hidden", "task_vocab", "task_hidden",
                        "task_max_len")} | {"loss_weights": [2.0, 1.0, 1.0]}
    assert config_from_dict(old) == dataclasses.replace(default, loss_weights=(2.0, 1.0, 1.0))


def test_forward_and_act_shapes_and_ranges(tiny):
    x = frames(tiny.config, 5)
    out = tiny(torch.from_numpy(x))
    assert out.shape == (5, 3)
    acts = tiny.act(x)
    assert acts.shape == (5, 3) and acts.dtype == np.float32
    assert (np.abs(acts[:, 0]) <= 1).all() and ((acts[:, 1:] >= 0) & (acts[:, 1:] <= 1)).all()
    assert tiny.training  # act() restores the mode it found
    np.testing.assert_array_equal(tiny.act(x, np.zeros((5, 0), np.float32), ["any task"] * 5), acts)
    with pytest.raises(ValueError, match="uint8"):
        tiny.act(x.astype(np.float32))
    with pytest.raises(ValueError, match="frames must be"):
        tiny.act(x[:, :1])
    with pytest.raises(ValueError, match="state must be"):
        tiny.act(x, states(5))
    with pytest.raises(ValueError, match="NaN"):
        tiny.loss(torch.from_numpy(x), torch.full((5, 3), float("nan")))
    with pytest.raises(ValueError, match="target must be"):
        tiny.loss(torch.from_numpy(x), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="no task input"):
        tiny.tokenize(["open the drawer"])


def test_squash_respects_bounds(arm):
    lo, hi = np.array(ARM.action_low, np.float32), np.array(ARM.action_high, np.float32)
    with torch.no_grad():
        for p in arm.head[-1].parameters():  # saturate the outputs both ways
            p.fill_(0.0)
        arm.head[-1].bias.copy_(torch.tensor([50.0, -50.0, 0.0, 50.0]))
        acts = arm.act(frames(ARM, 4), states(4), list(TASKS[:2]) * 2)
        arm.head[-1].reset_parameters()
    np.testing.assert_allclose(acts, np.broadcast_to([hi[0], lo[1], (lo[2] + hi[2]) / 2, hi[3]], (4, 4)), atol=1e-6)
    x = torch.from_numpy(frames(ARM, 64, seed=4))
    out = arm(x, torch.from_numpy(states(64, seed=4)) * 100, arm.tokenize(list(TASKS) * 21 + ["unheard words"]))
    assert out.shape == (64, 4) and (out >= torch.from_numpy(lo)).all() and (out <= torch.from_numpy(hi)).all()


def test_state_and_tasks_are_required(arm):
    x, s = frames(ARM, 3), states(3)
    assert arm.act(x, s, list(TASKS)).shape == (3, 4)
    with pytest.raises(ValueError, match="reads a state of width 7"):
        arm.act(x, None, list(TASKS))
    with pytest.raises(ValueError, match="state must be"):
        arm.act(x, s[:, :6], list(TASKS))
    with pytest.raises(ValueError, match="NaN"):
        arm.act(x, np.full_like(s, np.nan), list(TASKS))
    with pytest.raises(ValueError, match="task instruction"):
        arm.act(x, s)
    with pytest.raises(ValueError, match="task instruction"):
        arm.act(x, s, list(TASKS[:2]))
    with pytest.raises(ValueError, match="task instruction"):
        arm(torch.from_numpy(x), torch.from_numpy(s))
    with pytest.raises(ValueError, match="task instruction"):
        arm.loss(torch.from_numpy(x), torch.zeros(3, 4), torch.from_numpy(s))
    tokens = arm.tokenize(["Pick up the RED cube!", "open the drawer", "fly away"])
    vocab = ARM.task_vocab
    assert tokens.dtype == torch.long and tokens.shape == (3, 5)
    assert tokens[0].tolist() == [2 + vocab.index(w) for w in ("pick", "up", "the", "red", "cube")]
    assert tokens[1, 3:].tolist() == [0, 0] and tokens[2, :2].tolist() == [1, 1]  # [PAD] = 0, [UNK] = 1


def test_task_encoder_encodes_repeated_instructions_like_single_ones(arm):
    texts = ["open the drawer", "Pick up the RED cube!", "open the drawer", "fly away", "Pick up the RED cube!"]
    encoder, tokens = arm.task_encoder, arm.tokenize(texts)
    torch.testing.assert_close(encoder(tokens), torch.cat([encoder(row[None]) for row in tokens]))
    assert encoder(tokens[:0]).shape == (0, ARM.task_hidden)


def test_default_preset_runs():
    policy = Policy(preset("default"))
    assert policy.act(frames(policy.config, 2)).shape == (2, 3)


def test_save_load_round_trip(tiny, arm, tmp_path):
    x = frames(tiny.config, 3, seed=1)
    save(tiny, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    again = load(tmp_path / "ckpt")
    assert again.config == tiny.config and not again.training
    np.testing.assert_array_equal(again.act(x), tiny.act(x))
    with pytest.raises(ValueError, match="not a policy checkpoint"):
        load(tmp_path / "missing")
    # state statistics and the task encoder travel with the weights
    arm.train()
    arm.loss(torch.from_numpy(frames(ARM, 8)), torch.zeros(8, 4), torch.from_numpy(states(8)), list(TASKS[:2]) * 4)
    assert arm.state_norm.count.item() >= 8
    save(arm, tmp_path / "arm")
    again = load(tmp_path / "arm")
    assert again.config == ARM
    torch.testing.assert_close(again.state_norm.mean, arm.state_norm.mean)
    x, s = frames(ARM, 3, seed=5), states(3, seed=5)
    np.testing.assert_array_equal(again.act(x, s, list(TASKS)), arm.act(x, s, list(TASKS)))


def test_tiny_overfit_loss_drops():
    torch.manual_seed(0)
    cfg = preset("tiny")
    policy = Policy(cfg)
    x = torch.from_numpy(frames(cfg, 16, seed=3))
    target = torch.from_numpy(np.random.default_rng(3).uniform([-1, 0, 0], [1, 1, 1], (16, 3)).astype(np.float32))
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    first = policy.loss(x, target).item()
    for _ in range(cfg.steps):
        loss = policy.loss(x, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_learns_from_state_and_task():
    """The target is a function of the state (the gripper copies state[6]) and of the task alone (the
    other three actions are a per-task constant); the frames are noise. A few dozen steps learn it."""
    torch.manual_seed(0)
    policy = Policy(dataclasses.replace(ARM, lr=1e-2))
    rng = np.random.default_rng(0)
    per_task = np.array([[0.4, -0.4, 0.8], [-0.4, 0.4, -0.8], [0.0, 0.3, 0.0]], np.float32)

    def batch(n: int, seed: int):
        r = np.random.default_rng(seed)
        task_ids = r.integers(0, 3, n)
        s = states(n, seed=seed)
        target = np.concatenate([per_task[task_ids], s[:, 6:]], axis=1)
        return (torch.from_numpy(frames(ARM, n, seed=seed)), torch.from_numpy(target), torch.from_numpy(s),
                [TASKS[i] for i in task_ids])

    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for step in range(60):
        loss = policy.loss(*batch(32, seed=int(rng.integers(1 << 30))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, target, s, tasks = batch(64, seed=12345)  # unseen frames and states
    pred = policy.act(x.numpy(), s.numpy(), tasks)
    err = np.abs(pred - target.numpy()).mean(axis=0)
    assert (err[:3] < 0.1).all() and err[3] < 0.15, err


def test_random_shift_translates_each_sample_in_training_only():
    x = torch.arange(4 * 6 * 16 * 16, dtype=torch.float32).reshape(4, 6, 16, 16)
    torch.manual_seed(0)
    y = random_shift(x, 3)
    assert y.shape == x.shape and not torch.equal(x, y)
    for b in range(4):  # one whole-pixel translation per sample, shared by all its channels
        rows = (y[b, 0, :, 0] - x[b, 0, 0, 0]) // 16
        cols = (y[b, 0, 0, :] - x[b, 0, 0, 0]) % 16
        dy, dx = int(rows[3]) - 3, int(cols[3]) - 3
        assert -3 <= dy <= 3 and -3 <= dx <= 3
        shifted = x[b].roll((-dy, -dx), dims=(1, 2))
        inner = (slice(None), slice(3, 13), slice(3, 13))
        assert torch.equal(y[b][inner], shifted[inner])
    with pytest.raises(ValueError, match="shift"):
        PolicyConfig(shift=32)
    policy = Policy(dataclasses.replace(ARM, shift=4)).eval()
    f, s = frames(ARM, 2), states(2)
    assert np.array_equal(policy.act(f, s, TASKS[:2]), policy.act(f, s, TASKS[:2]))  # no shift when acting


def test_auxiliary_targets_shape_the_encoder_in_training_only(tmp_path):
    """The auxiliary head learns the unread state (here: where a bright square sits) from the
    pixels; its loss joins training, rows with non-finite targets are skipped, inference and a
    policy without it are unchanged, and its statistics travel with the checkpoint."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny"), aux_dim=2, aux_weight=1.0, lr=1e-2)
    assert not dataclasses.replace(cfg, aux_weight=0.0).has_aux and Policy(preset("tiny")).aux_head is None
    with pytest.raises(ValueError, match="aux_dim and aux_weight"):
        dataclasses.replace(cfg, aux_weight=-1.0)
    policy = Policy(cfg)

    def batch(n: int, seed: int):
        r = np.random.default_rng(seed)
        pos = r.integers(0, cfg.image_size - 8, (n, 2))
        x = np.zeros((n, cfg.history, cfg.image_size, cfg.image_size, 3), np.uint8)
        for i, (row, col) in enumerate(pos):
            x[i, :, row:row + 8, col:col + 8] = 255
        return torch.from_numpy(x), torch.full((n, 3), 0.5), torch.from_numpy(pos.astype(np.float32))

    x, target, aux = batch(8, seed=1)
    plain = policy.loss(x, target).item()
    with_aux = policy.loss(x, target, aux_BX=aux).item()
    assert with_aux > plain
    aux[:4] = np.nan  # rows without targets add nothing, and the rest still count
    assert plain < policy.loss(x, target, aux_BX=aux).item()
    with pytest.raises(ValueError, match="aux targets must be"):
        policy.loss(x, target, aux_BX=aux[:, :1])
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for step in range(80):
        x, target, aux = batch(32, seed=100 + step)
        loss = policy.loss(x, target, aux_BX=aux)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    x, _, aux = batch(64, seed=999)  # unseen squares
    with torch.no_grad():
        pred = policy._forward(x, None, None)[1] * policy.aux_norm.var.sqrt() + policy.aux_norm.mean
    assert (pred - aux).abs().mean() < 0.25 * (aux - aux.mean(0)).abs().mean()  # far better than the mean
    save(policy, tmp_path / "aux")
    again = load(tmp_path / "aux")
    torch.testing.assert_close(again.aux_norm.mean, policy.aux_norm.mean)
    np.testing.assert_array_equal(again.act(x.numpy()), policy.act(x.numpy()))


def test_the_head_can_read_the_auxiliary_estimate_which_only_its_own_loss_trains(tmp_path):
    """``aux_input``: the action head reads the auxiliary head's estimate of the unread state; the
    behaviour-cloning loss does not reach that head (stopped gradient), the auxiliary loss does."""
    with pytest.raises(ValueError, match="aux_input needs the auxiliary loss"):
        dataclasses.replace(preset("tiny"), aux_input=True)
    torch.manual_seed(0)
    cfg = dataclasses.replace(ARM, aux_dim=3, aux_weight=1.0, aux_input=True)
    policy = Policy(cfg)
    plain = Policy(dataclasses.replace(cfg, aux_input=False))
    assert policy.head[2].in_features == plain.head[2].in_features + 3
    x, s, tasks = torch.from_numpy(frames(cfg, 4)), torch.from_numpy(states(4)), list(TASKS) + ["Open the drawer"]
    target = torch.full((4, 4), 0.25)
    policy.loss(x, target, s, tasks).backward()  # behaviour cloning alone
    assert all(p.grad is None or not p.grad.any() for p in policy.aux_head.parameters())
    assert policy.head[2].weight.grad[:, -3:].abs().sum() > 0  # the head does read the estimate
    policy.zero_grad()
    policy.loss(x, target, s, tasks, aux_BX=torch.randn(4, 3)).backward()
    assert all(p.grad.abs().sum() > 0 for p in policy.aux_head.parameters())
    save(policy, tmp_path / "aux_input")
    again = load(tmp_path / "aux_input")
    assert again.config.aux_input
    np.testing.assert_array_equal(again.act(x.numpy(), s.numpy(), tasks), policy.act(x.numpy(), s.numpy(), tasks))
