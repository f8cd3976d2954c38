"""Action-conditioned world model: the next frame from the last K frames, the action taken and,
optionally, the task instruction.

A small diffusion generator built from diffusers blocks, following
* EDM (Karras et al. 2022): Karras preconditioning (c_skip, c_out, c_in, c_noise), loss weighted
  to unit variance of the network target, the rho-spaced sigma schedule and the Euler sampler;
* DIAMOND (Alonso et al. 2024): EDM for world modelling with the K context frames stacked on the
  channel axis beside the noisy target, the action added to the noise-level embedding, and
  few-step sampling (sigma_max 5, sigma_min 2e-3, rho 7). The training noise-level distribution
  is shifted: a share of samples sits exactly at sigma_max, where 1-step sampling evaluates
  the denoiser (the lognormal rarely visits it);
* GameNGen (Valevski et al. 2024): Gaussian noise augmentation of the context frames during
  training, with its level given to the network, so autoregressive rollouts survive their own
  errors; as in Diffusion Forcing (Chen et al. 2024) every context frame draws its own level,
  so the network learns to trust recent and old frames by how clean each is;
* Cosmos 3's reasoner-instructs-generator split: with ``condition_dim`` the generator also reads a
  conditioning vector, the hidden state h[t] of the autoregressive reasoner
  (``models.dynamics.Dynamics``: ``Prediction.condition``) over the same window, which carries
  what frames alone do not show (the logged state, the task, the longer past);
* Cosmos (NVIDIA 2025) framing: a world model is f(past frames, action) -> future frames that is
  post-trained on domain data and doubles as a neural simulator (`rollout`).

By default the diffused quantity is the scaled change from the last context frame,
(next - last) / delta_scale, not the frame itself: an untrained denoiser then starts at the
copy-last-frame baseline, which on a few minutes of CPU training matters (frames change little per
step; the scale brings the change to DIAMOND's sigma_data). The change is taken from the
noise-augmented last frame the network sees, so it learns to clean its context, as it must in
rollouts fed its own output. delta_scale=None diffuses whole frames.

The denoiser (``Denoiser``) is a U-Net assembled from diffusers blocks that starts at full
resolution, as the regressor baseline of ``benchmarks/bench_world_model.py`` does: a 3x3 stem over
the K context frames and the noisy target stacked on channels, a ``ResnetBlock2D`` per level (time
embedding as scale and shift) with ``Downsample2D`` between levels, ``UNetMidBlock2D`` (with
self-attention when ``attention``), ``Upsample2D`` and skip concatenation back up, and a
zero-initialised output conv. The action (and the K context-noise levels, the task embedding when
``task_vocab`` is set and the reasoner's conditioning vector when ``condition_dim`` is) go through
a small MLP and are added to the time embedding. On a CPU it learns faster than diffusers'
``UNet2DModel`` over 2x-unshuffled frames, which it replaced (one-step MSE after 60 s: 46.3
against 74.4, copy-last 78.2; the probe: benchmarks/README.md, "Full-resolution denoiser"). The task
embedding comes from ``models.text.TaskEncoder`` (word-level tokens, a one-layer BERT trained
from scratch, mean-pooled), shared with the policy. EDM's c_noise = ln(sigma)/4 is scaled x1000
before diffusers' sinusoidal embedding, whose frequencies assume timesteps in the 1000s.

The network sees the noisy target scaled by its signal share, c_in * x * sigma_data^2 /
(sigma_data^2 + sigma^2): at sigma_max (where 1-step sampling evaluates it) x_sigma holds 1 % of
signal, and a full-scale noise input only slows learning; at small sigma it passes almost
unchanged.

Alignment: history = frames o[t-K+1..t] (oldest first), action = a[t] (applied at o[t]),
target = o[t+1]. Frames are uint8 HWC RGB; actions float [A] in the world's own units and order
(``action_dim`` = A, set from the world's spec); tasks one instruction sentence per row.
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
class WorldModelConfig:
    """Architecture, EDM noise levels, sampling and training hyper-parameters."""

    image_size: int = 64
    history: int = 4  # K context frames, oldest first
    action_dim: int = 3  # A, the width of the world's action vector
    channels: tuple[int, ...] = (16, 32, 64)  # widths, one resolution level each, the first at full size
    layers: int = 1  # ResNet blocks per level
    attention: bool = False  # self-attention in the mid block (lowest resolution)
    norm_groups: int = 8  # GroupNorm groups; keep several channels per group, or per-sample offsets vanish
    unshuffle: int = 1  # pixel_unshuffle factor before the network (1: full resolution)
    delta_scale: float | None = 0.15  # diffuse (next - last) / delta_scale; None: the next frame itself
    # EDM / DIAMOND noise levels of the diffused variable (frames are normalised to [-1, 1])
    sigma_data: float = 0.5
    sigma_min: float = 2e-3
    sigma_max: float = 5.0
    rho: float = 7.0
    train_sigma_mean: float = -0.4  # lognormal training distribution of sigma
    train_sigma_std: float = 1.2
    train_sigma_max_prob: float = 0.5  # share of training samples at exactly sigma_max (1-step sampling)
    context_noise_max: float = 0.1  # GameNGen augmentation: context sigma ~ U(0, max) in training
    sampling_steps: int = 1
    # task conditioning: lower-case words of the world's task instructions; () = none
    task_vocab: tuple[str, ...] = ()
    task_hidden: int = 32
    task_max_len: int = 32  # tokens kept per instruction
    condition_dim: int = 0  # width of the reasoner's conditioning vector (models.dynamics embed); 0: none
    # training recipe (used by the post-training stage / recipe scripts)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 16
    steps: int = 400  # about 3 minutes on 2 CPU cores

    def __post_init__(self) -> None:
        if self.history < 1 or self.action_dim < 1 or self.layers < 1 or not self.channels:
            raise ValueError("history, action_dim, layers must be >= 1 and channels non-empty")
        factor = self.unshuffle * 2 ** (len(self.channels) - 1)
        if self.unshuffle < 1 or self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by unshuffle * 2**(levels-1) "
                             f"= {factor}")
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"channels {self.channels} must be multiples of norm_groups {self.norm_groups}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.delta_scale is not None and self.delta_scale <= 0:
            raise ValueError(f"delta_scale must be positive or None, got {self.delta_scale}")
        if self.sampling_steps < 1:
            raise ValueError(f"sampling_steps must be >= 1, got {self.sampling_steps}")
        if self.task_hidden < 1 or self.task_max_len < 1 or self.condition_dim < 0:
            raise ValueError("task_hidden and task_max_len must be >= 1 and condition_dim >= 0")
        check_vocab(self.task_vocab)


_DEFAULT = WorldModelConfig()
_TINY = dataclasses.replace(_DEFAULT, channels=(8, 16), norm_groups=2, batch_size=4,
                            steps=50)
_GPU = dataclasses.replace(_DEFAULT, channels=(64, 128, 256, 256), layers=2, attention=True, norm_groups=16, batch_size=128,
                           lr=3e-4, steps=50_000, train_sigma_max_prob=0.2, sampling_steps=3)
PRESETS = {"tiny": _TINY, "default": _DEFAULT, "gpu": _GPU}


def preset(name: str) -> WorldModelConfig:
    """Named config: "tiny" (tests), "default" (CPU demo), "gpu"."""
    return checkpoint.preset(PRESETS, name, "world-model")


def config_from_dict(d: dict) -> WorldModelConfig:
    """Rebuild a config from its JSON form (lists back to tuples; unknown keys are an error; missing
    keys take their defaults, so older checkpoints load)."""
    return checkpoint.config_from_dict(WorldModelConfig, d)


def _to_tensor(x: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, bool]:
    """(tensor, was_numpy) for a torch tensor or anything numpy can read."""
    if isinstance(x, torch.Tensor):
        return x, False
    return torch.from_numpy(np.ascontiguousarray(x)), True


def _normalise(frames_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1]."""
    return frames_uint8.movedim(-1, -3).float() / 127.5 - 1.0


