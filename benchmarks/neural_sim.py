"""Part 2 of `make bench-world-model`: the neural simulator as an evaluator, and what the dynamics
model knows beyond pixels.

For one world, given the dynamics model and the generator trained by part 1 and the same training
and held-out episodes:

1. Dynamics. ``models.dynamics.Dynamics`` (``--dynamics-preset``, the world's shapes) trains (in
   part 1, before the generator, whose conditioning vector it gives) for ``--dynamics-seconds``
   on every whole window of the training episodes (K steps and the row after) with
   ``train_dynamics``. On the held-out windows of part 1, the neural simulator (``sim.neural.NeuralSim``) is
   driven by the logged actions and its predicted state, reward and signals are scored per horizon
   against the log: state MAE in units of the training states' std (``state_err_h{H}``), reward MAE
   (``reward_err_h{H}``) and the success signal's accuracy (success worlds), each beside the
   predictor that always says the training mean (or majority).
2. Inverse dynamics. Actions inferred between consecutive held-out frames (``infer_actions``)
   against the logged ones: MAE and R^2 (1 - MSE / variance of the logged actions) per world.
3. A ladder of policies. A behaviour-cloned ``models.policy.Policy`` (the preset the flywheel
   trains, with the world's shapes) trains on the expert's labels of the training episodes for
   ``--policy-seconds``; its weights at 0, 1/8, 1/2 and all of the budget, the final one with a
   quarter, half and three quarters of its actions replaced by random ones (epsilon-greedy rungs:
   a clone saturates early, so checkpoints alone give rungs of equal quality, between which any
   ranking is noise), and the uniformly random policy make eight policies.
4. Ranking. Each policy drives ``--sim-horizon`` steps from the same ``--sim-starts`` starting
   states: real windows of held-out episodes (step ``--sim-start`` and every ``--sim-stride``
   after; more held-out scenes are driven when those hold too few), in the real simulator (the
   episode replayed from its seed by its logged actions up to the start, which reproduces the
   logged frame: checked and counted) and in the neural simulator (seeded from the logged
   frames, actions and states). ``spearman`` is the rank correlation of the eight policies' mean
   scores (the world's score; ``spearman_return`` the same on returns), ``bias`` the mean of
   neural - real scores.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from time import perf_counter
from typing import Any

import numpy as np
import torch

from models import dynamics as dyn
from models import policy as pol
from models.text import build_vocab
from sim.neural import NeuralSim, Start, run_policy

CHECKPOINTS = (0.0, 0.125, 0.5, 1.0)  # shares of the policy's training budget kept as ladder rungs
MIXES = (0.25, 0.5, 0.75)  # shares of the final clone's actions replaced by random ones, one rung each


def log(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho with average ranks for ties; None when either side is constant."""
    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):
            r[v == value] = r[v == value].mean()
        return r
    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


# ---- data ---------------------------------------------------------------------------------------


def _signals(e: dict, names: tuple[str, ...]) -> np.ndarray:
    return np.stack([e["signals"][n] for n in names], -1).astype(np.float32) if names else \
        np.zeros((len(e["frames"]), 0), np.float32)


class Sequences:
    """Every whole window of K steps (and the row after it, when logged) of some episodes."""

    def __init__(self, episodes: list[dict], history: int, signals: tuple[str, ...]) -> None:
        self.eps, self.K = episodes, history
        self.raised = [_signals(e, signals) for e in episodes]  # [T, G] per episode, stacked once
        self.index = [(i, t) for i, e in enumerate(episodes) for t in range(len(e["frames"]) - history + 1)]

    def batch(self, size: int, rng: np.random.Generator) -> tuple:
        K, picks = self.K, rng.choice(len(self.index), size=size)
        rows = [self.index[p] for p in picks]

        def cut(arrays: list[np.ndarray], extra: int = 0) -> np.ndarray:
            """Rows t .. t+K+extra-1 of each picked episode's array, the last row repeated past its end."""
            out = []
            for i, t in rows:
                w = arrays[i][t:t + K + extra]
                out.append(np.concatenate([w, np.repeat(w[-1:], K + extra - len(w), 0)]) if len(w) < K + extra else w)
            return np.stack(out)

        def of(key: str) -> list[np.ndarray]:
            return [e[key] for e in self.eps]
        has = np.array([[t + k + 1 < len(self.eps[i]["frames"]) for k in range(K)] for i, t in rows])
        states, sig = cut(of("states"), 1), cut(self.raised, 1)
        done = np.array([[t + k == len(self.eps[i]["frames"]) - 1 for k in range(K)] for i, t in rows])
        targets = dyn.Targets(next_state_BKS=torch.from_numpy(states[:, 1:]),
                              reward_BK=torch.from_numpy(cut(of("rewards")).astype(np.float32)),
                              next_signals_BKG=torch.from_numpy(sig[:, 1:]), done_BK=torch.from_numpy(done).float(),
                              has_next_BK=torch.from_numpy(has))
        tasks = [self.eps[i]["instruction"] for i, _ in rows]
        return cut(of("frames")), cut(of("actions")), states[:, :K], targets, tasks


