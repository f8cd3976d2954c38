"""The dynamics model's per-slot targets from a sequence batch (``stages.train.dynamics_targets``)."""
from __future__ import annotations

import numpy as np
import torch

from stages.train import dynamics_targets


def names(rows: list[list[tuple[str, ...]]]) -> np.ndarray:
    out = np.empty((len(rows), len(rows[0])), object)
    for i, row in enumerate(rows):
        for j, raised in enumerate(row):
            out[i, j] = raised
    return out


def test_slot_targets_shift_by_one_and_the_last_slot_reads_the_row_after():
    state = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    after = np.empty(2, object)
    after[0], after[1] = ("b",), ()
    batch = {"state_BKS": state, "next_state_BS": np.array([[100, 101], [np.nan, np.nan]], np.float32),
             "signals_BK": names([[(), ("a",), ("a", "b")], [("b",), (), ()]]), "next_signals_B": after,
             "reward_BK": np.ones((2, 3), np.float32), "done_BK": np.array([[0, 0, 0], [0, 0, 1]], bool),
             "has_next_B": np.array([True, False])}
    t = dynamics_targets(batch, ("a", "b"))
    torch.testing.assert_close(t.next_state_BKS[0], torch.tensor([[2.0, 3.0], [4.0, 5.0], [100.0, 101.0]]))
    assert torch.isnan(t.next_state_BKS[1, 2]).all()
    assert t.next_signals_BKG[0].tolist() == [[1, 0], [1, 1], [0, 1]]
    assert t.next_signals_BKG[1].tolist() == [[0, 0], [0, 0], [0, 0]]
    assert t.has_next_BK.tolist() == [[True, True, True], [True, True, False]]
    assert t.done_BK.tolist() == [[False, False, False], [False, False, True]]
