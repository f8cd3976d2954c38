"""The CarRacing world: config validation, determinism by seed, vehicle state, track geometry."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sim import worlds
from sim.worlds.base import WorldConfig
from sim.worlds.carracing import SPEC, CarEnv, CarRacing
from sim.worlds.carracing_expert import Track, is_off_track, vehicle_state, wrap_angle

WORLD = WorldConfig(name="carracing", image_size=64, max_steps=100)


@pytest.fixture(scope="module")
def world():
    return worlds.get(WORLD)


@pytest.fixture
def make(world):
    """Build (and close afterwards) the env of one seed."""
    built = []

    def _make(seed: int) -> CarEnv:
        env = world.make_env(seed, "drive")
        built.append(env)
        return env

    yield _make
    for env in built:
        env.close()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown world"):
        worlds.get(WorldConfig(name="Pong-v5"))
    with pytest.raises(ValueError, match="image_size"):
        WorldConfig(image_size=8)
    with pytest.raises(ValueError, match="max_steps"):
        WorldConfig(max_steps=-1)
    with pytest.raises(ValueError, match="not 'carracing'"):
        CarRacing(WorldConfig(name="metaworld-mt10"))
    with pytest.raises(ValueError, match="unknown Options fields"):
        worlds.get(WorldConfig(name="carracing", options={"turbo": True}))
    with pytest.raises(ValueError, match="no task"):
        worlds.get("carracing").make_env(0, "fly")


def test_world_registry_and_options():
    world = worlds.get("carracing")
    assert isinstance(world, CarRacing) and world.spec is SPEC and worlds.spec("carracing") is SPEC
    assert "carracing" in worlds.names()
    assert world.image_size == SPEC.image_size and world.max_steps == SPEC.max_steps  # 0: the spec's
    tiny = worlds.get(WorldConfig(name="carracing", image_size=32, max_steps=120,
                                  options={"noise": {"pulse_prob": 0.05}, "safety": {"stall_steps": 10}}))
    assert tiny.image_size == 32 and tiny.max_steps == 120
    assert tiny.options.noise.pulse_prob == 0.05 and tiny.options.noise.steer_std == 0.05  # others kept
    assert tiny.options.safety.stall_steps == 10


def test_observation_size_and_determinism_by_seed(make):
    def roll(seed: int) -> np.ndarray:
        env = make(seed)
        obs = env.reset()
        frames = [obs]
        for t in range(20):
            obs, reward, done, info = env.step(np.array([0.3 * math.sin(t / 3), 0.5, 0.0], dtype=np.float32))
            assert isinstance(reward, float) and not done
            frames.append(obs)
        return np.stack(frames)

    a, b, c = roll(7), roll(7), roll(8)
    assert a.shape == (21, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_image_size_follows_the_config():
    world = worlds.get(WorldConfig(name="carracing", image_size=32, max_steps=10))
    env = world.make_env(0, "drive")
    try:
        assert env.reset().shape == (32, 32, 3)
    finally:
        env.close()


def test_vehicle_state_vector(make):
    env = make(3)
    env.reset()
    s0 = vehicle_state(env)
    assert s0.shape == (len(SPEC.state_names),) == (8,) and s0.dtype == np.float32
    np.testing.assert_array_equal(env.state(), s0)
    track = Track(env)
    assert np.linalg.norm(s0[:2] - track.points[0]) < 1.0  # starts on the first centreline point
    assert s0[5] == pytest.approx(0.0, abs=1e-3) and s0[7] == 1.0
    assert env.signals() == {"off_track": False} and not env.success()
    for _ in range(60):
        env.step(np.array([0.0, 1.0, 0.0], dtype=np.float32))
    s = env.state()
    hull = env.unwrapped.car.hull
    assert s[2] == pytest.approx(hull.angle, abs=1e-5)
    assert s[5] == pytest.approx(math.hypot(s[3], s[4]), rel=1e-5) and s[5] > 10
    forward = np.array([-math.sin(s[2]), math.cos(s[2])])
    assert forward @ (s[3:5] / s[5]) > 0.9  # driving forwards
    assert s[7] == 1.0 and not is_off_track(env) and env.signals() == {"off_track": False}


def test_track_geometry(make):
    env = make(3)
    env.reset()
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
    assert SPEC.state_names == ("x", "y", "heading", "vx", "vy", "speed", "yaw_rate", "on_track")
    assert SPEC.name == "carracing" and SPEC.signals == ("off_track",)
    assert SPEC.action_names == ("steer", "gas", "brake")
