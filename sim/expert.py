"""The privileged CarRacing expert: pure pursuit on the track centreline + curvature speed control.

Steering is pure pursuit (Coulter 1992): aim at a point one look-ahead distance along the
centreline and set the front-wheel angle to atan(2·L·lateral / d²). Speed is limited by the
curvature ahead, v ≤ √(a_lat/κ), propagated back with a braking deceleration
(v_now ≤ √(v_curve² + 2·a_brake·s)), and tracked by a smooth proportional gas/brake law. The expert
reads the simulator's own track and car state (privileged); it never looks at pixels.

`NoisyExpert` is the turn-0 fleet driver: Gaussian action noise plus occasional steer pulses
that push the car towards the edge and brake pulses that slow it down (sometimes to a halt), so
recoveries from both appear in the logs (DART, Laskey et al. 2017).
The training label stays the clean expert action for the observed state (rollout records it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sim.carracing import WHEELBASE, Track, is_off_track


@dataclass(frozen=True)
class ExpertConfig:
    """Pure-pursuit and speed-control gains (sim units: metres-ish, seconds)."""

    lookahead_base: float = 8.0
    lookahead_gain: float = 0.2  # extra look-ahead per unit/s of speed
    steer_gain: float = 1.0
    a_lat: float = 120.0  # lateral acceleration budget for the curvature speed limit
    a_lat_pursuit: float = 150.0  # same budget for the arc pure pursuit asks for (slows recoveries)
    a_brake: float = 40.0  # deceleration assumed when planning to slow for a bend
    v_max: float = 95.0
    horizon: float = 120.0  # how far ahead bends are considered
    gas_gain: float = 0.1  # gas per unit/s below the target speed
    brake_gain: float = 0.04  # brake per unit/s above target (after the dead band)
    brake_deadband: float = 4.0
    max_brake: float = 0.8
    grass_speed: float = 25.0  # speed cap while off track (the car spins on grass otherwise)
    grass_gas: float = 0.2


class Expert:
    """Privileged driver: `reset(env)` per episode, then `act(env) -> float32[3]` each step."""

    def __init__(self, config: ExpertConfig | None = None) -> None:
        self.config = config or ExpertConfig()
        self.track: Track | None = None
        self.index: int | None = None  # nearest centreline point at the last `locate`

    def reset(self, env, seed: int | None = None) -> None:
        self.track = Track(env)
        self.index = None

    def locate(self, env) -> int:
        """Nearest centreline index, searched locally around the last one (globally when lost)."""
        if self.track is None:
            raise ValueError("Expert.reset(env) must be called before act/locate")
        xy = np.asarray(env.unwrapped.car.hull.position)
        i = self.track.nearest(xy, self.index)
        if np.linalg.norm(self.track.points[i] - xy) > 3 * self.track.HALF_WIDTH:
            i = self.track.nearest(xy)
        self.index = i
        return i

    def target_speed(self, i: int) -> float:
        """Speed allowed now given the bends within the horizon ahead of point i."""
        c, tr = self.config, self.track
        v, s, j = c.v_max, 0.0, i
        while s < c.horizon:
            kappa = abs(tr.curvature[j])
            v_curve = math.sqrt(c.a_lat / kappa) if kappa > 1e-6 else c.v_max
            v = min(v, math.sqrt(v_curve ** 2 + 2 * c.a_brake * s))
            s += tr.seg_len[j]
            j = (j + 1) % tr.n
        return v

    def act(self, env, frame: np.ndarray | None = None) -> np.ndarray:
        c = self.config
        i = self.locate(env)
        hull = env.unwrapped.car.hull
        xy = np.asarray(hull.position)
        speed = math.hypot(*hull.linearVelocity)
        j, _ = self.track.ahead(i, c.lookahead_base + c.lookahead_gain * speed)
        d = self.track.points[j] - xy
        theta = hull.angle
        lateral = d[0] * math.cos(theta) + d[1] * math.sin(theta)  # positive: target to the right
        kappa_pp = 2 * lateral / max(float(d @ d), 1e-6)  # curvature of the pure-pursuit arc
        steer = math.atan(WHEELBASE * kappa_pp) * c.steer_gain
        v_target = min(self.target_speed(i), math.sqrt(c.a_lat_pursuit / max(abs(kappa_pp), 1e-6)))
        if is_off_track(env):
            v_target = min(v_target, c.grass_speed)
        err = v_target - speed
        gas = float(np.clip(c.gas_gain * err, 0.0, 1.0))
        if is_off_track(env):
            gas = min(gas, c.grass_gas)
        brake = float(np.clip(c.brake_gain * (-err - c.brake_deadband), 0.0, c.max_brake))
        return np.array([np.clip(steer, -1.0, 1.0), gas, brake], dtype=np.float32)

    __call__ = act


@dataclass(frozen=True)
class NoiseConfig:
    """Exploration noise of the fleet expert (DART-style): action noise, steer and brake pulses."""

    steer_std: float = 0.05
    gas_std: float = 0.1
    pulse_prob: float = 0.01  # chance per step to start a steer pulse
    pulse_steps: tuple[int, int] = (5, 15)  # pulse length range (inclusive)
    pulse_steer: tuple[float, float] = (0.15, 0.4)  # pulse magnitude range, random sign
    brake_prob: float = 0.003  # chance per step to start a brake pulse (slow and stopped states)
    brake_steps: tuple[int, int] = (15, 50)
    brake: float = 0.8
    start_step: int = 60  # no noise during the zoom-in intro


class NoisyExpert:
    """The expert with action noise, steer and brake pulses; deterministic given the episode seed."""

    def __init__(self, noise: NoiseConfig | None = None, config: ExpertConfig | None = None) -> None:
        self.noise = noise or NoiseConfig()
        self.expert = Expert(config)
        self._rng = np.random.default_rng(0)
        self._t = 0
        self._pulse_left = 0
        self._pulse = 0.0
        self._brake_left = 0

    def reset(self, env, seed: int | None = None) -> None:
        self.expert.reset(env)
        self._rng = np.random.default_rng(None if seed is None else [seed, 0x5EED])
        self._t, self._pulse_left, self._pulse, self._brake_left = 0, 0, 0.0, 0

    def act(self, env, frame: np.ndarray | None = None) -> np.ndarray:
        n, rng = self.noise, self._rng
        action = self.expert.act(env).astype(np.float64)
        self._t += 1
        if self._t <= n.start_step:
            return action.astype(np.float32)
        if self._pulse_left == 0 and rng.random() < n.pulse_prob:
            self._pulse_left = int(rng.integers(n.pulse_steps[0], n.pulse_steps[1] + 1))
            self._pulse = float(rng.uniform(*n.pulse_steer)) * rng.choice([-1.0, 1.0])
        if self._brake_left == 0 and rng.random() < n.brake_prob:
            self._brake_left = int(rng.integers(n.brake_steps[0], n.brake_steps[1] + 1))
        action += rng.normal(0.0, [n.steer_std, n.gas_std, 0.0])
        if self._pulse_left > 0:
            action[0] += self._pulse
            self._pulse_left -= 1
        if self._brake_left > 0:
            action[1:] = (0.0, n.brake)
            self._brake_left -= 1
        return np.array([np.clip(action[0], -1, 1), np.clip(action[1], 0, 1), np.clip(action[2], 0, 1)],
                        dtype=np.float32)

    __call__ = act
