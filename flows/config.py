"""Typed configuration for one turn of the flywheel, with named presets and dotted overrides.

`tiny` (tests: seconds), `default` (the CPU demo: one turn in minutes) and `gpu` (an accelerator)
derive from each other with `dataclasses.replace`, as torchtitan's presets do. `resolve` then
applies, in order: the world's own overrides for the preset (``WorldSpec.presets``), the shapes the
world declares (action bounds, state width, task words), a JSON/YAML config file of dotted keys,
and `--set section.key=value` overrides. The resolved config is saved beside every table version
and checkpoint (`to_dict`), as LeRobot's train_config.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from models import dynamics, world_model
from models import policy as policy_model
from sim import worlds
from sim.worlds.base import WorldConfig, from_dict


@dataclass(frozen=True)
class FleetConfig:
    """How many episodes the fleet drives (turn 0: the world's noisy expert; then the champion)."""

    episodes: int = 12  # behaviour cloning from 12 noisy-expert episodes drives near expert level
    champion_episodes: int = 0  # episodes of the turns the champion drives (over HTTP); 0 = episodes
    seed_base: int = 100_000  # fleet seeds are seed_base + 1000 * turn + i; never the eval seeds
    focus: float = 0.0  # share of the champion's episodes sent to the tasks where it falls short of the
    #                     expert on the held-out scenes, in proportion to the gap (the rest by task_weights)
    task_weights: dict[str, float] = field(default_factory=dict)  # task -> relative share of the episodes
    #                     (a task not named weighs 1; {}: round-robin over the world's tasks)
    parallelism: int = 2


@dataclass(frozen=True)
class CurateConfig:
    """Ingest, alignment, quality limits, event clips, de-duplication and scene description."""

    min_length: int = 1  # steps; shorter spans are rejected (1: a log of a moment is an episode)
    max_log_bytes: int = 4 << 30  # a log (all files of a unit) over this is rejected unread: readers hold it in memory
    max_episode_frames: int = 1_000_000  # an episode (one camera) of more frames is too_large (9 h at 30 Hz)
    max_image_side: int = 1280  # frames keep their resolution up to this longer side (larger ones shrink to it)
    adopt_undeclared: bool = False  # logs that declare no world are this world's (else: their format and source)
    val_fraction: float = 0.1
    mapping: dict = field(default_factory=dict)  # role -> topic/feature names (stages.streams.Mapping)
    gap_factor: float = 3.0  # a camera gap over gap_factor frame periods splits the episode
    hold_factor: float = 2.0  # a signal sample is fresh for hold_factor of its own periods
    max_frozen_fraction: float = 0.5
    max_dark_fraction: float = 0.5
    max_dropped_fraction: float = 0.2
    events: dict = field(default_factory=dict)  # clip geometry (stages.events.EventConfig) + the world's thresholds
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
    offsets: tuple[float, ...] = (-0.5, 0.5)  # sizes of the world's counterfactual perturbation
    drift_steps: int = 6  # first steps drive with the perturbation; the label always recovers
    max_frame_change: float = 40.0  # mean |x_t - x_{t-1}| above this is implausible
    max_color_shift: float = 30.0  # mean |x_t - parent frame| above this is implausible
    # the inverse-dynamics critic: a variant whose frames show the actions that drove them worse than
    # this times the generator's median on the same windows under their logged actions is implausible
    max_idm_ratio: float = 1.5
    # where labels come from: "expert_replay" (the world's expert at each counterfactual state, where
    # the world replays the parent; elsewhere the heuristics), "heuristic" (the world's recovery rule,
    # then the action that drove the generator), "inverse_dynamics" (the rule, then the action the
    # dynamics model reads off the generated frames); every frame records its label's source
    labels: str = "expert_replay"
    replay_parallelism: int = 2
    parallelism: int = 1
    # the policy trains on synthetic frames only once an ablation on this lake (`worldloop ablate`)
    # showed a lift whose 95% CI is above zero; False: always at train.synthetic_fraction
    require_lift: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Ray Train settings shared by the world model and the policy."""

    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    synthetic_fraction: float = 0.1  # share of each policy batch drawn from synthetic frames
    oversample_events: bool = True  # policy windows drawn by clip weight (stages.sampler.window_weights)
    duplicate_weight: float = 0.0  # weight of windows only near-duplicate clips cover
    focus: float = 0.0  # share of the policy's training windows drawn from the tasks where the champion
    #                     falls short of the expert on the held-out scenes, in proportion to the gap
    warm_start: bool = True  # start from the registry's latest version when there is one
    # batches a background thread makes ahead of each step (0: none). On a GPU the step no longer
    # waits on data; on 2 CPU cores the thread competes with the step (arm policy 226 s against 216 s)
    prefetch: int = 0
    # "bf16": each step's forward under bfloat16 autocast (weights and optimizer in fp32); "fp32"
    precision: str = "fp32"
    # a checkpoint (weights + optimizer + step) every this many steps; a run killed mid-way and
    # started again with the same inputs resumes from the latest one (0: only at the end)
    checkpoint_every: int = 200
    # the generator reads the dynamics model's conditioning vector (the reasoner instructs the
    # generator); the world model then trains after the dynamics model, on its vectors
    condition_generator: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be fp32 or bf16, got {self.precision!r}")


@dataclass(frozen=True)
class EvalConfig:
    seeds: tuple[int, ...] = ()  # held-out scenes, () = the world's eval_seeds; never driven by the fleet
    tasks: tuple[str, ...] = ()  # () = every task of the world; each task is evaluated on every seed
    parallelism: int = 2
    bootstrap: int = 10_000
    # the neural simulator (`evaluate --in neural`, and the screen before real rollouts)
    neural_starts: int = 16  # real starting windows cut from the lake (its val split, else train)
    neural_horizon: int = 100  # steps each driver takes from a start
    screen: bool = False  # screen a candidate against the champion in the neural simulator first
    screen_margin: float = 0.0  # it passes unless its mean neural score is lower by more than this


@dataclass(frozen=True)
class GateConfig:
    """The promotion gate (``stages.promote.gate``): how much better, and which guards may not regress."""

    margin: float = 0.0  # the 95% lower bound of the mean paired score difference must be above this
    failure_tolerance: float = 0.0  # the failure rate (1 - success rate) may rise by at most this
    interventions_tolerance: float = 0.5  # interventions needed per episode may rise by at most this
    guard_signals: tuple[str, ...] = ()  # the world's bad signals (its presets name them) whose share of steps
    signal_tolerance: float = 0.01  # ... may rise by at most this

    def __post_init__(self) -> None:
        bad = [k for k in ("failure_tolerance", "interventions_tolerance", "signal_tolerance")
               if not getattr(self, k) >= 0]
        if bad or self.margin != self.margin:
            raise ValueError(f"gate: {bad or ['margin']} must be >= 0 (margin: a number)")

    def tolerances(self) -> dict[str, float]:
        """Guard name -> the largest rise allowed, as ``stages.promote.gate`` takes them."""
        return {"failure_rate": self.failure_tolerance, "interventions": self.interventions_tolerance,
                **{s: self.signal_tolerance for s in self.guard_signals}}


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = ""  # "" = "act-<world>": each world's champion is its own Serve application
    route_prefix: str = ""  # "" = "/<world>": POST /<world>/act, GET /<world>/healthz
    num_replicas: int = 1
    companions: bool = True  # also serve the world model (predict) and the reasoner (report) beside act


@dataclass(frozen=True)
class FlywheelConfig:
    name: str = "default"
    world: WorldConfig = field(default_factory=WorldConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    world_model: world_model.WorldModelConfig = field(default_factory=lambda: world_model.preset("default"))
    dynamics: dynamics.DynamicsConfig = field(default_factory=lambda: dynamics.preset("default"))
    policy: policy_model.PolicyConfig = field(default_factory=lambda: policy_model.preset("default"))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def validate(self) -> "FlywheelConfig":
        sizes = {"world": self.world.image_size, "world_model": self.world_model.image_size,
                 "dynamics": self.dynamics.image_size, "policy": self.policy.image_size}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"image sizes must agree across components, got {sizes}")
        worlds.get(self.world)  # the world's options
        unknown = sorted(set(self.gate.guard_signals) - set(self.spec.signals))
        if unknown:
            raise ValueError(f"gate.guard_signals {unknown} are not signals of {self.world.name} {list(self.spec.signals)}")
        return self

    @property
    def spec(self) -> worlds.WorldSpec:
        return worlds.spec(self.world.name)

    @property
    def eval_seeds(self) -> tuple[int, ...]:
        return self.eval.seeds or self.spec.eval_seeds

    @property
    def eval_tasks(self) -> tuple[str, ...]:
        return self.eval.tasks or self.spec.task_names

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
        world=replace(base.world, image_size=32),
        fleet=replace(base.fleet, episodes=2),
        curate=replace(base.curate, min_length=20, val_fraction=0.0, reasoner_preset="tiny"),
        synth=replace(base.synth, variants=2, horizon=4, drift_steps=2),
        world_model=replace(world_model.preset("tiny"), image_size=32),
        dynamics=replace(dynamics.preset("tiny"), image_size=32),
        policy=policy_model.preset("tiny"),
        train=replace(base.train, cpus_per_worker=0.5, synthetic_fraction=0.25),
        eval=replace(base.eval, seeds=(1000, 1001), tasks=(), bootstrap=1000, neural_starts=4, neural_horizon=8),
    )


def _gpu() -> FlywheelConfig:
    base = _default()
    return replace(
        base,
        name="gpu",
        fleet=replace(base.fleet, episodes=64, parallelism=8),
        synth=replace(base.synth, variants=256, horizon=16),
        world_model=world_model.preset("gpu"),
        dynamics=dynamics.preset("gpu"),
        policy=policy_model.preset("gpu"),
        train=replace(base.train, num_workers=1, use_gpu=True, cpus_per_worker=4.0, prefetch=2,
                      precision="bf16"),
        eval=replace(base.eval, parallelism=8),
    )


PRESETS = {"tiny": _tiny, "default": _default, "gpu": _gpu}


def preset(name: str) -> FlywheelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def resolve(name: str = "default", *, world: str = worlds.DEFAULT, config_file: str | None = None,
            overrides: list[str] | dict[str, Any] | None = None) -> FlywheelConfig:
    """The preset ``name`` for ``world``, then the file's and the command line's dotted overrides;
    last, the shapes the models take from the world (so they always agree with it)."""
    spec = worlds.spec(world)
    cfg = preset(name)
    cfg = replace(cfg, world=replace(cfg.world, name=world))
    cfg = apply(cfg, {**spec.presets.get("all", {}), **spec.presets.get(name, {})})
    if config_file:
        cfg = apply(cfg, load_file(config_file))
    if overrides:
        cfg = apply(cfg, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return apply(cfg, _world_shapes(spec, cfg)).validate()


def _world_shapes(spec: worlds.WorldSpec, cfg: FlywheelConfig) -> dict[str, Any]:
    """What the models must take from the world: action bounds, state width, task words."""
    words = sorted({w for t in spec.tasks for w in re.findall(r"[a-z0-9]+", t.instruction.lower())})
    vocab = tuple(words) if len(spec.tasks) > 1 else ()
    # one section at a time, so the policy's bounds change together (a config validates its widths)
    return {"policy": {"action_low": tuple(spec.action_low.tolist()), "action_high": tuple(spec.action_high.tolist()),
                       "state_dim": len(spec.policy_state), "aux_dim": len(spec.state_names) - len(spec.policy_state),
                       "task_vocab": vocab, "image_size": cfg.world.image_size},
            "world_model": {"action_dim": len(spec.actions), "task_vocab": vocab,
                            "image_size": cfg.world.image_size,
                            "condition_dim": cfg.dynamics.embed if cfg.train.condition_generator else 0},
            "dynamics": {"action_dim": len(spec.actions), "state_dim": len(spec.state_names),
                         "signals": tuple(spec.signals), "task_vocab": vocab, "image_size": cfg.world.image_size}}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.num_workers=1", "eval.seeds=[1000, 1001]"]`` -> dotted dict; values are JSON, else text
    (a list field also takes comma-separated text: ``eval.tasks=push,reach``)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not section.key=value")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def _scalar(text: str) -> Any:
    """One item of a comma-separated list override: JSON (a number, true, null), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_file(path: str) -> dict[str, Any]:
    """A config file: JSON or YAML, nested sections or dotted keys (flattened to dotted keys)."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping of sections, got {type(data).__name__}")

    def flat(d: dict, prefix: str) -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            is_section = isinstance(v, dict) and not key.endswith(("options", "mapping", "events"))
            out.update(flat(v, key + ".") if is_section else {key: v})
        return out
    return flat(data, "")


def apply(cfg: Any, overrides: dict[str, Any]) -> Any:
    """``cfg`` with each dotted key set; unknown keys are an error that names the known ones."""
    for key, value in overrides.items():
        cfg = _set(cfg, key.split("."), value, key)
    return cfg


def _set(obj: Any, path: list[str], value: Any, full: str) -> Any:
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        current = obj.get(head, {})
        return {**obj, head: _set(current, rest, value, full) if rest else value}
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"override {full!r}: {type(obj).__name__} has no fields")
    names = {f.name for f in dataclasses.fields(obj)}
    if head not in names:
        raise ValueError(f"unknown config key {full!r}: {type(obj).__name__} has {sorted(names)}")
    current = getattr(obj, head)
    if rest:
        return replace(obj, **{head: _set(current, rest, value, full)})
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
        value = from_dict(type(current), {**dataclasses.asdict(current), **value})
    elif isinstance(value, list):
        value = tuple(value)
    elif isinstance(current, tuple) and isinstance(value, str):
        value = tuple(_scalar(p.strip().strip("'\"")) for p in value.strip("()[] ").split(",") if p.strip())
    elif isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"override {full!r}: expected true or false, got {value!r}")
    elif isinstance(current, (int, float)) and not isinstance(current, bool):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"override {full!r}: expected a number, got {value!r}")
        value = type(current)(value) if isinstance(current, float) or float(value).is_integer() else value
    return replace(obj, **{head: value})
