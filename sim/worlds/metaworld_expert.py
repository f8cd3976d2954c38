"""Meta-World's privileged drivers: the scripted expert, the fleet's noisy expert, the safety driver.

The expert is ``metaworld.policies``' scripted policy for the task, reading the privileged
observation, plus one rule: fingers jammed on top of the object open and lift. The noisy expert
adds DART-style noise (Laskey et al., "DART: Noise Injection for Robust Imitation Learning",
CoRL 2017) plus short pushes and gripper openings, so recoveries reach the data. The safety
monitor decides when the expert takes over from another driver.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

HAND = slice(0, 3)  # the hand's position in the world's state vector
OBJ_Z = 9  # the object's height in the world's state vector
GRASPS = ("push", "pick-place", "peg-insert-side")  # tasks whose expert closes the fingers on a free object


@dataclass(frozen=True)
class NoiseConfig:
    """The fleet expert's noise: Gaussian on dx, dy, dz every step, and pulses after warmup and
    before success: a push along one random hand axis, or the gripper opened for a moment."""

    sigma: float = 0.1
    pulse_prob: float = 0.02  # chance per step of starting a pulse
    pulse_steps: tuple[int, int] = (3, 8)  # push length range (inclusive)
    push: float = 0.5  # push size (0.5: 5 mm per step)
    open_fraction: float = 0.25  # fraction of pulses that open the gripper instead of pushing
    open_steps: tuple[int, int] = (1, 3)  # longer openings drop a lifted puck out of reach


@dataclass(frozen=True)
class SafetyConfig:
    """When the expert takes over (stall, drift, timeout) and when it hands back."""

    stall_steps: int = 15
    stall_dist: float = 0.004  # m the hand must move within stall_steps (clean expert >= 0.007)
    drift_reward: float = 3.0  # shaped reward (0-10) below its best (clean expert drops <= 1.8)
    timeout_fraction: float = 0.7  # past this share of max_steps unsolved: the expert finishes
    handback_steps: int = 10  # at least this many expert steps with progress before handing back
    progress_reward: float = 0.5  # reward gained since takeover that counts as progress


# peg-insert-side's scripted policy sends the hand back down onto the peg whenever the hand is over
# 2.5 cm above the peg's grasp point, also while carrying it: a peg hanging a little low in the fingers
# went back to the table (3 of the 10 held-out scenes failed so, the peg 2.5 cm under the hand). Once
# the peg is held off the table the expert only carries it (the policy's own carry and insert branches)
PEG, PEG_LIFTED = "peg-insert-side", 0.06  # m: the resting peg's grasp point is 2.5-3 cm high


# tasks whose success is the fingertips' centre (TCP) near the goal: Meta-World's scripted policy
# brings the hand there, which leaves the TCP 4.6 cm from the goal, 0.4 cm inside the 5 cm success
# radius, so a policy imitating it fails when it stops a centimetre short (README, the arm)
AIM_TCP = ("reach",)


class Expert:
    """Meta-World's scripted policy for the env's task, on the privileged observation; stateless.
    Two rules are added: fingers jammed on top of the object (``MetaWorldEnv.jammed``) open and lift,
    and a lifted peg is carried to the hole, never put back down (``PEG``)."""

    name, policy_version, reads_frames = "expert", "", False

    def __init__(self) -> None:
        self._policies: dict = {}

    def reset(self, env: Any, seed: int = 0) -> None:
        pass

    def act(self, env: Any, obs: Any = None) -> np.ndarray:
        if env.task not in self._policies:
            from metaworld.policies import ENV_POLICY_MAP

            self._policies[env.task] = ENV_POLICY_MAP[f"{env.task}-v3"]()
        if env.task in GRASPS and env.jammed():
            return np.array([0.0, 0.0, 1.0, -1.0], np.float32)
        if env.task == PEG and env.state()[OBJ_Z] > PEG_LIFTED and env.grasped():
            return self._carry_peg(env.raw_obs)
        with warnings.catch_warnings():  # the policies warn whenever their gain saturates (the env clips)
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)
            # a copy: some policies edit their observation in place (door-open shifts the handle's x)
            obs = env.raw_obs.copy()
            if env.task in AIM_TCP:  # aim the point success is measured at, not the hand 4.5 cm above it
                obs[HAND] = env.gym.tcp_center
            action = self._policies[env.task].get_action(obs)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    @staticmethod
    def _carry_peg(obs: np.ndarray) -> np.ndarray:
        """The carry and insert branches of Meta-World's ``SawyerPegInsertionSideV3Policy``: the hand
        to the hole's line 40 cm out, then into the hole; the fingers keep their grip."""
        hand, peg, goal = obs[0:3], obs[4:7], obs[-3:]
        hole = np.array([-0.35, goal[1], 0.16])
        target = hole + np.array([0.4, 0.0, 0.0]) if np.linalg.norm(peg[1:] - hole[1:]) > 0.03 else hole
        return np.r_[np.clip(25.0 * (target - hand), -1.0, 1.0), 0.6].astype(np.float32)


