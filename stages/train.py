"""Post-training on Ray Train: one TorchTrainer adapter for the world model and the policy.

Workers read random frame histories straight from the Lance `frames` table (each worker its own
shard, `stages.sampler.HistorySampler`), so no Ray Data read competes with the workers for the
two cores (STACK.md). Each worker wraps the model's own `loss` in a module so that DDP's
gradient hooks see it. Rank 0 saves the checkpoint (safetensors + resolved config.json).
Resources are declared here: `num_workers`, `cpus_per_worker`, `use_gpu`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from stages.prefetch import Prefetcher
from stages.sampler import HistorySampler
from stages.schemas import of_world

# each ray.train.report waits for the controller's next poll (about 2 s on Ray Train v2, measured):
# a short run reports every REPORT_MIN_STEPS steps at most, not every tenth of its steps
REPORT_MIN_STEPS = 25
PROGRESS_EVERY_S = 1.0  # rank 0 tells the driver's step bar where it is at most this often
TRAINER_STATE = "trainer_state.pt"  # optimizer, schedule and step beside the weights of a mid-run checkpoint
MAX_SKIPPED_IN_A_ROW = 10  # steps in a row with a non-finite gradient before the run stops as diverged
PRECISIONS = ("fp32", "bf16")  # bf16: the forward under bfloat16 autocast, weights and optimizer in fp32
# kind -> (module path, model class, what the sampler adds to a window: "next" frame or the "sequence")
MODEL_KINDS = {"policy": ("models.policy", "Policy", ""), "world_model": ("models.world_model", "WorldModel", "next"),
               "dynamics": ("models.dynamics", "Dynamics", "sequence")}


def _model_module(kind: str):
    import importlib

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    return importlib.import_module(MODEL_KINDS[kind][0])


class _LossModule(nn.Module):
    """Routes a model's `loss` through `forward`, so DistributedDataParallel syncs its gradients."""

    def __init__(self, model: nn.Module, kind: str, state_index: list[int], aux: bool = True,
                 teacher: nn.Module | None = None):
        super().__init__()
        self.model, self.kind, self.state_index, self.aux = model, kind, state_index, aux
        self._aux_index: list[int] | None = None  # the state columns the policy does not read
        # the frozen reasoner whose vector conditions a generator; a tuple, so that it is no submodule:
        # DDP, the optimizer and train() never see it
        self._teacher = (teacher.eval().requires_grad_(False),) if teacher is not None else ()

    def forward(self, batch: dict) -> torch.Tensor:
        c = self.model.config
        tasks = list(batch["tasks"]) if getattr(c, "task_vocab", ()) else None
        if self.kind == "policy":
            state = batch["state_BS"][:, self.state_index] if c.state_dim else None
            aux = None
            if self.aux and c.has_aux:
                if self._aux_index is None:
                    read = set(self.state_index)
                    self._aux_index = [i for i in range(batch["state_BS"].shape[1]) if i not in read]
                aux = batch["state_BS"][:, self._aux_index]
            return self.model.loss(batch["frames_BKHWC"], batch["label_BA"], state, tasks, aux)
        if self.kind == "dynamics":
            return self.model.loss(batch["frames_BKHWC"], batch["action_BKA"], batch["state_BKS"],
                                   dynamics_targets(batch, c.signals), tasks)["loss"]
        frames = batch["frames_BKHWC"]
        return self.model.loss(frames[:, -c.history:], batch["action_BA"], batch["next_BHWC"], tasks=tasks,
                               condition_BD=self._condition(batch) if self._teacher else None)

    def _condition(self, batch: dict) -> torch.Tensor:
        """The reasoner's h[t] over the last steps of the window: what conditions the generator."""
        teacher = self._teacher[0]
        d = teacher.config
        k = d.history
        return teacher.predict(batch["frames_BKHWC"][:, -k:], batch["action_BKA"][:, -k:],
                               batch["state_BKS"][:, -k:] if d.state_dim else None,
                               list(batch["tasks"]) if d.task_vocab else None).condition


