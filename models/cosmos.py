"""A pretrained Cosmos world model behind the project's world-model interface, for users who have
the weights (tests build only tiny random versions; nothing is ever downloaded).

Follows NVIDIA Cosmos 3 as diffusers 0.42 ships it: ``Cosmos3OmniPipeline`` (one transformer,
``Cosmos3OmniTransformer``, that reads text tokens, Wan-VAE video latents (``AutoencoderKLWan``)
and action tokens, sampled with ``UniPCMultistepScheduler``), driven in the "forward_dynamics" mode
of ``CosmosActionCondition``: a first frame and a chunk of ``chunk_size`` raw actions of one
embodiment (``domain_name``, e.g. "pusht", "droid_lerobot", "av") in, the ``chunk_size + 1`` frames
of the chunk out. It is the one Cosmos class in diffusers with an action input:
``CosmosTransformer3DModel`` (Cosmos 1) and the Cosmos 2 / 2.5 video-to-world pipelines condition
on text and frames only.

The directory is a pipeline as ``Cosmos3OmniPipeline.save_pretrained`` writes it (the layout of the
released checkpoints): ``model_index.json`` and the ``transformer``, ``text_tokenizer``, ``vae`` and
``scheduler`` folders, loaded with ``local_files_only=True``. The settings that the weights do not
carry (embodiment, chunk size, sampling) are a ``CosmosConfig``, given to ``load`` or read from
``worldloop_cosmos.json`` beside the weights (``save_config`` writes it, resolved: the source and
the classes that were loaded).

What Cosmos 3 forward dynamics fixes, and this adapter therefore does:
* it conditions on one frame, so ``history = 1``: of a longer history only the last frame is read;
* actions are the embodiment's own raw vectors, so their width is the domain's (2 for "pusht"), not
  the project world's; the task sentence becomes the description in Cosmos' structured action prompt;
* frames are generated a chunk at a time: ``rollout`` runs chunk after chunk, each from the last
  frame generated; ``predict`` is a rollout of one step (the pipeline holds its action over the rest
  of the chunk, which a bidirectional model may read);
* the pipeline generates one sample per call, so a batch is a loop; frame sides must be multiples of
  the VAE's spatial factor (16) and fit the ``resolution_tier`` canvas, which is never upscaled;
* a checkpoint that enables NVIDIA's guardrail (``cosmos_guardrail``) needs that package to load;
  ``safety_checker=False`` turns it off where the model's licence allows.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline, CosmosActionCondition
from PIL import Image

from models import checkpoint

CONFIG_NAME = "worldloop_cosmos.json"
PIPELINE_INDEX = "model_index.json"
COMPONENTS = ("transformer", "text_tokenizer", "vae", "scheduler")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CosmosConfig:
    """How the pretrained model is driven (the user's settings) and what was loaded (set by `load`)."""

    domain_name: str  # the embodiment: picks the action projection and fixes the action width
    chunk_size: int  # actions per generated chunk; a multiple of the VAE's temporal factor (4)
    num_inference_steps: int = 35  # the pipeline's defaults from here on
    guidance_scale: float = 6.0  # classifier-free guidance; 1.0 skips the unconditional pass
    resolution_tier: int = 480  # 256 | 480 | 704 | 720: the conditioning canvas
    fps: float = 24.0
    prompt: str = ""  # the action description when no task is given
    view_point: str = "ego_view"
    dtype: str = "float32"  # "bfloat16" on an accelerator
    safety_checker: bool | None = None  # None: as the checkpoint's model_index.json says
    # resolved by `load`
    source: str = ""
    pipeline_class: str = ""
    transformer_class: str = ""
    vae_class: str = ""
    action_dim: int = 0

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.num_inference_steps < 1:
            raise ValueError("chunk_size and num_inference_steps must be >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")


def _action_width(domain_name: str) -> int:
    """The raw action width of an embodiment, as ``CosmosActionCondition`` resolves it (ValueError
    for a domain it does not know)."""
    probe = CosmosActionCondition(mode="policy", chunk_size=1, domain_name=domain_name,
                                  image=np.zeros((1, 1, 3), np.uint8))
    return int(probe.raw_action_dim)


def _transformer_config(local: Path, name: str) -> dict[str, Any]:
    """The transformer config of the Cosmos 3 pipeline saved in ``local``; clear errors naming it
    ``name``, before any weights are read, when the directory is not one."""
    if not (local / PIPELINE_INDEX).is_file():
        where = "" if local.is_dir() and any(local.iterdir()) else "does not exist or "
        raise ValueError(f"{name} {where}is not a diffusers pipeline directory (needs {PIPELINE_INDEX}, "
                         f"as save_pretrained writes it)")
    kind = json.loads((local / PIPELINE_INDEX).read_text()).get("_class_name")
    if kind != Cosmos3OmniPipeline.__name__:
        raise ValueError(f"{name} holds a {kind}, not a {Cosmos3OmniPipeline.__name__} (the Cosmos pipeline "
                         f"with action conditioning)")
    missing = [name for name in COMPONENTS if not (local / name).is_dir()]
    if missing:
        raise ValueError(f"{name} lacks the pipeline component(s) {missing}; needs {list(COMPONENTS)}")
    return json.loads((local / "transformer" / "config.json").read_text())


def load(directory: str | os.PathLike, *, source: str | None = None, device: str | torch.device = "cpu",
         **settings: Any) -> CosmosWorldModel:
    """The Cosmos 3 pipeline saved in a local ``directory``, driven by its ``worldloop_cosmos.json``
    (when there is one) updated with ``settings`` (``CosmosConfig`` fields). ``source`` is what the
    config records as where the weights came from (default: ``directory``)."""
    local, name = Path(directory), source or str(directory)
    transformer = _transformer_config(local, name)
    saved = json.loads((local / CONFIG_NAME).read_text()) if (local / CONFIG_NAME).is_file() else {}
    config = checkpoint.config_from_dict(CosmosConfig, {**saved, **settings})
    config = dataclasses.replace(config, action_dim=_action_width(config.domain_name))
    if not transformer.get("action_gen"):
        raise ValueError(f"{name}: the transformer was not trained with actions (action_gen is off)")
    if config.action_dim > transformer["action_dim"]:
        raise ValueError(f"domain {config.domain_name!r} has {config.action_dim}-wide actions, wider than the "
                         f"checkpoint's action head ({transformer['action_dim']})")
    overrides = {} if config.safety_checker is None else {"enable_safety_checker": config.safety_checker}
    pipeline = Cosmos3OmniPipeline.from_pretrained(local, local_files_only=True, dtype=getattr(torch, config.dtype),
                                                   **overrides)
    if config.chunk_size % pipeline.vae_scale_factor_temporal:
        raise ValueError(f"chunk_size {config.chunk_size} must be a multiple of the VAE's temporal factor "
                         f"{pipeline.vae_scale_factor_temporal}")
    config = dataclasses.replace(config, source=name, pipeline_class=type(pipeline).__name__,
                                 transformer_class=type(pipeline.transformer).__name__,
                                 vae_class=type(pipeline.vae).__name__)
    return CosmosWorldModel(pipeline.to(device), config)


def _numpy(x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, bool]:
    """(array, was_numpy) for a torch tensor or anything numpy can read."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy(), False
    return np.asarray(x), True


class CosmosWorldModel:
    """A loaded Cosmos 3 pipeline as a world model: next frames from the last frame and the actions."""

    history = 1  # frames Cosmos 3 forward dynamics conditions on

    def __init__(self, pipeline: Cosmos3OmniPipeline, config: CosmosConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        pipeline.set_progress_bar_config(disable=True)

    @property
    def action_dim(self) -> int:
        return self.config.action_dim

    def save_config(self, directory: str | os.PathLike) -> str:
        """Write the resolved config as ``worldloop_cosmos.json`` into a local directory; returns its path."""
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        return str(path)

    # ---- input checks -------------------------------------------------------------------------

    def _check_history(self, history: np.ndarray) -> None:
        if history.dtype != np.uint8 or history.ndim != 5 or history.shape[-1] != 3:
            raise ValueError(f"history must be uint8 [B, K, H, W, 3], got {history.dtype} {history.shape}")
        if history.shape[1] < self.history:
            raise ValueError(f"history must hold at least {self.history} frame(s), got {history.shape[1]}")
        factor = self.pipeline.vae_scale_factor_spatial
        if history.shape[2] % factor or history.shape[3] % factor:
            raise ValueError(f"frame sides {history.shape[2:4]} must be multiples of the VAE's spatial factor {factor}")

    def _check_actions(self, actions: np.ndarray, batch: int) -> np.ndarray:
        if actions.ndim != 3 or actions.shape[0] != batch or actions.shape[-1] != self.action_dim:
            raise ValueError(f"actions must be [B, T, {self.action_dim}] (domain {self.config.domain_name!r}) "
                             f"with B={batch}, got {actions.shape}")
        if actions.shape[1] < 1:
            raise ValueError("actions must hold at least one step")
        if not np.isfinite(actions).all():
            raise ValueError("actions contain NaN or inf")
        return actions.astype(np.float32)

    def _prompts(self, tasks: Sequence[str] | None, batch: int) -> list[str]:
        if tasks is None:
            return [self.config.prompt] * batch
        if isinstance(tasks, str) or len(tasks) != batch:
            raise ValueError(f"tasks must be a sequence of {batch} instruction(s), one per row")
        return [str(t) for t in tasks]

    # ---- sampling -----------------------------------------------------------------------------

    def _chunk(self, frame_HWC: np.ndarray, actions_TA: np.ndarray, prompt: str, steps: int,
               generator: torch.Generator | None) -> np.ndarray:
        """One pipeline call: uint8 frames [len(actions_TA), H, W, 3] after ``frame_HWC``."""
        c = self.config
        condition = CosmosActionCondition(
            mode="forward_dynamics", chunk_size=c.chunk_size, domain_name=c.domain_name,
            resolution_tier=c.resolution_tier, raw_actions=torch.from_numpy(actions_TA),
            image=Image.fromarray(frame_HWC), view_point=c.view_point)
        video = self.pipeline(prompt, action=condition, num_inference_steps=steps, guidance_scale=c.guidance_scale,
                              fps=c.fps, generator=generator, output_type="np").video
        frames = (np.asarray(video) * 255).round().clip(0, 255).astype(np.uint8)
        if frames.shape[1:3] != frame_HWC.shape[:2]:
            raise ValueError(f"{frame_HWC.shape[:2]} frames came back {frames.shape[1:3]}: they do not fit the "
                             f"resolution tier {c.resolution_tier}'s canvas; choose a larger tier")
        return frames[1:1 + len(actions_TA)]  # frame 0 is the conditioning frame, re-encoded

    @torch.no_grad()
    def rollout(self, history_BKHWC: torch.Tensor | np.ndarray, actions_BTA: torch.Tensor | np.ndarray,
                steps: int | None = None, generator: torch.Generator | None = None,
                tasks: Sequence[str] | None = None) -> torch.Tensor | np.ndarray:
        """Frames uint8 [B, T, H, W, 3] after the last history frame, generated ``chunk_size`` actions at a
        time, each chunk from the last frame of the one before (numpy in -> numpy out, torch -> torch on
        the CPU). ``generator`` makes the noise reproducible; ``tasks`` are one description per row."""
        history, as_numpy = _numpy(history_BKHWC)
        self._check_history(history)
        actions = self._check_actions(_numpy(actions_BTA)[0], history.shape[0])
        prompts = self._prompts(tasks, history.shape[0])
        steps = self.config.num_inference_steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        rows = []
        for frame, actions_TA, prompt in zip(history[:, -1], actions, prompts):
            chunks = []
            for start in range(0, actions_TA.shape[0], self.config.chunk_size):
                chunks.append(self._chunk(frame, actions_TA[start:start + self.config.chunk_size], prompt, steps,
                                          generator))
                frame = chunks[-1][-1]
            rows.append(np.concatenate(chunks))
        out = np.stack(rows)
        return out if as_numpy else torch.from_numpy(out)

    def predict(self, history_BKHWC: torch.Tensor | np.ndarray, action_BA: torch.Tensor | np.ndarray,
                steps: int | None = None, generator: torch.Generator | None = None,
                tasks: Sequence[str] | None = None) -> torch.Tensor | np.ndarray:
        """Next frame uint8 [B, H, W, 3]: a rollout of one step, arguments as in `rollout`."""
        action, _ = _numpy(action_BA)
        if action.ndim != 2:
            raise ValueError(f"action must be [B, {self.action_dim}], got {action.shape}")
        return self.rollout(history_BKHWC, action[:, None], steps=steps, generator=generator, tasks=tasks)[:, 0]
