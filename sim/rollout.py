"""The rollout loop: one episode of a driver in the world, with a privileged safety driver.

A driver has `reset(env, seed)` and `act(env, frame) -> float32[3]` plus `name` and
`policy_version` attributes. The safety driver is the privileged expert: it takes over *before*
the car leaves the road (predicted lateral offset near the edge, heading turned across the road,
or already off) and on a stall (speed below a threshold for a while after the zoom-in intro; a
cloned policy that brakes to a halt never restarts), and it hands back after the car has been
stable for a few steps. The expert's action is recorded for every step as the training label.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from sim.carracing import INTRO_STEPS, STEP_NS, Track, WorldConfig, is_off_track, make_env, vehicle_state
from sim.expert import Expert, NoisyExpert

SAFETY_MODES = ("active", "shadow", "off")


class ExpertDriver:
    """The (optionally noisy) privileged expert as a driver."""

    policy_version = ""

    def __init__(self, expert: Expert | NoisyExpert | None = None, *, name: str | None = None) -> None:
        self.expert = expert or Expert()
        self.name = name or ("noisy_expert" if isinstance(self.expert, NoisyExpert) else "expert")

    def reset(self, env, seed: int | None = None) -> None:
        self.expert.reset(env, seed)

    def act(self, env, frame: np.ndarray) -> np.ndarray:
        return self.expert.act(env, frame)


class RandomDriver:
    """Uniformly random actions (steer in [-1, 1], gas and brake in [0, 1]); seeded per episode."""

    policy_version = ""

    def __init__(self, *, name: str = "random") -> None:
        self.name = name
        self._rng = np.random.default_rng(0)

    def reset(self, env, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(None if seed is None else [seed, 0xA11])

    def act(self, env, frame: np.ndarray) -> np.ndarray:
        return self._rng.uniform([-1.0, 0.0, 0.0], [1.0, 1.0, 1.0]).astype(np.float32)


class PolicyDriver:
    """Drives from pixels with any `act(frames_BKHWC uint8) -> float32[B, 3]` over the last K frames.

    The history is padded by repeating the first frame of the episode.
    """

    def __init__(self, act_fn: Callable[[np.ndarray], np.ndarray], *, history: int, name: str = "policy",
                 policy_version: str | None = None) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.act_fn, self.history, self.name = act_fn, history, name
        self.policy_version = name if policy_version is None else policy_version
        self._frames: deque = deque(maxlen=history)

    def reset(self, env, seed: int | None = None) -> None:
        self._frames.clear()

    def act(self, env, frame: np.ndarray) -> np.ndarray:
        if not self._frames:
            self._frames.extend([frame] * self.history)
        self._frames.append(frame)
        out = np.asarray(self.act_fn(np.stack(self._frames)[None]), dtype=np.float32)
        if out.shape != (1, 3):
            raise ValueError(f"policy act_fn must return [1, 3] actions, got shape {out.shape}")
        return out[0]


@dataclass(frozen=True)
class SafetyConfig:
    """When the privileged safety driver takes over and when it hands back."""

    predict_s: float = 0.3  # horizon of the constant-yaw-rate position prediction, seconds
    edge_offset: float = 5.0  # predicted |lateral offset| that triggers (road half-width 6.67) ...
    min_offset: float = 2.5  # ... once the car is this far out (steer noise makes short yaw spikes)
    min_heading: float = 0.3  # ... or turned this far (rad) from the road direction
    max_offset: float = 5.5  # current |lateral offset| that triggers (the expert cuts bends to ~3.8)
    heading_limit: float = 1.0  # |heading error| (rad) that triggers while moving
    stall_speed: float = 3.0  # units/s
    stall_steps: int = 25  # consecutive slow steps after the intro that make a stall
    handback_steps: int = 15  # consecutive stable steps before control goes back
    stable_offset: float = 2.5
    stable_heading: float = 0.3
    stable_speed: float = 15.0


class SafetyMonitor:
    """Tracks the trigger conditions step by step and the engaged/handed-back state machine.

    The edge trigger predicts where the car will be `predict_s` from now if it keeps its
    velocity and yaw rate (an arc), and measures that point's offset from the centreline; a
    driver following the road aims near the centreline there, a drifting one does not.
    """

    def __init__(self, config: SafetyConfig, track: Track) -> None:
        self.config, self.track = config, track
        self.engaged = False
        self.events = 0
        self.stalled = False  # a stall was seen at some step (whoever was driving)
        self._slow = 0
        self._stable = 0

    def predicted_offset(self, hull, track_index: int, substeps: int = 6) -> float:
        """Lateral offset of the car's position `predict_s` ahead along its current arc."""
        xy, v = np.array(hull.position, dtype=np.float64), np.array(hull.linearVelocity, dtype=np.float64)
        dt = self.config.predict_s / substeps
        for k in range(substeps):
            a = hull.angularVelocity * dt * (k + 0.5)
            xy += dt * np.array([math.cos(a) * v[0] - math.sin(a) * v[1], math.sin(a) * v[0] + math.cos(a) * v[1]])
        return self.track.lateral_offset(xy, self.track.nearest(xy, track_index))

    def update(self, env, step: int, track_index: int) -> tuple[bool, str]:
        """Advance one step; returns (engaged now, trigger reason or "")."""
        c = self.config
        hull = env.unwrapped.car.hull
        speed = math.hypot(*hull.linearVelocity)
        offset = self.track.lateral_offset(np.asarray(hull.position), track_index)
        heading_err = self.track.heading_error(hull.angle, track_index)
        self._slow = self._slow + 1 if step >= INTRO_STEPS and speed < c.stall_speed else 0
        reason = ""
        if is_off_track(env):
            reason = "off_track"
        elif abs(offset) > c.max_offset or (
                (abs(offset) > c.min_offset or abs(heading_err) > c.min_heading)
                and abs(self.predicted_offset(hull, track_index)) > c.edge_offset):
            reason = "edge"
        elif abs(heading_err) > c.heading_limit and speed > c.stall_speed:
            reason = "heading"
        elif self._slow >= c.stall_steps:
            reason = "stall"
        self.stalled |= reason == "stall"
        if not self.engaged and reason:
            self.engaged, self._stable = True, 0
            self.events += 1
        elif self.engaged:
            stable = (not reason and abs(offset) < c.stable_offset and abs(heading_err) < c.stable_heading
                      and speed > c.stable_speed)
            self._stable = self._stable + 1 if stable else 0
            if self._stable >= c.handback_steps:
                self.engaged = False
        return self.engaged, reason


