"""`make bench-world-model`: the world model against its baselines on both built-in worlds, in one
process. Part 1 (here): the generator against copy-last-frame and a CNN regressor, fidelity of
open-loop rollouts and generation speed on the CPU. Part 2 (``benchmarks/neural_sim.py``): the
dynamics model's errors, inverse dynamics, and eight policies ranked by the neural simulator
against the real one (``spearman_*``). Part 3 (``benchmarks/plausibility.py``): the synthesis
filter against counterfactuals replayed in the real simulator.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_world_model                # defaults
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_world_model --preset tiny --train-seconds 10 \
        --train-episodes 2 --eval-episodes 1 --horizons 1 4                           # a quick run

For each world of ``--worlds`` (carracing, metaworld-mt10), in this one process:

1. Data. ``--train-episodes`` (8) episodes, and more until they hold ``--train-frames`` (8000) frames
   (the arm's episodes are short: the same frame budget for both worlds), as the turn-0 fleet drives them (``sim.rollout.run_episode``
   with the world's noisy privileged expert, the expert as active safety driver, seeds
   ``spec.fleet_seed_base + i``, tasks round-robin over ``spec.task_names``), and
   ``--eval-episodes`` (10) the same way on the held-out ``spec.eval_seeds`` (seed i with task i
   round-robin: the arm's held-out scenes cover several tasks). Frames at the world's image size.
   With ``--play-frames N`` (default 0), also N frames of play data on the scenes after the
   fleet's: the world's uniformly random driver with nobody taking over, episodes until the
   budget is met. Only the dynamics model trains on them (a fleet whose logs nearly all succeed
   teaches its success head little about failing). Measured, arm, 3000 frames: no reliable
   change to the success ranking (benchmarks/README.md).
2. Training. First the dynamics model (part 2's ``train_dynamics``, ``--dynamics-seconds``): as
   in the flywheel, its vector h[t] over the window conditions the generator (``--no-condition``:
   a generator without it). Then the world model (``models.world_model.WorldModel``, ``--preset``
   with the world's action width and task words and the dynamics model's width, as
   ``flows.config`` sets them), the same generator without the vector (``wm_plain``: what the
   reasoner's instruction is worth) and a deterministic regressor
   (``Regressor`` below: a small conv encoder-decoder with skips from the same K frames, the
   action and, for a multi-task world, the task's index, to the change from the last frame;
   MSE) each train for the same wall-clock ``--train-seconds`` (120), one after the other, on the
   same stream of batches: every window of the training episodes (history o[t-W+1..t] with the
   actions and states logged at it, W the longer of the two models' windows, of which the
   generator and the regressor read the last K frames; action
   a[t], target o[t+1]; a window reaching before step 0 repeats the first frame, as
   ``stages.sampler.HistorySampler`` does), drawn uniformly, at the preset's batch size. Both
   use the recipe of ``stages.train``: AdamW with the preset's lr and weight decay (the world
   model's ``make_optimizer``), gradient clipping at 1, and OneCycleLR's shape (10 % warm-up,
   cosine decay), here over the elapsed share of the time budget instead of a step count.
   Drawing batches counts in the budget. Steps done are reported (``train_steps_*``).
3. Fidelity. From ``--starts`` (4) evenly spaced start points s of each held-out episode (after
   ``spec.warmup_steps``, with max(horizons) true frames after s), each predictor rolls out
   max(``--horizons``) (1 4 16 32) steps open loop, driven by the logged actions a[s..], its
   uint8 output fed back as context; scored against the logged frames with
   ``models.world_model.frame_metrics`` (PSNR from the MSE pooled over all windows at a
   horizon; mean SSIM). The conditioned world model is rolled out in the neural simulator
   (``NeuralSim.rollout``: the dynamics model reads the window, its predicted states fed back,
   and instructs the generator) at the config's ``sampling_steps`` and at 1 step (seeded
   sampling noise), ``wm_plain`` with ``WorldModel.rollout``; copy-last-frame is
   ``copy_last_baseline``. ``psnr_gain_h{H}_{world}`` = world model - copy-last PSNR at horizon H
   (targets: >= 3 dB at 4, > 0 at 32); ``psnr_gain_h{H}`` is the minimum over the worlds run.
4. Speed. Frames/s of one neural-simulator step (``NeuralSim.step``: the dynamics model, then the
   generator; ``WorldModel.predict`` for an unconditioned one) from held-out windows, batch 1
   and batch ``--batch`` (32), at 1, 2, 4 sampling steps and
   the config's: calls repeated for ``--speed-seconds`` (2) after 2 warm-up calls.
   ``fps_batch1`` / ``fps_batched`` are at the config's steps (minimum over worlds; targets on 2
   cores: >= 30 and >= 100); ``realtime_factor_{world}`` = fps_batch1 / ``spec.rate_hz``. The
   regressor's one forward pass is timed the same way.

Torch runs ``--threads`` (1) intra-op threads: on a 2-core machine shared with other work, 2
threads made a tiny world-model ``predict`` about 80x slower than 1 (350 ms vs 4.3 ms, measured
while two Ray workers were busy), so 1 is the default; on an idle machine ``--threads 2`` trains
the default model about 1.6x faster (0.20 vs 0.32 s a step) and predicts about as fast. Output: a line per phase on stderr with
its seconds; on stdout a markdown table, each figure beside its baselines and target, then as the
last line one JSON object with every figure, the machine (cpu_count, platform, load average at
start and end) and the git commit.

Not measured here: ``synthetic_lift_ci_low`` (the policy's lift from synthetic data; ``worldloop
ablate`` measures it on a lake). It is null in the JSON, never estimated. ``spearman_arm`` is
``spearman_metaworld-mt10``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import neural_sim, plausibility
from benchmarks.strip import save_strip
from benchmarks.windows import Batch, Windows, drive, eval_windows, held_out_scenes
from models import dynamics as dyn
from models import world_model as wm
from models.text import build_vocab
from sim.neural import NeuralSim, Start

WORLDS = ("carracing", "metaworld-mt10")
SPEED_STEPS = (1, 2, 4)
NOT_MEASURED = ("synthetic_lift_ci_low",)
ALIASES = {"spearman_carracing": "spearman_carracing", "spearman_arm": "spearman_metaworld-mt10"}  # the keys
TARGETS = {"psnr_gain_h4": ">= 3 dB", "psnr_gain_h32": "> 0 dB", "fps_batch1": ">= 30", "fps_batched": ">= 100"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- the regressor baseline ---------------------------------------------------------------------


class Regressor(nn.Module):
    """Next frame = last frame + a conv encoder-decoder's output. Encoder 64 -> 32 -> 16 -> 8 px
    over the K frames stacked on channels; decoder upsamples with skips; the action (and the
    task's one-hot) go through an MLP into a per-channel bias at the bottleneck and at each
    decoder level. The output layer starts at zero, i.e. at copy-last-frame."""

    def __init__(self, history: int, action_dim: int, tasks: int, width: int) -> None:
        super().__init__()
        w, self.tasks, self.history = width, tasks, history

        def block(cin: int, cout: int, stride: int = 1) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.enc = nn.ModuleList([block(3 * history, w), block(w, 2 * w, 2), block(2 * w, 4 * w, 2),
                                  block(4 * w, 4 * w, 2)])
        self.dec = nn.ModuleList([block(8 * w, 2 * w), block(4 * w, w), block(2 * w, w)])
        self.widths = (4 * w, 2 * w, w, w)
        self.cond = nn.Sequential(nn.Linear(action_dim + tasks, 4 * w), nn.SiLU(), nn.Linear(4 * w, sum(self.widths)))
        self.out = nn.Conv2d(w, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, context_BKCHW: torch.Tensor, action_BA: torch.Tensor, task_B: torch.Tensor) -> torch.Tensor:
        cond = action_BA if not self.tasks else torch.cat([action_BA, F.one_hot(task_B, self.tasks).float()], 1)
        bias = [b[:, :, None, None] for b in self.cond(cond).split(self.widths, dim=1)]
        x, skips = context_BKCHW.flatten(1, 2), []
        for blk in self.enc:
            x = blk(x)
            skips.append(x)
        x = x + bias[0]
        for blk, skip, b in zip(self.dec, reversed(skips[:-1]), bias[1:]):
            x = blk(torch.cat([F.interpolate(x, scale_factor=2.0), skip], dim=1)) + b
        return context_BKCHW[:, -1] + self.out(x)

    def loss(self, batch: Batch) -> torch.Tensor:
        pred = self(wm._normalise(batch.history[:, -self.history:]), batch.action, torch.from_numpy(batch.task))
        return F.mse_loss(pred, wm._normalise(batch.target))

    @torch.no_grad()
    def predict(self, history: np.ndarray, action: np.ndarray, task: np.ndarray) -> np.ndarray:
        """Next uint8 frames [B, H, W, 3] (numpy in and out, as ``WorldModel.predict``)."""
        context = wm._normalise(torch.from_numpy(history[:, -self.history:]))
        return wm._to_uint8(self(context, torch.from_numpy(action), torch.from_numpy(task))).numpy()

    @torch.no_grad()
    def rollout(self, history: np.ndarray, actions: np.ndarray, task: np.ndarray) -> np.ndarray:
        """Autoregressive uint8 frames [B, T, H, W, 3], quantised and fed back as the world model's are."""
        context, task_t, frames = wm._normalise(torch.from_numpy(history[:, -self.history:])), torch.from_numpy(task), []
        for t in range(actions.shape[1]):
            frame = wm._to_uint8(self(context, torch.from_numpy(actions[:, t]), task_t))
            frames.append(frame)
            context = torch.cat([context[:, 1:], wm._normalise(frame)[:, None]], dim=1)
        return torch.stack(frames, dim=1).numpy()


# ---- training -----------------------------------------------------------------------------------


def one_cycle(fraction: float, max_lr: float, warmup: float = 0.1) -> float:
    """torch's OneCycleLR (cosine, div_factor 25, final_div_factor 1e4) at a share of the run."""
    start, end = max_lr / 25, max_lr / 25 / 1e4
    if fraction < warmup:
        return start + (max_lr - start) * (1 - math.cos(math.pi * fraction / warmup)) / 2
    done = min(1.0, (fraction - warmup) / (1 - warmup))
    return end + (max_lr - end) * (1 + math.cos(math.pi * done)) / 2


def train(model: nn.Module, loss_fn: Callable[[Batch], torch.Tensor], opt: torch.optim.Optimizer,
          batches: Iterator[Batch], seconds: float) -> dict[str, float]:
    """Steps until ``seconds`` of wall clock are spent; returns steps, seconds, the last steps' loss."""
    model.train()
    max_lr, losses, steps, start = opt.param_groups[0]["lr"], [], 0, perf_counter()
    while (elapsed := perf_counter() - start) < seconds:
        for group in opt.param_groups:
            group["lr"] = one_cycle(elapsed / seconds, max_lr)
        loss = loss_fn(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        steps += 1
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return {"steps": steps, "seconds": perf_counter() - start, "loss": sum(tail) / len(tail) if tail else math.nan}


# ---- speed --------------------------------------------------------------------------------------


def frames_per_s(batch: int, seconds: float, fn: Callable[..., Any], *fn_args: Any, **fn_kwargs: Any) -> float:
    """Frames/s of ``fn(*fn_args, **fn_kwargs)`` making ``batch`` frames a call: 2 warm-up calls, then
    calls for ``seconds`` (3 at least)."""
    fn(*fn_args, **fn_kwargs)
    fn(*fn_args, **fn_kwargs)
    calls, start = 0, perf_counter()
    while (elapsed := perf_counter() - start) < seconds or calls < 3:
        fn(*fn_args, **fn_kwargs)
        calls += 1
    return calls * batch / elapsed


# ---- one world ----------------------------------------------------------------------------------


def model_config(preset: str, spec, image_size: int, condition_dim: int = 0,
                 overrides: dict[str, Any] | None = None) -> wm.WorldModelConfig:
    """The preset with ``overrides`` (``--set``) and the world's shapes, as ``flows.config`` resolves them."""
    from flows.config import apply

    vocab = build_vocab(t.instruction for t in spec.tasks) if len(spec.tasks) > 1 else ()
    return dataclasses.replace(apply(wm.preset(preset), overrides or {}), action_dim=len(spec.actions),
                               task_vocab=vocab, image_size=image_size, condition_dim=condition_dim)


def generate(model: wm.WorldModel, dynamics: dyn.Dynamics, spec, ev: dict, rows: slice, steps: int, seed: int,
             tasks: list[str]) -> np.ndarray:
    """Open-loop frames [B, T, H, W, 3] from the held-out windows ``rows``, driven by the logged actions:
    through the neural simulator (the dynamics model instructs the generator) when the generator
    reads its vector, else by the generator alone."""
    if not model.config.condition_dim:
        return model.rollout(ev["history"][rows, -model.config.history:], ev["actions"][rows], steps=steps,
                             generator=torch.Generator().manual_seed(seed), tasks=tasks[rows])
    sim = NeuralSim(model, dynamics, spec, sampling_steps=steps, seed=seed)
    starts = [Start(frames=f, actions=a, states=s, instruction=t) for f, a, s, t in
              zip(ev["history"][rows], ev["history_actions"][rows], ev["history_states"][rows], tasks[rows])]
    return sim.rollout(starts, ev["actions"][rows])["frames"]


def neural_step_speed(model: wm.WorldModel, dynamics: dyn.Dynamics, spec, ev: dict, rows: np.ndarray, steps: int,
                      seconds: float, tasks: list[str]) -> float:
    """Frames/s of one neural-simulator step (reasoner and generator) for the windows ``rows``."""
    sim = NeuralSim(model, dynamics, spec, sampling_steps=steps)
    sim.reset([Start(frames=ev["history"][i], actions=ev["history_actions"][i], states=ev["history_states"][i],
                     instruction=tasks[i]) for i in rows])
    return frames_per_s(len(rows), seconds, sim.step, ev["actions"][rows, 0])


def drive_until(world, first_seed: int, episodes: int, frames: int, *, play: bool = False) -> list[dict]:
    """Episodes on seeds ``first_seed``, ``first_seed + 1``, ... (tasks round-robin) until there are at
    least ``episodes`` of them holding at least ``frames`` frames (``benchmarks.windows.drive``)."""
    out: list[dict] = []
    tasks = world.spec.task_names
    while len(out) < episodes or sum(len(e["frames"]) for e in out) < frames:
        out += drive(world, [(first_seed + len(out), tasks[len(out) % len(tasks)])], play=play)
    return out


def bench_world(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from sim import worlds

    world = worlds.get(name)
    spec, out = world.spec, {}
    dcfg = neural_sim.dynamics_config(world, args.dynamics_preset)
    cfg = model_config(args.preset, spec, world.image_size, dcfg.embed if args.condition else 0, args.overrides)
    K, horizons, sample_steps = cfg.history, args.horizons, cfg.sampling_steps
    W = max(K, dcfg.history)  # the frames both models read before a step
    instructions = [spec.instruction(t) for t in spec.task_names]

    start = perf_counter()
    train_eps = drive_until(world, spec.fleet_seed_base, args.train_episodes, args.train_frames)
    play_eps = drive_until(world, spec.fleet_seed_base + len(train_eps), 0, args.play_frames, play=True)
    eval_eps = drive(world, held_out_scenes(spec, args.eval_episodes))
    windows = Windows(train_eps, W, spec.task_names)
    ev = eval_windows(eval_eps, W, max(horizons), args.starts, max(spec.warmup_steps, W - 1), spec.task_names)
    out |= {"train_frames": sum(len(e["frames"]) for e in train_eps), "train_windows": len(windows),
            "play_frames": sum(len(e["frames"]) for e in play_eps),
            "eval_frames": sum(len(e["frames"]) for e in eval_eps), "eval_windows": len(ev["task"]),
            "seconds_episodes": perf_counter() - start}
    log(f"[{name}] episodes: {len(train_eps)} train ({out['train_frames']} frames), {len(play_eps)} play "
        f"({out['play_frames']} frames), {args.eval_episodes} "
        f"held-out ({out['eval_frames']} frames, {out['eval_windows']} windows): {out['seconds_episodes']:.1f} s")

    start = perf_counter()  # the reasoner first: its vector conditions the generator
    dynamics, info = neural_sim.train_dynamics(dcfg, train_eps + play_eps, args.dynamics_seconds, args.seed)
    out |= info | {"seconds_train_dynamics": perf_counter() - start}
    log(f"[{name}] train dynamics: {info['train_steps_dynamics']} steps, loss {info['train_loss_dynamics']:.4f}: "
        f"{out['seconds_train_dynamics']:.1f} s")

    torch.manual_seed(args.seed)
    model = wm.WorldModel(cfg)
    torch.manual_seed(args.seed)
    plain = wm.WorldModel(dataclasses.replace(cfg, condition_dim=0)) if cfg.condition_dim else None
    torch.manual_seed(args.seed)
    reg = Regressor(K, len(spec.actions), len(spec.tasks) if len(spec.tasks) > 1 else 0, args.regressor_width)
    out |= {"params_wm": sum(p.numel() for p in model.parameters()),
            "params_regressor": sum(p.numel() for p in reg.parameters()), "conditioned": bool(cfg.condition_dim)}

    def wm_loss(net: wm.WorldModel, b: Batch) -> torch.Tensor:
        tasks, condition = [instructions[i] for i in b.task], None
        if net.config.condition_dim:
            d = dcfg.history
            condition = dynamics.predict(b.history[:, -d:], b.actions[:, -d:], b.states[:, -d:],
                                         tasks if dcfg.task_vocab else None).condition
        return net.loss(b.history[:, -K:], b.action, b.target, tasks=tasks, condition_BD=condition)

    trainees = [("wm", model, functools.partial(wm_loss, model), model.make_optimizer())]
    if plain is not None:  # the same generator without the reasoner's vector: what the vector is worth
        trainees.append(("wm_plain", plain, functools.partial(wm_loss, plain), plain.make_optimizer()))
    trainees.append(("regressor", reg, reg.loss, torch.optim.AdamW(reg.parameters(), lr=cfg.lr,
                                                                    weight_decay=cfg.weight_decay)))
    for key, net, loss_fn, opt in trainees:
        r = train(net, loss_fn, opt, windows.stream(cfg.batch_size, args.seed), args.train_seconds)
        out |= {f"train_steps_{key}": r["steps"], f"seconds_train_{key}": r["seconds"], f"train_loss_{key}": r["loss"]}
        log(f"[{name}] train {key}: {r['steps']} steps of batch {cfg.batch_size}, final loss {r['loss']:.4f}: "
            f"{r['seconds']:.1f} s")

    start = perf_counter()
    tasks = np.array([instructions[i] for i in ev["task"]], dtype=object)
    every, curves = slice(None), {}
    for steps in sorted({sample_steps, 1}):
        curves[f"wm_steps{steps}"] = wm.frame_metrics(generate(model, dynamics, spec, ev, every, steps, args.seed,
                                                               tasks), ev["future"])
    if plain is not None:
        curves["wm_plain"] = wm.frame_metrics(generate(plain, dynamics, spec, ev, every, sample_steps, args.seed, tasks),
                                              ev["future"])
    curves["wm"] = curves[f"wm_steps{sample_steps}"]
    curves["copy_last"] = wm.frame_metrics(wm.copy_last_baseline(ev["history"], max(horizons)), ev["future"])
    curves["regressor"] = wm.frame_metrics(reg.rollout(ev["history"], ev["actions"], ev["task"]), ev["future"])
    for h in horizons:
        for key, c in curves.items():
            out[f"psnr_h{h}_{key}"], out[f"ssim_h{h}_{key}"] = c["psnr"][h - 1], c["ssim"][h - 1]
        out[f"psnr_gain_h{h}"] = out[f"psnr_h{h}_wm"] - out[f"psnr_h{h}_copy_last"]
        out[f"regressor_psnr_gain_h{h}"] = out[f"psnr_h{h}_regressor"] - out[f"psnr_h{h}_copy_last"]
        if plain is not None:
            out[f"plain_psnr_gain_h{h}"] = out[f"psnr_h{h}_wm_plain"] - out[f"psnr_h{h}_copy_last"]
    if args.strip:  # the first held-out window, at the longest horizon, for the README's picture
        out["strip"] = (ev["future"][0], generate(model, dynamics, spec, ev, slice(0, 1), sample_steps, args.seed,
                                                  tasks)[0])
    out["seconds_fidelity"] = perf_counter() - start
    log(f"[{name}] fidelity: " + ", ".join(f"h{h} gain {out[f'psnr_gain_h{h}']:+.2f} dB" for h in horizons)
        + f": {out['seconds_fidelity']:.1f} s")

    start = perf_counter()
    rows = np.resize(np.arange(len(ev["task"])), args.batch)
    for size, key in ((1, "batch1"), (args.batch, "batched")):
        hist, act, idx = ev["history"][rows[:size]], ev["actions"][rows[:size], 0], ev["task"][rows[:size]]
        for steps in sorted(set(SPEED_STEPS) | {sample_steps}):
            if cfg.condition_dim:  # a step of the neural simulator: the reasoner, then the generator
                out[f"fps_{key}_steps{steps}"] = neural_step_speed(model, dynamics, spec, ev, rows[:size], steps,
                                                                   args.speed_seconds, tasks)
            else:
                out[f"fps_{key}_steps{steps}"] = frames_per_s(size, args.speed_seconds, model.predict, hist[:, -K:],
                                                              act, steps=steps, tasks=list(tasks[rows[:size]]))
        out[f"fps_{key}"] = out[f"fps_{key}_steps{sample_steps}"]
        out[f"regressor_fps_{key}"] = frames_per_s(size, args.speed_seconds, reg.predict, hist, act, idx)
    out |= {"rate_hz": spec.rate_hz, "realtime_factor": out["fps_batch1"] / spec.rate_hz,
            "seconds_speed": perf_counter() - start}
    log(f"[{name}] speed: {out['fps_batch1']:.1f} fps at batch 1, {out['fps_batched']:.1f} at batch {args.batch} "
        f"({sample_steps} step(s); {spec.rate_hz:g} Hz control): {out['seconds_speed']:.1f} s")
    if args.neural_sim:
        out |= neural_sim.measure(world, model, dynamics, train_eps, eval_eps, args)
    if args.filter_variants:
        start = perf_counter()
        out |= plausibility.measure(world, model, dynamics, eval_eps, variants=args.filter_variants, seed=args.seed)
        log(f"[{name}] plausibility filter: rejected {out.get('filter_rejection_rate', float('nan')):.2f}, kept but "
            f"contradicted {out.get('filter_false_keep_rate', float('nan')):.2f}: {perf_counter() - start:.1f} s")
    return out


# ---- report -------------------------------------------------------------------------------------


def _cell(f: dict[str, Any], world: str, key: str, fmt: str = "{:.2f}") -> str:
    value = f.get(f"{key}_{world}")
    return "" if value is None else fmt.format(value)


def table(f: dict[str, Any], args: argparse.Namespace) -> str:
    steps = f["sampling_steps"]
    lines = [(f"World model (preset {args.preset}, {steps} sampling step(s), "
              f"{'conditioned on the dynamics model' if args.condition else 'unconditioned'}) vs baselines: "
              f"{args.train_seconds:g} s of training each, {f['threads']} thread(s), "
              f"{f['cpu_count']} CPUs, load {f['loadavg_start'][0]:.1f} -> {f['loadavg_end'][0]:.1f}, "
              f"commit {f['git_commit'][:12]}"), "",
             "| world | figure | world model | world model, 1 step | without the reasoner's vector | copy-last | "
             "regressor | target |", "|---|---|---|---|---|---|---|---|"]
    keys = ("wm", "wm_steps1", "wm_plain", "copy_last", "regressor")
    for w in args.worlds:
        g = functools.partial(_cell, f, w)

        for h in args.horizons:
            lines.append(f"| {w} | PSNR h={h} (dB) | {' | '.join(g(f'psnr_h{h}_{k}') for k in keys)} | |")
            lines.append(f"| {w} | SSIM h={h} | {' | '.join(g(f'ssim_h{h}_{k}', '{:.3f}') for k in keys)} | |")
            lines.append(f"| {w} | PSNR gain over copy-last h={h} (dB) | {g(f'psnr_gain_h{h}', '{:+.2f}')} | | "
                         f"{g(f'plain_psnr_gain_h{h}', '{:+.2f}')} | 0 | {g(f'regressor_psnr_gain_h{h}', '{:+.2f}')} | "
                         f"{TARGETS.get(f'psnr_gain_h{h}', '')} |")
        lines.append(f"| {w} | frames/s, batch 1 | {g('fps_batch1', '{:.1f}')} | {g('fps_batch1_steps1', '{:.1f}')} | "
                     f"| | {g('regressor_fps_batch1', '{:.1f}')} | {TARGETS['fps_batch1']} |")
        lines.append(f"| {w} | frames/s, batch {args.batch} | {g('fps_batched', '{:.1f}')} | "
                     f"{g('fps_batched_steps1', '{:.1f}')} | | | {g('regressor_fps_batched', '{:.1f}')} | "
                     f"{TARGETS['fps_batched']} |")
        lines.append(f"| {w} | real-time factor at {g('rate_hz', '{:g}')} Hz, batch 1 | {g('realtime_factor')} | | | | | "
                     ">= 1 |")
        lines.append(f"| {w} | training steps in {args.train_seconds:g} s | {g('train_steps_wm', '{}')} | | "
                     f"{g('train_steps_wm_plain', '{}')} | | {g('train_steps_regressor', '{}')} | |")
    lines += ["", "| key figure (min over worlds) | value | target |", "|---|---|---|"]
    for key, target in TARGETS.items():
        value = f.get(key)
        lines.append(f"| {key} | {'not measured' if value is None else f'{value:.2f}'} | {target} |")
    for key in ALIASES:
        value = f.get(key)
        lines.append(f"| {key} | {'not measured' if value is None else f'{value:.2f}'} | >= 0.8 |")
    lines.append(f"| {', '.join(NOT_MEASURED)} | not measured | |")
    if args.neural_sim:
        lines += neural_sim.table(f, args.worlds, args.horizons)
    lines += plausibility.table(f, args.worlds)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    parser.add_argument("--preset", default="default", choices=sorted(wm.PRESETS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the world model's preset (e.g. train_sigma_max_prob=0.9)")
    parser.add_argument("--train-seconds", type=float, default=120.0, help="per model per world")
    parser.add_argument("--train-episodes", type=int, default=8, help="at least this many training episodes")
    parser.add_argument("--train-frames", type=int, default=8000, help="and at least this many frames (0: any)")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--horizons", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--starts", type=int, default=4, help="open-loop start points per held-out episode")
    parser.add_argument("--batch", type=int, default=32, help="the batched speed measurement's batch")
    parser.add_argument("--speed-seconds", type=float, default=2.0, help="timed seconds per speed figure")
    parser.add_argument("--regressor-width", type=int, default=32, help="channels of the regressor's first level")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strip", default="", help="write a PNG of real vs generated frames here")
    part2 = parser.add_argument_group("part 2: the neural simulator (benchmarks/neural_sim.py)")
    part2.add_argument("--no-neural-sim", dest="neural_sim", action="store_false", help="part 1 only")
    parser.add_argument("--no-condition", dest="condition", action="store_false",
                        help="a generator that does not read the dynamics model's vector (and no wm_plain)")
    part2.add_argument("--dynamics-preset", default="default", choices=sorted(dyn.PRESETS))
    part2.add_argument("--dynamics-seconds", type=float, default=90.0)
    part2.add_argument("--play-frames", type=int, default=0,
                       help="frames of play data (the world's random driver, no safety driver) the dynamics model "
                            "also trains on, so that it has seen what failing looks like (0: none)")
    part2.add_argument("--policy-preset", default="default", choices=sorted(dyn.PRESETS))
    part2.add_argument("--policy-seconds", type=float, default=120.0, help="the policy ladder's training budget")
    part2.add_argument("--sim-starts", type=int, default=30, help="starting states shared by both simulators")
    part2.add_argument("--sim-start", type=int, default=0, help="first start step (at least the warm-up)")
    part2.add_argument("--sim-stride", type=int, default=150, help="steps between starts of one episode")
    part2.add_argument("--sim-horizon", type=int, default=100, help="steps each policy drives (0: the world's max)")
    parser.add_argument("--filter-variants", type=int, default=24,
                        help="part 3: counterfactual variants replayed in the real simulator (0: skip)")
    args = parser.parse_args(argv)
    args.horizons = sorted(set(args.horizons))
    from flows.config import apply, parse_overrides

    args.overrides = parse_overrides(args.overrides)
    if args.horizons[0] < 1 or min(args.train_episodes, args.eval_episodes, args.starts, args.batch) < 1 \
            or args.play_frames < 0 or args.regressor_width % 8:
        parser.error("horizons, episodes, starts and batch must be >= 1; --play-frames >= 0; "
                     "--regressor-width a multiple of 8")
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    torch.set_num_threads(args.threads)
    from stages.registry import git_commit

    cfg = apply(wm.preset(args.preset), args.overrides)
    figures: dict[str, Any] = {
        "preset": args.preset, "overrides": args.overrides, "sampling_steps": cfg.sampling_steps,
        "batch_size": cfg.batch_size, "train_seconds": args.train_seconds, "train_episodes": args.train_episodes,
        "train_frames": args.train_frames, "play_frames": args.play_frames,
        "eval_episodes": args.eval_episodes, "horizons": args.horizons, "starts": args.starts,
        "speed_batch": args.batch, "threads": torch.get_num_threads(), "seed": args.seed,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
        "loadavg_start": list(os.getloadavg()), "git_commit": git_commit() or "unknown"}
    start = perf_counter()
    per_world = {w: bench_world(w, args) for w in args.worlds}
    if args.strip:
        save_strip(args.strip, {w: r.pop("strip") for w, r in per_world.items()})
        log(f"strip of real vs generated frames: {args.strip}")
    for w, result in per_world.items():
        figures |= {f"{k}_{w}": v for k, v in result.items()}
    for key in ["fps_batch1", "fps_batched", *(f"fps_{b}_steps{s}" for b in ("batch1", "batched")
                                                for s in sorted(set(SPEED_STEPS) | {cfg.sampling_steps})),
                *(f"psnr_gain_h{h}" for h in args.horizons)]:
        figures[key] = min(r[key] for r in per_world.values())
    for h in (4, 32):
        figures.setdefault(f"psnr_gain_h{h}", None)
    figures |= dict.fromkeys(NOT_MEASURED) | {k: figures.get(v) for k, v in ALIASES.items()}
    figures |= {"seconds": perf_counter() - start, "loadavg_end": list(os.getloadavg())}
    print(table(figures, args), flush=True)
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