def _to_uint8(x_BCHW: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((x_BCHW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(1, -1)


class Denoiser(nn.Module):
    """The U-Net F of ``WorldModel`` (module doc) from diffusers blocks: stem at full size, one level per
    width with ``layers`` ResNet blocks, skips concatenated on the way up, zero-initialised output."""

    def __init__(self, in_ch: int, out_ch: int, widths: tuple[int, ...], layers: int, emb_dim: int, groups: int,
                 attention: bool) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

        def res(cin: int, cout: int) -> nn.Module:
            return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=emb_dim, groups=groups,
                                 time_embedding_norm="scale_shift")

        self.time_proj = Timesteps(widths[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(widths[0], emb_dim)
        self.stem = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        self.down, self.downsample, self.up, self.upsample = (nn.ModuleList() for _ in range(4))
        prev = widths[0]
        for i, w in enumerate(widths):
            self.down.append(nn.ModuleList([res(prev if j == 0 else w, w) for j in range(layers)]))
            prev = w
            if i < len(widths) - 1:
                self.downsample.append(Downsample2D(w, use_conv=True, name="op"))  # "conv" aliases it twice
        self.mid = UNetMidBlock2D(prev, emb_dim, num_layers=int(attention), add_attention=attention,
                                  resnet_groups=groups, resnet_time_scale_shift="scale_shift",
                                  attention_head_dim=min(32, prev))
        for w in reversed(widths[:-1]):
            self.upsample.append(Upsample2D(prev, use_conv=True))
            self.up.append(nn.ModuleList([res(prev + w if j == 0 else w, w) for j in range(layers)]))
            prev = w
        self.norm_out = nn.GroupNorm(groups, prev)
        self.conv_out = nn.Conv2d(prev, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_BCHW: torch.Tensor, timestep_B: torch.Tensor, cond_BE: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(self.time_proj(timestep_B).to(x_BCHW.dtype)) + cond_BE
        h, skips = self.stem(x_BCHW), []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            if i < len(self.downsample):
                skips.append(h)
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for upsample, blocks in zip(self.upsample, self.up):
            h = torch.cat([upsample(h), skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class WorldModel(nn.Module):
    """EDM denoiser D(x_sigma; sigma, context frames, action[, task]) and its few-step sampler."""

    def __init__(self, config: WorldModelConfig) -> None:
        super().__init__()
        self.config = c = config
        r2 = c.unshuffle ** 2
        emb_dim = 2 * c.channels[-1]
        self.net = Denoiser(3 * (c.history + 1) * r2, 3 * r2, c.channels, c.layers, emb_dim, c.norm_groups,
                            c.attention)
        self.task_encoder = TaskEncoder(c.task_vocab, c.task_hidden, c.task_max_len) if c.task_vocab else None
        task_dim = c.task_hidden if c.task_vocab else 0
        self.cond_mlp = nn.Sequential(nn.Linear(c.action_dim + c.history + task_dim + c.condition_dim, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- input checks -------------------------------------------------------------------------

    def _check_frames(self, frames: torch.Tensor, name: str, lead: str, ndim: int) -> None:
        c = self.config
        if frames.dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8 frames, got {frames.dtype}")
        if frames.ndim != ndim or tuple(frames.shape[-3:]) != (c.image_size, c.image_size, 3):
            raise ValueError(f"{name} must be [{lead}, {c.image_size}, {c.image_size}, 3], "
                             f"got {tuple(frames.shape)}")

    def _check_history(self, history_BKHWC: torch.Tensor) -> None:
        self._check_frames(history_BKHWC, "history", f"B, {self.config.history}", 5)
        if history_BKHWC.shape[1] != self.config.history:
            raise ValueError(f"history must hold {self.config.history} frames, got {history_BKHWC.shape[1]}")

    def _check_actions(self, actions: torch.Tensor, batch: int, ndim: int) -> torch.Tensor:
        if actions.ndim != ndim or actions.shape[0] != batch or actions.shape[-1] != self.config.action_dim:
            lead = "B" if ndim == 2 else "B, T"
            raise ValueError(f"actions must be [{lead}, {self.config.action_dim}] with B={batch}, "
                             f"got {tuple(actions.shape)}")
        actions = actions.to(self.device, torch.float32)
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN or inf")
        return actions

    def embed_tasks(self, tasks: Sequence[str] | None, batch: int) -> torch.Tensor | None:
        """Task embeddings [B, task_hidden] of one instruction per row; None for a model without task
        input (which ignores ``tasks``). Missing tasks are an error when the model reads them."""
        if self.task_encoder is None:
            return None
        return self.task_encoder.encode(tasks, batch, self.device)

    def _extra(self, tasks: Sequence[str] | None, condition_BD, batch: int) -> list[torch.Tensor]:
        """What besides the action and noise levels goes into the conditioning MLP: the task
        embedding and the reasoner's vector, each where the config reads it (and required there)."""
        c, extra = self.config, []
        task = self.embed_tasks(tasks, batch)
        if task is not None:
            extra.append(task)
        if c.condition_dim:
            if condition_BD is None:
                raise ValueError(f"this generator reads the reasoner's conditioning vector [B, {c.condition_dim}]: "
                                 "pass condition (sim.neural.NeuralSim pairs it with its dynamics model)")
            cond = _to_tensor(condition_BD)[0].to(self.device, torch.float32)
            if cond.shape != (batch, c.condition_dim) or not torch.isfinite(cond).all():
                raise ValueError(f"condition must be finite [{batch}, {c.condition_dim}], got {tuple(cond.shape)}")
            extra.append(cond)
        return extra

    # ---- EDM denoiser -------------------------------------------------------------------------

    def _network(self, x_in_BCHW: torch.Tensor, sigma_B: torch.Tensor, context_BKCHW: torch.Tensor,
                 action_BA: torch.Tensor, context_sigma_BK: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
        """F_theta on the preconditioned input c_in * x_sigma (full resolution in and out)."""
        r, sd = self.config.unshuffle, self.config.sigma_data
        signal_share = (sd ** 2 / (sd ** 2 + sigma_B ** 2))[:, None, None, None]
        stacked = torch.cat([context_BKCHW.flatten(1, 2), x_in_BCHW * signal_share], dim=1)
        c_noise_B = 1000.0 * sigma_B.log() / 4  # EDM's ln(sigma)/4, scaled for sinusoidal embeddings
        cond = self.cond_mlp(torch.cat([action_BA, context_sigma_BK, *extra], dim=1))
        return F.pixel_shuffle(self.net(F.pixel_unshuffle(stacked, r), c_noise_B, cond), r)

    def _frame_to_x(self, frame_BCHW: torch.Tensor, context_BKCHW: torch.Tensor) -> torch.Tensor:
        """The diffused variable: the frame, or its scaled change from the last context frame."""
        s = self.config.delta_scale
        return frame_BCHW if s is None else (frame_BCHW - context_BKCHW[:, -1]) / s

    def _x_to_frame(self, x_BCHW: torch.Tensor, context_BKCHW: torch.Tensor) -> torch.Tensor:
        s = self.config.delta_scale
        return x_BCHW if s is None else context_BKCHW[:, -1] + s * x_BCHW

    def _precondition(self, sigma_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EDM's (c_skip, c_out, c_in) as [B, 1, 1, 1]."""
        sd = self.config.sigma_data
        s = sigma_B[:, None, None, None]
        denom = (s ** 2 + sd ** 2).sqrt()
        return sd ** 2 / denom ** 2, s * sd / denom, 1 / denom

    def denoise(self, x_BCHW: torch.Tensor, sigma_B: torch.Tensor, context_BKCHW: torch.Tensor,
                action_BA: torch.Tensor, context_sigma_BK: torch.Tensor | None = None,
                tasks: Sequence[str] | None = None, condition_BD=None) -> torch.Tensor:
        """D(x_sigma) = c_skip x + c_out F(c_in x): the denoised estimate of the diffused variable;
        ``context_sigma_BK`` the noise level of each context frame (None: clean)."""
        return self._denoise(x_BCHW, sigma_B, context_BKCHW, action_BA, context_sigma_BK,
                             self._extra(tasks, condition_BD, x_BCHW.shape[0]))

    def _denoise(self, x_BCHW: torch.Tensor, sigma_B: torch.Tensor, context_BKCHW: torch.Tensor,
                 action_BA: torch.Tensor, context_sigma_BK: torch.Tensor | None,
                 extra: list[torch.Tensor]) -> torch.Tensor:
        if context_sigma_BK is None:
            context_sigma_BK = sigma_B.new_zeros(sigma_B.shape[0], self.config.history)
        c_skip, c_out, c_in = self._precondition(sigma_B)
        return c_skip * x_BCHW + c_out * self._network(c_in * x_BCHW, sigma_B, context_BKCHW, action_BA,
                                                       context_sigma_BK, extra)

    def sigmas(self, steps: int) -> torch.Tensor:
        """Karras rho-spaced noise levels from sigma_max down to sigma_min, then 0: [steps + 1]."""
        c = self.config
        ramp = torch.linspace(0, 1, steps)
        lo, hi = c.sigma_min ** (1 / c.rho), c.sigma_max ** (1 / c.rho)
        return torch.cat([(hi + ramp * (lo - hi)) ** c.rho, torch.zeros(1)])

    def sample_sigma(self, batch: int) -> torch.Tensor:
        """Training noise levels: clamped lognormal, with a share exactly at sigma_max."""
        c = self.config
        sigma = (c.train_sigma_mean + c.train_sigma_std * torch.randn(batch, device=self.device)).exp()
        at_max = torch.rand(batch, device=self.device) < c.train_sigma_max_prob
        return torch.where(at_max, torch.full_like(sigma, c.sigma_max), sigma).clamp(c.sigma_min, c.sigma_max)

    def loss(self, history_BKHWC: torch.Tensor, action_BA: torch.Tensor, target_BHWC: torch.Tensor,
             tasks: Sequence[str] | None = None, condition_BD=None) -> torch.Tensor:
        """EDM denoising loss (MSE on the network's unit-variance target) for one batch of transitions;
        ``tasks`` (one instruction per row) is required when the model reads tasks, ``condition_BD``
        (the reasoner's vector over the same window) when it reads one; else they are ignored."""
        history, _ = _to_tensor(history_BKHWC)
        target, _ = _to_tensor(target_BHWC)
        action, _ = _to_tensor(action_BA)
        self._check_history(history)
        self._check_frames(target, "target", "B", 4)
        B, K = history.shape[:2]
        if target.shape[0] != B:
            raise ValueError(f"target batch {target.shape[0]} does not match history batch {B}")
        action = self._check_actions(action, B, 2)
        extra = self._extra(tasks, condition_BD, B)
        context = _normalise(history.to(self.device))
        context_sigma = torch.rand(B, K, device=self.device) * self.config.context_noise_max  # per frame
        context = context + context_sigma[:, :, None, None, None] * torch.randn_like(context)
        x0 = self._frame_to_x(_normalise(target.to(self.device)), context)  # from the noisy last frame
        sigma = self.sample_sigma(B)
        noisy = x0 + sigma[:, None, None, None] * torch.randn_like(x0)
        c_skip, c_out, c_in = self._precondition(sigma)
        out = self._network(c_in * noisy, sigma, context, action, context_sigma, extra)
        return F.mse_loss(out, (x0 - c_skip * noisy) / c_out)

    # ---- sampling -----------------------------------------------------------------------------

    def _sample(self, context_BKCHW: torch.Tensor, action_BA: torch.Tensor, steps: int,
                generator: torch.Generator | None, extra: list[torch.Tensor]) -> torch.Tensor:
        """Euler sampler (EDM Alg. 1 without churn) -> normalised next frame [B, 3, H, W]."""
        B, _, C, H, W = context_BKCHW.shape
        sigmas = self.sigmas(steps).to(self.device)
        x = sigmas[0] * torch.randn((B, C, H, W), generator=generator, device=self.device)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            denoised = self._denoise(x, s.expand(B), context_BKCHW, action_BA, None, extra)
            x = x + (x - denoised) / s * (s_next - s)
        return self._x_to_frame(x, context_BKCHW)

    def _steps(self, steps: int | None) -> int:
        steps = self.config.sampling_steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return steps

    @torch.no_grad()
    def predict(self, history_BKHWC: torch.Tensor | np.ndarray, action_BA: torch.Tensor | np.ndarray,
                steps: int | None = None, generator: torch.Generator | None = None,
                tasks: Sequence[str] | None = None, condition_BD=None) -> torch.Tensor | np.ndarray:
        """Next frame uint8 [B, H, W, 3] (numpy in -> numpy out; torch in -> torch on the model's device).
        `generator` (on the model's device) makes the sampling noise reproducible; `tasks` and
        `condition_BD` as in `loss`."""
        history, as_numpy = _to_tensor(history_BKHWC)
        self._check_history(history)
        action = self._check_actions(_to_tensor(action_BA)[0], history.shape[0], 2)
        extra = self._extra(tasks, condition_BD, history.shape[0])
        context = _normalise(history.to(self.device))
        frame = _to_uint8(self._sample(context, action, self._steps(steps), generator, extra))
        return frame.cpu().numpy() if as_numpy else frame

    @torch.no_grad()
    def rollout(self, history_BKHWC: torch.Tensor | np.ndarray, actions_BTA: torch.Tensor | np.ndarray,
                steps: int | None = None, generator: torch.Generator | None = None,
                tasks: Sequence[str] | None = None) -> torch.Tensor | np.ndarray:
        """Autoregressive frames uint8 [B, T, H, W, 3], each fed back (quantised) as context for the next;
        `tasks` (one instruction per row, fixed over the rollout) as in `loss`. A generator that reads
        the reasoner's vector needs the reasoner at every step: roll it out with
        ``sim.neural.NeuralSim`` instead."""
        if self.config.condition_dim:
            raise ValueError("this generator reads the reasoner's conditioning vector at every step: roll it out "
                             "with sim.neural.NeuralSim, which runs its dynamics model beside it")
        history, as_numpy = _to_tensor(history_BKHWC)
        self._check_history(history)
        actions = self._check_actions(_to_tensor(actions_BTA)[0], history.shape[0], 3)
        if actions.shape[1] < 1:
            raise ValueError("actions must hold at least one step")
        extra = self._extra(tasks, None, history.shape[0])
        steps = self._steps(steps)
        context = _normalise(history.to(self.device))
        frames = []
        for t in range(actions.shape[1]):
            frame = _to_uint8(self._sample(context, actions[:, t], steps, generator, extra))
            frames.append(frame)
            context = torch.cat([context[:, 1:], _normalise(frame)[:, None]], dim=1)
        out = torch.stack(frames, dim=1)
        return out.cpu().numpy() if as_numpy else out

    def make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW with the config's learning rate and weight decay."""
        return torch.optim.AdamW(self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)


# ---- checkpoints --------------------------------------------------------------------------------


def save(model: WorldModel, directory: str | os.PathLike) -> str:
    """Write model.safetensors + config.json to a local directory; returns it."""
    return checkpoint.save(model, directory)


def load(directory: str | os.PathLike, *, device: str = "cpu") -> WorldModel:
    """Load a world model saved by `save` (or real pretrained weights laid out the same way) from a
    local directory; returned in eval mode."""
    return checkpoint.load(WorldModel, config_from_dict, directory, device=device, what="world-model")


# ---- evaluation ---------------------------------------------------------------------------------


def copy_last_baseline(history_BKHWC: torch.Tensor | np.ndarray, horizon: int) -> torch.Tensor | np.ndarray:
    """The trivial predictor: the last context frame repeated `horizon` times -> [B, T, H, W, 3]."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    last = history_BKHWC[:, -1:]
    if isinstance(last, np.ndarray):
        return np.repeat(last, horizon, axis=1)
    return last.repeat_interleave(horizon, dim=1)


def _ssim_N(x_NCHW: torch.Tensor, y_NCHW: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, 'valid') on [0, 255]."""
    size = min(11, x_NCHW.shape[-1], x_NCHW.shape[-2])
    g = torch.exp(-((torch.arange(size) - (size - 1) / 2) ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    C = x_NCHW.shape[1]
    window = (g[:, None] * g[None, :]).expand(C, 1, size, size).to(x_NCHW)
    blur = lambda z: F.conv2d(z, window, groups=C)  # noqa: E731
    mx, my = blur(x_NCHW), blur(y_NCHW)
    vx, vy, cxy = blur(x_NCHW ** 2) - mx ** 2, blur(y_NCHW ** 2) - my ** 2, blur(x_NCHW * y_NCHW) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return ssim.mean(dim=(1, 2, 3))


def frame_metrics(pred_BTHWC: torch.Tensor | np.ndarray, true_BTHWC: torch.Tensor | np.ndarray) -> dict:
    """Per-horizon image metrics of predicted vs true uint8 frames [B, T, H, W, 3].

    Returns {"horizon": [1..T], "mse": [...], "psnr": [...] (dB, from the MSE averaged over the
    batch at that horizon, so identical frames do not make it infinite), "ssim": [...] (mean
    per-frame SSIM)}; lists of Python floats, one per horizon.
    """
    pred = _to_tensor(pred_BTHWC)[0].detach().cpu()
    true = _to_tensor(true_BTHWC)[0].detach().cpu()
    if pred.shape != true.shape or pred.ndim != 5 or pred.shape[-1] != 3:
        raise ValueError(f"pred and true must both be [B, T, H, W, 3], got {tuple(pred.shape)} and "
                         f"{tuple(true.shape)}")
    if pred.dtype != torch.uint8 or true.dtype != torch.uint8:
        raise ValueError(f"pred and true must be uint8 frames, got {pred.dtype} and {true.dtype}")
    B, T = pred.shape[:2]
    p, t = pred.float(), true.float()
    mse_T = ((p - t) ** 2).mean(dim=(0, 2, 3, 4))
    psnr_T = 10 * torch.log10(255.0 ** 2 / mse_T.clamp_min(1e-10))
    ssim_T = _ssim_N(p.flatten(0, 1).movedim(-1, 1), t.flatten(0, 1).movedim(-1, 1)).view(B, T).mean(0)
    return {"horizon": list(range(1, T + 1)), "mse": mse_T.tolist(), "psnr": psnr_T.tolist(),
            "ssim": ssim_T.tolist()}


def rollout_metrics(model: WorldModel, history_BKHWC: torch.Tensor | np.ndarray,
                    actions_BTA: torch.Tensor | np.ndarray, future_BTHWC: torch.Tensor | np.ndarray,
                    steps: int | None = None, generator: torch.Generator | None = None,
                    tasks: Sequence[str] | None = None) -> dict:
    """Open-loop rollout of the logged actions scored against the logged future, beside copy-last-frame:
    {"model": frame_metrics, "copy_last": frame_metrics, "sampling_steps": n}."""
    pred = model.rollout(history_BKHWC, actions_BTA, steps=steps, generator=generator, tasks=tasks)
    future = _to_tensor(future_BTHWC)[0]
    baseline = copy_last_baseline(_to_tensor(history_BKHWC)[0], future.shape[1])
    return {"model": frame_metrics(pred, future), "copy_last": frame_metrics(baseline, future),
            "sampling_steps": model._steps(steps)}
