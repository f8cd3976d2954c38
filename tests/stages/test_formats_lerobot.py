"""LeRobot v2.1 / v3.0 reader: exact round trips, AV1, shared-file offsets, broken datasets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.align import align
from stages.formats import lerobot
from stages.streams import LogError, Mapping
from tests.stages.lerobot_logs import (CAMERA, dataset_unit, encode_video, make_episode,
                                       memory_fetch, write_lerobot)

LENGTHS = (20, 17, 23)
STEP_NS = 20_000_000  # fps 50


def local_fetch(uri: str) -> bytes:
    return Path(uri).read_bytes()


def read(root: Path, mapping: Mapping | None = None) -> list:
    return lerobot.read(dataset_unit(root), mapping=mapping or Mapping(), fetch=local_fetch)


def episodes(smooth: bool = False) -> list[dict]:
    return [make_episode(n, seed=i, smooth=smooth) for i, n in enumerate(LENGTHS)]


def assert_round_trip(streams: list, eps: list[dict], version: str) -> None:
    assert [s.meta["episode_index"] for s in streams] == ["0", "1", "2"]
    for s, ep in zip(streams, eps):
        n = len(ep["frames"])
        np.testing.assert_array_equal(s.frames, ep["frames"])
        np.testing.assert_array_equal(s.camera_t, np.arange(n) * STEP_NS)
        assert set(s.signals) == {"action", "state", "reward"}
        for role, key in (("action", "actions"), ("state", "states"), ("reward", "rewards")):
            stamps, values = s.signals[role]
            np.testing.assert_array_equal(stamps, s.camera_t)
            assert values.dtype == np.float32
            np.testing.assert_array_equal(values, ep[key], err_msg=role)
        assert s.task == "drive the track"
        assert s.meta | {"episode_index": "?"} == {
            "format": f"lerobot-{version}", "fps": "50", "robot_type": "carracing", "source": "carracing",
            "camera_index": "0",
            "topic.camera": CAMERA, "topic.action": "action", "topic.state": "observation.state",
            "topic.reward": "next.reward", "episode_index": "?"}


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
@pytest.mark.parametrize("codec", ["ffv1", "png"])
def test_lossless_round_trip(tmp_path, version, codec):
    eps = episodes()
    write_lerobot(eps, tmp_path, version=version, codec=codec)
    assert_round_trip(read(tmp_path), eps, version)


def test_v3_episodes_sharing_files_start_at_their_own_offset(tmp_path):
    eps = episodes()
    write_lerobot(eps, tmp_path, version="v3.0", codec="ffv1", episodes_per_file=2)
    assert sorted(p.name for p in tmp_path.glob("videos/*/chunk-000/*.mp4")) == ["file-000.mp4", "file-001.mp4"]
    meta = pq.read_table(tmp_path / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert meta[1][f"videos/{CAMERA}/from_timestamp"] == pytest.approx(LENGTHS[0] / 50)
    assert meta[2][f"videos/{CAMERA}/from_timestamp"] == 0.0  # first of the second file
    streams = read(tmp_path)
    np.testing.assert_array_equal(streams[1].frames[0], eps[1]["frames"][0])
    assert not np.array_equal(streams[1].frames[0], eps[0]["frames"][-1])
    assert_round_trip(streams, eps, "v3.0")
    assert streams[0].source_uri == streams[1].source_uri != streams[2].source_uri


def test_reads_only_through_fetch(tmp_path):
    write_lerobot(episodes(), tmp_path, version="v3.0", codec="ffv1")
    unit = dataset_unit(tmp_path, scheme="mem://")
    fetch, served = memory_fetch(unit, "mem://")
    streams = lerobot.read(unit, mapping=Mapping(), fetch=fetch)
    assert len(streams) == 3
    assert len(served) == len(set(served))  # each object fetched once, the shared mp4 included
    assert not any(uri.endswith("episodes_stats.jsonl") for uri in served)


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_av1_decodes_close_to_the_original(tmp_path, version):
    eps = episodes(smooth=True)
    write_lerobot(eps, tmp_path, version=version, codec="libsvtav1")
    streams = read(tmp_path)
    for s, ep in zip(streams, eps):
        assert s.frames.shape == ep["frames"].shape
        assert np.abs(s.frames.astype(np.int16) - ep["frames"]).mean() < 8
        np.testing.assert_array_equal(s.signals["action"][1], ep["actions"])
    # each episode's first frame is its own, not its neighbour's in the shared mp4
    errors = [[np.abs(s.frames[0].astype(np.int16) - ep["frames"][0]).mean() for ep in eps] for s in streams]
    assert np.argmin(errors, axis=1).tolist() == [0, 1, 2]


def test_mapping_chooses_features(tmp_path):
    write_lerobot(episodes()[:1], tmp_path, version="v2.1", codec="ffv1")
    (s,) = read(tmp_path, Mapping(action=("observation.state",), state=("nothing",)))
    assert set(s.signals) == {"action", "reward"} and s.meta["topic.action"] == "observation.state"
    assert s.signals["action"][1].shape == (LENGTHS[0], 8)
    with pytest.raises(LogError) as err:
        read(tmp_path, Mapping(camera=("observation.images.wrist",)))
    assert err.value.reason == "missing_topic"


def test_width_one_lists_and_bools_for_scalar_roles(tmp_path):
    eps = episodes()[:1]
    write_lerobot(eps, tmp_path, version="v2.1", codec="ffv1")
    path = next(tmp_path.glob("data/**/*.parquet"))
    table = pq.read_table(path)
    reward = pa.FixedSizeListArray.from_arrays(table["next.reward"].combine_chunks(), 1)
    flags = np.arange(LENGTHS[0]) % 3 == 0
    pq.write_table(table.set_column(table.column_names.index("next.reward"), "next.reward", reward)
                   .append_column("intervention", pa.array(flags)), path)
    (s,) = read(tmp_path)
    np.testing.assert_array_equal(s.signals["reward"][1], eps[0]["rewards"])
    np.testing.assert_array_equal(s.signals["intervention"][1], flags.astype(np.float32))
    assert s.meta["topic.intervention"] == "intervention"


def test_a_signals_list_column_is_the_signals_role(tmp_path):
    eps = episodes()[:1]
    write_lerobot(eps, tmp_path, version="v2.1", codec="ffv1")
    path = next(tmp_path.glob("data/**/*.parquet"))
    off = np.arange(LENGTHS[0]) % 4 == 1
    column = pa.FixedSizeListArray.from_arrays(pa.array(off), 1)  # one bool per signal name
    pq.write_table(pq.read_table(path).append_column("signals", column), path)
    (s,) = read(tmp_path)
    assert s.meta["topic.signals"] == "signals"
    np.testing.assert_array_equal(s.signals["signals"][1], off[:, None].astype(np.float32))  # kept [N, 1]
    [span], _ = align(s, signal_names=("off_track",))
    np.testing.assert_array_equal(span["signals"]["off_track"], off)


def rewrite_info(root: Path, **changes) -> None:
    path = root / "meta/info.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def null_timestamp(root: Path) -> None:
    path = next(root.glob("data/**/*.parquet"))
    table = pq.read_table(path)
    stamps = pa.array([None, *table["timestamp"].to_pylist()[1:]], pa.float32())
    pq.write_table(table.set_column(table.column_names.index("timestamp"), "timestamp", stamps), path)


def drop_episodes_metadata(root: Path) -> None:
    for path in [*root.glob("meta/episodes.jsonl"), *root.glob("meta/episodes/**/*.parquet")]:
        path.unlink()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "no_info": (lambda r: (r / "meta/info.json").unlink(), "missing_file"),
    "no_mp4": (lambda r: next(r.glob("videos/**/*.mp4")).unlink(), "missing_file"),
    "no_parquet": (lambda r: next(r.glob("data/**/*.parquet")).unlink(), "missing_file"),
    "no_episodes": (drop_episodes_metadata, "missing_file"),
    "old_version": (lambda r: rewrite_info(r, codebase_version="v1.6"), "unsupported"),
    "info_not_json": (lambda r: (r / "meta/info.json").write_text("{fps: 50"), "corrupt"),
    "info_no_fps": (lambda r: rewrite_info(r, fps=None), "corrupt"),
    "info_zero_fps": (lambda r: rewrite_info(r, fps=0), "corrupt"),
    "null_timestamp": (null_timestamp, "corrupt"),
    "info_bad_template": (lambda r: rewrite_info(r, data_path="data/{nope}.parquet"), "corrupt"),
    "no_camera": (lambda r: rewrite_info(r, features={"action": {"dtype": "float32"}}), "missing_topic"),
    "mp4_truncated": (lambda r: truncate(next(r.glob("videos/**/*.mp4"))), "corrupt"),
    "mp4_garbage": (lambda r: next(r.glob("videos/**/*.mp4")).write_bytes(b"\0" * 999), "corrupt"),
    "parquet_truncated": (lambda r: truncate(next(r.glob("data/**/*.parquet"))), "corrupt"),
}


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_broken_datasets_raise_log_error(tmp_path, version, damage):
    write_lerobot(episodes()[:2], tmp_path, version=version, codec="ffv1")
    breaking, reason = DAMAGE[damage]
    breaking(tmp_path)
    with pytest.raises(LogError) as err:
        read(tmp_path)
    assert err.value.reason == reason, err.value


def test_zero_chunks_size_is_corrupt(tmp_path):
    """v2's file paths divide the episode index by ``chunks_size``: 0 is damaged metadata, not a crash."""
    write_lerobot(episodes()[:2], tmp_path, version="v2.1", codec="ffv1")
    rewrite_info(tmp_path, chunks_size=0)
    with pytest.raises(LogError) as err:
        read(tmp_path)
    assert err.value.reason == "corrupt" and "ZeroDivisionError" in err.value.detail


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_fewer_frames_than_rows(tmp_path, version):
    eps = episodes()[:1]
    write_lerobot(eps, tmp_path, version=version, codec="ffv1")
    encode_video(eps[0]["frames"][:-3], next(tmp_path.glob("videos/**/*.mp4")), fps=50, codec="ffv1")
    with pytest.raises(LogError) as err:
        read(tmp_path)
    assert err.value.reason == "inconsistent_lengths" and "3 of 20 rows" in err.value.detail


def test_rows_disagreeing_with_episode_metadata(tmp_path):
    write_lerobot(episodes()[:1], tmp_path, version="v3.0", codec="ffv1")
    path = tmp_path / "data/chunk-000/file-000.parquet"
    pq.write_table(pq.read_table(path).slice(0, 15), path)
    with pytest.raises(LogError) as err:
        read(tmp_path)
    assert err.value.reason == "inconsistent_lengths"


def test_v20_reads_and_unnamed_task_index(tmp_path):
    v2 = tmp_path / "v2"
    write_lerobot(episodes()[:1], v2, version="v2.1", codec="ffv1")
    rewrite_info(v2, codebase_version="v2.0")
    assert read(v2)[0].meta["format"] == "lerobot-v2.0"
    v3 = tmp_path / "v3"
    write_lerobot(episodes()[:1], v3, version="v3.0", codec="ffv1", task="park")
    pq.write_table(pa.table({"task_index": [0], "__index_level_0__": ["park"]}), v3 / "meta/tasks.parquet")
    assert read(v3)[0].task == "park"
