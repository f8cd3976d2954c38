"""The Meta-World MT10 world: spec, scenes by seed, experts, safety driver, events, tags, synthesis."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld")

from sim import worlds  # noqa: E402
from sim.worlds.base import Observation, WorldConfig  # noqa: E402
from sim.worlds.metaworld_mt10 import SPEC, STATE_NAMES, MetaWorldMT10  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def world():
    return worlds.get(WorldConfig(name="metaworld-mt10", image_size=SIZE))


@pytest.fixture
def make(world):
    """Build (and close afterwards) the env of one (seed, task)."""
    built = []

    def _make(seed: int, task: str, w=None):
        env = (w or world).make_env(seed, task)
        built.append(env)
        return env

    yield _make
    for env in built:
        env.close()


class Still:
    """A driver that never moves: the safety driver must call it a stall."""

    name, policy_version = "still", ""

    def reset(self, env, seed: int) -> None:
        pass

    def act(self, env, obs) -> np.ndarray:
        return np.zeros(4, np.float32)


def run(world, env, driver, *, safety: bool = False, max_steps: int | None = None) -> dict:
    """A local copy of the rollout loop's order: state, label, monitor, action, step."""
    spec, frame = world.spec, env.reset()
    label_expert, monitor = world.expert(), world.safety_monitor(env)
    driver.reset(env, env.seed)
    out = {k: [] for k in ("actions", "labels", "states", "rewards", "interventions", "reasons", "success", "grasped")}
    for t in range(max_steps or world.max_steps):
        state = env.state()
        obs = Observation(frame, state[spec.policy_state_index], env.task, spec.instruction(env.task), t)
        label = label_expert.act(env, obs)
        engaged, reason = monitor.update(env, t)
        action = label if (safety and engaged) else spec.clip_action(driver.act(env, obs), driver.name)
        signals = env.signals()
        for key, value in (("actions", action), ("labels", label), ("states", state), ("interventions", engaged),
                           ("reasons", reason), ("success", signals["success"]), ("grasped", signals["grasped"])):
            out[key].append(value)
        frame, reward, done, _ = env.step(action)
        out["rewards"].append(reward)
        if done:
            break
    out = {k: np.asarray(v) for k, v in out.items()}
    out["solved"], out["takeovers"] = env.success(), monitor.events
    return out


def test_spec_is_valid_and_registered(world):
    assert isinstance(world, MetaWorldMT10) and worlds.spec("metaworld-mt10") is SPEC
    assert SPEC.task_names == ("reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close",
                               "button-press-topdown", "peg-insert-side", "window-open", "window-close")
    assert all(t.instruction.endswith(".") for t in SPEC.tasks)
    assert SPEC.action_names == ("dx", "dy", "dz", "gripper") and SPEC.rate_hz == pytest.approx(80.0)
    assert SPEC.policy_state == ("hand_x", "hand_y", "hand_z", "gripper", "goal_x", "goal_y", "goal_z")
    assert not {"obj_x", "obj_y", "obj_z"} & set(SPEC.policy_state) and set(SPEC.static_state) <= set(STATE_NAMES)
    assert "none" not in SPEC.event_weights and SPEC.score == "success"
    assert not any(SPEC.fleet_seed_base <= s for s in SPEC.eval_seeds)
    assert all(len(k.split(".")) == 2 for p in SPEC.presets.values() for k in p)  # section.key (tests/flows resolve them)
    tiny = worlds.get(WorldConfig(name="metaworld-mt10", max_steps=40, options={"noise": {"sigma": 0.5}}))
    assert tiny.max_steps == 40 and tiny.options.noise.sigma == 0.5 and tiny.options.noise.pulse_prob == 0.02
    with pytest.raises(ValueError, match="unknown Options fields"):
        worlds.get(WorldConfig(name="metaworld-mt10", options={"turbo": True}))
    with pytest.raises(ValueError, match="<= 500"):
        worlds.get(WorldConfig(name="metaworld-mt10", max_steps=600))
    with pytest.raises(ValueError, match="no task"):
        world.make_env(0, "juggle")