def train_dynamics(cfg: dyn.DynamicsConfig, episodes: list[dict], seconds: float, seed: int) -> tuple[dyn.Dynamics, dict]:
    from benchmarks.bench_world_model import one_cycle

    torch.manual_seed(seed)
    model, data, rng = dyn.Dynamics(cfg), Sequences(episodes, cfg.history, cfg.signals), np.random.default_rng(seed)
    opt, steps, start, losses = model.make_optimizer(), 0, perf_counter(), []
    model.train()
    while (elapsed := perf_counter() - start) < seconds:
        for group in opt.param_groups:
            group["lr"] = one_cycle(elapsed / seconds, cfg.lr)
        frames, actions, states, targets, tasks = data.batch(cfg.batch_size, rng)
        loss = model.loss(frames, actions, states, targets, tasks if cfg.task_vocab else None)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        steps += 1
    tail = losses[-max(1, steps // 10):]
    return model.eval(), {"train_steps_dynamics": steps, "train_loss_dynamics": float(np.mean(tail)) if tail else None}


def start_of(e: dict, s: int, K: int) -> Start:
    lo = max(0, s - K + 1)
    return Start(frames=e["frames"][lo:s + 1], actions=e["actions"][lo:s + 1], states=e["states"][lo:s + 1],
                 instruction=e["instruction"], episode_id=f"{e['seed']}:{e['task']}", step=s, seed=e["seed"],
                 task=e["task"])


# ---- 1 and 2: what the dynamics model predicts ----------------------------------------------------


def dynamics_fidelity(sim: NeuralSim, model: dyn.Dynamics, spec, train: list[dict], held_out: list[dict],
                      horizons: list[int], first: int) -> dict[str, float]:
    """Errors per horizon of the neural simulator driven by logged actions, and inverse dynamics."""
    H, out = max(horizons), {}
    starts, future = [], []
    for e in held_out:
        for s in range(first, len(e["frames"]) - H, max(1, (len(e["frames"]) - H - first) // 4 or 1)):
            starts.append(start_of(e, s, sim.context))
            future.append({k: e[k][s:s + H] for k in ("actions", "states", "rewards")}
                          | {"next_states": e["states"][s + 1:s + 1 + H], "signals": _signals(e, spec.signals)[s + 1:s + 1 + H]})
    if not starts:
        return {}
    sim.reset(starts)
    states = np.concatenate([e["states"] for e in train])
    mean, std = states.mean(0), states.std(0) + 1e-6
    mean_reward = float(np.concatenate([e["rewards"] for e in train]).mean())
    success = spec.signals.index(spec.success_signal) if spec.score == "success" else None
    majority = float(np.concatenate([_signals(e, spec.signals) for e in train])[:, success].mean() > 0.5) \
        if success is not None else None
    for h in range(1, H + 1):
        _, o = sim.step(np.stack([f["actions"][h - 1] for f in future]))
        if h not in horizons:
            continue
        true_s = np.stack([f["next_states"][h - 1] for f in future])
        true_r = np.array([f["rewards"][h - 1] for f in future])
        out[f"state_err_h{h}"] = float(np.nanmean(np.abs(o["state"] - true_s) / std))
        out[f"state_err_h{h}_mean_baseline"] = float(np.nanmean(np.abs(mean - true_s) / std))
        out[f"reward_err_h{h}"] = float(np.abs(o["reward"] - true_r).mean())
        out[f"reward_err_h{h}_mean_baseline"] = float(np.abs(mean_reward - true_r).mean())
        if success is not None:
            truth = np.stack([f["signals"][h - 1] for f in future])[:, success] > 0.5
            out[f"success_acc_h{h}"] = float(((o["signals"][:, success] > 0.5) == truth).mean())
            out[f"success_acc_h{h}_majority_baseline"] = float(((majority > 0.5) == truth).mean())
    pred = np.concatenate([model.infer_actions(e["frames"][None])[0] for e in held_out])
    true = np.concatenate([e["actions"][:-1] for e in held_out])
    out["idm_mae"] = float(np.abs(pred - true).mean())
    out["idm_r2"] = float(1 - ((pred - true) ** 2).mean(0).sum() / true.var(0).sum())
    return out


# ---- 3: a ladder of policies ----------------------------------------------------------------------


def policy_config(spec, image_size: int, preset: str) -> pol.PolicyConfig:
    """The preset with the world's shapes, as ``flows.config`` resolves them."""
    vocab = build_vocab(t.instruction for t in spec.tasks) if len(spec.tasks) > 1 else ()
    return dataclasses.replace(pol.preset(preset), action_low=tuple(spec.action_low.tolist()),
                               action_high=tuple(spec.action_high.tolist()), state_dim=len(spec.policy_state),
                               task_vocab=vocab, image_size=image_size, aux_dim=0, aux_weight=0.0)


def policy_ladder(spec, cfg: pol.PolicyConfig, episodes: list[dict], seconds: float,
                  seed: int) -> dict[str, Callable[[np.ndarray, np.ndarray, list[str]], np.ndarray]]:
    """name -> act(frames_BKHWC, policy state_BP, instructions) of the eight rungs."""
    from benchmarks.bench_world_model import one_cycle

    torch.manual_seed(seed)
    policy, rng = pol.Policy(cfg), np.random.default_rng(seed)
    K, index = cfg.history, spec.policy_state_index
    frames = np.concatenate([e["frames"] for e in episodes])
    labels = np.concatenate([e["expert_actions"] for e in episodes]).astype(np.float32)
    states = np.concatenate([e["states"][:, index] for e in episodes]).astype(np.float32)
    tasks = np.concatenate([[e["instruction"]] * len(e["frames"]) for e in episodes])
    first = np.concatenate([np.full(len(e["frames"]), o) for o, e in
                            zip(np.cumsum([0] + [len(e["frames"]) for e in episodes[:-1]]), episodes)])
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    snapshots, start, marks = {}, perf_counter(), list(CHECKPOINTS)
    policy.train()
    while marks:
        share = (perf_counter() - start) / seconds
        if share >= marks[0]:
            snapshots[f"bc@{marks.pop(0):g}"] = copy.deepcopy(policy.state_dict())
            continue
        for group in opt.param_groups:
            group["lr"] = one_cycle(share, cfg.lr)
        rows = rng.integers(0, len(frames), cfg.batch_size)
        slots = np.maximum(rows[:, None] - np.arange(K - 1, -1, -1)[None], first[rows][:, None])
        loss = policy.loss(torch.from_numpy(frames[slots]), torch.from_numpy(labels[rows]),
                           torch.from_numpy(states[rows]) if cfg.state_dim else None,
                           list(tasks[rows]) if cfg.task_vocab else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()

    def acting(weights: dict, noise: float = 0.0, seed: int = 0):
        net = pol.Policy(cfg)
        net.load_state_dict(weights)
        net.eval()
        noise_rng = np.random.default_rng(seed)

        def act(frames_BKHWC, state_BP, instructions):
            a = net.act(frames_BKHWC, state_BP if cfg.state_dim else None, instructions)
            swap = noise_rng.random(len(a)) < noise
            a[swap] = noise_rng.uniform(spec.action_low, spec.action_high, (int(swap.sum()), len(spec.actions)))
            return a
        return act

    def random_act(frames_BKHWC, state_BP, instructions):
        return rng.uniform(spec.action_low, spec.action_high, (len(frames_BKHWC), len(spec.actions))).astype(np.float32)

    ladder = {"random": random_act, **{name: acting(w) for name, w in snapshots.items()}}
    return ladder | {f"bc@1+{round(100 * q)}%random": acting(snapshots["bc@1"], noise=q, seed=seed + i)
                     for i, q in enumerate(MIXES)}


# ---- 4: the same policies in both simulators ------------------------------------------------------


def ranking_starts(world, held_out: list[dict], first: int, stride: int, wanted: int) -> list[tuple[dict, int]]:
    """``wanted`` starting states (episode, step): steps ``first``, ``first + stride``, ... of each
    held-out episode, taken round-robin over the episodes; when they hold too few, more held-out
    scenes are driven (``benchmarks.windows.held_out_scenes``, after the given episodes' own)."""
    from benchmarks.windows import drive, held_out_scenes

    episodes = list(held_out)
    steps = lambda e: range(first, len(e["frames"]) - 1, stride)  # noqa: E731
    scenes = held_out_scenes(world.spec, 10 ** 6)
    while sum(len(steps(e)) for e in episodes) < wanted and len(episodes) < len(scenes):
        episodes += drive(world, [scenes[len(episodes)]])
    rows = [[(e, s) for s in steps(e)] for e in episodes]
    return [r[k] for k in range(max(map(len, rows), default=0)) for r in rows if k < len(r)][:wanted]


def real_scores(world, act, starts: list[tuple[dict, int]], horizon: int, K: int) -> tuple[list[dict], int]:
    """Each start replayed from its seed by the logged actions, then ``act`` drives ``horizon``
    steps; returns per-start rows and how many replays did not reproduce the logged frame."""
    spec, mismatched, rows = world.spec, 0, []
    success_at = spec.success_signal
    for e, s in starts:
        env = world.make_env(int(e["seed"]), e["task"])
        try:
            image = env.reset()
            for a in e["actions"][:s]:
                image, *_ = env.step(a)
            mismatched += int(np.abs(image.astype(int) - e["frames"][s].astype(int)).mean() > 1.0)
            history = [f for f in e["frames"][max(0, s - K + 1):s + 1]]
            history = [history[0]] * (K - len(history)) + history
            ret, success, steps = 0.0, False, 0
            for _ in range(horizon):
                state = np.asarray(env.state(), np.float32)[spec.policy_state_index]
                a = spec.clip_action(act(np.stack(history[-K:])[None], state[None], [e["instruction"]])[0], "policy")
                image, reward, done, _ = env.step(a)
                history.append(image)
                ret, steps = ret + float(reward), steps + 1
                success |= bool(env.signals().get(success_at, False)) if success_at else False
                if done or (spec.score == "success" and success):
                    break
        finally:
            env.close()
        rows.append({"score": float(success) if spec.score == "success" else ret, "episode_return": ret,
                     "success": success, "steps": steps})
    return rows, mismatched


def neural_scores(sim: NeuralSim, act, starts: list[tuple[dict, int]], horizon: int, K: int) -> list[dict]:
    def batch_act(obs: dict) -> np.ndarray:
        return act(obs["frames"][:, -K:], obs["state"], obs["tasks"])
    return run_policy(sim, [start_of(e, s, sim.context) for e, s in starts], batch_act, horizon=horizon)


def dynamics_config(world, preset: str) -> dyn.DynamicsConfig:
    """The preset with the world's shapes, as ``flows.config`` resolves them."""
    spec = world.spec
    vocab = build_vocab(t.instruction for t in spec.tasks) if len(spec.tasks) > 1 else ()
    return dataclasses.replace(dyn.preset(preset), image_size=world.image_size, action_dim=len(spec.actions),
                               state_dim=len(spec.state_names), signals=tuple(spec.signals), task_vocab=vocab)


def measure(world, generator, model: dyn.Dynamics, train: list[dict], held_out: list[dict], args) -> dict[str, Any]:
    """Parts 1-4 for one world (``model``: the trained dynamics model); figures keyed without the world's suffix."""
    spec, out = world.spec, {}
    name = spec.name
    sim = NeuralSim(generator, model, spec, seed=args.seed)
    start = perf_counter()
    out |= dynamics_fidelity(sim, model, spec, train, held_out, args.horizons, max(spec.warmup_steps, sim.context - 1))
    log(f"[{name}] dynamics fidelity: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items() if k.endswith("_h4")
                                                    or k.startswith("idm")) + f": {perf_counter() - start:.1f} s")
    start = perf_counter()
    pcfg = policy_config(spec, world.image_size, args.policy_preset)
    ladder = policy_ladder(spec, pcfg, train, args.policy_seconds, args.seed)
    log(f"[{name}] policy ladder ({len(ladder)} policies): {perf_counter() - start:.1f} s")
    first = max(args.sim_start, sim.context - 1, spec.warmup_steps)
    horizon = args.sim_horizon or spec.max_steps
    starts = ranking_starts(world, held_out, first, args.sim_stride, args.sim_starts)
    real, neural, mismatched = {}, {}, 0
    start = perf_counter()
    for policy_name, act in ladder.items():
        rows, bad = real_scores(world, act, starts, horizon, pcfg.history)
        mismatched = max(mismatched, bad)
        real[policy_name] = rows
        neural[policy_name] = neural_scores(sim, act, starts, horizon, pcfg.history)
        log(f"[{name}]   {policy_name}: real {np.mean([r['score'] for r in rows]):.3f}, neural "
            f"{np.mean([r['score'] for r in neural[policy_name]]):.3f}")
    names = list(ladder)
    for key, field in (("", "score"), ("_return", "episode_return")):
        r = np.array([np.mean([x[field] for x in real[n]]) for n in names])
        m = np.array([np.mean([x[field] for x in neural[n]]) for n in names])
        out[f"spearman{key}"], out[f"bias{key}"] = spearman(m, r), float((m - r).mean())
        out |= {f"real{key}_{n}": float(a) for n, a in zip(names, r)} | {f"neural{key}_{n}": float(b) for n, b in zip(names, m)}
    out |= {"sim_starts": len(starts), "sim_horizon": horizon, "replay_mismatches": mismatched,
            "seconds_ranking": perf_counter() - start, "policies": names}
    log(f"[{name}] ranking: spearman {out['spearman']}, on returns {out['spearman_return']}, bias {out['bias']:.3f}, "
        f"{len(starts)} starts x {horizon} steps, replay mismatches {mismatched}: {out['seconds_ranking']:.1f} s")
    return out


def table(f: dict[str, Any], worlds: list[str], horizons: list[int]) -> list[str]:
    """Markdown rows of part 2: each policy's real and neural score, the rank correlation and the
    dynamics model's errors beside their baselines."""
    def v(key: str, fmt: str = "{:.3f}") -> str:
        x = f.get(key)
        return "n/a" if x is None else fmt.format(x)
    lines = ["", "Neural simulator vs real simulator, the same policies from the same starting states:", "",
             "| world | policy | real score | neural score | real return | neural return |", "|---|---|---|---|---|---|"]
    for w in worlds:
        for p in f.get(f"policies_{w}") or []:
            lines.append(f"| {w} | {p} | {v(f'real_{p}_{w}')} | {v(f'neural_{p}_{w}')} | {v(f'real_return_{p}_{w}', '{:.1f}')} "
                         f"| {v(f'neural_return_{p}_{w}', '{:.1f}')} |")
        lines.append(f"| {w} | **Spearman** (target >= 0.8) | {v(f'spearman_{w}', '{:.2f}')} | bias {v(f'bias_{w}')} | "
                     f"{v(f'spearman_return_{w}', '{:.2f}')} | bias {v(f'bias_return_{w}', '{:.1f}')} |")
    lines += ["", "| world | figure | dynamics model | baseline (training mean or majority) |", "|---|---|---|---|"]
    for w in worlds:
        for h in horizons:
            lines.append(f"| {w} | state error h={h} (train std units) | {v(f'state_err_h{h}_{w}')} | "
                         f"{v(f'state_err_h{h}_mean_baseline_{w}')} |")
            lines.append(f"| {w} | reward error h={h} | {v(f'reward_err_h{h}_{w}')} | {v(f'reward_err_h{h}_mean_baseline_{w}')} |")
            if f.get(f"success_acc_h{h}_{w}") is not None:
                lines.append(f"| {w} | success accuracy h={h} | {v(f'success_acc_h{h}_{w}')} | "
                             f"{v(f'success_acc_h{h}_majority_baseline_{w}')} |")
        lines.append(f"| {w} | inverse dynamics: action MAE, R^2 | {v(f'idm_mae_{w}')}, {v(f'idm_r2_{w}')} | R^2 0 |")
    return lines