def _check_action(action: np.ndarray, who: str) -> np.ndarray:
    a = np.asarray(action, dtype=np.float32).reshape(-1)
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise ValueError(f"{who} returned an invalid action {action!r}; need 3 finite floats")
    return np.clip(a, [-1.0, 0.0, 0.0], [1.0, 1.0, 1.0]).astype(np.float32)


def run_episode(*, world: WorldConfig, seed: int, driver, safety: str = "active", record: bool = True,
                safety_config: SafetyConfig | None = None, env=None) -> tuple[dict | None, dict]:
    """Drive one episode; returns (episode dict per the data contract or None if not recorded, summary).

    safety: "active" (the expert takes over and the steps are flagged), "shadow" (triggers are
    counted as interventions needed, the driver keeps control) or "off" (no monitoring acts).
    Pass `env` to reuse one built by `make_env(world)`.
    """
    if safety not in SAFETY_MODES:
        raise ValueError(f"safety must be one of {SAFETY_MODES}, got {safety!r}")
    if env is None:
        env = make_env(world)
        try:
            return run_episode(world=world, seed=seed, driver=driver, safety=safety, record=record,
                               safety_config=safety_config, env=env)
        finally:
            env.close()
    frame, _ = env.reset(seed=int(seed))
    if frame.shape != (world.image_size, world.image_size, 3):
        raise ValueError(f"env renders {frame.shape} frames but world.image_size is {world.image_size}; "
                         "CarRacing's size is a module global: build the env with make_env(world)")
    expert = Expert()
    expert.reset(env)
    driver.reset(env, int(seed))
    monitor = SafetyMonitor(safety_config or SafetyConfig(), expert.track)
    rec: dict[str, list] = {k: [] for k in ("frames", "actions", "expert_actions", "states", "rewards",
                                            "interventions", "off_track")}
    score, steps, off_steps, engaged_steps = 0.0, 0, 0, 0
    lap_finished = False
    for t in range(world.max_steps):
        state = vehicle_state(env)
        label = expert.act(env)  # also advances the expert's track index used by the monitor
        engaged = monitor.update(env, t, expert.index)[0] and safety != "off"
        proposed = _check_action(driver.act(env, frame), f"driver {driver.name!r}")
        takeover = engaged and safety == "active"
        action = label if takeover else proposed
        off = bool(state[7] == 0.0)
        if record:
            rec["frames"].append(frame)
            rec["actions"].append(action)
            rec["expert_actions"].append(label)
            rec["states"].append(state)
            rec["interventions"].append(takeover)
            rec["off_track"].append(off)
        frame, reward, terminated, truncated, info = env.step(action)
        if record:
            rec["rewards"].append(reward)
        score += float(reward)
        steps += 1
        off_steps += off
        engaged_steps += engaged
        if terminated or truncated:
            lap_finished = bool(info.get("lap_finished", False))
            break
    summary = {"seed": int(seed), "score": score, "steps": steps, "off_track_rate": off_steps / max(steps, 1),
               "interventions": monitor.events if safety != "off" else 0,
               "intervention_steps": engaged_steps, "stalled": monitor.stalled,
               "lap_finished": lap_finished, "driver": driver.name, "safety": safety}
    if not record:
        return None, summary
    episode = {"world": world.world, "seed": int(seed), "driver": driver.name,
               "policy_version": str(driver.policy_version),
               "frames": np.stack(rec["frames"]).astype(np.uint8),
               "actions": np.stack(rec["actions"]).astype(np.float32),
               "expert_actions": np.stack(rec["expert_actions"]).astype(np.float32),
               "states": np.stack(rec["states"]).astype(np.float32),
               "rewards": np.asarray(rec["rewards"], dtype=np.float32),
               "interventions": np.asarray(rec["interventions"], dtype=bool),
               "off_track": np.asarray(rec["off_track"], dtype=bool),
               "timestamps_ns": np.arange(steps, dtype=np.int64) * STEP_NS}
    return episode, summary
