"""HistorySampler: windows stay inside episodes, pad at the start, honour the real/synthetic mix
and draw event clips more often than routine ones."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from stages.curate import episode_to_tables
from stages.lake import Lake
from stages.sampler import HistorySampler, focus_weights, window_weights
from stages.schemas import clips_schema

SIZE = 8
# (episode index, length, origin); channel 0 of every pixel = episode index, channel 1 = step
EPISODES = [(1, 7, "real"), (2, 3, "real"), (3, 12, "real"), (4, 10, "synthetic"), (5, 1, "real")]


def coded_episode(index: int, length: int) -> dict:
    steps = np.arange(length)
    frames = np.zeros((length, SIZE, SIZE, 3), np.uint8)
    frames[..., 0], frames[..., 1] = index, steps[:, None, None]
    actions = np.column_stack([np.full(length, index), steps, np.zeros(length)]).astype(np.float32)
    states = np.column_stack([np.full(length, index), steps]).astype(np.float32) - 0.25
    return {"frames": frames, "actions": actions, "labels": actions + 0.5, "states": states,
            "rewards": (100 * index + steps).astype(np.float32), "signals": {"odd": steps % 2 == 1},
            "instruction": f"task {index}", "timestamps_ns": steps.astype(np.int64) * 20_000_000}


def decode(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(episode index, step) of each frame, from its pixels."""
    return frames[..., 0, 0, 0].astype(int), frames[..., 0, 0, 1].astype(int)


@pytest.fixture(scope="module")
def frames_uri(tmp_path_factory) -> str:
    """A frames table written in shuffled physical order, in two appends."""
    tables = [episode_to_tables(coded_episode(i, n), episode_id=f"ep-{i}", source_uri="", content_hash="",
                                turn=0, origin=origin, parent_episode_id="", generator_version="",
                                label_source="privileged_expert", split="val" if i == 3 else "train")[1]
              for i, n, origin in EPISODES]
    table = pa.concat_tables(tables)
    table = table.take(np.random.default_rng(0).permutation(table.num_rows))
    lake = Lake(str(tmp_path_factory.mktemp("lake")))
    lake.append("frames", table.slice(0, 15), key="frame_id")
    lake.append("frames", table.slice(15), key="frame_id")
    return lake.table_uri("frames")


def check_windows(frames_bkhwc: np.ndarray) -> None:
    """Every window is one episode, consecutive steps, padded with the first frame at the start."""
    episode, step = decode(frames_bkhwc)
    assert (episode == episode[:, -1:]).all()
    k = frames_bkhwc.shape[1]
    expected = np.maximum(step[:, -1:] - np.arange(k - 1, -1, -1)[None, :], 0)
    np.testing.assert_array_equal(step, expected)


def test_windows_stay_inside_episodes_and_pad_at_start(frames_uri):
    sampler = HistorySampler(frames_uri, history=4, seed=1)
    assert len(sampler) == sum(n for _, n, _ in EPISODES) and sampler.skipped_windows == 0
    batch = sampler.batch(64)
    assert batch["frames_BKHWC"].shape == (64, 4, SIZE, SIZE, 3)
    assert batch["frames_BKHWC"].dtype == np.uint8 and batch["label_BA"].dtype == np.float32
    assert batch["label_BA"].shape == batch["action_BA"].shape == (64, 3)
    assert batch["state_BS"].shape == (64, 2) and batch["state_BS"].dtype == np.float32
    check_windows(batch["frames_BKHWC"])
    episode, step = decode(batch["frames_BKHWC"][:, -1])
    np.testing.assert_array_equal(batch["action_BA"][:, :2], np.column_stack([episode, step]))
    np.testing.assert_array_equal(batch["label_BA"], batch["action_BA"] + 0.5)
    np.testing.assert_array_equal(batch["state_BS"], np.column_stack([episode, step]) - 0.25)  # the last step's
    assert batch["tasks"].tolist() == [f"task {e}" for e in episode]
    padded = step < 3
    assert padded.any()  # windows at an episode start repeat its first frame
    assert "next_BHWC" not in batch


def test_draws_cover_every_window_once_per_epoch(frames_uri):
    sampler = HistorySampler(frames_uri, history=1, seed=0)
    frames = sampler.batch(len(sampler))["frames_BKHWC"][:, 0]
    pairs = set(zip(*decode(frames)))
    assert len(pairs) == len(sampler)


def test_require_next(frames_uri):
    sampler = HistorySampler(frames_uri, history=3, require_next=True, seed=2)
    assert len(sampler) == sum(n - 1 for _, n, _ in EPISODES)
    batch = sampler.batch(48)
    check_windows(batch["frames_BKHWC"])
    end_episode, end_step = decode(batch["frames_BKHWC"][:, -1])
    next_episode, next_step = decode(batch["next_BHWC"])
    np.testing.assert_array_equal(next_episode, end_episode)
    np.testing.assert_array_equal(next_step, end_step + 1)


