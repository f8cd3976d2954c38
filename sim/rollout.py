"""The rollout loop: one episode of a driver in any registered world, with a privileged safety driver.

A driver has `reset(env, seed)`, `act(env, obs) -> float32[A]` and `name`, `policy_version`
attributes (``sim.worlds.base.Driver``). Each step the world's privileged expert labels the
observed state (the training label), the world's safety rule decides whether the expert takes
over, and the driver's action (or the expert's, on a takeover) is applied. The episode comes back
in the contract of ``sim.worlds.base``; the summary carries the world's score (episode return or
success) beside the intervention counts.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

from sim.worlds.base import Observation, World, WorldSpec

SAFETY_MODES = ("active", "shadow", "off")


class RandomDriver:
    """Uniformly random actions within the spec's bounds; seeded per episode."""

    policy_version, reads_frames = "", False

    def __init__(self, spec: WorldSpec, *, name: str = "random") -> None:
        self.spec, self.name = spec, name
        self._rng = np.random.default_rng(0)

    def reset(self, env, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(None if seed is None else [seed, 0xA11])

    def act(self, env, obs: Observation) -> np.ndarray:
        return self._rng.uniform(self.spec.action_low, self.spec.action_high).astype(np.float32)


class PolicyDriver:
    """Drives with any `act_fn(frames_BKHWC uint8, state_BS float32, tasks [B]) -> float32[B, A]`
    over the last K frames (padded by repeating the episode's first frame)."""

    reads_frames = True

    def __init__(self, act_fn: Callable[..., np.ndarray], *, history: int, name: str = "policy",
                 policy_version: str | None = None) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.act_fn, self.history, self.name = act_fn, history, name
        self.policy_version = name if policy_version is None else policy_version
        self._frames: deque = deque(maxlen=history)

    def reset(self, env, seed: int | None = None) -> None:
        self._frames.clear()

    def act(self, env, obs: Observation) -> np.ndarray:
        if not self._frames:
            self._frames.extend([obs.image] * self.history)
        self._frames.append(obs.image)
        out = np.asarray(self.act_fn(np.stack(self._frames)[None], obs.state[None], [obs.instruction]),
                         dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != 1:
            raise ValueError(f"policy act_fn must return [1, A] actions, got shape {out.shape}")
        return out[0]


def run_episode(*, world: World, seed: int, task: str | None = None, driver, safety: str = "active",
                record: bool = True, expert=None) -> tuple[dict | None, dict]:
    """Drive one episode of `task` (default: the world's first) on scene `seed`.

    Returns (episode dict per the contract, or None if not recorded; summary). safety: "active"
    (the expert takes over and the steps are flagged), "shadow" (triggers are counted as
    interventions needed, the driver keeps control) or "off" (no monitoring acts).
    """
    spec = world.spec
    if safety not in SAFETY_MODES:
        raise ValueError(f"safety must be one of {SAFETY_MODES}, got {safety!r}")
    task = task or spec.task_names[0]
    instruction = spec.instruction(task)
    # nobody looks at an unrecorded episode's frames when the driver acts on privileged state
    env = world.make_env(int(seed), task, frames=record or getattr(driver, "reads_frames", True))
    try:
        image = env.reset()
        want = (world.image_size, world.image_size, 3)
        if image.shape != want:
            raise ValueError(f"world {spec.name!r} renders {image.shape} frames, expected {want}")
        expert = expert or world.expert()
        expert.reset(env, int(seed))
        driver.reset(env, int(seed))
        monitor = world.safety_monitor(env)
        index = spec.policy_state_index
        rec: dict[str, list] = {k: [] for k in ("frames", "actions", "expert_actions", "states", "rewards",
                                                "interventions", "signals")}
        score, steps, engaged_steps, signal_steps = 0.0, 0, 0, dict.fromkeys(spec.signals, 0)
        for t in range(world.max_steps):
            state = np.asarray(env.state(), np.float32)
            signals = env.signals()
            obs = Observation(image=image, state=state[index], task=task, instruction=instruction, step=t)
            label = spec.clip_action(expert.act(env, obs), "expert")
            engaged = monitor.update(env, t)[0] and safety != "off"
            proposed = spec.clip_action(driver.act(env, obs), f"driver {driver.name!r}")
            takeover = engaged and safety == "active"
            action = label if takeover else proposed
            if record:
                for key, value in (("frames", image), ("actions", action), ("expert_actions", label),
                                   ("states", state), ("interventions", takeover), ("signals", signals)):
                    rec[key].append(value)
            image, reward, done, _ = env.step(action)
            rec["rewards"].append(reward)
            score += float(reward)
            steps += 1
            engaged_steps += engaged
            for name in spec.signals:
                signal_steps[name] += bool(signals.get(name, False))
            if done:
                break
        success = bool(env.success())
    finally:
        env.close()
    summary = {"seed": int(seed), "task": task, "score": float(success) if spec.score == "success" else score,
               "episode_return": score, "success": success, "steps": steps,
               **{f"{name}_rate": n / max(steps, 1) for name, n in signal_steps.items()},
               "interventions": monitor.events if safety != "off" else 0,
               "intervention_steps": engaged_steps, "driver": driver.name, "safety": safety}
    if not record:
        return None, summary
    episode = {"world": spec.name, "seed": int(seed), "task": task, "instruction": instruction,
               "driver": driver.name, "policy_version": str(driver.policy_version),
               "frames": np.stack(rec["frames"]).astype(np.uint8),
               "actions": np.stack(rec["actions"]).astype(np.float32),
               "expert_actions": np.stack(rec["expert_actions"]).astype(np.float32),
               "states": np.stack(rec["states"]).astype(np.float32),
               "rewards": np.asarray(rec["rewards"], dtype=np.float32),
               "interventions": np.asarray(rec["interventions"], dtype=bool),
               "signals": {name: np.array([bool(s.get(name, False)) for s in rec["signals"]])
                           for name in spec.signals},
               "timestamps_ns": np.arange(steps, dtype=np.int64) * spec.step_ns}
    return episode, summary


def replay_labels(*, world: World, seed: int, task: str, prefix: np.ndarray, logged_state: np.ndarray,
                  actions: np.ndarray, atol: float = 1e-3) -> np.ndarray | None:
    """The privileged expert's labels along a counterfactual, where the world can replay a logged state.

    The episode (``seed``, ``task``) is replayed by its logged actions ``prefix`` [t, A] (steps
    0..t-1, the expert stepping along so that any memory it keeps is what it was), which must
    reproduce ``logged_state`` (the state logged at step t, NaN entries ignored); then ``actions``
    [T, A] drive it, and label i is the clean expert's action at the state after ``actions[:i + 1]``.
    Returns float32 [n, A] with n <= T (fewer when the episode ends), or None when the replay does
    not reproduce the logged state (a log from elsewhere, or a world that is not deterministic).
    """
    spec = world.spec
    env = world.make_env(int(seed), task, frames=False)
    try:
        env.reset()
        expert = world.expert()
        expert.reset(env, int(seed))
        for a in prefix:
            expert.act(env)
            if env.step(np.asarray(a, np.float32))[2]:
                return None
        state, logged = np.asarray(env.state(), np.float32), np.asarray(logged_state, np.float32)
        known = np.isfinite(logged)
        if state.shape != logged.shape or not np.allclose(state[known], logged[known], atol=atol, rtol=1e-4):
            return None
        expert.act(env)  # at step t, as when it was logged: one call per state keeps any memory in step
        labels = []
        for a in actions:
            done = env.step(np.asarray(a, np.float32))[2]
            labels.append(spec.clip_action(expert.act(env), "expert"))
            if done:
                break
        return np.asarray(labels, np.float32).reshape(len(labels), len(spec.actions))
    finally:
        env.close()
