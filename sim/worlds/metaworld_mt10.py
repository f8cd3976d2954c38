"""Meta-World MT10 as a worldloop world: a Sawyer arm on ten tabletop tasks, seen from a corner.

Meta-World (Yu et al., "Meta-World: A Benchmark and Evaluation for Multi-Task and Meta
Reinforcement Learning", CoRL 2019), v3 as maintained by the Farama Foundation (``metaworld==3.1.1``,
MuJoCo 3.3.0). Actions move the hand's mocap target by up to 1 cm per step along x, y, z and drive
the gripper (+1 closes); one step is ``frame_skip`` 5 x 2.5 ms of simulation, so 80 Hz. The scripted
experts of ``metaworld.policies`` read the privileged observation (object and goal positions); the
fleet's noisy expert adds DART-style noise (Laskey et al., "DART: Noise Injection for Robust
Imitation Learning", CoRL 2017) plus short pushes and gripper openings, so recoveries reach the data.

Traps handled here (see shared/STACK.md):
* ``reset(seed=)`` is ignored in 3.1.1, and ``gym.make("Meta-World/MT1", seed=)`` draws a scene from
  50 pre-sampled goals (2-4 s a build) that changes with every reset. Here a process keeps one raw
  env per task and draws each scene from the env's own sampler reseeded from (scene seed, task)
  before every reset: a scene depends on its seed only, and a reused env costs ~0.25 s a reset.
* Rendering is OSMesa on CPUs (EGL needs a GPU); shadows, offscreen multisampling and reflections
  are switched off (reflections alone cost ~40% of a frame and change it by < 0.03/255 on average).
  Several envs in one process each own a GL context: ours is made current before every render, and
  on close MuJoCo's GL objects are freed in our context before the context itself (freeing them in
  another env's context corrupts its frames).
* Some scripted policies edit the observation they are given (door-open shifts the handle's x in
  place): the expert gets a copy, or a second call in one step (label and driver) breaks the task.
* The ``corner`` camera renders upside down: frames are flipped on both axes.
"""
from __future__ import annotations

import os

os.environ["MUJOCO_GL"] = os.environ.get("MUJOCO_GL", "").strip() or "osmesa"  # " osmesa " breaks MuJoCo
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa" if os.environ["MUJOCO_GL"] == "osmesa" else "egl")

import atexit  # noqa: E402
import threading  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402

from sim.worlds import detectors, register  # noqa: E402
from sim.worlds.base import ActionSpec, EventSpec, TaskSpec, World, WorldConfig, WorldSpec  # noqa: E402
from sim.worlds.metaworld_expert import (HAND, Expert, NoiseConfig, NoisyExpert, SafetyConfig,  # noqa: E402
                                        SafetyMonitor)

TASKS = (
    TaskSpec("reach", "Move the gripper to the goal position."),
    TaskSpec("push", "Push the puck across the table to the goal."),
    TaskSpec("pick-place", "Pick up the puck and place it at the goal."),
    TaskSpec("door-open", "Open the door by pulling its handle."),
    TaskSpec("drawer-open", "Pull the drawer open."),
    TaskSpec("drawer-close", "Push the drawer closed."),
    TaskSpec("button-press-topdown", "Press the button down from above."),
    TaskSpec("peg-insert-side", "Pick up the peg and insert it sideways into the hole."),
    TaskSpec("window-open", "Slide the window open."),
    TaskSpec("window-close", "Slide the window closed."),
)
STATE_NAMES = ("hand_x", "hand_y", "hand_z", "gripper", "goal_x", "goal_y", "goal_z",
               "obj_x", "obj_y", "obj_z", "obj_to_goal")
GRIP, GOAL, OBJ, TO_GO = 3, slice(4, 7), slice(7, 10), 10
PHASES = ("reach", "grasp", "transport", "place", "push", "done")
MAX_PATH = 500  # Meta-World refuses to step an episode past this

