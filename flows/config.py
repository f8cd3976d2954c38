"""Typed configuration for one turn of the flywheel, with named presets.

`tiny` (tests: seconds), `default` (the CPU demo: one turn in minutes) and `gpu` (an accelerator)
derive from each other with `dataclasses.replace`, as torchtitan's presets do. The resolved config
is saved beside every table version and checkpoint (`to_dict`), as LeRobot's train_config.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, replace

from models import policy as policy_model
from models import world_model
from sim.carracing import WorldConfig
from sim.expert import NoiseConfig


@dataclass(frozen=True)
class FleetConfig:
    """Who drives, how many episodes, and how the turn-0 expert is perturbed."""

    episodes: int = 12  # behaviour cloning from 12 noisy-expert episodes drives near expert level
    seed_base: int = 100_000  # fleet seeds are seed_base + 1000 * turn + i; never the eval seeds
    parallelism: int = 2
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # turn-0 expert: noise and steer pulses


@dataclass(frozen=True)
class CurateConfig:
    """Ingest, alignment, quality limits, event clips, de-duplication and scene description."""

    min_length: int = 60  # steps; shorter spans are rejected
    val_fraction: float = 0.1
    mapping: dict = field(default_factory=dict)  # role -> topic/feature names (stages.streams.Mapping)
    action_dim: int = 3
    state_dim: int = 8
    action_low: tuple[float, ...] = (-1.0, 0.0, 0.0)  # steer, gas, brake
    action_high: tuple[float, ...] = (1.0, 1.0, 1.0)
    gap_factor: float = 3.0  # a camera gap over gap_factor frame periods splits the episode
    hold_factor: float = 2.0  # a signal sample is fresh for hold_factor of its own periods
    max_frozen_fraction: float = 0.5
    max_dark_fraction: float = 0.5
    max_dropped_fraction: float = 0.2
    events: dict = field(default_factory=dict)  # overrides of stages.events.EventConfig
    clip_frames: int = 4  # frames of each clip shown to the reasoner
    dedup_threshold: float = 0.01  # cosine distance under which a clip duplicates a kept one
    novelty_threshold: float = 0.05  # a routine clip this far from every lake clip is "novelty"
    reasoner: str = ""  # a reasoner or local VLM directory; "" = the registry's, trained if absent
    reasoner_preset: str = "default"


@dataclass(frozen=True)
class SynthConfig:
    """Counterfactual variants rolled out by the world model from real histories."""

    variants: int = 24  # synthetic episodes per turn
    horizon: int = 12  # generated frames per variant
    steer_offsets: tuple[float, ...] = (-0.5, 0.5)  # steer added while the car drifts
    drift_steps: int = 6  # first steps drive with the offset; the label always counter-steers
    recovery_gain: float = 1.0  # label steer = expert steer - gain * offset (PilotNet-style)
    max_frame_change: float = 40.0  # mean |x_t - x_{t-1}| above this is implausible
    max_color_shift: float = 30.0  # mean |x_t - parent frame| above this is implausible
    parallelism: int = 1


@dataclass(frozen=True)
class TrainConfig:
    """Ray Train settings shared by the world model and the policy."""

    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    synthetic_fraction: float = 0.1  # share of each policy batch drawn from synthetic frames
    oversample_events: bool = True  # policy windows drawn by clip weight (stages.sampler.window_weights)
    duplicate_weight: float = 0.0  # weight of windows only near-duplicate clips cover
    warm_start: bool = True  # start from the registry's latest version when there is one


@dataclass(frozen=True)
class EvalConfig:
    seeds: tuple[int, ...] = tuple(range(1000, 1010))  # held-out: never driven by the fleet
    parallelism: int = 2
    bootstrap: int = 10_000


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "act"
    route_prefix: str = "/"  # POST /act, GET /healthz at the root; later apps take their own prefix
    num_replicas: int = 1


@dataclass(frozen=True)
class FlywheelConfig:
    name: str = "default"
    world: WorldConfig = field(default_factory=WorldConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    world_model: world_model.WorldModelConfig = field(default_factory=lambda: world_model.preset("default"))
    policy: policy_model.PolicyConfig = field(default_factory=lambda: policy_model.preset("default"))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        sizes = {"world": self.world.image_size, "world_model": self.world_model.image_size,
                 "policy": self.policy.image_size}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"image sizes must agree across components, got {sizes}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short content hash of the resolved config (lineage)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _default() -> FlywheelConfig:
    return FlywheelConfig()


def _tiny() -> FlywheelConfig:
    base = _default()
    return replace(
        base,
        name="tiny",
        world=replace(base.world, max_steps=120, image_size=32),
        fleet=replace(base.fleet, episodes=2, noise=replace(base.fleet.noise, pulse_prob=0.05)),
        curate=replace(base.curate, min_length=20, val_fraction=0.0, reasoner_preset="tiny"),
        synth=replace(base.synth, variants=2, horizon=4, drift_steps=2),
        world_model=replace(world_model.preset("tiny"), image_size=32),
        policy=policy_model.preset("tiny"),
        train=replace(base.train, cpus_per_worker=0.5, synthetic_fraction=0.25),
        eval=replace(base.eval, seeds=(1000, 1001), bootstrap=1000),
    )


def _gpu() -> FlywheelConfig:
    base = _default()
    return replace(
        base,
        name="gpu",
        fleet=replace(base.fleet, episodes=64, parallelism=8),
        synth=replace(base.synth, variants=256, horizon=16),
        world_model=world_model.preset("gpu"),
        policy=policy_model.preset("gpu"),
        train=replace(base.train, num_workers=1, use_gpu=True, cpus_per_worker=4.0),
        eval=replace(base.eval, seeds=tuple(range(1000, 1030)), parallelism=8),
    )


PRESETS = {"tiny": _tiny, "default": _default, "gpu": _gpu}


def preset(name: str) -> FlywheelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