def test_sequence_windows_carry_every_slot_and_the_row_after(frames_uri):
    sampler = HistorySampler(frames_uri, history=3, sequence=True, seed=5)
    assert len(sampler) == sum(max(0, n - 2) for _, n, _ in EPISODES)  # whole windows only: no padding
    batch = sampler.batch(64)
    episode, step = decode(batch["frames_BKHWC"])
    np.testing.assert_array_equal(step, step[:, :1] + np.arange(3))
    assert (episode == episode[:, :1]).all()
    np.testing.assert_array_equal(batch["action_BKA"][..., 1], step)
    np.testing.assert_array_equal(batch["state_BKS"], np.stack([episode, step], -1) - 0.25)
    np.testing.assert_array_equal(batch["reward_BK"], 100 * episode + step)
    assert [[("odd" in s) for s in row] for row in batch["signals_BK"]] == (step % 2 == 1).tolist()
    length = dict((i, n) for i, n, _ in EPISODES)
    last = np.array([[length[e] - 1 for e in row] for row in episode])
    np.testing.assert_array_equal(batch["done_BK"], step == last)
    np.testing.assert_array_equal(batch["has_next_B"], step[:, -1] < last[:, -1])
    after = batch["has_next_B"]
    np.testing.assert_array_equal(batch["next_state_BS"][after], np.stack([episode[after, -1], step[after, -1] + 1], -1) - 0.25)
    assert [("odd" in s) for s in batch["next_signals_B"][after]] == ((step[after, -1] + 1) % 2 == 1).tolist()
    assert batch["done_BK"].any() and not batch["has_next_B"].all()


def test_synthetic_fraction(frames_uri):
    sampler = HistorySampler(frames_uri, history=2, seed=3)
    assert (sampler.n_real, sampler.n_synthetic) == (23, 10)
    for fraction in (0.0, 0.25, 1.0):
        episode, _ = decode(sampler.batch(16, synthetic_fraction=fraction)["frames_BKHWC"][:, -1])
        assert (episode == 4).sum() == round(16 * fraction)
    with pytest.raises(ValueError, match="synthetic_fraction"):
        sampler.batch(4, synthetic_fraction=1.5)
    real_only = HistorySampler(frames_uri, history=2, filter="origin = 'real'")
    episode, _ = decode(real_only.batch(16, synthetic_fraction=0.5)["frames_BKHWC"][:, -1])
    assert (episode != 4).all()  # no synthetic rows: the whole batch is real


def test_filter_and_shards(frames_uri):
    val = HistorySampler(frames_uri, history=2, filter="split = 'val'")
    episode, _ = decode(val.batch(8)["frames_BKHWC"])
    assert len(val) == 12 and (episode == 3).all()
    shards = [HistorySampler(frames_uri, history=1, rank=r, world_size=2) for r in range(2)]
    seen = [set(zip(*decode(s.batch(len(s))["frames_BKHWC"][:, 0]))) for s in shards]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 33


def test_gaps_from_deleted_rows_are_not_bridged(tmp_path):
    lake = Lake(str(tmp_path))
    _, table = episode_to_tables(coded_episode(7, 8), episode_id="ep-7", source_uri="",
                                 content_hash="", turn=0, origin="real", parent_episode_id="",
                                 generator_version="", label_source="executed", split="train")
    lake.append("frames", table, key="frame_id")
    lake.dataset("frames").delete("step = 4")
    sampler = HistorySampler(lake.table_uri("frames"), history=3, filter="step >= 1")
    # steps 1..3 and 5..7 remain; windows ending at 5 and 6 would bridge the gap
    assert len(sampler) == 4 and sampler.skipped_windows == 2
    _, steps = decode(sampler.batch(20)["frames_BKHWC"])
    assert set(steps[:, -1]) == {1, 2, 3, 7}
    assert np.isin(np.diff(steps, axis=1), [0, 1]).all()  # padded (1,1,2) or consecutive


def test_sampler_on_s3(s3_server):
    _, options = s3_server
    lake = Lake("s3://lake/sampler-test", options)
    _, table = episode_to_tables(coded_episode(9, 5), episode_id="ep-9", source_uri="",
                                 content_hash="", turn=0, origin="real", parent_episode_id="",
                                 generator_version="", label_source="executed", split="train")
    lake.append("frames", table, key="frame_id")
    sampler = HistorySampler(lake.table_uri("frames"), history=2, storage_options=options)
    check_windows(sampler.batch(5)["frames_BKHWC"])


def test_empty_selection_is_a_clear_error(frames_uri):
    with pytest.raises(ValueError, match="no windows"):
        HistorySampler(frames_uri, history=2, filter="split = 'nope'")


def clips_table(rows: list[tuple[str, int, int, float, str]]) -> pa.Table:
    """A clips table of (episode_id, start_step, end_step, weight, duplicate_of) rows."""
    keys = ("episode_id", "start_step", "end_step", "weight", "duplicate_of")
    return pa.Table.from_pylist([dict(zip(keys, r), clip_id=f"c{i}") for i, r in enumerate(rows)],
                                schema=clips_schema())