SPEC = WorldSpec(
    name="metaworld-mt10",
    description="Meta-World v3 MT10: a Sawyer arm on ten tabletop tasks, from a corner camera (MuJoCo).",
    camera="corner",
    image_size=64,
    state_names=STATE_NAMES,
    policy_state=STATE_NAMES[:7],  # hand, gripper opening, goal; object positions are privileged
    actions=(ActionSpec("dx", -1.0, 1.0, "move the hand along x (across the table), 1 = 1 cm per step"),
             ActionSpec("dy", -1.0, 1.0, "move the hand along y (away from the robot), 1 = 1 cm per step"),
             ActionSpec("dz", -1.0, 1.0, "move the hand along z (up), 1 = 1 cm per step"),
             ActionSpec("gripper", -1.0, 1.0, "gripper effort: +1 closes, -1 opens")),
    tasks=TASKS,
    rate_hz=80.0,  # frame_skip 5 x timestep 0.0025 s
    warmup_steps=5,
    max_steps=150,  # the clean expert succeeds in 36-117 steps (measured; see tests)
    score="success",
    signals=("success", "grasped"),
    success_signal="success",
    events=(EventSpec("intervention", 4.0, "the safety driver took over"),
            EventSpec("stall", 4.0, "the hand barely moved for stall_steps before success"),
            EventSpec("drift", 3.0, "the shaped reward fell drift_reward below its best so far"),
            EventSpec("drop", 3.0, "the fingers lost a free object away from the goal"),
            EventSpec("grasp", 2.0, "the fingers closed on a free object"),
            EventSpec("release", 2.0, "the fingers let go of a free object near the goal"),
            EventSpec("success", 2.0, "the task's success condition became true")),
    tags={"phase": PHASES, "gripper": ("open", "closed"), "held": ("yes", "no")},
    mirror={},  # a mirrored corner view is not a scene of this arm
    eval_seeds=tuple(range(1000, 1010)),
    state_message="sensor_msgs/msg/JointState",
    static_state=("goal_x", "goal_y", "goal_z"),
    # at 32 px the puck and the goal vanish; a reach is solved in ~40 steps; a hand holding still
    # gives identical frames (not a frozen camera)
    # random-shift augmentation: 0.44 -> 0.60 mean success on 50 held-out scenes (same data and steps);
    # the head reads the policy's own estimate of the object's place from its pixels (aux_input: the
    # estimate is 0.7-2.3 cm off on unseen episodes; see the README's probes)
    presets={"all": {"world.image_size": 64, "curate.min_length": 20, "curate.max_frozen_fraction": 0.9,
                     "policy.shift": 4, "policy.aux_weight": 1.0, "policy.aux_input": True},
             # tiny turns keep the plain head: with aux_input their 50-step fit on 2 episodes did not beat
             # the random policy on the 4 scenes the gate sees (+0.5, CI lower bound 0.0)
             "tiny": {"world.max_steps": 60, "world.options": {"noise": {"pulse_prob": 0.05}},
                      "policy.aux_input": False, "policy.aux_weight": 0.0},
             # one turn in under 20 minutes on 2 cores: 30 expert episodes per task, 60 for the grasp
             # tasks (their policy misses the object by 1-5 cm on unseen scenes: more object positions;
             # 60 when the champion drives, over HTTP: on-policy states with the expert's labels;
             # fleet.focus 0.7 on 80 and train.focus 0.5 did not lift it, see the README), all 10 held-out seeds per
             # task (100 scenes: on 50 the gate could not pass a +0.10 candidate, CI +0.0 .. +0.2), a
             # long policy fit (more scenes need more steps: 2000 underfit 300 episodes, 0.50 against
             # 0.72 at 6000); the world model's variants are few and its two models fit briefly
             # (both warm-start each turn; the policy reads neither while synthetic frames stay gated
             # out): at 600 dynamics and 200 generator steps turns took 19.0 to 20.9 minutes
             "default": {"fleet.episodes": 390, "fleet.champion_episodes": 60, "policy.steps": 5000,
                         "fleet.task_weights": {"push": 2, "pick-place": 2, "peg-insert-side": 2},
                         "dynamics.steps": 300, "world_model.steps": 100, "synth.variants": 8}},
)


@dataclass(frozen=True)
class EventThresholds:
    stall_steps: int = 15
    stall_dist: float = 0.004
    drift_reward: float = 3.0
    place_radius: float = 0.08  # obj_to_goal under which letting go is a release, not a drop


@dataclass(frozen=True)
class TagThresholds:
    near: float = 0.09  # hand-object distance of contact phases (window handles sit ~8 cm off)
    gripper_closed: float = 0.75  # opening (1 = wide) under which the gripper is closed
    place_radius: float = 0.08
    moved: float = 0.01  # object displacement over the clip that makes a contact clip a push


@dataclass(frozen=True)
class Options:
    success_hold: int = 5  # the episode ends once success has held this many steps
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    events: EventThresholds = field(default_factory=EventThresholds)
    tags: TagThresholds = field(default_factory=TagThresholds)


_POOL: dict[tuple[str, int], list] = {}  # (task, image size) -> idle raw envs of this process
_POOL_LOCK = threading.Lock()
POOL_IDLE = 2  # idle envs kept per (task, size); more are freed


