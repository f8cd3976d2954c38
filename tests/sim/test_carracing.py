"""The CarRacing world: config validation, determinism by seed, vehicle state, track geometry."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sim.carracing import STATE_FIELDS, Track, WorldConfig, is_off_track, make_env, vehicle_state, wrap_angle


@pytest.fixture(scope="module")
def env():
    e = make_env(WorldConfig(image_size=64, max_steps=100))
    yield e
    e.close()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unsupported world"):
        WorldConfig(world="Pong-v5")
    with pytest.raises(ValueError, match="image_size"):
        WorldConfig(image_size=8)
    with pytest.raises(ValueError, match="max_steps"):
        WorldConfig(max_steps=0)


def test_observation_size_and_determinism_by_seed(env):
    def roll(seed: int) -> np.ndarray:
        obs, _ = env.reset(seed=seed)
        frames = [obs]
        for t in range(20):
            obs, *_ = env.step(np.array([0.3 * math.sin(t / 3), 0.5, 0.0], dtype=np.float32))
            frames.append(obs)
        return np.stack(frames)

    a, b, c = roll(7), roll(7), roll(8)
    assert a.shape == (21, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_vehicle_state_vector(env):
    env.reset(seed=3)
    s0 = vehicle_state(env)
    assert s0.shape == (len(STATE_FIELDS),) == (8,) and s0.dtype == np.float32
    track = Track(env)
    assert np.linalg.norm(s0[:2] - track.points[0]) < 1.0  # starts on the first centreline point
    assert s0[5] == pytest.approx(0.0, abs=1e-3) and s0[7] == 1.0
    for _ in range(60):
        env.step(np.array([0.0, 1.0, 0.0], dtype=np.float32))
    s = vehicle_state(env)
    hull = env.unwrapped.car.hull
    assert s[2] == pytest.approx(hull.angle, abs=1e-5)
    assert s[5] == pytest.approx(math.hypot(s[3], s[4]), rel=1e-5) and s[5] > 10
    forward = np.array([-math.sin(s[2]), math.cos(s[2])])
    assert forward @ (s[3:5] / s[5]) > 0.9  # driving forwards
    assert s[7] == 1.0 and not is_off_track(env)


def test_track_geometry(env):
    env.reset(seed=3)
    track = Track(env)
    assert track.n > 100 and np.allclose(track.seg_len[:-1], 3.5, atol=0.1)
    assert abs(track.curvature).max() < 0.2
    i = 10
    normal_right = np.array([math.sin(track.heading[i]), -math.cos(track.heading[i])])
    p = track.points[i] + 2.0 * normal_right
    assert track.nearest(p, hint=8) == i
    assert track.lateral_offset(p, i) == pytest.approx(2.0, abs=1e-6)
    assert track.lateral_rate(3.0 * normal_right, i) == pytest.approx(3.0, abs=1e-6)
    assert track.heading_error(track.heading[i] - math.pi / 2, i) == pytest.approx(0.0, abs=1e-9)
    j, s = track.ahead(i, 10.0)
    assert s >= 10.0 and (j - i) % track.n == 3
    assert wrap_angle(3 * math.pi) == pytest.approx(-math.pi)


def test_state_fields_contract():
    assert STATE_FIELDS == ("x", "y", "heading", "vx", "vy", "speed", "yaw_rate", "on_track")