class NoisyExpert:
    """The expert plus DART noise and pulses; deterministic given (seed, episode seed)."""

    name, policy_version, reads_frames = "noisy_expert", "", False

    def __init__(self, noise: NoiseConfig, seed: int = 0, *, warmup: int) -> None:
        self.noise, self.seed, self.warmup, self.expert = noise, int(seed), warmup, Expert()
        self.reset(None, 0)

    def reset(self, env: Any, seed: int = 0) -> None:
        self._rng = np.random.default_rng([self.seed, int(seed), 0xDA27])
        self._t, self._left, self._axis, self._push = 0, 0, -1, 0.0

    def act(self, env: Any, obs: Any = None) -> np.ndarray:
        n, rng = self.noise, self._rng
        a = self.expert.act(env, obs).astype(np.float64)
        self._t += 1
        if self._left == 0 and self._t > self.warmup and not env.success() and rng.random() < n.pulse_prob:
            self._axis = 3 if rng.random() < n.open_fraction else int(rng.integers(3))
            low, high = n.open_steps if self._axis == 3 else n.pulse_steps
            self._left = int(rng.integers(low, high + 1))
            self._push = -1.0 if self._axis == 3 else float(rng.choice([-n.push, n.push]))
        a[:3] += rng.normal(0.0, n.sigma, 3)
        if self._left > 0:
            a[self._axis] = self._push
            self._left -= 1
        return np.clip(a, -1.0, 1.0).astype(np.float32)


class SafetyMonitor:
    """Takes over on a stall (the hand still for ``stall_steps``), a drift (the shaped reward well
    below its best) or a timeout (unsolved past ``timeout_fraction`` of the episode: the expert keeps
    control to the end); hands back after ``handback_steps`` of progress. Quiet once solved."""

    def __init__(self, config: SafetyConfig, max_steps: int, warmup: int) -> None:
        self.config, self.warmup = config, warmup
        self.timeout_step = int(config.timeout_fraction * max_steps)
        self.engaged, self.events = False, 0
        self._hands: list[np.ndarray] = []
        self._best = -np.inf
        self._since, self._reward_at = 0, 0.0

    def update(self, env: Any, step: int) -> tuple[bool, str]:
        c = self.config
        hand, reward = env.state()[HAND].astype(np.float64), env.reward
        self._hands = (self._hands + [hand])[-(c.stall_steps + 1):]
        self._best = max(self._best, reward)
        reason = ""
        if env.success():
            self.engaged = False
            return False, ""
        if step >= self.timeout_step:
            reason = "timeout"
        elif (step >= self.warmup and len(self._hands) > c.stall_steps
              and np.linalg.norm(self._hands[-1] - self._hands[0]) < c.stall_dist):
            reason = "stall"
        elif reward < self._best - c.drift_reward:
            reason = "drift"
        if not self.engaged and reason:
            self.engaged, self._since, self._reward_at = True, 0, reward
            self.events += 1
        elif self.engaged and reason != "timeout":
            self._since += 1
            if self._since >= c.handback_steps and reward >= self._reward_at + c.progress_reward:
                self.engaged, self._hands, self._best = False, [], reward  # fresh windows after handing back
        return self.engaged, reason