def _build(task: str, size: int):
    """A raw Meta-World env of `task` that samples its own scene (from ``np_random``) on reset."""
    import mujoco
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ML1_ARGS_KWARGS

    env = ALL_V3_ENVIRONMENTS[f"{task}-v3"](render_mode="rgb_array", camera_name=SPEC.camera, width=size,
                                           height=size)
    kwargs = {k: v for k, v in ML1_ARGS_KWARGS[f"{task}-v3"]["kwargs"].items() if k != "task_id"}
    env._partially_observable = False  # the goal is in the observation (as MT benchmarks set it)
    env.__dict__.pop("sawyer_observation_space", None)  # a cached property of the observability
    env._set_task_inner(**kwargs)
    env._set_task_called, env._freeze_rand_vec, env.seeded_rand_vec = True, False, True
    model = env.model
    model.vis.quality.shadowsize = 0  # before the renderer exists (it is created on first render)
    model.vis.quality.offsamples = 0
    model.mat_reflectance[:] = 0  # mirrored second pass: ~40% of a frame, < 0.03/255 of its pixels
    free = {int(model.jnt_bodyid[j]) for j in range(model.njnt) if model.jnt_type[j] == mujoco.mjtJoint.mjJNT_FREE}
    env.worldloop_free_geoms = {g for g in range(model.ngeom) if int(model.body_rootid[model.geom_bodyid[g]]) in free}
    return env


def _free(env) -> None:
    viewer = env.mujoco_renderer._viewers.get("rgb_array")
    if viewer is not None:  # MuJoCo's GL objects in their own context, then the context
        viewer.make_context_current()
        viewer.con.free()
    env.close()


def _checkout(task: str, size: int):
    """An idle pooled env of (task, size), or a new one."""
    with _POOL_LOCK:
        idle = _POOL.get((task, size))
        env = idle.pop() if idle else None
    return env or _build(task, size)


@atexit.register
def _drain() -> None:
    with _POOL_LOCK:
        envs = [e for idle in _POOL.values() for e in idle]
        _POOL.clear()
    for env in envs:
        _free(env)


class MetaWorldEnv:
    """One (seed, task) scene: the ``Env`` contract over a raw Meta-World env of the process's pool."""

    def __init__(self, world: "MetaWorldMT10", seed: int, task: str, *, frames: bool = True) -> None:
        self.seed, self.task = int(seed), task
        self._blank = None if frames else np.zeros((world.image_size, world.image_size, 3), np.uint8)
        self.max_steps, self.hold = world.max_steps, world.options.success_hold
        self._key = (task, world.image_size)
        self._scene = int(np.random.SeedSequence([self.seed, zlib.crc32(task.encode())]).generate_state(1)[0])
        self.gym = _checkout(task, world.image_size)
        model = self.gym.model
        self._free_geoms = self.gym.worldloop_free_geoms
        self._pads = (model.geom("leftpad_geom").id, model.geom("rightpad_geom").id)
        self.raw_obs = np.zeros(39)
        self.t, self.reward, self.ever, self.now, self._streak = 0, 0.0, False, False, 0
        self._to_go = np.nan

    def reset(self) -> np.ndarray:
        self.gym.seed(self._scene)  # every reset of this env draws the same scene
        obs, _ = self.gym.reset()
        self.raw_obs = obs
        self._to_go = float(self.gym.evaluate_state(obs, np.zeros(4, np.float32))[1]["obj_to_target"])
        self.t, self.reward, self.ever, self.now, self._streak = 0, 0.0, False, False, 0
        return self._frame()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        a = np.clip(np.asarray(action, np.float32).reshape(4), -1.0, 1.0)
        obs, reward, _, truncated, info = self.gym.step(a)
        self.raw_obs, self.reward, self.t = obs, float(reward), self.t + 1
        self._to_go = float(info["obj_to_target"])
        self.now = bool(info["success"])
        self.ever |= self.now
        self._streak = self._streak + 1 if self.now else 0
        done = self._streak >= self.hold or self.t >= self.max_steps or bool(truncated)
        return self._frame(), self.reward, done, info

    def _frame(self) -> np.ndarray:
        if self._blank is not None:  # nobody reads the frames (make_env(frames=False)): no render
            return self._blank
        self._viewer().make_context_current()  # another env's GL context may be the current one
        return np.ascontiguousarray(self.gym.render()[::-1, ::-1])

    def _viewer(self):
        return self.gym.mujoco_renderer._get_viewer("rgb_array")

    def state(self) -> np.ndarray:
        o = self.raw_obs
        return np.concatenate([o[0:4], o[-3:], o[4:7], [self._to_go]]).astype(np.float32)

    def grasped(self) -> bool:
        """Both finger pads touch one geom of a free body (the puck, the peg), not a handle or button."""
        data, (left, right) = self.gym.data, self._pads
        touch: tuple[set, set] = (set(), set())
        for c in data.contact[:data.ncon]:
            for side, pad in enumerate((left, right)):
                if pad in (c.geom1, c.geom2):
                    touch[side].add(int(c.geom2 if c.geom1 == pad else c.geom1))
        return bool(touch[0] & touch[1] & self._free_geoms)

    def jammed(self) -> bool:
        """Fingers closed above a resting object (closed too early): the scripted expert would press
        down on it forever. In clean runs the fingertips close 0.5-2 cm below the object's centre."""
        s, tcp = self.state(), self.gym.tcp_center
        return bool(s[GRIP] < 0.6 and s[OBJ][2] < 0.05 and tcp[2] - s[OBJ][2] > 0.01
                    and np.linalg.norm(tcp[:2] - s[OBJ][:2]) < 0.05)

    def signals(self) -> dict[str, bool]:
        return {"success": self.now, "grasped": self.grasped()}

    def success(self) -> bool:
        return self.ever

    def close(self) -> None:
        """Give the raw env back to the process's pool (or free it when the pool is full)."""
        env, self.gym = getattr(self, "gym", None), None
        if env is None:
            return
        with _POOL_LOCK:
            idle = _POOL.setdefault(self._key, [])
            keep = len(idle) < POOL_IDLE
            if keep:
                idle.append(env)
        if not keep:
            _free(env)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@register
