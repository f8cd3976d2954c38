"""Gymnasium CarRacing-v3 as a worldloop world: config, env factory, vehicle state, track geometry.

The simulator is Gymnasium's Box2D CarRacing (continuous actions: steer in [-1, 1], positive turns
right; gas and brake in [0, 1]). Observations are re-sized by setting the module globals
`STATE_W`/`STATE_H` before `gym.make` (the only global state touched here). Geometry follows the
simulator's own conventions: car forward is (-sin θ, cos θ), right is (cos θ, sin θ); the track is
a closed loop of centreline points 3.5 units apart with a half-width of 40/6 units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

STATE_FIELDS = ("x", "y", "heading", "vx", "vy", "speed", "yaw_rate", "on_track")
INTRO_STEPS = 50  # the camera zooms in during the first second (50 steps at 50 Hz)
STEP_NS = 20_000_000  # 50 Hz
WHEELBASE = 3.24  # front-to-rear axle distance in sim units ((80 + 82) * 0.02)
MAX_WHEEL_ANGLE = 0.4  # steering joint limit in radians; steer actions beyond it saturate


@dataclass(frozen=True)
class WorldConfig:
    """Which world to build and how episodes are bounded."""

    world: str = "CarRacing-v3"
    image_size: int = 64
    max_steps: int = 1000
    lap_complete_percent: float = 0.95
    domain_randomize: bool = False

    def __post_init__(self) -> None:
        if self.world != "CarRacing-v3":
            raise ValueError(f"unsupported world {self.world!r}; only 'CarRacing-v3' is built in")
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in [16, 512], got {self.image_size}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


def make_env(cfg: WorldConfig):
    """Build the gymnasium env with `cfg.image_size` square observations; `reset(seed=s)` is deterministic.

    The size is a module global of CarRacing, read at every render: one size per process.
    """
    import gymnasium as gym
    import gymnasium.envs.box2d.car_racing as car_racing

    car_racing.STATE_W = car_racing.STATE_H = cfg.image_size
    env = gym.make(cfg.world, continuous=True, max_episode_steps=cfg.max_steps,
                   lap_complete_percent=cfg.lap_complete_percent, domain_randomize=cfg.domain_randomize)
    return env


def is_off_track(env) -> bool:
    """True when no wheel touches a road tile."""
    return not any(len(w.tiles) for w in env.unwrapped.car.wheels)


def vehicle_state(env) -> np.ndarray:
    """float32[8] in the order of STATE_FIELDS."""
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
