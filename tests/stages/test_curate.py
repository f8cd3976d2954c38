"""Curation: kept episodes carry labels and lineage; bad logs become reject rows."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from tests.stages.test_mcap_log import make_episode

from stages.curate import (EPISODES, REJECTS, content_hash, curate_log, episode_to_tables,
                           frames_schema, validate_episode)
from stages.mcap_log import episode_to_mcap_bytes

OPTS = {"turn": 2, "image_size": 64, "min_length": 10, "val_fraction": 0.2}


def curate(episode: dict, **overrides) -> dict:
    data = episode_to_mcap_bytes(episode)
    return curate_log(data, source_uri="s3://lake/landing/ep.mcap", **{**OPTS, **overrides})


def test_kept_episode_row_and_frames():
    episode = make_episode(30)
    episode["expert_actions"][5] = np.nan
    episode["interventions"][:] = False
    episode["interventions"][[3, 4, 5, 10, 29]] = True  # three takeovers, five steps
    data = episode_to_mcap_bytes(episode)
    out = curate_log(data, source_uri="s3://lake/landing/ep.mcap", **OPTS)
    row, frames = out["episode"], out["frames"]
    assert out["reject"] is None
    assert row["episode_id"] == f"ep-{content_hash(data)[:24]}" and row["content_hash"] == content_hash(data)
    assert (row["length"], row["turn"], row["origin"]) == (30, 2, "real")
    assert (row["interventions"], row["intervention_steps"]) == (3, 5)
    assert row["off_track_steps"] == int(episode["off_track"].sum())
    assert row["episode_return"] == pytest.approx(float(episode["rewards"].astype(np.float64).sum()))
    assert row["label_source"] == "mixed" and row["split"] in ("train", "val")
    pa.Table.from_pylist([row], schema=EPISODES)  # the row fits the episodes schema
    assert frames.schema == frames_schema(64) and frames.num_rows == 30
    assert frames.column("frame_id")[7].as_py() == f"{row['episode_id']}:00007"
    labels = np.stack(frames.column("label").to_pylist())
    expected = episode["expert_actions"].copy()
    expected[5] = episode["actions"][5]  # no expert label at step 5: the executed action
    np.testing.assert_array_equal(labels, expected)
    sources = frames.column("label_source").to_pylist()
    assert sources[5] == "executed" and set(sources[:5] + sources[6:]) == {"privileged_expert"}
    images = frames.column("image").combine_chunks().to_numpy_ndarray()
    np.testing.assert_array_equal(images, episode["frames"])


def test_same_bytes_same_id_and_split():
    episode = make_episode(12, seed=4)
    first, second = curate(episode), curate(episode)
    assert first["episode"]["episode_id"] == second["episode"]["episode_id"]
    assert curate(episode, val_fraction=0.0)["episode"]["split"] == "train"
    assert curate(episode, val_fraction=1.0)["episode"]["split"] == "val"


@pytest.mark.parametrize("break_it, reason", [
    (lambda ep: ep["actions"].__setitem__((4, 1), np.nan), "nonfinite_action"),
    (lambda ep: ep["actions"].__setitem__((4, 0), 1.5), "range_action"),
    (lambda ep: ep["expert_actions"].__setitem__((2, 2), np.inf), "nonfinite_expert_action"),
    (lambda ep: ep["timestamps_ns"].__setitem__([5, 6], ep["timestamps_ns"][[6, 5]]), "timestamps"),
])
def test_bad_values_are_rejected(break_it, reason):
    episode = make_episode(20)
    break_it(episode)
    out = curate(episode)
    assert out["episode"] is None and out["frames"] is None
    reject = out["reject"]
    assert (reject["stage"], reject["reason"], reject["turn"]) == ("validate", reason, 2)
    assert reject["source_uri"] == "s3://lake/landing/ep.mcap" and reject["detail"]
    pa.Table.from_pylist([reject], schema=REJECTS)


def test_duplicate_stamps_cannot_be_aligned():
    episode = make_episode(20)
    episode["timestamps_ns"][6] = episode["timestamps_ns"][5]
    reject = curate(episode)["reject"]
    assert (reject["stage"], reject["reason"]) == ("read", "inconsistent_lengths")
    assert "19 distinct messages" in reject["detail"]


def test_wrong_image_shape_and_too_short_are_rejected():
    assert curate(make_episode(20, size=32))["reject"]["reason"] == "image_shape"
    assert curate(make_episode(20), image_size=(64, 96))["reject"]["reason"] == "image_shape"
    reject = curate(make_episode(5))["reject"]
    assert reject["reason"] == "too_short" and "5 steps" in reject["detail"]


def test_unreadable_log_is_a_read_reject_with_a_stable_id():
    data = episode_to_mcap_bytes(make_episode(12))[:-100]
    out = [curate_log(data, source_uri="/landing/x.mcap", **OPTS) for _ in range(2)]
    assert out[0]["episode"] is None
    assert (out[0]["reject"]["stage"], out[0]["reject"]["reason"]) == ("read", "truncated")
    assert out[0]["reject"]["reject_id"] == out[1]["reject"]["reject_id"]


def test_kept_plus_rejected_is_seen():
    logs = [episode_to_mcap_bytes(make_episode(12, seed=s)) for s in range(3)] + [b"", b"junk"]
    results = [curate_log(d, source_uri=f"/l/{i}.mcap", **OPTS) for i, d in enumerate(logs)]
    kept = [r for r in results if r["episode"] is not None]
    rejected = [r for r in results if r["reject"] is not None]
    assert (len(kept), len(rejected)) == (3, 2) and len(kept) + len(rejected) == len(logs)


def test_validate_reports_length_mismatch_and_missing_fields():
    episode = make_episode(10)
    episode["rewards"] = episode["rewards"][:9]
    del episode["off_track"]
    problems = validate_episode(episode, image_size=64)
    assert problems == ["length_mismatch: rewards has shape [9], expected [10]",
                        "missing_field: off_track"]


def test_synthetic_episode_tables():
    episode = make_episode(8, size=16)
    for key in ("states", "rewards", "interventions", "off_track", "expert_actions"):
        del episode[key]
    episode["labels"] = episode["actions"]
    row, frames = episode_to_tables(
        episode, episode_id="syn-1", source_uri="worldmodel://wm-3", content_hash="abc", turn=1,
        origin="synthetic", parent_episode_id="ep-1", generator_version="wm-3",
        label_source="privileged_expert", split="train")
    assert (row["origin"], row["parent_episode_id"], row["label_source"]) == (
        "synthetic", "ep-1", "privileged_expert")
    assert frames.schema == frames_schema(16)
    assert np.isnan(np.stack(frames.column("state").to_pylist())).all()
    assert set(frames.column("origin").to_pylist()) == {"synthetic"}
    with pytest.raises(ValueError, match="labels"):
        episode_to_tables({k: v for k, v in episode.items() if k != "labels"}, episode_id="x",
                          source_uri="", content_hash="", turn=0, origin="synthetic",
                          parent_episode_id="", generator_version="", label_source="", split="train")
