"""The neural simulator: a world's episodes continued by the world model instead of its physics.

``NeuralSim`` steps a batch of episodes at once: each starts from a real window of a logged episode
(``Start``: its last frames, the actions taken at them, the logged states and the task), and each
``step(actions)`` asks the generator (``models.world_model.WorldModel``) for the next frame and the
dynamics model (``models.dynamics.Dynamics``) for the next state, the reward, the world's signals
and whether the episode ends; the dynamics model reads the window first, and its conditioning
vector instructs the generator when the generator reads one (``condition_dim``). ``rollout``
drives the batch open loop with given actions (synthesis, fidelity). ``NeuralSimEnv`` is the same for one episode as a Gymnasium
environment; ``run_policy`` drives any batched policy through it and scores it by the world's own
rule (episode return, or success: the world's ``success_signal`` raised at some step), as the
real simulator scores it (``sim.rollout.run_episode``).

Nothing here names a world's fields: widths, bounds, signals and the score come from the spec.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from sim.worlds.base import WorldSpec

DONE_AT = 0.5  # the dynamics model's end-of-episode (and success) probability that ends / counts


@dataclass(frozen=True)
class Start:
    """A real window to continue: frames uint8 [K, H, W, 3] (oldest first), the actions taken at them
    [K, A] (the last is replaced by the driver's), the logged states [K, S], the instruction, and
    where it comes from (episode id, step of the last frame, the scene's seed and task name)."""

    frames: np.ndarray
    actions: np.ndarray
    states: np.ndarray
    instruction: str
    episode_id: str = ""
    step: int = 0
    seed: int = -1
    task: str = ""


class NeuralSim:
    """A batch of episodes continued by a generator and a dynamics model (both in eval mode)."""

    def __init__(self, generator, dynamics, spec: WorldSpec, *, sampling_steps: int | None = None,
                 seed: int = 0) -> None:
        self.generator, self.dynamics, self.spec = generator, dynamics, spec
        self.steps, self.seed = sampling_steps, seed
        g, d = generator.config, dynamics.config
        if g.action_dim != len(spec.actions) or d.action_dim != len(spec.actions):
            raise ValueError(f"world {spec.name!r} has {len(spec.actions)} actions; the generator takes "
                             f"{g.action_dim} and the dynamics model {d.action_dim}")
        if d.state_dim not in (0, len(spec.state_names)):
            raise ValueError(f"the dynamics model predicts {d.state_dim} state values; world {spec.name!r} logs "
                             f"{len(spec.state_names)}")
        if g.image_size != d.image_size:
            raise ValueError(f"generator frames {g.image_size} px and dynamics frames {d.image_size} px differ")
        if g.condition_dim not in (0, d.embed):
            raise ValueError(f"the generator reads a {g.condition_dim}-wide conditioning vector; this dynamics model "
                             f"gives {d.embed}: pair it with the dynamics model it was trained with")
        self.context = max(g.history, d.history)
        self.image_size = g.image_size
        self.success_index = spec.signals.index(spec.success_signal) if spec.score == "success" else None

    def reset(self, starts: Sequence[Start]) -> dict[str, np.ndarray]:
        """Begin one episode per start; returns the first observation batch."""
        if not starts:
            raise ValueError("reset needs at least one start")
        K, size = self.context, self.image_size
        for s in starts:
            if s.frames.shape[1:] != (size, size, 3) or len(s.frames) < 1:
                raise ValueError(f"start {s.episode_id}:{s.step} frames are {s.frames.shape}, need [K, {size}, {size}, 3]")
        pad = lambda x: np.concatenate([np.repeat(x[:1], K - len(x), 0), x[-K:]]) if len(x) < K else x[-K:]
        self.frames = np.stack([pad(s.frames) for s in starts]).astype(np.uint8)
        self.actions = np.stack([pad(np.asarray(s.actions, np.float32)) for s in starts])
        self.states = np.stack([pad(np.asarray(s.states, np.float32)) for s in starts])
        self.tasks = [s.instruction for s in starts]
        self.done = np.zeros(len(starts), bool)
        self.t = 0
        self._generator = torch.Generator().manual_seed(self.seed)
        return self.observation()

    def observation(self) -> dict[str, np.ndarray]:
        """image uint8 [B, H, W, 3], the policy's state slice [B, P], the last K frames, the tasks."""
        return {"image": self.frames[:, -1], "state": self.states[:, -1][:, self.spec.policy_state_index],
                "frames": self.frames, "tasks": list(self.tasks)}

    def step(self, actions_BA: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Apply one action per episode -> (observation, outcome: reward [B], signals [B, G]
        probabilities, done [B] probability, success [B] bool, state [B, S])."""
        actions = np.clip(np.asarray(actions_BA, np.float32), self.spec.action_low, self.spec.action_high)
        if actions.shape != (len(self.frames), len(self.spec.actions)) or not np.isfinite(actions).all():
            raise ValueError(f"actions must be finite [{len(self.frames)}, {len(self.spec.actions)}], got {actions.shape}")
        self.actions[:, -1] = actions
        g, d = self.generator.config, self.dynamics.config
        tasks = list(self.tasks)
        # the reasoner reads the window first; its h[t] instructs the generator (when it reads one)
        pred = self.dynamics.predict(self.frames[:, -d.history:], self.actions[:, -d.history:],
                                     self.states[:, -d.history:] if d.state_dim else None,
                                     tasks if d.task_vocab else None)
        frame = self.generator.predict(self.frames[:, -g.history:], actions, steps=self.steps,
                                       generator=self._generator, tasks=tasks if g.task_vocab else None,
                                       condition_BD=pred.condition if g.condition_dim else None)
        signals = pred.signals.cpu().numpy()
        state = pred.next_state.cpu().numpy() if d.state_dim else np.full((len(actions), len(self.spec.state_names)),
                                                                             np.nan, np.float32)
        i = self.success_index
        success = signals[:, i] > DONE_AT if i is not None else np.zeros(len(actions), bool)
        outcome = {"reward": pred.reward.cpu().numpy(), "signals": signals, "done": pred.done.cpu().numpy(),
                   "success": success, "state": state}
        self.frames = np.concatenate([self.frames[:, 1:], frame[:, None]], axis=1)
        self.actions = np.concatenate([self.actions[:, 1:], actions[:, None]], axis=1)
        self.states = np.concatenate([self.states[:, 1:], state[:, None].astype(np.float32)], axis=1)
        self.t += 1
        return self.observation(), outcome


    def rollout(self, starts: Sequence[Start], actions_BTA: np.ndarray) -> dict[str, np.ndarray]:
        """Open loop: drive each start with its row of ``actions_BTA`` [B, T, A] -> frames uint8
        [B, T, H, W, 3] (frame t follows action t), the predicted states [B, T, S], rewards [B, T],
        signal probabilities [B, T, G] and end-of-episode probabilities [B, T]."""
        actions = np.asarray(actions_BTA, np.float32)
        if actions.ndim != 3 or len(actions) != len(starts) or actions.shape[1] < 1:
            raise ValueError(f"actions must be [{len(starts)}, T >= 1, A], got {actions.shape}")
        self.reset(starts)
        frames, outcomes = [], []
        for t in range(actions.shape[1]):
            obs, out = self.step(actions[:, t])
            frames.append(obs["image"])
            outcomes.append(out)
        stack = lambda key: np.stack([o[key] for o in outcomes], axis=1)  # noqa: E731
        return {"frames": np.stack(frames, axis=1), "states": stack("state"), "rewards": stack("reward"),
                "signals": stack("signals"), "done": stack("done")}

def run_policy(sim: NeuralSim, starts: Sequence[Start], act: Callable[[dict], np.ndarray], *,
               horizon: int) -> list[dict]:
    """Drive ``act(observation batch) -> actions [B, A]`` for up to ``horizon`` steps from each start;
    one summary per start: the world's score, the return, success, steps, per-signal rates.

    A world scored by success scores the dynamics model's belief that the task succeeded: the
    highest probability it gave the success signal while the episode ran (``success_prob``), an
    estimate of the success rate that a 0/1 threshold would throw away; ``success`` is that
    probability above ``DONE_AT``, which also ends the episode."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    spec = sim.spec
    obs = sim.reset(starts)
    B = len(starts)
    ret, alive = np.zeros(B), np.ones(B, bool)
    steps, success, belief = np.zeros(B, int), np.zeros(B, bool), np.zeros(B)
    raised = np.zeros((B, len(spec.signals)))
    for _ in range(horizon):
        obs, out = sim.step(act(obs))
        ret += np.where(alive, out["reward"], 0.0)
        steps += alive
        raised += alive[:, None] * (out["signals"] > DONE_AT)
        success |= alive & out["success"]
        if sim.success_index is not None:
            belief = np.where(alive, np.maximum(belief, out["signals"][:, sim.success_index]), belief)
        alive &= out["done"] <= DONE_AT
        if spec.score == "success":
            alive &= ~success
        if not alive.any():
            break
    return [{"episode_id": s.episode_id, "start_step": s.step, "seed": s.seed, "task": s.task,
             "score": float(belief[i]) if spec.score == "success" else float(ret[i]),
             "episode_return": float(ret[i]), "success": bool(success[i]), "success_prob": float(belief[i]),
             "steps": int(steps[i]),
             **{f"{name}_rate": float(raised[i, j] / max(steps[i], 1)) for j, name in enumerate(spec.signals)}}
            for i, s in enumerate(starts)]


class NeuralSimEnv(gym.Env):
    """One episode of ``NeuralSim`` as a Gymnasium env. ``reset(seed, options={"start": i})`` picks
    the i-th start (default: seeded at random); observations are {"image", "state"}; the info dict
    carries the predicted full state, signal probabilities and success."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, generator, dynamics, spec: WorldSpec, starts: Sequence[Start], *, max_steps: int = 200,
                 sampling_steps: int | None = None) -> None:
        if not starts:
            raise ValueError("NeuralSimEnv needs at least one start")
        self.sim = NeuralSim(generator, dynamics, spec, sampling_steps=sampling_steps)
        self.starts, self.max_steps, self.world_spec = list(starts), max_steps, spec  # gym.Env.spec is Gymnasium's
        size = self.sim.image_size
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (size, size, 3), np.uint8),
            "state": gym.spaces.Box(-np.inf, np.inf, (len(spec.policy_state),), np.float32)})
        self.action_space = gym.spaces.Box(spec.action_low, spec.action_high, dtype=np.float32)
        self.render_mode = "rgb_array"

    def _obs(self, obs: dict) -> dict:
        return {"image": obs["image"][0], "state": obs["state"][0].astype(np.float32)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        index = (options or {}).get("start", int(self.np_random.integers(len(self.starts))))
        start = self.starts[int(index)]
        self.sim.seed = int(self.np_random.integers(2**31))
        obs = self.sim.reset([start])
        return self._obs(obs), {"start": int(index), "episode_id": start.episode_id, "step": start.step,
                                "instruction": start.instruction}

    def step(self, action):
        obs, out = self.sim.step(np.asarray(action, np.float32)[None])
        success = bool(out["success"][0])
        terminated = bool(out["done"][0] > DONE_AT) or (self.world_spec.score == "success" and success)
        info = {"state": out["state"][0], "signals": dict(zip(self.world_spec.signals, out["signals"][0].tolist())),
                "success": success}
        return self._obs(obs), float(out["reward"][0]), terminated, self.sim.t >= self.max_steps, info

    def render(self) -> np.ndarray:
        return self.sim.frames[0, -1]
