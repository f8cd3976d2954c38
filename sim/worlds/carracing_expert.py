"""The CarRacing world's privileged drivers: track geometry, the expert, its noise, the safety rule.

Geometry follows the simulator's own conventions: car forward is (-sin θ, cos θ), right is
(cos θ, sin θ); the track is a closed loop of centreline points 3.5 units apart with a half-width
of 40/6 units.

The expert is pure pursuit on the track centreline + curvature speed control. Steering aims at a
point one look-ahead distance along the centreline and sets the front-wheel angle to
atan(2·L·lateral / d²) (Coulter 1992). Speed is limited by the curvature ahead, v ≤ √(a_lat/κ),
propagated back with a braking deceleration (v_now ≤ √(v_curve² + 2·a_brake·s)), and tracked by
a smooth proportional gas/brake law. The expert reads the simulator's own track and car state
(privileged); it never looks at pixels.

`NoisyExpert` is the turn-0 fleet driver: Gaussian action noise plus occasional steer pulses
that push the car towards the edge and brake pulses that slow it down (sometimes to a halt), so
recoveries from both appear in the logs (DART, Laskey et al. 2017). The training label stays the
clean expert action for the observed state (the rollout loop records it).

The safety driver (`SafetyMonitor`) takes over *before* the car leaves the road (predicted
lateral offset near the edge, heading turned across the road, or already off) and on a stall
(speed below a threshold for a while after the zoom-in intro; a cloned policy that brakes to a
halt never restarts), and it hands back after the car has been stable for a few steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INTRO_STEPS = 50  # the camera zooms in during the first second (50 steps at 50 Hz)
WHEELBASE = 3.24  # front-to-rear axle distance in sim units ((80 + 82) * 0.02)
MAX_WHEEL_ANGLE = 0.4  # steering joint limit in radians; steer actions beyond it saturate


def is_off_track(env) -> bool:
    """True when no wheel touches a road tile."""
    return not any(len(w.tiles) for w in env.unwrapped.car.wheels)


def vehicle_state(env) -> np.ndarray:
    """float32[8] in the order of the spec's state_names (x, y, heading, vx, vy, speed, yaw_rate, on_track)."""
    hull = env.unwrapped.car.hull
    vx, vy = hull.linearVelocity
    return np.array([hull.position[0], hull.position[1], hull.angle, vx, vy, math.hypot(vx, vy),
                     hull.angularVelocity, 0.0 if is_off_track(env) else 1.0], dtype=np.float32)


def wrap_angle(a: np.ndarray | float) -> np.ndarray | float:
    """Wrap radians to [-pi, pi)."""
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


class Track:
    """The centreline of the current track, with arc length, heading and smoothed curvature."""

    HALF_WIDTH = 40 / 6

    def __init__(self, env, *, curvature_window: int = 2) -> None:
        pts = np.asarray([(x, y) for _, _, x, y in env.unwrapped.track], dtype=np.float64)
        if len(pts) < 8:
            raise ValueError(f"track has only {len(pts)} points")
        self.points = pts
        self.n = len(pts)
        seg = np.roll(pts, -1, axis=0) - pts
        self.seg_len = np.linalg.norm(seg, axis=1)
        self.heading = np.arctan2(seg[:, 1], seg[:, 0])  # direction of travel at each point
        dtheta = wrap_angle(np.roll(self.heading, -1) - self.heading)
        raw = dtheta / np.maximum(self.seg_len, 1e-6)
        kernel = np.ones(2 * curvature_window + 1) / (2 * curvature_window + 1)
        padded = np.concatenate([raw[-curvature_window:], raw, raw[:curvature_window]])
        self.curvature = np.convolve(padded, kernel, mode="valid")  # signed, 1/units, left positive

    def nearest(self, xy: np.ndarray, hint: int | None = None, *, behind: int = 5, ahead: int = 30) -> int:
        """Index of the closest centreline point; searched locally around `hint` when given."""
        idx = np.arange(self.n) if hint is None else (hint + np.arange(-behind, ahead + 1)) % self.n
        d2 = np.sum((self.points[idx] - np.asarray(xy)[None]) ** 2, axis=1)
        return int(idx[np.argmin(d2)])

    def lateral_offset(self, xy: np.ndarray, i: int) -> float:
        """Signed distance from the centreline at point i (positive: right of the travel direction)."""
        h = self.heading[i]
        d = np.asarray(xy) - self.points[i]
        return float(d[0] * math.sin(h) - d[1] * math.cos(h))

    def lateral_rate(self, velocity: np.ndarray, i: int) -> float:
        """Rate of change of the lateral offset (velocity towards the right edge) at point i."""
        h = self.heading[i]
        return float(velocity[0] * math.sin(h) - velocity[1] * math.cos(h))

    def heading_error(self, car_angle: float, i: int) -> float:
        """Car heading minus track direction at point i, wrapped (car forward is angle + pi/2)."""
        return float(wrap_angle(car_angle + math.pi / 2 - self.heading[i]))

    def ahead(self, i: int, distance: float) -> tuple[int, float]:
        """Index of the first point at least `distance` along the track from point i, and that arc length."""
        s, j = 0.0, i
        while s < distance:
            s += self.seg_len[j]
            j = (j + 1) % self.n
        return j, s


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

    name, policy_version, reads_frames = "expert", "", False

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

    def act(self, env, obs=None) -> np.ndarray:
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

    name, policy_version, reads_frames = "noisy_expert", "", False

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

    def act(self, env, obs=None) -> np.ndarray:
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

    def __init__(self, config: SafetyConfig, expert: "Expert") -> None:
        self.config, self.expert, self.track = config, expert, expert.track
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

    def update(self, env, step: int) -> tuple[bool, str]:
        """Advance one step; returns (engaged now, trigger reason or "")."""
        c = self.config
        track_index = self.expert.index  # the expert acts first each step, locating the car
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
