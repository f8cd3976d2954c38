"""Pixels-to-action driving policy: a small CNN over a stack of the last K frames.

The design follows the classic end-to-end driving nets (NVIDIA PilotNet, Bojarski et al. 2016;
the Atari DQN encoder, Mnih et al. 2015): a 2x space-to-depth (pixel unshuffle, a large CPU
speed-up) then strided convolutions over stacked RGB frames (frame
history gives the net motion, hence speed), a small MLP head, steer squashed by tanh to [-1, 1]
and gas/brake by a sigmoid to [0, 1], trained by behaviour cloning (per-channel weighted
smooth-L1 on the squashed outputs). Training hyper-parameters live beside the architecture so
the resolved config saved with a checkpoint says how it was made.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class PolicyConfig:
    """Architecture and behaviour-cloning hyper-parameters of the driving policy."""

    image_size: int = 64
    history: int = 3  # K frames stacked on channels, oldest first
    channels: tuple[int, ...] = (32, 64, 128)  # one stride-2 conv per entry, after a 2x space-to-depth
    hidden: int = 256
    dropout: float = 0.1
    loss_weights: tuple[float, float, float] = (2.0, 1.0, 1.0)  # steer, gas, brake
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


_DEFAULT = PolicyConfig()
_TINY = dataclasses.replace(_DEFAULT, image_size=32, history=2, channels=(8, 16), hidden=32, dropout=0.0,
                            batch_size=16, steps=50)
_GPU = dataclasses.replace(_DEFAULT, channels=(64, 128, 256), hidden=512, batch_size=512, steps=20000)
PRESETS = {"tiny": _TINY, "default": _DEFAULT, "gpu": _GPU}


def preset(name: str) -> PolicyConfig:
    """Named config: "tiny" (tests), "default" (CPU demo), "gpu"."""
    if name not in PRESETS:
        raise ValueError(f"unknown policy preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


def config_from_dict(d: dict) -> PolicyConfig:
    """Rebuild a config from its JSON form (lists back to tuples; unknown keys are an error)."""
    names = {f.name for f in dataclasses.fields(PolicyConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown PolicyConfig fields: {sorted(unknown)}")
    return PolicyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class Policy(nn.Module):
    """CNN policy: uint8 frames [B, K, H, W, 3] -> action [B, 3] = (steer, gas, brake)."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        blocks, c_in = [nn.PixelUnshuffle(2)], 4 * 3 * config.history  # space-to-depth: cheap on CPU
        for c_out in config.channels:
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.SiLU()]
            c_in = c_out
        self.encoder = nn.Sequential(*blocks)
        side = config.image_size // 2 ** (len(config.channels) + 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(config.dropout),
                                  nn.Linear(c_in * side * side, config.hidden), nn.SiLU(),
                                  nn.Dropout(config.dropout), nn.Linear(config.hidden, 3))

    def _check(self, frames_BKHWC: torch.Tensor) -> None:
        c = self.config
        want = (c.history, c.image_size, c.image_size, 3)
        if frames_BKHWC.ndim != 5 or tuple(frames_BKHWC.shape[1:]) != want:
            raise ValueError(f"frames must be [B, {', '.join(map(str, want))}], got {tuple(frames_BKHWC.shape)}")

    def forward(self, frames_BKHWC: torch.Tensor) -> torch.Tensor:
        self._check(frames_BKHWC)
        B, K, H, W, C = frames_BKHWC.shape
        x = frames_BKHWC.permute(0, 1, 4, 2, 3).reshape(B, K * C, H, W).float() / 127.5 - 1.0
        raw_B3 = self.head(self.encoder(x))
        return torch.cat([torch.tanh(raw_B3[:, :1]), torch.sigmoid(raw_B3[:, 1:])], dim=1)

    def loss(self, frames_BKHWC: torch.Tensor, target_B3: torch.Tensor) -> torch.Tensor:
        """Weighted smooth-L1 between predicted and target actions (rows with NaN labels are an error)."""
        if torch.isnan(target_B3).any():
            raise ValueError("target actions contain NaN; filter unlabeled rows before training")
        pred_B3 = self(frames_BKHWC)
        w = torch.tensor(self.config.loss_weights, dtype=pred_B3.dtype, device=pred_B3.device)
        per = F.smooth_l1_loss(pred_B3, target_B3.to(pred_B3.dtype), reduction="none", beta=0.1)
        return (per * w).sum(dim=1).mean() / w.sum()

    @torch.no_grad()
    def act(self, frames_BKHWC: np.ndarray) -> np.ndarray:
        """Inference on uint8 frames [B, K, H, W, 3]; returns float32 actions [B, 3]."""
        frames = np.asarray(frames_BKHWC)
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}")
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            out = self(torch.from_numpy(np.ascontiguousarray(frames)).to(device))
        finally:
            self.train(was_training)
        return out.cpu().numpy().astype(np.float32)


def save(policy: Policy, dir: str | os.PathLike, *, storage_options: dict | None = None) -> str:
    """Write model.safetensors + config.json to a local dir or an s3:// prefix; returns the location."""
    import pyarrow.fs as pafs

    from stages.storage import pyarrow_fs

    target = str(dir)
    fs, path = pyarrow_fs(target, storage_options)
    remote = not isinstance(fs, pafs.LocalFileSystem)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) if remote else Path(path)
        local.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
        save_file(state, str(local / WEIGHTS_NAME))
        (local / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(policy.config), indent=2))
        if remote:
            pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return target


def load(dir_or_uri: str | os.PathLike, *, storage_options: dict | None = None,
         device: str = "cpu") -> Policy:
    """Load a policy saved by `save` from a local dir or an s3:// prefix (eval mode)."""
    import pyarrow.fs as pafs

    from stages.storage import pyarrow_fs

    fs, path = pyarrow_fs(str(dir_or_uri), storage_options)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(path)
        if not isinstance(fs, pafs.LocalFileSystem):
            local = Path(tmp)
            pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        if not (local / CONFIG_NAME).is_file() or not (local / WEIGHTS_NAME).is_file():
            raise ValueError(f"{dir_or_uri} is not a policy checkpoint (needs {WEIGHTS_NAME} and {CONFIG_NAME})")
        config = config_from_dict(json.loads((local / CONFIG_NAME).read_text()))
        policy = Policy(config)
        policy.load_state_dict(load_file(str(local / WEIGHTS_NAME)))
    return policy.to(device).eval()