def test_window_weights_take_the_heaviest_covering_clip():
    episode = np.array(["a"] * 6 + ["b"] * 4, object)
    step = np.r_[np.arange(6), np.arange(2, 6)]
    clips = clips_table([("a", 0, 4, 1.0, ""), ("a", 2, 5, 4.0, ""), ("b", 0, 4, 1.0, "c9"),
                         ("b", 3, 8, 2.0, "c8"), ("zz", 0, 9, 9.0, "")])
    np.testing.assert_array_equal(window_weights(episode, step, clips, duplicate_weight=0.0),
                                  [1, 1, 4, 4, 4, 1, 0, 0, 0, 0])  # a:5 uncovered weighs 1
    np.testing.assert_array_equal(window_weights(episode, step, clips, duplicate_weight=0.5),
                                  [1, 1, 4, 4, 4, 1, .5, 1, 1, 1])
    with pytest.raises(ValueError, match="duplicate_weight"):
        window_weights(episode, step, clips, duplicate_weight=-1)


def test_event_clips_are_oversampled_and_duplicates_dropped(frames_uri, tmp_path):
    # ep-1 (7 steps): an event clip over steps 2..4 (weight 4) and a routine tile over all;
    # ep-3 (12 steps) is covered only by a near-duplicate tile; the rest has no clips
    lake = Lake(str(tmp_path))
    lake.append("clips", clips_table([("ep-1", 2, 5, 4.0, ""), ("ep-1", 0, 7, 1.0, ""),
                                      ("ep-3", 0, 12, 1.0, "c0")]), key="clip_id")
    sampler = HistorySampler(frames_uri, history=2, seed=4, clips_uri=lake.table_uri("clips"))
    # weights: ep-1 4+4+4+1*4 = 16, ep-2 3, ep-3 0, ep-4 (synthetic) 10, ep-5 1: total 30
    assert sampler.event_share == pytest.approx(12 / 30)
    assert sampler.event_share_natural == pytest.approx(3 / 33)
    episode, step = decode(sampler.batch(30_000)["frames_BKHWC"][:, -1])
    assert not (episode == 3).any()
    event = (episode == 1) & (step >= 2) & (step <= 4)
    assert event.mean() == pytest.approx(12 / 30, abs=0.02)
    routine_ep1 = (episode == 1) & ~event
    assert event.sum() / routine_ep1.sum() == pytest.approx(12 / 4, rel=0.1)
    # the synthetic share is still the caller's; the real draws keep their weights
    episode, _ = decode(sampler.batch(1_000, synthetic_fraction=0.25)["frames_BKHWC"][:, -1])
    assert (episode == 4).sum() == 250 and not (episode == 3).any()
    with pytest.raises(ValueError, match="weigh 0"):
        HistorySampler(frames_uri, history=2, filter="split = 'val'", clips_uri=lake.table_uri("clips"))


def test_focus_weights_spend_the_focus_share_on_the_tasks_with_a_gap():
    tasks = np.array(["a"] * 6 + ["b"] * 3 + ["c"] * 1, object)
    weights = np.r_[np.ones(5), 3.0, np.ones(3), 2.0]  # natural shares: a 8/13, b 3/13, c 2/13
    out = focus_weights(tasks, weights, gaps={"b": 0.3, "c": 0.1, "zz": 0.9}, focus=0.5)
    share = {t: out[tasks == t].sum() / out.sum() for t in "abc"}
    assert share["a"] == pytest.approx(0.5 * 8 / 13)
    assert share["b"] == pytest.approx(0.5 * 3 / 13 + 0.5 * 0.75)
    assert share["c"] == pytest.approx(0.5 * 2 / 13 + 0.5 * 0.25)
    assert out[5] == pytest.approx(3 * out[0])  # within a task the windows keep their weights
    np.testing.assert_array_equal(focus_weights(tasks, weights, gaps={"a": 0.0}, focus=0.5), weights)
    np.testing.assert_array_equal(focus_weights(tasks, weights, gaps={"b": 1.0}, focus=0.0), weights)
    with pytest.raises(ValueError, match="focus"):
        focus_weights(tasks, weights, gaps={"b": 1.0}, focus=1.5)


def test_focus_draws_the_gapped_tasks_more_often(frames_uri):
    # frames' task text is "task {episode index}"; training rows: ep-1 7, ep-2 3, ep-4 10, ep-5 1
    plain = HistorySampler(frames_uri, history=2, seed=5, filter="split = 'train'")
    assert plain.focus_share is None
    sampler = HistorySampler(frames_uri, history=2, seed=5, filter="split = 'train'",
                             task_gaps={"task 2": 0.4, "task 9": 1.0}, focus=0.6)
    assert sampler.focus_share == pytest.approx(0.4 * 3 / 21 + 0.6)
    episode, _ = decode(sampler.batch(20_000)["frames_BKHWC"][:, -1])
    assert (episode == 2).mean() == pytest.approx(0.4 * 3 / 21 + 0.6, abs=0.02)
    assert (episode == 1).mean() == pytest.approx(0.4 * 7 / 21, abs=0.02)
