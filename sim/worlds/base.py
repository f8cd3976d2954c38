"""What a world declares once, and the contract the rest of worldloop reads.

A world is one module under ``sim/worlds/`` that subclasses ``World`` and registers itself with
``sim.worlds.register``. Its ``spec`` (a ``WorldSpec``) holds the *data* everything else needs —
observation features, action names and bounds, tasks, rate, score, signals, events, tags,
held-out seeds, per-preset overrides — in the spirit of LeRobot's ``EnvConfig`` features and
torchtitan's ``ModelSpec``. Its methods hold the *behaviour* that only the world can know: the
env factory, the privileged expert and its noise, the safety driver's takeover rule, event
detectors, privileged scene tags, and the counterfactual perturbation used by synthesis.

Flows, stages, models and serving never name a world's fields: they read them from here or from
the tables' metadata.

The episode contract (``sim.rollout.run_episode`` returns it, ``stages.mcap_log`` logs it)::

    world str, seed int, task str (the task's name), instruction str (its sentence),
    driver str, policy_version str,
    frames uint8[T,H,W,3], actions / expert_actions float32[T,A], states float32[T,S]
    (``spec.state_names``), rewards float32[T], interventions bool[T],
    signals {name: bool[T]} (``spec.signals``), timestamps_ns int64[T]
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

SCORES = ("return", "success")

DEFAULT = "carracing"  # the world a command runs when none is named


@dataclass(frozen=True)
class ActionSpec:
    """One action dimension: its name, bounds and meaning. The policy squashes into [low, high]."""

    name: str
    low: float
    high: float
    description: str = ""

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"action {self.name!r}: low {self.low} must be below high {self.high}")


@dataclass(frozen=True)
class TaskSpec:
    """A task of the world: a short name (logs, tables) and the instruction the policy reads."""

    name: str
    instruction: str


@dataclass(frozen=True)
class EventSpec:
    """A mined event: its name, the oversampling weight of clips around it, what triggers it."""

    name: str
    weight: float
    description: str = ""


@dataclass(frozen=True)
class WorldSpec:
    """Everything about a world that the rest of the system reads (features, rules, seeds)."""

    name: str
    description: str
    camera: str  # the camera's name in logs ("front", "corner"); its frames are RGB uint8
    image_size: int  # default square resolution; `world.image_size` in the config overrides it
    state_names: tuple[str, ...]  # logged per step, in order (proprioceptive and privileged)
    policy_state: tuple[str, ...]  # the subset (in order) the policy reads; () = pixels only
    actions: tuple[ActionSpec, ...]
    tasks: tuple[TaskSpec, ...]
    rate_hz: float
    warmup_steps: int  # steps at an episode's start that events and stalls ignore
    max_steps: int
    score: str  # "return" (episode return) or "success" (1.0 if the task succeeded)
    signals: tuple[str, ...]  # per-step boolean signals logged beside the frames
    events: tuple[EventSpec, ...]  # in priority order (the first one covering a step names it)
    tags: dict[str, tuple[str, ...]]  # the reasoner's tag vocabulary: tag -> values
    mirror: dict[str, dict[str, str]]  # tag -> {value: value of the clip flipped left-right}; {} = no mirroring
    eval_seeds: tuple[int, ...]  # held-out: the fleet never uses them
    fleet_seed_base: int = 100_000
    state_message: str = "std_msgs/msg/Float32MultiArray"  # or "sensor_msgs/msg/JointState" (arms)
    static_state: tuple[str, ...] = ()  # state names fixed within an episode (a task's goal): synthesis keeps them
    success_signal: str = ""  # the signal raised when the task is done (worlds scored by "success")
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # preset -> dotted overrides

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        missing = set(self.policy_state) - set(self.state_names)
        if missing:
            raise ValueError(f"policy_state names {sorted(missing)} are not in state_names")
        if self.score == "success" and self.success_signal not in self.signals:
            raise ValueError(f"a world scored by success names its success_signal among {self.signals}")
        if not self.tasks or not self.actions:
            raise ValueError(f"world {self.name!r} needs at least one task and one action")
        if any(self.fleet_seed_base <= s < self.fleet_seed_base + 10**6 for s in self.eval_seeds):
            raise ValueError("eval_seeds overlap the fleet's seed range")

    # derived views -------------------------------------------------------------------------
    @property
    def action_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.actions)

    @property
    def action_low(self) -> np.ndarray:
        return np.array([a.low for a in self.actions], np.float32)

    @property
    def action_high(self) -> np.ndarray:
        return np.array([a.high for a in self.actions], np.float32)

    @property
    def policy_state_index(self) -> np.ndarray:
        """Columns of ``state_names`` the policy reads."""
        return np.array([self.state_names.index(n) for n in self.policy_state], np.int64)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def instruction(self, task: str) -> str:
        for t in self.tasks:
            if t.name == task:
                return t.instruction
        raise ValueError(f"world {self.name!r} has no task {task!r}; tasks: {list(self.task_names)}")

    @property
    def event_weights(self) -> dict[str, float]:
        return {e.name: e.weight for e in self.events}

    @property
    def step_ns(self) -> int:
        return int(round(1e9 / self.rate_hz))

    def clip_action(self, action: np.ndarray, who: str) -> np.ndarray:
        """A finite action of the spec's width, clipped to its bounds; anything else is an error."""
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.shape != (len(self.actions),) or not np.all(np.isfinite(a)):
            raise ValueError(f"{who} returned an invalid action {action!r}; need {len(self.actions)} finite "
                             f"floats ({', '.join(self.action_names)})")
        return np.clip(a, self.action_low, self.action_high).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (``worldloop worlds``, table metadata)."""
        d = dataclasses.asdict(self)
        d.pop("presets")
        return d


@dataclass(frozen=True)
class WorldConfig:
    """Which world to build, at which resolution, how long episodes may run, and its options.

    ``options`` are the world's own knobs (expert noise, safety thresholds, ...), validated by
    ``World.options``; ``max_steps`` 0 means the spec's.
    """

    name: str = DEFAULT
    image_size: int = 64
    max_steps: int = 0
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in [16, 512], got {self.image_size}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")


@dataclass
class Observation:
    """What a driver sees at one step: the camera frame, the policy's state slice and the task."""

    image: np.ndarray  # uint8[H,W,3]
    state: np.ndarray  # float32[len(spec.policy_state)]
    task: str  # the task's name
    instruction: str  # its sentence
    step: int