def test_scenes_depend_on_the_seed_only(world, make):
    a, b, c = make(1000, "push"), make(1001, "push"), make(1000, "push")
    fa, fb, fc = a.reset(), b.reset(), c.reset()
    assert fa.shape == (SIZE, SIZE, 3) and fa.dtype == np.uint8 and fa.std() > 10
    assert np.array_equal(fa, fc) and np.array_equal(a.state(), c.state())
    sa, sb = a.state(), b.state()
    obj, goal = slice(7, 10), slice(4, 7)
    assert not np.allclose(sa[obj], sb[obj]) and not np.allclose(sa[goal], sb[goal])
    assert not np.array_equal(fa, fb)
    assert sa.dtype == np.float32 and sa.shape == (len(STATE_NAMES),) and np.isfinite(sa).all()
    assert set(a.signals()) == set(SPEC.signals) and not a.success()
    # a second reset keeps the scene (Meta-World would draw a new one)
    a.step(np.ones(4, np.float32))
    assert np.array_equal(a.reset(), fa)
    # each env owns a GL context: closing one must not corrupt the others' frames
    c.close()
    assert np.array_equal(b.reset(), fb) and np.array_equal(a.reset(), fa)
    # a pooled env that ran another scene draws this one exactly as a fresh env did
    d = make(1002, "push")
    assert d.gym is not None and not np.array_equal(d.reset(), fa)
    d.step(-np.ones(4, np.float32))
    d.close()
    again = make(1000, "push")
    assert np.array_equal(again.reset(), fa) and np.array_equal(again.state(), sa)
    # an env whose frames nobody reads (an expert's or random driver's evaluation) skips rendering:
    # blank frames, the same scene and the same physics
    blind = world.make_env(1000, "push", frames=False)
    try:
        assert not blind.reset().any() and np.array_equal(blind.state(), sa)
        step = np.array([0.3, -0.2, 0.1, 1.0], np.float32)
        again.step(step)
        assert not blind.step(step)[0].any() and np.array_equal(blind.state(), again.state())
    finally:
        blind.close()
    # tasks sharing a sampler (reach, push, pick-place) get different scenes from one seed
    reach, pick = make(1000, "reach"), make(1000, "pick-place")
    reach.reset(), pick.reset()
    assert not np.allclose(reach.state()[goal], pick.state()[goal])


@pytest.mark.parametrize("task", ["reach", "drawer-close", "button-press-topdown"])
def test_clean_expert_succeeds(world, make, task):
    out = run(world, make(1000, task), world.expert())
    assert out["solved"] and len(out["actions"]) < world.max_steps
    assert out["takeovers"] == 0  # the clean expert never trips the safety driver
    assert np.array_equal(out["actions"], out["labels"])
    assert (np.abs(out["actions"]) <= 1).all() and out["actions"].dtype == np.float32


def test_reach_expert_brings_the_fingertips_to_the_goal(world, make):
    """Success is the TCP (between the finger pads, 4.5 cm below the hand) within 5 cm of the goal:
    the expert aims the TCP there, leaving a policy that imitates it the whole radius of slack."""
    env, expert = make(1004, "reach"), world.expert()  # a high goal: aiming the hand left the TCP 4.5 cm short
    env.reset()
    for _ in range(100):  # on past the success that ends an episode, to where the expert settles
        env.step(expert.act(env))
    tcp_to_goal = np.linalg.norm(env.gym.tcp_center - env.state()[4:7])
    hand_to_goal = np.linalg.norm(env.state()[:3] - env.state()[4:7])
    assert env.success() and tcp_to_goal < 0.01 and 0.04 < hand_to_goal < 0.05


def test_peg_expert_carries_a_lifted_peg_to_the_hole(world, make):
    """Meta-World's scripted peg policy put a peg hanging 2.5 cm under the hand back on the table
    (scene 1001, to-go 0.31 m at the end); the expert carries a lifted peg on into the hole."""
    out = run(world, make(1001, "peg-insert-side"), world.expert())
    assert out["solved"] and out["takeovers"] == 0
    lifted = out["states"][:, 9] > 0.06
    assert lifted.any() and lifted[np.argmax(lifted):].all()  # once off the table, never put back