class MetaWorldMT10(World):
    spec = SPEC
    Options = Options

    def __init__(self, config: WorldConfig | None = None) -> None:
        super().__init__(config)
        if self.max_steps > MAX_PATH:
            raise ValueError(f"max_steps must be <= {MAX_PATH} (Meta-World's episode limit), got {self.max_steps}")

    def make_env(self, seed: int, task: str, *, frames: bool = True) -> MetaWorldEnv:
        self.spec.instruction(task)  # an unknown task is an error
        return MetaWorldEnv(self, seed, task, frames=frames)

    def expert(self, *, noisy: bool = False, seed: int = 0):
        return NoisyExpert(self.options.noise, seed, warmup=self.spec.warmup_steps) if noisy else Expert()

    def safety_monitor(self, env: MetaWorldEnv) -> SafetyMonitor:
        return SafetyMonitor(self.options.safety, env.max_steps, self.spec.warmup_steps)

    def detect_events(self, span: dict, *, params: dict) -> list[dict]:
        c = EventThresholds(**{k: v for k, v in params.items() if k in EventThresholds.__dataclass_fields__})
        states = np.asarray(span["states"], np.float64)
        steps = len(states)
        signals = span.get("signals", {})
        success = np.asarray(signals.get("success", np.zeros(steps, bool)), bool)
        grasped = np.asarray(signals.get("grasped", np.zeros(steps, bool)), bool)
        solved = np.maximum.accumulate(success) if steps else success
        live = (np.arange(steps) >= self.spec.warmup_steps) & ~solved
        moved = np.full(steps, np.nan)
        k = c.stall_steps
        if steps > k:
            moved[k:] = np.linalg.norm(states[k:, HAND] - states[:-k, HAND], axis=1)
        rewards = np.asarray(span["rewards"], np.float64)
        below = np.fmax.accumulate(rewards) - rewards if steps else rewards
        before = np.concatenate([[False], grasped[:-1]]) if steps else grasped
        let_go = before & ~grasped
        near_goal = (states[:, TO_GO] <= c.place_radius) | success
        return detectors.events_of({
            "intervention": detectors.flag(span["interventions"]),
            "stall": detectors.flag(live & (moved < c.stall_dist)),
            "drift": detectors.flag(live & (below > c.drift_reward)),
            "drop": detectors.flag(let_go & ~near_goal),
            "grasp": detectors.flag(grasped & ~before),
            "release": detectors.flag(let_go & near_goal),
            "success": detectors.flag(success & ~np.concatenate([[False], success[:-1]])),
        }, int(params.get("merge_gap", 16)))

    def privileged_tags(self, states: np.ndarray, signals: dict[str, np.ndarray], *,
                        clip_len: int) -> dict[str, str] | None:
        """At the clip's last step: gripper opening and whether a free object is pinched; phase
        from hand-object distance, holding, the object's distance to the goal and its motion."""
        t = self.options.tags
        states = np.asarray(states, np.float64)
        n = int(clip_len)
        if states.ndim != 2 or states.shape[1] != len(STATE_NAMES) or not 0 < n <= len(states):
            raise ValueError(f"states must be [T, {len(STATE_NAMES)}] with the clip in its first rows, "
                             f"got {states.shape} and clip_len {n}")
        s, first = states[n - 1], states[0]
        if np.isnan(s).any() or np.isnan(first[OBJ]).any():
            return None
        flag = {k: bool(np.asarray(signals.get(k, np.zeros(len(states), bool)))[n - 1]) for k in SPEC.signals}
        near = np.linalg.norm(s[HAND] - s[OBJ]) < t.near
        if flag["success"]:
            phase = "done"
        elif flag["grasped"]:
            phase = "place" if s[TO_GO] <= t.place_radius else "transport"
        elif not near:
            phase = "reach"
        else:
            phase = "push" if np.linalg.norm(s[OBJ] - first[OBJ]) > t.moved else "grasp"
        return {"phase": phase, "gripper": "closed" if s[GRIP] < t.gripper_closed else "open",
                "held": "yes" if flag["grasped"] else "no"}

    def caption(self, tags: dict[str, str], event: str) -> str:
        held = {"yes": "object held", "no": "nothing held"}.get(tags.get("held", ""), "holding unknown")
        phase, gripper = tags.get("phase", "unknown"), tags.get("gripper", "unknown")
        return f"{phase} phase, gripper {gripper}, {held}; event: {event}"

    def plan(self, task: str, tags: dict[str, str]) -> str:
        self.spec.instruction(task)
        if tags.get("phase") == "done":
            return "hold still: the task is done"
        if task == "reach":
            return "move the gripper to the goal and hold it there"
        thing, grasps, move, finish = _PLANS[task]
        grasp = f"lower the gripper to grasp the {thing}" if grasps else f"bring the gripper against the {thing}"
        steps = {"reach": [f"move the gripper {'above' if grasps else 'to'} the {thing}"], "grasp": [grasp],
                 "transport": [move], "place": [finish]}
        order = ("reach", "grasp", "transport", "place")
        phase = {"push": "transport"}.get(tags.get("phase", ""), tags.get("phase", ""))
        start = order.index(phase) if phase in order else 0
        if grasps and phase in ("transport", "place") and tags.get("held") == "no":
            start = 0  # the object slipped: start over
        if grasps and start == 0 and tags.get("gripper") == "closed":
            steps["reach"] = ["open the gripper"] + steps["reach"]
        return ", ".join(c for p in order[start:] for c in steps[p])

    def counterfactual(self, actions: np.ndarray, labels: np.ndarray, *, offset: float, drift_steps: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
        """A push of ``offset`` along one random hand axis (random sign) for ``drift_steps``, then the
        opposite push as long (the recovery); labels oppose the push throughout."""
        actions, labels = np.array(actions, np.float32), np.array(labels, np.float32)
        axis, sign = int(rng.integers(3)), float(rng.choice([-1.0, 1.0]))
        drift = slice(0, min(drift_steps, len(actions)))
        back = slice(drift.stop, min(2 * drift.stop, len(actions)))
        push = np.float32(sign * offset)
        actions[drift, axis] += push
        actions[back, axis] -= push
        labels[drift, axis] -= push
        labels[back, axis] -= push
        low, high = self.spec.action_low, self.spec.action_high
        return np.clip(actions, low, high), np.clip(labels, low, high), "recovery_heuristic"


_PLANS = {  # task: (object, grasped?, move clause, finishing clause)
    "push": ("puck", True, "push the puck across the table toward the goal", "let go at the goal"),
    "pick-place": ("puck", True, "lift it and move it toward the goal", "place it at the goal"),
    "peg-insert-side": ("peg", True, "lift it and carry it to the hole", "push it sideways into the hole"),
    "door-open": ("door handle", False, "pull the door open in an arc", "move clear of the door"),
    "drawer-open": ("drawer handle", False, "pull the drawer open", "move clear of the drawer"),
    "drawer-close": ("drawer", False, "push the drawer closed", "move clear of the drawer"),
    "button-press-topdown": ("button", False, "press the button straight down", "hold it down"),
    "window-open": ("window handle", False, "slide the window open", "move clear of the window"),
    "window-close": ("window handle", False, "slide the window closed", "move clear of the window"),
}
