"""Training batches of frame histories from the Lance frames table, by random access.

The index is built from the light columns only (episode_id, step, origin); images are fetched
per batch with ``dataset.take``. Rows are ordered by (episode_id, step) from the columns, never
by their physical position, and every fetched row is checked against the index.

With a ``clips`` table, windows are drawn with probability proportional to the weight of the
clips that cover their last step (``window_weights``): event clips are oversampled (their
``weight`` column, from ``stages.events.oversample``: the world's event weights) and near-duplicate clips down-weighted,
as a fleet data engine feeds its triggers back into training.
"""
from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa

from stages import images, storage
from stages.schemas import vectors

_LIGHT = ["episode_id", "step", "origin", "task"]
_CLIP_COLUMNS = ["episode_id", "start_step", "end_step", "weight", "duplicate_of"]


def window_weights(episode: np.ndarray, step: np.ndarray, clips: pa.Table, *,
                   duplicate_weight: float) -> np.ndarray:
    """Sampling weight (float64[N]) of the window ending at each row, from the clips covering it.

    Rows must be sorted by (episode, step). A row covered by clips [start_step, end_step) of its
    episode takes the largest covering weight, a clip marked ``duplicate_of`` another counting
    ``duplicate_weight`` times its own; a row no clip covers (synthetic frames, logs curated
    without clips) weighs 1.
    """
    if duplicate_weight < 0:
        raise ValueError(f"duplicate_weight must be >= 0, got {duplicate_weight}")
    weight = np.full(len(step), np.nan)
    if not len(step):
        return weight
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    bounds = dict(zip(episode[starts], zip(starts, np.r_[starts[1:], len(step)])))
    value = clips.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
    duplicate = np.asarray(clips.column("duplicate_of").to_pylist(), object) != ""
    value = np.where(duplicate, value * duplicate_weight, value)
    for ep, start, end, v in zip(clips.column("episode_id").to_pylist(),
                                 clips.column("start_step").to_numpy(),
                                 clips.column("end_step").to_numpy(), value):
        if ep not in bounds:
            continue
        lo, hi = bounds[ep]
        a, b = lo + np.searchsorted(step[lo:hi], [start, end])
        weight[a:b] = np.fmax(weight[a:b], v)
    return np.where(np.isnan(weight), 1.0, weight)


def focus_weights(tasks: np.ndarray, weights: np.ndarray, *, gaps: dict[str, float], focus: float) -> np.ndarray:
    """``weights`` (float64[N], one per window) rescaled so that a share ``1 - focus`` of the draws
    falls on each task as before and the share ``focus`` on the tasks with a gap, in proportion to
    it (``gaps``: task text -> how far the champion falls short; tasks absent or at 0 get no extra
    share), as a fleet data engine spends its training steps where the model fails. Within a task
    windows keep their relative weights. Unchanged when no task of ``tasks`` has a gap."""
    if not 0.0 <= focus <= 1.0:
        raise ValueError(f"focus must be in [0, 1], got {focus}")
    total = weights.sum()
    names = np.unique(tasks)
    gap = np.array([max(0.0, float(gaps.get(t, 0.0))) for t in names])
    if focus == 0.0 or not total > 0 or not gap.sum() > 0:
        return weights
    out = weights.astype(np.float64, copy=True)
    for name, g in zip(names, gap):
        mine = tasks == name
        natural = weights[mine].sum() / total
        if natural > 0:
            out[mine] *= ((1.0 - focus) * natural + focus * g / gap.sum()) / natural
    return out


