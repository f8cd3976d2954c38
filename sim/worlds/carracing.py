"""Gymnasium CarRacing-v3 as a worldloop world: a car driven from a 64x64 top-down camera.

The simulator is Gymnasium's Box2D CarRacing (continuous actions: steer in [-1, 1], positive turns
right; gas and brake in [0, 1]); the score is the episode return (about +1000/N per new track tile,
-0.1 per step). Observations are re-sized by setting the module globals `STATE_W`/`STATE_H`
before `gym.make` (the only global state touched here: one size per process). Seeds are
deterministic, also across processes.

Everything the rest of worldloop knows about the car is declared here: the spec (features,
actions, events, tags, held-out seeds), the privileged expert and safety driver
(`sim.worlds.carracing_expert`), the event detectors, the scene tags and the counterfactual
steer perturbation synthesis uses (NVIDIA PilotNet's recovery augmentation, Bojarski et al. 2016).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from sim.worlds import detectors, register
from sim.worlds.base import ActionSpec, EventSpec, TaskSpec, World, WorldSpec
from sim.worlds.carracing_expert import (INTRO_STEPS, Expert, ExpertConfig, NoiseConfig, NoisyExpert,
                                         SafetyConfig, SafetyMonitor, is_off_track, vehicle_state)

STATE_NAMES = ("x", "y", "heading", "vx", "vy", "speed", "yaw_rate", "on_track")
_HEADING, _SPEED, _ON_TRACK = (STATE_NAMES.index(n) for n in ("heading", "speed", "on_track"))

SPEC = WorldSpec(
    name="carracing",
    description="Gymnasium CarRacing-v3: drive a random closed track from a top-down camera (Box2D).",
    camera="top_down",
    image_size=64,
    state_names=STATE_NAMES,
    policy_state=(),  # pixels only: speed and heading are read from the frame history
    actions=(ActionSpec("steer", -1.0, 1.0, "steering; positive turns right"),
             ActionSpec("gas", 0.0, 1.0, "throttle"),
             ActionSpec("brake", 0.0, 1.0, "brake")),
    tasks=(TaskSpec("drive", "Drive a full lap of the track without leaving the road."),),
    rate_hz=50.0,
    warmup_steps=INTRO_STEPS,
    max_steps=1000,
    score="return",
    signals=("off_track",),
    events=(EventSpec("intervention", 4.0, "the safety driver took over"),
            EventSpec("off_track", 4.0, "no wheel on the road"),
            EventSpec("hard_brake", 2.0, "brake >= hard_brake or a deceleration >= decel_mps2"),
            EventSpec("hard_steer", 2.0, "|steer| >= hard_steer or |d steer/dt| >= steer_rate"),
            EventSpec("low_reward", 2.0, "trailing mean reward below low_reward")),
    tags={"curvature": ("left", "straight", "right"), "track": ("on", "off"),
          "speed": ("slow", "medium", "fast")},
    mirror={"curvature": {"left": "right", "right": "left"}},
    eval_seeds=tuple(range(1000, 1010)),
    presets={"all": {"policy.loss_weights": (2.0, 1.0, 1.0), "world.image_size": 64,
                     "gate.guard_signals": ("off_track",)},  # the gate: no more time off the road
             "tiny": {"world.image_size": 32, "world.max_steps": 120,
                      "world.options": {"noise": {"pulse_prob": 0.05}}}},
)


@dataclass(frozen=True)
class EventThresholds:
    """Trigger thresholds of the car's events (see ``SPEC.events``)."""

    hard_brake: float = 0.8
    decel_mps2: float = 15.0  # speed drop per second
    hard_steer: float = 0.9
    steer_rate: float = 8.0  # |d steer / dt| per second
    low_reward_window: int = 25
    low_reward: float = -0.05

    def __post_init__(self) -> None:
        bad = [k for k in ("hard_brake", "decel_mps2", "hard_steer", "steer_rate", "low_reward_window")
               if not getattr(self, k) > 0]
        if bad:
            raise ValueError(f"EventThresholds: {bad} must be > 0")


