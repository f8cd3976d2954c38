"""Starting states for the neural simulator, cut from the real frames of the lake, and the screen
that decides whether a candidate is worth real-simulator time.

Pure functions over Arrow and NumPy: the flow reads the light columns and the windows; the
rollouts themselves run in ``stages.adapters.neural_rollouts``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from sim.neural import Start
from stages import images
from stages.schemas import vectors

WINDOW_COLUMNS = ("episode_id", "step", "image", "height", "width", "action", "state", "task")


def pick_starts(light: pa.Table, *, n: int, context: int, first_step: int, seed: int) -> list[tuple[str, int]]:
    """Up to ``n`` (episode_id, step) starts from light rows (episode_id, step): each the last step of
    ``context`` consecutive logged steps, at ``first_step`` or later, spread over the episodes
    (round-robin over episodes in a seeded order, a seeded step in each). Order-independent."""
    if n < 1 or light.num_rows == 0:
        return []
    ids = np.asarray(light.column("episode_id").to_pylist(), object)
    steps = light.column("step").to_numpy().astype(np.int64)
    by_episode: dict[str, np.ndarray] = {}
    for e in sorted(set(ids)):
        s = np.sort(steps[ids == e])
        whole = np.zeros(len(s), bool)  # the context steps before it are all logged
        whole[context - 1:] = s[context - 1:] - s[:len(s) - context + 1] == context - 1
        ok = whole & (s >= first_step)
        if ok.any():
            by_episode[e] = s[ok]
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(sorted(by_episode)))
    picks: list[tuple[str, int]] = []
    while len(picks) < n and order:
        for e in list(order):
            choices = np.setdiff1d(by_episode[e], [s for pe, s in picks if pe == e])
            if not len(choices):
                order.remove(e)
                continue
            picks.append((str(e), int(rng.choice(choices))))
            if len(picks) == n:
                break
    return sorted(picks)


def starts_from_windows(windows: Sequence[pa.Table], picks: Sequence[tuple[str, int]], *, context: int,
                        image_size: int, task_names: dict[str, str] | None = None) -> list[Start]:
    """A ``Start`` per pick from its window (the frames rows, ``WINDOW_COLUMNS``, of steps
    ``step - context + 1 .. step`` of its episode, in any order); frames at ``image_size``."""
    starts = []
    for rows, (episode, step) in zip(windows, picks, strict=True):
        rows = rows.sort_by("step")
        if rows.num_rows != context or rows.column("step")[-1].as_py() != step:
            raise ValueError(f"the window of {episode}:{step} holds {rows.num_rows} rows, not {context}")
        instruction = rows.column("task")[-1].as_py() or ""
        starts.append(Start(frames=images.decode(rows, image_size), actions=vectors(rows.column("action")),
                            states=vectors(rows.column("state")), instruction=instruction, episode_id=episode,
                            step=step, task=(task_names or {}).get(instruction, instruction)))
    return starts


def screen(candidate: Sequence[float], champion: Sequence[float], *, margin: float) -> dict:
    """Paired neural-simulator scores of a candidate and the champion on the same starts: the
    candidate passes when its mean is no more than ``margin`` below the champion's."""
    c, r = np.asarray(candidate, float), np.asarray(champion, float)
    if c.shape != r.shape or not len(c):
        raise ValueError("screen needs the same non-empty starts for both")
    diff = float((c - r).mean())
    return {"passed": diff >= -margin, "mean_diff": diff, "candidate": float(c.mean()), "champion": float(r.mean()),
            "margin": margin, "n": len(c)}