def _raised(signals: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Multi-hot float32 [..., G] of the ``names`` raised in each entry (a tuple of names)."""
    flat = signals.reshape(-1)
    out = np.array([[name in raised for name in names] for raised in flat], np.float32)
    return out.reshape(*signals.shape, len(names))


def dynamics_targets(batch: dict, signals: tuple[str, ...]):
    """``models.dynamics.Targets`` of a sampler batch drawn with ``sequence=True``: slot t's next
    state and signals are slot t+1's, the last slot's the row after the window when it exists."""
    from models.dynamics import Targets

    def _t(x: np.ndarray | torch.Tensor) -> torch.Tensor:
        return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))

    state, has_next = _t(batch["state_BKS"]), _t(batch["has_next_B"]).bool()
    next_state = torch.cat([state[:, 1:], _t(batch["next_state_BS"])[:, None]], dim=1)
    raised = _raised(batch["signals_BK"], signals)
    next_raised = np.concatenate([raised[:, 1:], _raised(batch["next_signals_B"], signals)[:, None]], axis=1)
    ones = torch.ones_like(has_next)[:, None].expand(-1, state.shape[1] - 1)
    return Targets(next_state_BKS=next_state, reward_BK=_t(batch["reward_BK"]), next_signals_BKG=_t(next_raised),
                   done_BK=_t(batch["done_BK"]), has_next_BK=torch.cat([ones, has_next[:, None]], dim=1))


def _to_torch(batch: dict, device: torch.device) -> dict:
    """Arrays to tensors on ``device``; arrays of Python objects (tasks, signal names) stay as they are."""
    return {k: v if v.dtype == object else torch.from_numpy(v).to(device) for k, v in batch.items()}


def _build(kind: str, config: dict, init_dir: str | None) -> nn.Module:
    module = _model_module(kind)
    if init_dir:  # `load` gives eval mode: without train() a warm start fit with no dropout or augmentation
        return module.load(init_dir).train()
    return getattr(module, MODEL_KINDS[kind][1])(module.config_from_dict(config))


def _teacher(cfg: dict[str, Any], device: torch.device) -> nn.Module | None:
    """The frozen dynamics model whose vector conditions the model being trained, if any."""
    if not cfg.get("condition_dir"):
        return None
    from models import dynamics

    return dynamics.load(cfg["condition_dir"]).to(device)


def _where(cfg: dict[str, Any], split: str, base: str | None) -> str:
    """The rows of ``split`` that pass ``base``, of the run's world when it names one."""
    clauses = [f"({base})" if base else "", f"split = '{split}'",
               of_world(cfg["world"]) if cfg["world"] else ""]
    return " AND ".join(c for c in clauses if c)


def _autocast(precision: str, device: torch.device):
    """Mixed precision: matrix products and convolutions in bfloat16 under ``bf16``, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def apply_gradients(opt: torch.optim.Optimizer, parameters, max_norm: float = 1.0) -> bool:
    """Clip the gradients' norm to ``max_norm`` and step, unless the norm is not finite (an overflow or
    a NaN somewhere in the batch's backward): then leave the weights as they are and return False.
    Under DDP every rank holds the same reduced gradients, so every rank decides alike."""
    norm = nn.utils.clip_grad_norm_(list(parameters), max_norm)
    if not torch.isfinite(norm):
        return False
    opt.step()
    return True


def _step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one step on one rank: the step's noise does not depend on what ran before."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _report(metrics: dict, rank: int, save=None) -> None:
    """``ray.train.report`` with a checkpoint that rank 0 writes with ``save(directory)``, if any."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0 and save is not None:
            save(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker.

    Every ``checkpoint_every`` steps rank 0 reports a checkpoint holding the weights and the
    training state (optimizer, schedule, step: ``TRAINER_STATE``); a run started again under the
    same name and storage resumes from the latest one (``ray.train.get_checkpoint``). Each step's
    batch and noise depend only on the seed, the rank and the step, so a resumed run ends where
    an uninterrupted one does. The final checkpoint holds the weights alone.
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg["threads"])))
    device = ray.train.torch.get_device()
    module, hp = _model_module(cfg["kind"]), cfg["model_config"]
    steps, per_worker = cfg["steps"], max(1, hp["batch_size"] // world)
    resumed, first = ray.train.get_checkpoint(), 0
    state = None
    if resumed is not None:
        with resumed.as_directory() as directory:
            model = _build(cfg["kind"], hp, directory)
            if os.path.exists(os.path.join(directory, TRAINER_STATE)):
                state = torch.load(os.path.join(directory, TRAINER_STATE), weights_only=True)
        if state is None:  # the run had finished: its final weights are the result
            _report({"step": steps, "resumed_from": steps}, rank, lambda tmp: module.save(model, tmp))
            return
        first = int(state["step"])
    else:
        torch.manual_seed(cfg["seed"] + rank)
        model = _build(cfg["kind"], hp, cfg.get("init_dir"))
    teacher = _teacher(cfg, device)
    wrapped = ray.train.torch.prepare_model(_LossModule(model, cfg["kind"], cfg["state_index"], teacher=teacher))
    sampler = HistorySampler(
        cfg["frames_uri"], history=cfg["window"], storage_options=cfg["storage_options"],
        filter=_where(cfg, "train", cfg["filter"]), rank=rank, world_size=world,
        seed=cfg["seed"], require_next=cfg["require_next"], clips_uri=cfg["clips_uri"],
        duplicate_weight=cfg["duplicate_weight"], image_size=hp["image_size"], sequence=cfg["sequence"],
        task_gaps=cfg["task_gaps"], focus=cfg["focus"])
    opt = torch.optim.AdamW(wrapped.parameters(), lr=hp["lr"], weight_decay=hp.get("weight_decay", 0.0))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp["lr"], total_steps=steps, pct_start=0.1)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    drawing = iter(range(first, steps))

    def draw() -> dict[str, Any]:
        return sampler.batch(per_worker, synthetic_fraction=cfg["synthetic_fraction"], step=next(drawing))

    def save(directory: str, done: int) -> None:
        module.save(model, directory)
        torch.save({"step": done, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                   os.path.join(directory, TRAINER_STATE))
    # one thread draws the batches in the order the loop would (the same batches), each while the
    # step before it runs: Lance takes and frame decoding release the GIL
    count = steps - first
    batches = Prefetcher(draw, depth=cfg["prefetch"], count=count) if cfg["prefetch"] else \
        (draw() for _ in range(count))
    report_every, start, running = max(REPORT_MIN_STEPS, steps // 10), time.perf_counter(), []
    every, shown, skipped, in_a_row = cfg["checkpoint_every"], 0.0, 0, 0
    progress = cfg.get("progress") if rank == 0 else None
    with contextlib.closing(batches):
        for step, drawn in enumerate(batches, start=first):
            torch.manual_seed(_step_seed(cfg["seed"], rank, step))
            with _autocast(cfg["precision"], device):
                loss = wrapped(_to_torch(drawn, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if apply_gradients(opt, wrapped.parameters()):
                in_a_row = 0
                running.append(float(loss.detach()))
            else:
                skipped, in_a_row = skipped + 1, in_a_row + 1
                if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise FloatingPointError(f"training diverged: {in_a_row} steps in a row up to step {step + 1} had "
                                             f"a non-finite gradient ({skipped} skipped in all); lower the lr or "
                                             "use precision fp32")
            sched.step()
            due = step == steps - 1 or time.perf_counter() - shown > PROGRESS_EVERY_S
            if progress is not None and running and due:
                progress.set.remote(step + 1, running[-1])  # fire and forget: the driver's step bar
                shown = time.perf_counter()
            last, keep = step == steps - 1, every > 0 and (step + 1) % every == 0
            if (step + 1) % report_every and not last and not keep:
                continue
            elapsed = time.perf_counter() - start
            metrics = {"step": step + 1, "loss": sum(running) / len(running) if running else None,
                       "skipped_steps": skipped,
                       "samples_per_s": (step + 1 - first) * per_worker * world / elapsed, "wall_s": elapsed}
            if first:
                metrics["resumed_from"] = first
            if sampler.event_share is not None:
                metrics.update(event_share=sampler.event_share, event_share_natural=sampler.event_share_natural)
            if sampler.focus_share is not None:
                metrics["focus_share"] = sampler.focus_share
            running = []
            if not last:
                _report(metrics, rank, functools.partial(save, done=step + 1) if keep else None)
                continue
            metrics["val_loss"] = _validate(model, cfg, device, teacher) if rank == 0 else None
            _report(metrics, rank, lambda tmp: module.save(model, tmp))


@torch.no_grad()
def _validate(model: nn.Module, cfg: dict, device: torch.device, teacher: nn.Module | None,
              batches: int = 4) -> float | None:
    """Mean loss on the held-out `val` split of real frames (None when that split is empty)."""
    try:
        sampler = HistorySampler(
            cfg["frames_uri"], history=cfg["window"],
            storage_options=cfg["storage_options"], filter=_where(cfg, "val", "origin = 'real'"),
            seed=cfg["seed"] + 7, require_next=cfg["require_next"], image_size=cfg["model_config"]["image_size"],
            sequence=cfg["sequence"])
    except ValueError as err:  # no validation episodes (e.g. val_fraction = 0)
        if "no windows" in str(err):
            return None
        raise
    # the behaviour-cloning loss alone: comparable across configs with and without auxiliary targets
    wrapped, losses = _LossModule(model, cfg["kind"], cfg["state_index"], aux=False, teacher=teacher).eval(), []
    for _ in range(batches):
        with _autocast(cfg["precision"], device):
            losses.append(float(wrapped(_to_torch(sampler.batch(cfg["model_config"]["batch_size"]), device))))
    model.train()
    return sum(losses) / len(losses)


def train_model(kind: str, *, frames_uri: str, model_config, storage_path: str, steps: int | None = None,
                storage_options: dict | None = None, num_workers: int = 2, cpus_per_worker: float = 1.0,
                use_gpu: bool = False, synthetic_fraction: float | None = None, init_dir: str | None = None,
                filter: str | None = None, seed: int = 0, run_name: str | None = None,
                clips_uri: str | None = None, duplicate_weight: float = 0.0,
                state_index: list[int] | None = None, world: str = "", prefetch: int = 0,
                checkpoint_every: int = 0, data_version: str = "", condition_dir: str | None = None,
                precision: str = "fp32", task_gaps: dict[str, float] | None = None, focus: float = 0.0) -> dict:
    """Train `kind` on the frames table with a TorchTrainer; returns metrics and the checkpoint dir.

    With ``clips_uri`` training windows are drawn by the clips' weights (event clips oversampled,
    near-duplicates weighted ``duplicate_weight``; ``stages.sampler.window_weights``); validation
    always samples uniformly. ``state_index``: the columns of the frames' ``state`` the policy reads
    (the world's ``policy_state``). ``world``: only rows of that world (a lake's frames table also
    holds the foreign logs curated into it); frames are resized to the model's ``image_size``.
    ``prefetch``: batches a background thread makes ahead of the step that will use them.
    ``task_gaps`` (task text -> the champion's shortfall) and ``focus``: that share of the training
    windows is drawn from the tasks with a gap, in proportion to it (``stages.sampler.focus_weights``).
    ``precision``: "fp32", or "bf16" (the forward and loss under bfloat16 autocast; the weights, the
    gradients and the optimizer stay fp32, so checkpoints are the same either way).

    Resumable: the run is named ``{run_name or kind}-{digest}``, the digest of every input (config,
    data, ``data_version``: the tables' versions, seed, ...), and checkpoints every
    ``checkpoint_every`` steps (0: only at the end); the same call after a crash or a kill resumes
    from its latest checkpoint and ends with the weights an uninterrupted run would have.

    ``condition_dir``: a world model whose config reads a conditioning vector (``condition_dim``)
    trains on the vector of this frozen dynamics model (``models.dynamics``), computed over each
    window; windows then span the longer of the two models' histories.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _model_module(kind)  # validates the kind
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    adds = MODEL_KINDS[kind][2]
    config = dataclasses.asdict(model_config)
    window = config["history"]
    if config.get("condition_dim"):
        if not condition_dir:
            raise ValueError(f"this {kind} reads a conditioning vector: train it with the dynamics model that gives it "
                             "(condition_dir)")
        from models import dynamics
        d = dynamics.load(condition_dir).config
        if d.embed != config["condition_dim"] or d.image_size != config["image_size"]:
            raise ValueError(f"the dynamics model at {condition_dir} gives {d.embed}-wide vectors over "
                             f"{d.image_size} px frames; the {kind} reads {config['condition_dim']} over "
                             f"{config['image_size']} px")
        window = max(window, d.history)
    loop_config = {
        "kind": kind, "model_config": config, "frames_uri": frames_uri,
        "storage_options": storage_options, "steps": int(steps or config["steps"]),
        "synthetic_fraction": synthetic_fraction, "init_dir": init_dir, "filter": filter,
        "seed": seed, "require_next": adds == "next", "sequence": adds == "sequence",
        "threads": max(1, int(cpus_per_worker)),
        "clips_uri": clips_uri, "duplicate_weight": duplicate_weight, "state_index": list(state_index or []),
        "world": world, "prefetch": int(prefetch), "checkpoint_every": int(checkpoint_every),
        "data_version": data_version, "window": window,
        "condition_dir": condition_dir if config.get("condition_dim") else None, "precision": precision,
        "task_gaps": dict(task_gaps or {}) if focus > 0 else {}, "focus": float(focus),
    }
    digest = hashlib.sha256(json.dumps(loop_config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    progress = _Steps.remote()  # not part of the digest: a resumed run is the same run
    with _step_bar(progress, total=loop_config["steps"], desc=f"train {run_name or kind}"):  # ends the actor
        trainer = TorchTrainer(
            train_loop, train_loop_config={**loop_config, "progress": progress},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name=f"{run_name or kind}-{digest}", storage_path=os.path.abspath(storage_path),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {kind} produced no checkpoint: {result.error}")
    return {"checkpoint_dir": result.checkpoint.path, "metrics": dict(result.metrics)}


@ray.remote(num_cpus=0)
class _Steps:
    """Where rank 0 is: the step it finished and that step's loss."""

    def __init__(self) -> None:
        self.seen: tuple[int, float | None] = (0, None)

    def set(self, step: int, loss: float) -> None:
        self.seen = (step, loss)

    def get(self) -> tuple[int, float | None]:
        return self.seen


@contextlib.contextmanager
def _step_bar(progress, *, total: int, desc: str, every_s: float = 2.0):
    """A step bar on stderr, fed by rank 0 through the ``_Steps`` actor while the block (the
    trainer's fit, on this thread) runs; the actor ends with the block."""
    from tqdm import tqdm

    done = threading.Event()

    def follow(bar) -> None:
        while True:
            last = done.wait(every_s)  # one more poll after the block ends: the bar ends where rank 0 did
            try:
                step, loss = ray.get(progress.get.remote(), timeout=every_s)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):  # busy or going away
                step, loss = bar.n, None
            bar.update(step - bar.n)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if last:
                return

    with tqdm(total=total, desc=desc, unit="step", file=sys.stderr, mininterval=every_s) as bar:
        thread = threading.Thread(target=follow, args=(bar,), daemon=True, name="step-bar")
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            ray.kill(progress)
