"""Pixels (+ state, + task instruction) -> action policy: a small CNN over the last K frames.

The design follows the classic end-to-end visuomotor nets (NVIDIA PilotNet, Bojarski et al.
2016; the Atari DQN encoder, Mnih et al. 2015): a 2x space-to-depth (pixel unshuffle, a large CPU
speed-up) then strided convolutions over stacked RGB frames (frame history gives the net motion,
hence speed), and a small MLP head. It is world-agnostic: the world's spec sets the action
bounds, the proprioceptive/goal state and the task vocabulary through the config.

* Actions: A = len(action_low) outputs, each squashed into its [low, high] as
  low + (high - low) * sigmoid(raw); trained by behaviour cloning with per-action weighted
  smooth-L1 on the squashed outputs.
* State (``state_dim`` > 0): normalised by running mean/std buffers (updated in training mode,
  frozen in eval, saved with the weights; the observation normalisation of RL practice, e.g.
  stable-baselines' VecNormalize), clipped to +-5, then a small MLP; concatenated with the image
  features before the head.
* Task (``task_vocab`` non-empty): the instruction goes through ``models.text.TaskEncoder``
  (word-level tokens, a one-layer BERT trained from scratch, mean-pooled); its embedding
  FiLM-modulates the last convolutional features (Perez et al. 2018; as in RT-1 / BC-Z) and is
  concatenated before the head.
* Augmentation (``shift`` > 0): in training, every sample's frames (its whole history alike) are
  shifted by a random whole number of pixels in [-shift, shift] on each axis, the border repeated
  (DrQ's random shift: Kostrikov et al., "Image Augmentation Is All You Need", ICLR 2021; RAD,
  Laskin et al. 2020): few demonstrations, many frames that differ by a few pixels.
* Auxiliary targets (``aux_dim`` > 0 and ``aux_weight`` > 0): in training, a second head predicts
  from the image features the state the policy is not given (object positions a simulator or a
  labelled log knows), normalised like the state; its smooth-L1, times ``aux_weight``, joins the
  loss. Inference runs it only with ``aux_input`` (below): it shapes the encoder to find what the
  actions depend on (the auxiliary pose targets of Levine et al. 2016, "End-to-End Training of Deep
  Visuomotor Policies"; UNREAL's auxiliary tasks, Jaderberg et al. 2017). Rows whose targets are not finite are skipped.
  With ``aux_input`` the head also reads that head's estimate (gradient stopped, so only the
  auxiliary loss shapes it): the policy sees the objects in its pixels as a few numbers, the
  perception-then-control split of classic visuomotor pipelines, and still reads no privileged state.

Training hyper-parameters live beside the architecture so the resolved config saved with a
checkpoint says how it was made.
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
from models.text import TaskEncoder, check_vocab

WEIGHTS_NAME = checkpoint.WEIGHTS_NAME
CONFIG_NAME = checkpoint.CONFIG_NAME


@dataclass(frozen=True)
class PolicyConfig:
    """Architecture, inputs/outputs and behaviour-cloning hyper-parameters of the policy."""

    image_size: int = 64
    history: int = 3  # K frames stacked on channels, oldest first
    channels: tuple[int, ...] = (32, 64, 128)  # one stride-2 conv per entry, after a 2x space-to-depth
    hidden: int = 256
    dropout: float = 0.1
    shift: int = 0  # random-shift augmentation in training, in pixels (0 = off)
    # outputs: one per action, squashed into [low, high]
    action_low: tuple[float, ...] = (-1.0, 0.0, 0.0)
    action_high: tuple[float, ...] = (1.0, 1.0, 1.0)
    loss_weights: tuple[float, ...] = ()  # one per action; () = all 1
    # inputs beside the pixels
    state_dim: int = 0  # width of the state vector the policy reads (the world's policy_state); 0 = none
    state_hidden: int = 64
    task_vocab: tuple[str, ...] = ()  # lower-case words of the world's task instructions; () = no task input
    task_hidden: int = 32
    task_max_len: int = 32  # tokens kept per instruction
    aux_dim: int = 0  # width of the auxiliary target (the world's state the policy does not read)
    aux_weight: float = 0.0  # its share of the training loss; 0 = no auxiliary head
    aux_input: bool = False  # the action head also reads the auxiliary head's estimate (needs aux_weight > 0)
    # training recipe (used by the post-training stage / recipe script)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    steps: int = 1000

    def __post_init__(self) -> None:
        if self.history < 1:
            raise ValueError(f"history must be >= 1, got {self.history}")
        if self.image_size % 2 ** (len(self.channels) + 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**{len(self.channels) + 1}")
        if not self.action_low or len(self.action_low) != len(self.action_high):
            raise ValueError(f"action_low and action_high need the same non-zero length, got "
                             f"{self.action_low} and {self.action_high}")
        if not all(lo < hi for lo, hi in zip(self.action_low, self.action_high)):
            raise ValueError(f"each action_low must be below its action_high, got {self.action_low}, "
                             f"{self.action_high}")
        if self.loss_weights and (len(self.loss_weights) != self.action_dim
                                  or min(self.loss_weights) < 0 or sum(self.loss_weights) <= 0):
            raise ValueError(f"loss_weights must be () or {self.action_dim} non-negative floats with a "
                             f"positive sum, got {self.loss_weights}")
        if not 0 <= self.shift < self.image_size // 2:
            raise ValueError(f"shift must be in [0, {self.image_size // 2}), got {self.shift}")
        if self.state_dim < 0 or self.state_hidden < 1 or self.task_hidden < 1 or self.task_max_len < 1:
            raise ValueError("state_dim must be >= 0 and state_hidden, task_hidden, task_max_len >= 1")
        if self.aux_input and self.aux_weight <= 0:  # aux_dim 0 (no unread state): nothing to estimate
            raise ValueError("aux_input needs the auxiliary loss (aux_weight > 0)")
        if self.aux_dim < 0 or self.aux_weight < 0:
            raise ValueError(f"aux_dim and aux_weight must be >= 0, got {self.aux_dim}, {self.aux_weight}")
        check_vocab(self.task_vocab)

    @property
    def action_dim(self) -> int:
        return len(self.action_low)

    @property
    def has_aux(self) -> bool:
        return self.aux_dim > 0 and self.aux_weight > 0


_DEFAULT = PolicyConfig()
_TINY = dataclasses.replace(_DEFAULT, image_size=32, history=2, channels=(8, 16), hidden=32, dropout=0.0,
                            state_hidden=16, task_hidden=16, batch_size=16, steps=50)
_GPU = dataclasses.replace(_DEFAULT, channels=(64, 128, 256), hidden=512, state_hidden=128, task_hidden=64,
                           batch_size=512, steps=20000)
PRESETS = {"tiny": _TINY, "default": _DEFAULT, "gpu": _GPU}


def preset(name: str) -> PolicyConfig:
    """Named config: "tiny" (tests), "default" (CPU demo), "gpu"."""
    return checkpoint.preset(PRESETS, name, "policy")


def config_from_dict(d: dict) -> PolicyConfig:
    """Rebuild a config from its JSON form (lists back to tuples; unknown keys are an error; missing
    keys take their defaults, so older checkpoints load)."""
    return checkpoint.config_from_dict(PolicyConfig, d)


class RunningNorm(nn.Module):
    """(x - mean) / std clipped to +-clip, with mean/var buffers merged from every training batch
    (Chan et al.'s parallel update); eval mode uses them frozen. std is floored at ``min_std``."""

    def __init__(self, dim: int, clip: float = 5.0, min_std: float = 1e-2) -> None:
        super().__init__()
        self.clip, self.min_std = clip, min_std
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def forward(self, x_BS: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                n, m = float(self.count), float(x_BS.shape[0])
                b_mean, b_var = x_BS.mean(0), x_BS.var(0, unbiased=False)
                delta, total = b_mean - self.mean, n + m
                var = (self.var * n + b_var * m + delta ** 2 * n * m / total) / total
                self.mean.add_(delta * m / total)
                self.var.copy_(var)
                self.count.add_(m)
        std = self.var.clamp_min(self.min_std ** 2).sqrt()
        return ((x_BS - self.mean) / std).clamp(-self.clip, self.clip)


def random_shift(x_BCHW: torch.Tensor, pad: int) -> torch.Tensor:
    """Each sample translated by whole pixels in [-pad, pad] (replicated border), as DrQ does."""
    B, _, H, W = x_BCHW.shape
    padded = F.pad(x_BCHW, (pad, pad, pad, pad), mode="replicate")
    off = torch.randint(0, 2 * pad + 1, (B, 2), device=x_BCHW.device)
    rows = (off[:, 0, None] + torch.arange(H, device=x_BCHW.device))[:, :, None]  # [B, H, 1]
    cols = (off[:, 1, None] + torch.arange(W, device=x_BCHW.device))[:, None, :]  # [B, 1, W]
    index = (rows * (W + 2 * pad) + cols).reshape(B, 1, H * W).expand(-1, x_BCHW.shape[1], -1)
    return padded.flatten(2).gather(2, index).reshape(x_BCHW.shape)


class Policy(nn.Module):
    """uint8 frames [B, K, H, W, 3] (+ state [B, S], + task tokens [B, L]) -> actions [B, A] in bounds."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = c = config
        blocks, c_in = [nn.PixelUnshuffle(2)], 4 * 3 * c.history  # space-to-depth: cheap on CPU
        for c_out in c.channels:
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.SiLU()]
            c_in = c_out
        self.encoder = nn.Sequential(*blocks)
        side = c.image_size // 2 ** (len(c.channels) + 1)
        extra = 0
        self.state_norm = self.state_mlp = self.task_encoder = self.film = None
        if c.state_dim:
            self.state_norm = RunningNorm(c.state_dim)
            self.state_mlp = nn.Sequential(nn.Linear(c.state_dim, c.state_hidden), nn.SiLU(),
                                           nn.Linear(c.state_hidden, c.state_hidden), nn.SiLU())
            extra += c.state_hidden
        if c.task_vocab:
            self.task_encoder = TaskEncoder(c.task_vocab, c.task_hidden, c.task_max_len)
            self.film = nn.Linear(c.task_hidden, 2 * c_in)  # per-channel (gamma, beta); zero init = identity
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
            extra += c.task_hidden
        extra += c.aux_dim if c.aux_input and c.has_aux else 0
        # the leading Flatten is a no-op on [B, D]; it keeps the pixels-only parameter names of older checkpoints
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(c.dropout),
                                  nn.Linear(c_in * side * side + extra, c.hidden), nn.SiLU(),
                                  nn.Dropout(c.dropout), nn.Linear(c.hidden, c.action_dim))
        self.aux_norm = self.aux_head = None
        if c.has_aux:
            self.aux_norm = RunningNorm(c.aux_dim)
            self.aux_head = nn.Sequential(nn.Linear(c_in * side * side, c.hidden), nn.SiLU(),
                                          nn.Linear(c.hidden, c.aux_dim))
        self.register_buffer("action_low", torch.tensor(c.action_low, dtype=torch.float32), persistent=False)
        self.register_buffer("action_high", torch.tensor(c.action_high, dtype=torch.float32), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids LongTensor[B, L] (CPU) of task instructions, for ``forward``'s ``tokens_BL``."""
        if self.task_encoder is None:
            raise ValueError("this policy has no task input (config.task_vocab is empty)")
        return self.task_encoder.tokenize(texts)

    def _check(self, frames_BKHWC: torch.Tensor, state_BS: torch.Tensor | None,
               tokens_BL: torch.Tensor | None) -> None:
        c = self.config
        want = (c.history, c.image_size, c.image_size, 3)
        if frames_BKHWC.ndim != 5 or tuple(frames_BKHWC.shape[1:]) != want:
            raise ValueError(f"frames must be [B, {', '.join(map(str, want))}], got {tuple(frames_BKHWC.shape)}")
        B = frames_BKHWC.shape[0]
        if c.state_dim and state_BS is None:
            raise ValueError(f"this policy reads a state of width {c.state_dim}: pass state [B, {c.state_dim}]")
        if state_BS is not None and tuple(state_BS.shape) != (B, c.state_dim):
            raise ValueError(f"state must be [{B}, {c.state_dim}], got {tuple(state_BS.shape)}")
        if state_BS is not None and state_BS.numel() and not torch.isfinite(state_BS).all():
            raise ValueError("state contains NaN or inf")
        if self.task_encoder is not None and (tokens_BL is None or tokens_BL.shape[0] != B):
            raise ValueError(f"this policy reads a task instruction: pass one per row (B={B}); vocabulary: "
                             f"{' '.join(c.task_vocab)}")

    def forward(self, frames_BKHWC: torch.Tensor, state_BS: torch.Tensor | None = None,
                tokens_BL: torch.Tensor | None = None) -> torch.Tensor:
        """Actions [B, A] in [action_low, action_high]. ``tokens_BL`` (from ``tokenize``) is ignored
        by a policy without task input."""
        return self._forward(frames_BKHWC, state_BS, tokens_BL, estimate=False)[0]

    def _forward(self, frames_BKHWC: torch.Tensor, state_BS: torch.Tensor | None,
                 tokens_BL: torch.Tensor | None, *, estimate: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(actions [B, A], the auxiliary head's normalised estimate [B, X]; None without the head or
        when ``estimate`` is False and the action head does not read it)."""
        self._check(frames_BKHWC, state_BS, tokens_BL)
        B, K, H, W, C = frames_BKHWC.shape
        x = frames_BKHWC.permute(0, 1, 4, 2, 3).reshape(B, K * C, H, W).float() / 127.5 - 1.0
        if self.training and self.config.shift:
            x = random_shift(x, self.config.shift)
        feat_BCHW = self.encoder(x)
        parts = []
        if self.state_mlp is not None:
            parts.append(self.state_mlp(self.state_norm(state_BS.to(x.device, torch.float32))))
        if self.task_encoder is not None:
            task_BD = self.task_encoder(tokens_BL.to(x.device))
            gamma, beta = self.film(task_BD)[:, :, None, None].chunk(2, dim=1)
            feat_BCHW = feat_BCHW * (1 + gamma) + beta
            parts.append(task_BD)
        feat_BD = feat_BCHW.flatten(1)
        wanted = self.aux_head is not None and (estimate or self.config.aux_input)
        aux_BX = self.aux_head(feat_BD) if wanted else None  # normalised, like its targets
        if self.config.aux_input and aux_BX is not None:
            parts.append(aux_BX.detach())
        raw_BA = self.head(torch.cat([feat_BD, *parts], dim=1))
        return self.action_low + (self.action_high - self.action_low) * torch.sigmoid(raw_BA), aux_BX

    def _tokens(self, tasks: Sequence[str] | None, batch: int) -> torch.Tensor | None:
        if self.task_encoder is None:
            return None
        if tasks is None or isinstance(tasks, str) or len(tasks) != batch:
            raise ValueError(f"this policy reads a task instruction: pass tasks, a list of {batch} sentences "
                             f"(vocabulary: {' '.join(self.config.task_vocab)}); got {tasks!r}")
        return self.tokenize(list(tasks))

    def loss(self, frames_BKHWC: torch.Tensor, target_BA: torch.Tensor, state_BS: torch.Tensor | None = None,
             tasks: Sequence[str] | None = None, aux_BX: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted smooth-L1 between predicted and target actions (rows with NaN labels are an error),
        plus ``aux_weight`` times the auxiliary head's smooth-L1 on ``aux_BX`` when both are given."""
        A = self.config.action_dim
        if target_BA.ndim != 2 or target_BA.shape[1] != A or target_BA.shape[0] != frames_BKHWC.shape[0]:
            raise ValueError(f"target must be [B, {A}] with B={frames_BKHWC.shape[0]}, got {tuple(target_BA.shape)}")
        if torch.isnan(target_BA).any():
            raise ValueError("target actions contain NaN; filter unlabeled rows before training")
        pred_BA, est_BX = self._forward(frames_BKHWC, state_BS, self._tokens(tasks, frames_BKHWC.shape[0]))
        w = torch.tensor(self.config.loss_weights or (1.0,) * A, dtype=pred_BA.dtype, device=pred_BA.device)
        per = F.smooth_l1_loss(pred_BA, target_BA.to(pred_BA), reduction="none", beta=0.1)
        loss = (per * w).sum(dim=1).mean() / w.sum()
        if self.aux_head is None or aux_BX is None:
            return loss
        if tuple(aux_BX.shape) != (len(est_BX), self.config.aux_dim):
            raise ValueError(f"aux targets must be [{len(est_BX)}, {self.config.aux_dim}], got {tuple(aux_BX.shape)}")
        aux_BX = aux_BX.to(est_BX)
        ok_B = torch.isfinite(aux_BX).all(dim=1)
        target_BX = torch.zeros_like(aux_BX)
        if ok_B.any():  # the running norm learns from finite rows only
            target_BX[ok_B] = self.aux_norm(aux_BX[ok_B])
        per_B = F.smooth_l1_loss(est_BX, target_BX, reduction="none", beta=0.1).mean(dim=1)
        aux = (per_B * ok_B).sum() / ok_B.sum().clamp_min(1)  # the head is always in the graph (DDP)
        return loss + self.config.aux_weight * aux

    @torch.no_grad()
    def act(self, frames_BKHWC: np.ndarray, state_BS: np.ndarray | None = None,
            tasks: Sequence[str] | None = None) -> np.ndarray:
        """Inference on uint8 frames [B, K, H, W, 3] (+ state [B, S], + one task sentence per row);
        returns float32 actions [B, A] within the bounds. ``tasks`` is ignored without task input."""
        frames = np.asarray(frames_BKHWC)
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}")
        device = self.device
        state = None if state_BS is None else torch.as_tensor(np.asarray(state_BS, np.float32), device=device)
        was_training = self.training
        self.eval()
        try:
            x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
            out = self(x, state, self._tokens(tasks, len(frames)) if frames.ndim == 5 else None)
        finally:
            self.train(was_training)
        return out.cpu().numpy().astype(np.float32)


def save(policy: Policy, directory: str | os.PathLike) -> str:
    """Write model.safetensors + config.json to a local directory; returns it."""
    return checkpoint.save(policy, directory)


def load(directory: str | os.PathLike, *, device: str = "cpu") -> Policy:
    """Load a policy saved by `save` from a local directory (eval mode)."""
    return checkpoint.load(Policy, config_from_dict, directory, device=device, what="policy")
