"""Starting windows for the neural simulator, cut from frames rows, and the screen's rule."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from stages import images
from stages.neural import WINDOW_COLUMNS, pick_starts, screen, starts_from_windows


def light(steps: dict[str, list[int]]) -> pa.Table:
    return pa.table({"episode_id": [e for e, s in steps.items() for _ in s],
                     "step": [t for s in steps.values() for t in s]})


def test_starts_need_whole_context_windows_after_the_first_step():
    rows = light({"a": list(range(10)), "b": [0, 1, 2, 5, 6, 7, 8], "c": [0, 1]})
    picks = pick_starts(rows, n=50, context=3, first_step=4, seed=0)
    assert {e for e, _ in picks} == {"a", "b"}  # c is shorter than a window
    assert sorted(t for e, t in picks if e == "b") == [7, 8]  # 5 and 6 follow a gap
    assert sorted(t for e, t in picks if e == "a") == [4, 5, 6, 7, 8, 9]
    few = pick_starts(rows, n=2, context=3, first_step=4, seed=0)
    assert len(few) == 2 and {e for e, _ in few} == {"a", "b"}  # spread over episodes first
    shuffled = rows.take(np.random.default_rng(1).permutation(rows.num_rows))
    assert pick_starts(shuffled, n=4, context=3, first_step=4, seed=3) == pick_starts(rows, n=4, context=3,
                                                                                    first_step=4, seed=3)
    assert pick_starts(light({}), n=3, context=2, first_step=0, seed=0) == []


def window(episode: str, steps: list[int], size: int = 8) -> pa.Table:
    frames = np.stack([np.full((size, size, 3), 10 * s, np.uint8) for s in steps])
    image, height, width = images.to_columns(frames)
    return pa.table({"episode_id": [episode] * len(steps), "step": steps, "image": image, "height": height, "width": width,
                     "action": [[float(s), -float(s)] for s in steps], "state": [[float(s)] for s in steps],
                     "task": ["Reach the goal."] * len(steps)}).select(list(WINDOW_COLUMNS))


def test_starts_from_windows_keep_order_frames_actions_states():
    rows = window("a", [5, 3, 4])  # any order
    (start,) = starts_from_windows([rows], [("a", 5)], context=3, image_size=8, task_names={"Reach the goal.": "reach"})
    assert start.frames.shape == (3, 8, 8, 3) and start.frames[:, 0, 0, 0].tolist() == [30, 40, 50]
    assert start.actions[:, 0].tolist() == [3, 4, 5] and start.states[:, 0].tolist() == [3, 4, 5]
    assert (start.episode_id, start.step, start.task, start.instruction) == ("a", 5, "reach", "Reach the goal.")
    with pytest.raises(ValueError, match="holds 2 rows"):
        starts_from_windows([window("a", [4, 5])], [("a", 5)], context=3, image_size=8)


def test_screen_passes_within_the_margin():
    assert screen([1, 2], [1, 2], margin=0.0)["passed"]
    assert not screen([1, 2], [1.5, 2.5], margin=0.1)["passed"]
    assert screen([1, 2], [1.5, 2.5], margin=0.5)["passed"]
    assert not screen([1, 2], [1, 2], margin=-1)["passed"]  # a negative margin asks the candidate to win by it
    with pytest.raises(ValueError, match="same non-empty"):
        screen([1], [1, 2], margin=0)
