"""The world model's reasoning half: what comes next beyond pixels, and which action links two frames.

An autoregressive transformer over one token per time step, built from a ``transformers``
``GPT2Config`` (never downloaded, trained here): token t is the sum of an embedding of frame o[t]
(a small strided CNN), of the action a[t], of the state s[t] (normalised by running statistics)
and of the task instruction (``models.text.TaskEncoder``). Causal attention over the last K steps
gives a hidden vector h[t] from which heads predict

* the next state s[t+1] (as a change from s[t] in normalised units),
* the reward r[t] the action earned,
* each of the world's boolean signals at t+1 (the names its spec declares) and
* whether the episode ends after step t (``done``);

h[t] is also the conditioning vector a generator may read (``condition``). This is the "next
sensor output" of the Cosmos framing (NVIDIA 2025) and the reward/continue heads of Dreamer's
world model (Hafner et al. 2023), here over frame embeddings as in IRIS and Genie's latent-action
transformers (Micheli et al. 2023; Bruce et al. 2024).

Beside it an inverse-dynamics head (as VPT's IDM, Baker et al. 2022) reads the embeddings of two
consecutive frames and infers the action taken between them, so that clips without actions (real
or generated) can be labelled.

Alignment: frames o[0..K-1], actions a[0..K-1] (a[t] applied at o[t]), states s[0..K-1]; targets
per slot t: s[t+1], r[t], signals[t+1], done[t]. A missing target (the row after the window is
not logged, a NaN state) is masked out. In training the input states carry Gaussian noise
(``state_noise``) while the targets stay clean, so the state head learns to pull a state that is
a little off back towards the data, as the learned simulators of Sanchez-Gonzalez et al. (2020,
"Learning to Simulate Complex Physics with Graph Networks") do: fed its own predictions in the
neural simulator, it drifts less (arm, 30 held-out scenes, 32 steps: state error 1.17 -> 0.74
train-std units at 0.1; benchmarks/README.md, "State noise, probed"). Shapes and names come from the config (``action_dim``,
``state_dim``, ``signals``), which the caller fills from a world's spec.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import checkpoint
from models.policy import RunningNorm
from models.text import TaskEncoder, check_vocab


@dataclass(frozen=True)
class DynamicsConfig:
    """Architecture and training hyper-parameters; widths and names come from the world."""

    image_size: int = 64
    history: int = 8  # K steps the transformer attends over
    action_dim: int = 3
    state_dim: int = 0  # S: the world's logged state (0: none)
    signals: tuple[str, ...] = ()  # the world's per-step boolean signals, predicted at t+1
    channels: tuple[int, ...] = (16, 32, 64, 64)  # frame encoder: one stride-2 conv each
    embed: int = 128  # transformer width = conditioning width
    layers: int = 2
    heads: int = 4
    task_vocab: tuple[str, ...] = ()
    task_hidden: int = 32
    task_max_len: int = 32
    idm_hidden: int = 128  # inverse-dynamics MLP width
    state_noise: float = 0.1  # training only: N(0, this^2) on the input states, in train-std units
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    steps: int = 600

    def __post_init__(self) -> None:
        if min(self.history, self.action_dim, self.layers, self.heads) < 1 or self.state_dim < 0:
            raise ValueError("history, action_dim, layers and heads must be >= 1 and state_dim >= 0")
        if self.embed % self.heads:
            raise ValueError(f"embed {self.embed} must be a multiple of heads {self.heads}")
        if not self.channels or self.image_size % 2 ** len(self.channels):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**len(channels)")
        if self.state_noise < 0:
            raise ValueError(f"state_noise must be >= 0, got {self.state_noise}")
        if len(set(self.signals)) != len(self.signals):
            raise ValueError(f"signals repeat a name: {self.signals}")
        check_vocab(self.task_vocab)


_DEFAULT = DynamicsConfig()
_TINY = dataclasses.replace(_DEFAULT, history=4, channels=(8, 16), embed=32, layers=1, heads=2, idm_hidden=32,
                            batch_size=4, steps=20)
_GPU = dataclasses.replace(_DEFAULT, history=16, channels=(32, 64, 128, 128), embed=256, layers=4, heads=8,
                           idm_hidden=256, batch_size=256, lr=3e-4, steps=20_000)
PRESETS = {"tiny": _TINY, "default": _DEFAULT, "gpu": _GPU}


def preset(name: str) -> DynamicsConfig:
    """Named config: "tiny" (tests), "default" (CPU demo), "gpu"."""
    return checkpoint.preset(PRESETS, name, "dynamics")


def config_from_dict(d: dict) -> DynamicsConfig:
    return checkpoint.config_from_dict(DynamicsConfig, d)


@dataclass
class Targets:
    """Per-slot training targets [B, K, ...]; ``has_next`` masks slots whose step t+1 is not logged."""

    next_state_BKS: torch.Tensor
    reward_BK: torch.Tensor
    next_signals_BKG: torch.Tensor
    done_BK: torch.Tensor
    has_next_BK: torch.Tensor


@dataclass
class Prediction:
    """What the model expects after the last step of a window: next state [B, S], reward [B],
    signal and end-of-episode probabilities [B, G] and [B], and the conditioning vector [B, E]."""

    next_state: torch.Tensor
    reward: torch.Tensor
    signals: torch.Tensor
    done: torch.Tensor
    condition: torch.Tensor


class FrameEncoder(nn.Module):
    """uint8 frames [N, H, W, 3] -> embeddings [N, E]: stride-2 convs, GroupNorm, SiLU, a linear map."""

    def __init__(self, c: DynamicsConfig) -> None:
        super().__init__()
        layers, width = [], 3
        for ch in c.channels:
            layers += [nn.Conv2d(width, ch, 4, stride=2, padding=1), nn.GroupNorm(min(8, ch), ch), nn.SiLU()]
            width = ch
        self.convs = nn.Sequential(*layers)
        side = c.image_size // 2 ** len(c.channels)
        self.out = nn.Linear(width * side * side, c.embed)

    def forward(self, frames_NHWC: torch.Tensor) -> torch.Tensor:
        x = frames_NHWC.movedim(-1, 1).float() / 127.5 - 1.0
        return self.out(self.convs(x).flatten(1))


class Dynamics(nn.Module):
    """Causal transformer over (frame, action, state, task) tokens with next-step heads, and an IDM."""

    def __init__(self, config: DynamicsConfig) -> None:
        super().__init__()
        self.config = c = config
        self.frames = FrameEncoder(c)
        self.action_in = nn.Linear(c.action_dim, c.embed)
        self.state_norm = RunningNorm(c.state_dim) if c.state_dim else None
        self.state_in = nn.Linear(c.state_dim, c.embed) if c.state_dim else None
        self.task = TaskEncoder(c.task_vocab, c.task_hidden, c.task_max_len) if c.task_vocab else None
        self.task_in = nn.Linear(c.task_hidden, c.embed) if c.task_vocab else None
        from transformers import GPT2Config, GPT2Model  # here: reading a config never pays the import

        self.gpt = GPT2Model(GPT2Config(vocab_size=1, n_positions=c.history, n_embd=c.embed, n_layer=c.layers,
                                        n_head=c.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        bos_token_id=None, eos_token_id=None))
        self.gpt.wte.requires_grad_(False)  # tokens come in as embeddings: the vocabulary table is never read
        outputs = c.state_dim + 1 + len(c.signals) + 1  # next state change, reward, signals, done
        self.head = nn.Sequential(nn.LayerNorm(c.embed), nn.Linear(c.embed, outputs))
        self.idm = nn.Sequential(nn.Linear(3 * c.embed, c.idm_hidden), nn.SiLU(), nn.Linear(c.idm_hidden, c.idm_hidden),
                                 nn.SiLU(), nn.Linear(c.idm_hidden, c.action_dim))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- inputs ---------------------------------------------------------------------------------

    def _tensor(self, x, dtype=None) -> torch.Tensor:
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        return t.to(self.device, dtype=dtype)

    def _check(self, frames: torch.Tensor, actions: torch.Tensor, states: torch.Tensor | None) -> None:
        c = self.config
        B, K = frames.shape[:2]
        if frames.ndim != 5 or frames.shape[2:] != (c.image_size, c.image_size, 3) or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 [B, K, {c.image_size}, {c.image_size}, 3], got "
                             f"{frames.dtype}{list(frames.shape)}")
        if not 1 <= K <= c.history:
            raise ValueError(f"windows hold 1 to {c.history} steps, got {K}")
        if actions.shape != (B, K, c.action_dim):
            raise ValueError(f"actions must be [{B}, {K}, {c.action_dim}], got {list(actions.shape)}")
        if c.state_dim and (states is None or states.shape != (B, K, c.state_dim)):
            got = None if states is None else list(states.shape)
            raise ValueError(f"states must be [{B}, {K}, {c.state_dim}], got {got}")

    def _states(self, states_BKS: torch.Tensor) -> torch.Tensor:
        """Normalised states with NaN (unknown) entries at the mean (0)."""
        B, K, S = states_BKS.shape
        known = torch.isfinite(states_BKS)
        flat = torch.where(known, states_BKS, self.state_norm.mean).reshape(B * K, S)
        norm = self.state_norm(flat).reshape(B, K, S)
        if self.training and self.config.state_noise:  # the clean targets teach it to correct the noise
            norm = norm + self.config.state_noise * torch.randn_like(norm)
        return torch.where(known, norm, torch.zeros_like(states_BKS))

    def _hidden(self, frames_BKHWC, actions_BKA, states_BKS, tasks) -> tuple[torch.Tensor, ...]:
        """(hidden [B, K, E], frame embeddings [B, K, E], normalised states [B, K, S] or None)."""
        frames = self._tensor(frames_BKHWC)
        actions = self._tensor(actions_BKA, torch.float32)
        states = None if states_BKS is None or not self.config.state_dim else self._tensor(states_BKS, torch.float32)
        self._check(frames, actions, states)
        B, K = frames.shape[:2]
        emb = self.frames(frames.flatten(0, 1)).view(B, K, -1)
        tokens = emb + self.action_in(actions)
        norm = None
        if states is not None:
            norm = self._states(states)
            tokens = tokens + self.state_in(norm)
        if self.task is not None:
            tokens = tokens + self.task_in(self.task.encode(tasks, B, self.device))[:, None]
        return self.gpt(inputs_embeds=tokens).last_hidden_state, emb, norm

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        S, G = self.config.state_dim, len(self.config.signals)
        return out[..., :S], out[..., S], out[..., S + 1:S + 1 + G], out[..., S + 1 + G]

    # ---- training --------------------------------------------------------------------------------

    def loss(self, frames_BKHWC, actions_BKA, states_BKS, targets: Targets,
             tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Losses per head and their sum ("loss"): next state (MSE in normalised units), reward (Huber),
        signals and done (BCE), inverse dynamics (MSE of the action between consecutive frames)."""
        hidden, emb, norm = self._hidden(frames_BKHWC, actions_BKA, states_BKS, tasks)
        d_state, reward, signals, done = self._split(self.head(hidden))
        has_next = self._tensor(targets.has_next_BK, torch.bool)
        out = {"reward": F.smooth_l1_loss(reward, self._tensor(targets.reward_BK, torch.float32)),
               "done": F.binary_cross_entropy_with_logits(done, self._tensor(targets.done_BK, torch.float32))}
        if self.config.signals:
            bce = F.binary_cross_entropy_with_logits(
                signals, self._tensor(targets.next_signals_BKG, torch.float32), reduction="none").mean(-1)
            out["signals"] = (bce * has_next).sum() / has_next.sum().clamp_min(1)
        if norm is not None:
            nxt = self._tensor(targets.next_state_BKS, torch.float32)
            known = torch.isfinite(nxt) & has_next[..., None]
            std = self.state_norm.var.clamp_min(self.state_norm.min_std ** 2).sqrt()
            want = ((torch.where(known, nxt, self.state_norm.mean) - self.state_norm.mean) / std).clamp(-5, 5)
            err = (norm + d_state - want) ** 2
            out["state"] = (err * known).sum() / known.sum().clamp_min(1)
        actions = self._tensor(actions_BKA, torch.float32)
        if emb.shape[1] > 1:
            out["idm"] = F.mse_loss(self._idm(emb[:, :-1], emb[:, 1:]), actions[:, :-1])
        out["loss"] = sum(out.values())
        return out

    def _idm(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        return self.idm(torch.cat([before, after, after - before], dim=-1))

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    # ---- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, frames_BKHWC, actions_BKA, states_BKS=None, tasks: Sequence[str] | None = None) -> Prediction:
        """The model's expectation after the window's last step (windows of 1..K steps, oldest first)."""
        hidden, _, norm = self._hidden(frames_BKHWC, actions_BKA, states_BKS, tasks)
        d_state, reward, signals, done = self._split(self.head(hidden[:, -1]))
        if norm is not None:
            rs = self.state_norm
            next_state = (norm[:, -1] + d_state) * rs.var.clamp_min(rs.min_std ** 2).sqrt() + rs.mean
        else:
            next_state = d_state
        return Prediction(next_state=next_state, reward=reward, signals=torch.sigmoid(signals),
                          done=torch.sigmoid(done), condition=hidden[:, -1])

    @torch.no_grad()
    def infer_actions(self, frames_BTHWC) -> np.ndarray:
        """Inverse dynamics: the action between each pair of consecutive frames -> float32 [B, T-1, A]."""
        frames = self._tensor(frames_BTHWC)
        c = self.config
        if frames.ndim != 5 or frames.shape[1] < 2 or frames.shape[2:] != (c.image_size, c.image_size, 3):
            raise ValueError(f"frames must be uint8 [B, T >= 2, {c.image_size}, {c.image_size}, 3], got "
                             f"{list(frames.shape)}")
        B, T = frames.shape[:2]
        emb = self.frames(frames.flatten(0, 1)).view(B, T, -1)
        return self._idm(emb[:, :-1], emb[:, 1:]).cpu().numpy().astype(np.float32)


def save(model: Dynamics, directory: str | os.PathLike) -> str:
    """Write model.safetensors + config.json (``models.checkpoint``)."""
    return checkpoint.save(model, directory)


def load(directory: str | os.PathLike, *, device: str = "cpu") -> Dynamics:
    return checkpoint.load(Dynamics, config_from_dict, directory, device=device, what="dynamics")
