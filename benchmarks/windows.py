"""Data of `make bench-world-model`: episodes driven as the turn-0 fleet drives them, every training
window of them as batches, and the held-out windows rolled out open loop."""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator

import numpy as np
import torch


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)



def held_out_scenes(spec, n: int) -> list[tuple[int, str]]:
    """The first ``n`` distinct held-out scenes (seed, task): seed i with task i (round-robin) first,
    then each seed with the next task, and so on; at most every pair of ``spec.eval_seeds`` and tasks."""
    seeds, tasks = spec.eval_seeds, spec.task_names
    pairs = sorted(((i, j) for i in range(len(seeds)) for j in range(len(tasks))),
                   key=lambda p: ((p[1] - p[0]) % len(tasks), p[0]))
    return [(seeds[i], tasks[j]) for i, j in pairs[:n]]


def drive(world, scenes: list[tuple[int, str]], *, play: bool = False) -> list[dict]:
    """Episodes driven as the turn-0 fleet drives them: noisy expert, expert as safety driver; or,
    with ``play``, play data: the world's uniformly random driver with nobody taking over."""
    from sim.rollout import run_episode

    def driver():
        return world.random_driver() if play else world.expert(noisy=True)
    return [run_episode(world=world, seed=seed, task=task, driver=driver(), safety="off" if play else "active")[0]
            for seed, task in scenes]


@dataclasses.dataclass(frozen=True)
class Batch:
    """One training batch."""

    history: torch.Tensor  # uint8 [B, W, H, W, 3]: the longer of the two models' windows
    action: torch.Tensor  # float32 [B, A]: a[t]
    target: torch.Tensor  # uint8 [B, H, W, 3]
    task: np.ndarray  # int [B], index into spec.tasks
    actions: torch.Tensor  # float32 [B, W, A]: the actions logged at the window's frames
    states: torch.Tensor  # float32 [B, W, S]: the states logged at them


class Windows:
    """Every training window of some episodes, ending at each step t that has a next frame."""

    def __init__(self, episodes: list[dict], history: int, task_names: tuple[str, ...]) -> None:
        self.frames = torch.from_numpy(np.concatenate([e["frames"] for e in episodes]))
        self.actions = torch.from_numpy(np.concatenate([e["actions"] for e in episodes]))
        self.states = torch.from_numpy(np.concatenate([e["states"] for e in episodes]).astype(np.float32))
        back, offset, slots, tasks = np.arange(history - 1, -1, -1), 0, [], []
        for e in episodes:
            t = np.arange(len(e["frames"]) - 1)
            slots.append(offset + np.maximum(t[:, None] - back[None, :], 0))
            tasks.append(np.full(len(t), task_names.index(e["task"])))
            offset += len(e["frames"])
        self.slots, self.tasks = np.concatenate(slots), np.concatenate(tasks)

    def __len__(self) -> int:
        return len(self.slots)

    def stream(self, batch: int, seed: int) -> Iterator[Batch]:
        """Batches of uniformly drawn windows; the same seed gives the same batches."""
        rng = np.random.default_rng(seed)
        while True:
            ids = rng.choice(len(self), size=batch, replace=len(self) < batch)
            s = self.slots[ids]
            yield Batch(self.frames[s], self.actions[s[:, -1]], self.frames[s[:, -1] + 1], self.tasks[ids],
                        self.actions[s], self.states[s])


def eval_windows(episodes: list[dict], history: int, horizon: int, starts: int, first: int,
                 task_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Open-loop windows: K frames up to s with the actions and states logged at them, the logged
    actions a[s..s+h-1], the frames o[s+1..s+h]."""
    rows: dict[str, list] = {"history": [], "history_actions": [], "history_states": [], "actions": [],
                             "future": [], "task": []}
    for e in episodes:
        last = len(e["frames"]) - 1 - horizon
        if last < first:
            log(f"  held-out episode seed {e['seed']} ({len(e['frames'])} steps) is too short for horizon {horizon}")
            continue
        for s in np.unique(np.linspace(first, last, min(starts, last - first + 1)).round().astype(int)):
            rows["history"].append(e["frames"][s - history + 1:s + 1])
            rows["history_actions"].append(e["actions"][s - history + 1:s + 1])
            rows["history_states"].append(e["states"][s - history + 1:s + 1].astype(np.float32))
            rows["actions"].append(e["actions"][s:s + horizon])
            rows["future"].append(e["frames"][s + 1:s + 1 + horizon])
            rows["task"].append(task_names.index(e["task"]))
    if not rows["task"]:
        raise ValueError(f"no held-out window of horizon {horizon}: add --eval-episodes or lower --horizons")
    return {k: np.stack(v) for k, v in rows.items()}