@dataclass(frozen=True)
class TagThresholds:
    """Privileged tag rules. Measured on 252 clips of 12 noisy-expert episodes: clip-mean speed
    terciles 47.6 and 64.4 units/s (rounded to 45 and 65); the 1 s heading change has its 33rd
    percentile at 0.33 rad (dead band 0.3): the bands of each tag are roughly equally common."""

    lookahead_steps: int = 50  # 1 s at 50 Hz
    curve_rad: float = 0.3
    slow: float = 45.0
    fast: float = 65.0


@dataclass(frozen=True)
class Options:
    lap_complete_percent: float = 0.95
    domain_randomize: bool = False
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    events: EventThresholds = field(default_factory=EventThresholds)
    tags: TagThresholds = field(default_factory=TagThresholds)


class CarEnv:
    """One episode of CarRacing for a seed: the `Env` contract over the gymnasium env."""

    def __init__(self, world: "CarRacing", seed: int) -> None:
        import gymnasium as gym
        import gymnasium.envs.box2d.car_racing as car_racing

        car_racing.STATE_W = car_racing.STATE_H = world.image_size
        o = world.options
        self.gym = gym.make("CarRacing-v3", continuous=True, max_episode_steps=world.max_steps,
                            lap_complete_percent=o.lap_complete_percent, domain_randomize=o.domain_randomize)
        self.seed = int(seed)
        self.lap_finished = False

    @property
    def unwrapped(self):
        return self.gym.unwrapped

    def reset(self) -> np.ndarray:
        frame, _ = self.gym.reset(seed=self.seed)
        self.lap_finished = False
        return frame

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        frame, reward, terminated, truncated, info = self.gym.step(action)
        self.lap_finished |= bool(info.get("lap_finished", False))
        return frame, float(reward), bool(terminated or truncated), info

    def state(self) -> np.ndarray:
        return vehicle_state(self.gym)

    def signals(self) -> dict[str, bool]:
        return {"off_track": is_off_track(self.gym)}

    def success(self) -> bool:
        return self.lap_finished

    def close(self) -> None:
        self.gym.close()