class _Pool:
    """Window ids drawn without replacement, reshuffled each time the pool is exhausted; with
    ``weights``, drawn independently with probability proportional to their weight.

    ``draw(n, at=(key, position))`` draws the same ids whatever was drawn before: positions
    ``position .. position + n - 1`` of a stream of permutations seeded by ``key`` and the epoch
    (weighted pools: a choice seeded by ``key`` and ``position``), so a resumed run draws what the
    interrupted one would have."""

    def __init__(self, ids: np.ndarray, rng: np.random.Generator, weights: np.ndarray | None = None) -> None:
        self.ids, self.rng, self.order, self.cursor = ids, rng, ids[:0], 0
        self.p = None
        if weights is not None and len(ids):
            if not weights.sum() > 0:
                raise ValueError(f"all {len(ids)} windows of a sampling pool weigh 0")
            self.p = weights / weights.sum()

    def draw(self, n: int, at: tuple[list[int], int] | None = None) -> np.ndarray:
        if at is not None:
            return self._draw_at(n, *at)
        if self.p is not None:
            return self.rng.choice(self.ids, size=n, p=self.p)
        out: list[np.ndarray] = []
        while n > 0:
            if self.cursor >= len(self.order):
                self.order, self.cursor = self.rng.permutation(self.ids), 0
            take = self.order[self.cursor:self.cursor + n]
            self.cursor += len(take)
            n -= len(take)
            out.append(take)
        return np.concatenate(out) if out else self.ids[:0]

    def _draw_at(self, n: int, key: list[int], position: int) -> np.ndarray:
        if self.p is not None:
            return np.random.default_rng([*key, position]).choice(self.ids, size=n, p=self.p)
        if not len(self.ids) or n <= 0:
            return self.ids[:0]
        positions = np.arange(position, position + n)
        out = np.empty(n, self.ids.dtype)
        for epoch in np.unique(positions // len(self.ids)):
            here = positions // len(self.ids) == epoch
            order = np.random.default_rng([*key, int(epoch)]).permutation(self.ids)
            out[here] = order[positions[here] % len(self.ids)]
        return out


def history_slots(episode: np.ndarray, step: np.ndarray, history: int) -> tuple[np.ndarray, np.ndarray]:
    """The window rule, for rows sorted by (episode, step): ``slots[j, k]`` is the row of history
    slot k of the window ending at row j (a window reaching before its episode's first row repeats
    that row), ``valid[j]`` whether that window's steps are consecutive (no gap)."""
    rows = np.arange(len(step))
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    first = starts[np.searchsorted(starts, rows, side="right") - 1]
    back = np.arange(history - 1, -1, -1)
    slots = np.maximum(rows[:, None] - back[None, :], first[:, None])
    expected = np.maximum(step[:, None] - back[None, :], step[first][:, None])
    return slots, (step[slots] == expected).all(axis=1)


class HistorySampler:
    """Windows of ``history`` consecutive steps of one episode, ending at step t.

    A window that reaches before the episode's first step repeats that first frame. Windows
    that would span a gap in the steps (e.g. rows excluded by ``filter``) are left out of the
    index and counted in ``skipped_windows``. With ``require_next`` only windows whose step
    t+1 exists in the same episode are kept, and batches carry that next frame. Frames come at
    the resolution they were curated at, or resized to ``image_size`` (square) when given.
    Windows (ordered by episode_id, step) are sharded round-robin over ``world_size`` ranks.
    With ``clips_uri`` (the lake's clips table) windows are drawn by ``window_weights``, with
    replacement; ``event_share`` is then the expected share of draws (from all windows) whose
    last step lies in an oversampled clip (weight > 1), ``event_share_natural`` their share of
    windows. With ``task_gaps`` and ``focus`` > 0 the weights are then rescaled by task
    (``focus_weights``; the frames' ``task`` text), drawn with replacement, and ``focus_share`` is the
    expected share of draws from the tasks with a gap.

    With ``sequence`` only whole windows are kept (no repeated first frame) and batches carry
    every slot's reward and signals (``reward_BK``, ``signals_BK`` lists of names), ``done_BK`` (the slot is its episode's last row) and the row
    after the window (``next_state_BS``, ``next_signals_B``, ``has_next_B``): what
    ``models.dynamics`` learns from.
    """

    def __init__(self, frames_uri: str, *, history: int, storage_options: dict[str, str] | None = None,
                 filter: str | None = None, rank: int = 0, world_size: int = 1, seed: int = 0,
                 require_next: bool = False, clips_uri: str | None = None,
                 duplicate_weight: float = 0.0, image_size: int | None = None, sequence: bool = False,
                 task_gaps: dict[str, float] | None = None, focus: float = 0.0) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        options = storage.resolve_options(storage_options) if storage.is_s3(frames_uri) else None
        self.dataset = lance.dataset(frames_uri, storage_options=options)
        clips = lance.dataset(clips_uri, storage_options=options).to_table(columns=_CLIP_COLUMNS) \
            if clips_uri else None
        self.require_next, self.sequence = require_next, sequence
        self.image_size = image_size
        positions, episode, step, origin, task = self._light_index(filter)
        where = f"{frames_uri} (filter {filter!r}, history {history}, require_next {require_next})"
        if len(step) == 0:
            raise ValueError(f"no windows: no rows in {where}")
        order = np.lexsort((step, episode))
        positions, episode, step, origin, task = (positions[order], episode[order], step[order], origin[order],
                                                  task[order])
        slots, valid = history_slots(episode, step, history)
        rows = np.arange(len(step))
        self.skipped_windows = int((~valid).sum())
        nxt = np.minimum(rows + 1, len(rows) - 1)
        follows = (nxt > rows) & (episode[nxt] == episode) & (step[nxt] == step + 1)
        if require_next:
            valid &= follows
        if sequence:
            valid &= slots[:, 0] == rows - (history - 1)
        ids = np.flatnonzero(valid)[rank::world_size]
        if len(ids) == 0:
            raise ValueError(f"no windows for rank {rank}/{world_size} in {where}")
        self._rows = positions[slots[ids]]  # dataset offsets, [W, K]
        self._next = positions[nxt[ids]]
        self._follows = follows[ids]
        last = (nxt == rows) | (episode[nxt] != episode)
        self._last = last[slots[ids]]  # [W, K]: the slot is its episode's last row
        synthetic = origin[ids] == "synthetic"
        weights, self.event_share, self.event_share_natural, self.focus_share = None, None, None, None
        if clips is not None:
            weights = window_weights(episode, step, clips, duplicate_weight=duplicate_weight)[ids]
            self.event_share_natural = float((weights > 1).mean())
            self.event_share = float(weights[weights > 1].sum() / weights.sum())
        if focus > 0 and task_gaps:
            weights = focus_weights(task[ids], np.ones(len(ids)) if weights is None else weights,
                                    gaps=task_gaps, focus=focus)
            gapped = np.isin(task[ids], [t for t, g in task_gaps.items() if g > 0])
            self.focus_share = float(weights[gapped].sum() / weights.sum())
        rng = np.random.default_rng([seed, rank])
        self._key = [seed, rank]
        self._all = _Pool(np.arange(len(ids)), rng, weights)
        self._real = _Pool(np.flatnonzero(~synthetic), rng, None if weights is None else weights[~synthetic])
        self._synthetic = _Pool(np.flatnonzero(synthetic), rng, None if weights is None else weights[synthetic])
        self.n_synthetic, self.n_real = int(synthetic.sum()), int((~synthetic).sum())
        by_offset = np.argsort(positions)
        self._offsets, self._offset_keys = positions[by_offset], (episode[by_offset], step[by_offset])

    def _light_index(self, filter: str | None) -> tuple[np.ndarray, ...]:
        """Dataset offsets and light columns of the rows that pass ``filter``."""
        table = self.dataset.to_table(columns=_LIGHT, filter=filter, with_row_address=True)
        if filter is None:
            offsets = np.arange(table.num_rows)
        else:  # offsets count live rows in scan order: map the filtered rows' addresses onto them
            address = self.dataset.to_table(columns=[], with_row_address=True).column("_rowaddr")
            address = address.to_numpy()
            sorter = np.argsort(address)
            offsets = sorter[np.searchsorted(address, table.column("_rowaddr").to_numpy(),
                                             sorter=sorter)]
        return (offsets.astype(np.int64), np.asarray(table.column("episode_id").to_pylist(), object),
                table.column("step").to_numpy().astype(np.int64),
                np.asarray(table.column("origin").to_pylist(), object),
                np.asarray(table.column("task").to_pylist(), object))

    def __len__(self) -> int:
        return len(self._rows)

    def _draw(self, batch_size: int, synthetic_fraction: float | None, step: int | None) -> np.ndarray:
        def at(pool: int, n: int) -> tuple[list[int], int] | None:
            return None if step is None else ([*self._key, pool], step * n)
        if synthetic_fraction is None or self.n_synthetic == 0 or self.n_real == 0:
            return self._all.draw(batch_size, at(0, batch_size))
        if not 0.0 <= synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
        n_syn = int(round(batch_size * synthetic_fraction))
        return np.concatenate([self._synthetic.draw(n_syn, at(1, n_syn)),
                               self._real.draw(batch_size - n_syn, at(2, batch_size - n_syn))])

    def batch(self, batch_size: int, *, synthetic_fraction: float | None = None,
              step: int | None = None) -> dict[str, np.ndarray]:
        """A random batch: frames_BKHWC uint8; the last slot's label_BA, action_BA and state_BS and
        every slot's action_BKA and state_BKS, float32; tasks (+ next_BHWC, + the sequence targets).

        ``synthetic_fraction`` of the batch comes from windows ending on synthetic rows
        (None: the natural proportion; all real when there are no synthetic rows). With ``step``
        the batch depends only on the sampler's seed, rank and that step (a resumed training run
        draws the batches the interrupted one would have); without, batches follow one stream.
        """
        picks = self._draw(batch_size, synthetic_fraction, step)
        rows = self._rows[picks]
        with_next = self.require_next or self.sequence
        wanted = [rows.reshape(-1), rows[:, -1]] + ([self._next[picks]] if with_next else [])
        unique, inverse = np.unique(np.concatenate(wanted), return_inverse=True)
        columns = ["episode_id", "step", "image", "height", "width", "label", "action", "state", "task"]
        fetched = self.dataset.take(pa.array(unique), columns=columns + (["reward", "signals"] if self.sequence else []))
        self._check(unique, fetched)
        frames = images.decode(fetched, self.image_size)
        labels = vectors(fetched.column("label"))
        actions = vectors(fetched.column("action"))
        b, k = rows.shape
        history_idx = inverse[:b * k].reshape(b, k)
        end_idx = inverse[b * k:b * k + b]
        states = vectors(fetched.column("state"))
        out = {"frames_BKHWC": frames[history_idx], "label_BA": labels[end_idx],
               "action_BA": actions[end_idx], "state_BS": states[end_idx],
               "action_BKA": actions[history_idx], "state_BKS": states[history_idx],
               "tasks": np.asarray(fetched.column("task").to_pylist(), object)[end_idx]}
        if self.require_next:
            out["next_BHWC"] = frames[inverse[b * k + b:]]
        if self.sequence:
            signals = np.empty(fetched.num_rows, object)  # one tuple of raised signal names per row
            for i, raised in enumerate(fetched.column("signals").to_pylist()):
                signals[i] = tuple(raised or ())
            rewards = np.nan_to_num(fetched.column("reward").to_numpy(zero_copy_only=False).astype(np.float32))
            next_idx = inverse[b * k + b:]
            out.update(reward_BK=rewards[history_idx],
                       signals_BK=signals[history_idx], done_BK=self._last[picks],
                       next_state_BS=states[next_idx], next_signals_B=signals[next_idx],
                       has_next_B=self._follows[picks])
        return out

    def _check(self, offsets: np.ndarray, fetched: pa.Table) -> None:
        """Every fetched row must be the (episode_id, step) the index holds for its offset."""
        at = np.searchsorted(self._offsets, offsets)
        episode, step = self._offset_keys[0][at], self._offset_keys[1][at]
        got_episode = np.asarray(fetched.column("episode_id").to_pylist(), object)
        got_step = fetched.column("step").to_numpy().astype(np.int64)
        bad = np.flatnonzero((got_episode != episode) | (got_step != step))
        if len(bad):
            i = bad[0]
            raise RuntimeError(f"row {offsets[i]} is {got_episode[i]}:{got_step[i]}, the index "
                               f"expected {episode[i]}:{step[i]}: the table changed under the sampler")