class Env(Protocol):
    """One episode's environment, built for one (seed, task) by ``World.make_env``."""

    def reset(self) -> np.ndarray: ...  # the first frame, uint8[H,W,3]

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]: ...  # frame, reward, done, info

    def state(self) -> np.ndarray: ...  # float32[len(spec.state_names)]

    def signals(self) -> dict[str, bool]: ...  # each of spec.signals

    def success(self) -> bool: ...

    def close(self) -> None: ...


class Driver(Protocol):
    """Anything that acts in a world: the expert, a random policy, a trained policy, an endpoint."""

    name: str
    policy_version: str
    reads_frames: bool  # False: acts on the env's privileged state alone (the run may skip rendering)

    def reset(self, env: Env, seed: int) -> None: ...

    def act(self, env: Env, obs: Observation) -> np.ndarray: ...


class SafetyMonitor(Protocol):
    """The safety driver's rule: ``update`` each step returns (engaged, trigger reason or "")."""

    events: int  # takeovers so far

    def update(self, env: Env, step: int) -> tuple[bool, str]: ...


class World(ABC):
    """A registered world. Subclasses set ``spec`` and ``Options`` and implement the behaviour."""

    spec: ClassVar[WorldSpec]
    Options: ClassVar[type] = dict  # a dataclass of the world's own knobs

    def __init__(self, config: WorldConfig | None = None) -> None:
        config = config or WorldConfig(name=self.spec.name, image_size=self.spec.image_size)
        if config.name != self.spec.name:
            raise ValueError(f"config is for world {config.name!r}, not {self.spec.name!r}")
        self.config = config
        self.options = _build_options(self.Options, config.options)
        self.image_size = config.image_size
        self.max_steps = config.max_steps or self.spec.max_steps

    @abstractmethod
    def make_env(self, seed: int, task: str, *, frames: bool = True) -> Env:
        """A fresh env whose scene depends only on (seed, task): distinct seeds give distinct scenes.
        ``frames=False``: nobody reads the episode's frames; the env may return blank ones unrendered."""

    @abstractmethod
    def expert(self, *, noisy: bool = False, seed: int = 0) -> Driver:
        """The privileged expert (``noisy``: the turn-0 fleet's perturbed version, per options)."""

    def random_driver(self) -> Driver:
        from sim.rollout import RandomDriver

        return RandomDriver(self.spec)

    @abstractmethod
    def safety_monitor(self, env: Env) -> SafetyMonitor:
        """The safety driver's takeover rule for this episode."""

    @abstractmethod
    def detect_events(self, span: dict[str, np.ndarray], *, params: dict[str, Any]) -> list[dict]:
        """Events of one aligned span: ``[{"event", "step", "score"}]`` with names from ``spec.events``.

        ``span`` has ``timestamps_ns``, ``actions`` [T,A], ``states`` [T,S], ``rewards`` [T],
        ``interventions`` [T] and ``signals`` {name: bool[T]} (absent signals are all False);
        ``params`` overrides the world's thresholds.
        """

    @abstractmethod
    def privileged_tags(self, states: np.ndarray, signals: dict[str, np.ndarray], *,
                        clip_len: int) -> dict[str, str] | None:
        """Scene tags of a clip from the logged state (the reasoner's training labels).

        ``states`` [N, S] are the clip's ``clip_len`` rows followed by the rows after it in its
        span (a look-ahead, possibly empty); ``signals`` {name: bool[N]} the same rows. None when
        a value the rules read is NaN (a log without privileged state).
        """

    def caption(self, tags: dict[str, str], event: str) -> str:
        """One line from the tags and the clip's event."""
        return ", ".join(f"{k} {v}" for k, v in tags.items()) + f"; event: {event}"

    @abstractmethod
    def plan(self, task: str, tags: dict[str, str]) -> str:
        """One line in words: what to do next for ``task`` in the scene the tags describe."""

    @abstractmethod
    def counterfactual(self, actions: np.ndarray, labels: np.ndarray, *, offset: float, drift_steps: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
        """Synthesis: (actions to drive the world model with, labels, label source) for a perturbation
        of size ``offset`` during the first ``drift_steps`` followed by a recovery."""


def _build_options(cls: type, values: dict) -> Any:
    if cls is dict:
        return dict(values)
    return from_dict(cls, values)


def from_dict(cls: type, values: dict | None) -> Any:
    """A (nested, frozen) dataclass from a dict; lists become tuples, unknown keys are an error."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    defaults = cls()
    for name, value in values.items():
        current = getattr(defaults, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = from_dict(type(current), {**dataclasses.asdict(current), **value})
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