@register
class CarRacing(World):
    spec = SPEC
    Options = Options

    def make_env(self, seed: int, task: str = "drive", *, frames: bool = True) -> CarEnv:
        self.spec.instruction(task)
        return CarEnv(self, seed)

    def expert(self, *, noisy: bool = False, seed: int = 0):
        if noisy:
            return NoisyExpert(self.options.noise, self.options.expert)
        return Expert(self.options.expert)

    def safety_monitor(self, env: CarEnv) -> SafetyMonitor:
        expert = Expert(self.options.expert)
        expert.reset(env)
        return _LocatingMonitor(self.options.safety, expert)

    def detect_events(self, span: dict, *, params: dict) -> list[dict]:
        unknown = set(params) - set(EventThresholds.__dataclass_fields__) - {"merge_gap"}
        if unknown:
            raise ValueError(f"unknown {self.spec.name} event thresholds {sorted(unknown)}; "
                             f"known: {sorted(EventThresholds.__dataclass_fields__)}")
        c = dataclasses.replace(self.options.events, **{k: v for k, v in params.items() if k != "merge_gap"})
        stamps = np.asarray(span["timestamps_ns"], np.int64)
        actions = np.asarray(span["actions"])  # levels compared in their own dtype: 0.8 hits 0.8
        steer, brake = actions[:, 0], actions[:, 2]
        speed = np.asarray(span["states"], np.float64)[:, _SPEED]
        off = span.get("signals", {}).get("off_track", np.zeros(len(stamps), bool))
        rate = detectors.backward_rate
        return detectors.events_of({
            "intervention": detectors.flag(span["interventions"]),
            "off_track": detectors.flag(off),
            "hard_brake": detectors.threshold(brake, c.hard_brake, -rate(speed, stamps), c.decel_mps2),
            "hard_steer": detectors.threshold(np.abs(steer), c.hard_steer, np.abs(rate(steer, stamps)),
                                              c.steer_rate),
            "low_reward": detectors.low_reward(np.asarray(span["rewards"]), c.low_reward_window, c.low_reward),
        }, int(params.get("merge_gap", 16)))

    def privileged_tags(self, states: np.ndarray, signals: dict[str, np.ndarray], *,
                        clip_len: int) -> dict[str, str] | None:
        """curvature: heading change from the clip's last step to ``lookahead_steps`` later (fewer
        near the span's end); track: off when most clip steps are off; speed: the clip's mean."""
        t = self.options.tags
        states = np.asarray(states, np.float64)
        length = int(clip_len)
        if states.ndim != 2 or states.shape[1] != len(STATE_NAMES) or not 0 < length <= len(states):
            raise ValueError(f"states must be [T, {len(STATE_NAMES)}] with the clip in its first rows, "
                             f"got {states.shape} and clip_len {length}")
        last, ahead = length - 1, min(length - 1 + t.lookahead_steps, len(states) - 1)
        clip = states[:length]
        used = np.concatenate([states[[last, ahead], _HEADING], clip[:, _SPEED], clip[:, _ON_TRACK]])
        if np.isnan(used).any():
            return None
        turn = (states[ahead, _HEADING] - states[last, _HEADING] + np.pi) % (2 * np.pi) - np.pi
        curvature = "left" if turn > t.curve_rad else "right" if turn < -t.curve_rad else "straight"
        off = np.count_nonzero(clip[:, _ON_TRACK] < 0.5) * 2 > len(clip)
        speed = float(clip[:, _SPEED].mean())
        band = "slow" if speed < t.slow else "fast" if speed >= t.fast else "medium"
        return {"curvature": curvature, "track": "off" if off else "on", "speed": band}

    def plan(self, task: str, tags: dict[str, str]) -> str:
        speed, track, curve = tags.get("speed"), tags.get("track"), tags.get("curvature")
        if track == "off":
            return "slow down, steer back onto the road, then rejoin the racing line"
        ahead = "keep straight and accelerate" if curve == "straight" else f"brake before the {curve} bend, turn in"
        return f"{ahead}; {'ease off' if speed == 'fast' and curve != 'straight' else 'hold speed'}"

    def caption(self, tags: dict[str, str], event: str) -> str:
        """One line: "<speed>, <track> track, <curvature> curve ahead; event: <event>"."""
        unknown = "unknown"
        speed, track, curve = (tags.get(k, unknown) for k in ("speed", "track", "curvature"))
        speed_text = "speed unknown" if speed == unknown else speed
        track_text = "track unknown" if track == unknown else f"{track} track"
        curve_text = {"straight": "straight ahead", unknown: "road ahead unknown"}.get(curve, f"{curve} curve ahead")
        return f"{speed_text}, {track_text}, {curve_text}; event: {event}"

    def counterfactual(self, actions: np.ndarray, labels: np.ndarray, *, offset: float, drift_steps: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
        """Steer drifts by ``offset`` for ``drift_steps``, then counter-steers as long; the label
        during the drift is the expert's steer minus the offset (PilotNet-style recovery)."""
        actions, labels = actions.astype(np.float32).copy(), labels.astype(np.float32).copy()
        drift = slice(0, min(drift_steps, len(actions)))
        back = slice(drift.stop, min(2 * drift.stop, len(actions)))
        actions[drift, 0] += offset
        actions[back, 0] -= offset
        labels[drift, 0] -= offset
        low, high = self.spec.action_low, self.spec.action_high
        return np.clip(actions, low, high), np.clip(labels, low, high), "recovery_heuristic"


class _LocatingMonitor(SafetyMonitor):
    """The car's safety rule with its own expert locating the car on the track each step."""

    def update(self, env, step: int) -> tuple[bool, str]:
        self.expert.locate(env)
        return super().update(env, step)