def test_noisy_expert_is_deterministic_given_the_seed(world, make):
    env = make(1001, "reach")  # a re-reset env replays its scene
    runs = [run(world, env, world.expert(noisy=True, seed=3), max_steps=40) for _ in range(2)]
    other = run(world, env, world.expert(noisy=True, seed=4), max_steps=40)
    assert np.array_equal(runs[0]["actions"], runs[1]["actions"])
    assert np.array_equal(runs[0]["states"], runs[1]["states"])
    assert not np.array_equal(runs[0]["actions"], other["actions"])
    assert not np.array_equal(runs[0]["actions"], runs[0]["labels"])  # the noise is on the action, not the label


def test_safety_driver_takes_over_a_stalled_driver(world, make):
    env = make(1000, "reach")
    shadow = run(world, env, Still(), max_steps=40)
    assert shadow["takeovers"] >= 1 and "stall" in set(shadow["reasons"]) and not shadow["solved"]
    onset = int(np.argmax(shadow["interventions"]))
    assert SPEC.warmup_steps <= onset <= 2 * world.options.safety.stall_steps  # the hand settles first
    active = run(world, env, Still(), safety=True)
    assert active["interventions"].any() and active["solved"]  # the expert finished the job


def test_events_tags_plan_and_counterfactual(world, make):
    out = run(world, make(1000, "pick-place"), world.expert(), max_steps=90)
    steps = len(out["actions"])
    span = {"timestamps_ns": np.arange(steps, dtype=np.int64) * SPEC.step_ns, "actions": out["actions"],
            "states": out["states"], "rewards": out["rewards"], "interventions": out["interventions"],
            "signals": {"success": out["success"], "grasped": out["grasped"]}}
    events = world.detect_events(span, params={})
    names = {e["event"] for e in events}
    assert names <= set(SPEC.event_weights) and {"grasp", "success"} <= names
    assert all({"event", "step", "end_step", "score"} <= set(e) for e in events)
    # a stalled span and a dropped object
    still = dict(span, states=np.repeat(out["states"][:1], steps, 0), signals={})
    assert "stall" in {e["event"] for e in world.detect_events(still, params={"stall_steps": 10})}

    tags = []
    for end in [*range(8, steps, 8), steps]:
        t = world.privileged_tags(out["states"][end - 8:], {k: v[end - 8:] for k, v in span["signals"].items()},
                                  clip_len=8)
        assert all(t[k] in SPEC.tags[k] for k in SPEC.tags) and set(t) == set(SPEC.tags)
        tags.append(t)
    phases = [t["phase"] for t in tags]
    assert phases[0] == "reach" and {"transport", "done"} <= set(phases) and tags[-1]["held"] == "yes"
    nan = np.full_like(out["states"][:4], np.nan)
    assert world.privileged_tags(nan, {}, clip_len=4) is None
    for t in tags:
        plan = world.plan("pick-place", t)
        assert isinstance(plan, str) and plan and "\n" not in plan
    assert "grasp the puck" in world.plan("pick-place", {"phase": "reach", "gripper": "open", "held": "no"})

    actions, labels = np.zeros((12, 4), np.float32), np.full((12, 4), 0.25, np.float32)
    a, lab, source = world.counterfactual(actions, labels, offset=0.5, drift_steps=4, rng=np.random.default_rng(0))
    assert a.shape == actions.shape and lab.shape == labels.shape and a.dtype == lab.dtype == np.float32
    assert source == "recovery_heuristic" and (np.abs(a) <= 1).all() and (np.abs(lab) <= 1).all()
    axis = int(np.flatnonzero(a[0])[0])
    push = a[0, axis]
    assert axis in (0, 1, 2) and abs(push) == 0.5  # a push along one hand axis, never the gripper
    assert np.allclose(a[:4, axis], push) and np.allclose(a[4:8, axis], -push) and not a[8:].any()
    assert np.allclose(lab[:8, axis], 0.25 - push) and np.allclose(np.delete(lab, axis, 1), 0.25)
