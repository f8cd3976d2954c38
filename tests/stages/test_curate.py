"""Ingest (pure): a unit in, spans with labels and lineage or reject rows out; table schemas."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest
from tests.stages.test_mcap_log import SPEC, make_episode

from stages import images
from stages.curate import SpanVerdict, episode_to_tables
from stages.frames import Frames
from stages.ingest import IngestResult, ingest_unit
from stages.mcap_log import episode_to_mcap_bytes
from stages.schemas import EPISODES, REJECTS, clips_schema, features_of, frames_schema
from stages.sources import discover
from stages.streams import Mapping

OPTS = {"turn": 2, "max_side": 64, "min_length": 10, "val_fraction": 0.2}
DIMS = {"action_dim": len(SPEC.actions), "state_dim": len(SPEC.state_names)}


def curate_log(data: bytes, *, source_uri: str, turn: int, max_side: int, min_length: int,
               val_fraction: float) -> dict:
    """One MCAP log through ``ingest_unit``: {"episode", "frames", "reject"} of its first span."""
    unit = {"uri": source_uri, "format": "mcap",
            "files": [{"uri": source_uri, "rel": source_uri.rsplit("/", 1)[-1], "size": len(data), "etag": "e"}]}
    out = ingest_unit(unit, fetch=lambda uri: data, mapping=Mapping(), turn=turn, max_bytes=1 << 30,
                      max_side=max_side, world=SPEC.name, adopt_undeclared=False,
                      **DIMS, signal_names=SPEC.signals, features=features_of(SPEC), min_length=min_length,
                      gap_factor=3.0, hold_factor=2.0, val_fraction=val_fraction,
                      lineage={"code_version": "test", "config_digest": "c"})
    if out.spans:
        row, frames = out.spans[0]
        return {"episode": row, "frames": frames, "reject": None}
    return {"episode": None, "frames": None, "reject": out.rejects[0]}


def curate(episode: dict, **overrides) -> dict:
    return curate_log(episode_to_mcap_bytes(episode), source_uri="s3://lake/landing/ep.mcap",
                      **{**OPTS, **overrides})


def test_kept_episode_row_and_frames():
    episode = make_episode(30)
    episode["expert_actions"][5] = np.nan
    episode["interventions"][:] = False
    episode["interventions"][[3, 4, 5, 10, 29]] = True  # three takeovers, five steps
    out = curate(episode)
    row, frames = out["episode"], out["frames"]
    assert out["reject"] is None
    assert row["episode_id"].startswith("ep-") and len(row["content_hash"]) == 64
    assert (row["length"], row["turn"], row["origin"], row["format"]) == (30, 2, "real", "mcap-ros2")
    assert (row["interventions"], row["intervention_steps"]) == (3, 5)
    assert (row["start_ns"], row["end_ns"], row["source_shape"]) == (0, 29 * 20_000_000, "64x64")
    assert (row["code_version"], row["config_digest"]) == ("test", "c")
    assert row["episode_return"] == pytest.approx(float(episode["rewards"].astype(np.float64).sum()))
    assert row["label_source"] == "mixed" and row["split"] in ("train", "val")
    pa.Table.from_pylist([row], schema=EPISODES)  # the row fits the episodes schema
    off = episode["signals"]["off_track"]
    assert json.loads(row["signal_steps"]) == {"off_track": int(off.sum())}
    assert row["task"] == SPEC.instruction("drive") and row["world"] == "carracing"
    assert frames.schema == frames_schema(features_of(SPEC)) and frames.num_rows == 30
    assert json.loads(frames.schema.metadata[b"worldloop.features"]) == features_of(SPEC)
    assert frames.column("signals").to_pylist() == [["off_track"] if o else [] for o in off]
    assert set(frames.column("task").to_pylist()) == {SPEC.instruction("drive")}
    assert frames.column("frame_id")[7].as_py() == f"{row['episode_id']}:00007"
    labels = np.stack(frames.column("label").to_pylist())
    expected = episode["expert_actions"].copy()
    expected[5] = episode["actions"][5]  # no expert label at step 5: the executed action
    np.testing.assert_array_equal(labels, expected)
    sources = frames.column("label_source").to_pylist()
    assert sources[5] == "executed" and set(sources[:5] + sources[6:]) == {"privileged_expert"}
    np.testing.assert_array_equal(images.decode(frames), episode["frames"])
    assert set(frames.column("world").to_pylist()) == {"carracing"}
    assert json.loads(row["action_names"]) == list(SPEC.action_names)
    assert json.loads(row["state_names"]) == list(SPEC.state_names)


def test_same_bytes_same_id_and_split():
    episode = make_episode(12, seed=4)
    first, second = curate(episode), curate(episode)
    assert first["episode"]["episode_id"] == second["episode"]["episode_id"]
    assert curate(episode, val_fraction=0.0)["episode"]["split"] == "train"
    assert curate(episode, val_fraction=1.0)["episode"]["split"] == "val"


def test_frames_over_the_max_side_shrink_to_it():
    out = curate(make_episode(12, size=96))
    assert out["episode"]["source_shape"] == "96x96"
    assert set(out["frames"].column("height").to_pylist()) == set(out["frames"].column("width").to_pylist()) == {64}
    assert images.decode(out["frames"]).shape == (12, 64, 64, 3)
    small = curate(make_episode(12, size=48))  # smaller frames keep their size
    assert images.decode(small["frames"]).shape == (12, 48, 48, 3)


def test_unreadable_and_short_logs_are_rejects_with_stable_ids():
    data = episode_to_mcap_bytes(make_episode(12))[:-100]
    out = [curate_log(data, source_uri="/landing/x.mcap", **OPTS) for _ in range(2)]
    assert out[0]["episode"] is None
    assert (out[0]["reject"]["stage"], out[0]["reject"]["reason"]) == ("read", "truncated")
    assert out[0]["reject"]["reject_id"] == out[1]["reject"]["reject_id"]
    short = curate(make_episode(5))["reject"]
    assert (short["stage"], short["reason"], short["frames"]) == ("align", "short_span", 5)
    assert (short["span_start_ns"], short["span_end_ns"]) == (0, 4 * 20_000_000)
    pa.Table.from_pylist([short], schema=REJECTS)


def test_any_exception_reading_a_log_is_its_reject():
    """An exception no reader check foresaw (here the storage layer's) rejects that log with its
    type and message instead of escaping the stage."""
    def broken(uri: str) -> bytes:
        raise RuntimeError("connection reset by peer")

    unit = {"uri": "/landing/x.mcap", "format": "mcap",
            "files": [{"uri": "/landing/x.mcap", "rel": "x.mcap", "size": 10, "etag": "e"}]}
    params = dict(mapping=Mapping(), turn=0, max_side=32, world=SPEC.name, adopt_undeclared=False, **DIMS, min_length=5, gap_factor=3.0,
                  hold_factor=2.0, val_fraction=0.0, lineage={})
    out = ingest_unit(unit, fetch=broken, max_bytes=100, **params)
    assert not out.spans and len(out.rejects) == 1
    reject = out.rejects[0]
    assert (reject["stage"], reject["reason"]) == ("read", "error")
    assert reject["detail"] == "RuntimeError: connection reset by peer"
    # a log over the size limit is rejected before a byte of it is fetched
    big = ingest_unit(unit, fetch=broken, max_bytes=9, **params).rejects[0]
    assert (big["stage"], big["reason"]) == ("read", "too_large") and big["detail"].startswith("10 bytes")


def test_an_episode_over_the_frame_limit_is_rejected_for_it():
    episode = make_episode(30)
    data = episode_to_mcap_bytes(episode)
    unit = {"uri": "/landing/long.mcap", "format": "mcap",
            "files": [{"uri": "/landing/long.mcap", "rel": "long.mcap", "size": len(data), "etag": "e"}]}
    out = ingest_unit(unit, fetch=lambda uri: data, mapping=Mapping(), turn=0, max_bytes=1 << 30, max_frames=20,
                      max_side=64, world=SPEC.name, adopt_undeclared=False, **DIMS, min_length=1, gap_factor=3.0,
                      hold_factor=2.0, val_fraction=0.0, lineage={})
    assert not out.spans and (out.frames_seen, out.episodes_seen) == (30, 1)
    reject, = out.rejects
    assert (reject["stage"], reject["reason"], reject["frames"]) == ("align", "too_large", 30)
    assert "curate.max_episode_frames" in reject["detail"]


def test_out_of_order_stamps_are_rejected():
    episode = make_episode(20)
    episode["timestamps_ns"][[5, 6]] = episode["timestamps_ns"][[6, 5]]
    reject = curate(episode)["reject"]
    assert (reject["stage"], reject["reason"]) == ("align", "timestamps_out_of_order")


def test_discover_groups_units_by_format():
    objs = [{"uri": f"/l/{p}", "size": 1, "etag": "x"} for p in (
        "a.mcap", "b.bag", "notes.txt", ".hidden/x.mcap", "bag2/metadata.yaml", "bag2/bag2_0.db3",
        "ds/meta/info.json", "ds/data/chunk-000/episode_000000.parquet", "ds/videos/x.mp4")]
    units = {u["uri"]: u for u in discover(objs, root="/l")}
    assert {k: u["format"] for k, u in units.items()} == {
        "/l/a.mcap": "mcap", "/l/b.bag": "rosbag1", "/l/notes.txt": "unsupported",
        "/l/bag2": "rosbag2", "/l/ds": "lerobot"}
    assert sorted(f["rel"] for f in units["/l/ds"]["files"]) == [
        "data/chunk-000/episode_000000.parquet", "meta/info.json", "videos/x.mp4"]
    changed = discover([{**o, "etag": "y"} if o["uri"].endswith(".db3") else o for o in objs], root="/l")
    assert {u["uri"] for u in changed if u["key"] != units[u["uri"]]["key"]} == {"/l/bag2"}


def test_synthetic_episode_tables_and_clips_schema():
    episode = make_episode(8, size=16)
    for key in ("rewards", "interventions", "signals", "expert_actions"):
        del episode[key]
    episode["states"] = np.full((8, len(SPEC.state_names)), np.nan, np.float32)  # no state known
    episode["labels"] = episode["actions"]
    row, frames = episode_to_tables(
        episode, episode_id="syn-1", source_uri="worldmodel://wm-3", content_hash="abc", turn=1,
        origin="synthetic", parent_episode_id="ep-1", generator_version="wm-3",
        label_source="privileged_expert", split="train")
    assert (row["origin"], row["parent_episode_id"], row["label_source"]) == (
        "synthetic", "ep-1", "privileged_expert")
    assert frames.schema == frames_schema() and images.decode(frames).shape == (8, 16, 16, 3)
    assert json.loads(row["action_names"]) == ["action_0", "action_1", "action_2"]  # no names, no features
    assert np.isnan(np.stack(frames.column("state").to_pylist())).all()
    assert row["signal_steps"] == "{}" and frames.column("signals").to_pylist() == [[]] * 8
    assert not any(frames.column("intervention").to_pylist()) and np.isnan(frames.column("reward")).all()
    assert set(frames.column("task").to_pylist()) == {SPEC.instruction("drive")}
    assert set(frames.column("origin").to_pylist()) == {"synthetic"}
    assert "embedding" in clips_schema().names
    with pytest.raises(ValueError, match="labels"):
        episode_to_tables({k: v for k, v in episode.items() if k != "labels"}, episode_id="x",
                          source_uri="", content_hash="", turn=0, origin="synthetic",
                          parent_episode_id="", generator_version="", label_source="", split="train")
    with pytest.raises(KeyError, match="states"):  # states are required (NaN where unknown)
        episode_to_tables({k: v for k, v in episode.items() if k != "states"}, episode_id="x",
                          source_uri="", content_hash="", turn=0, origin="synthetic",
                          parent_episode_id="", generator_version="", label_source="", split="train")


def test_frames_schema_and_features():
    schema = frames_schema({"world": "arm", "actions": ["x"]})
    assert schema.field("image").type == pa.large_binary() and schema.field("height").type == pa.int32()
    assert schema.field("action").type == schema.field("state").type == pa.list_(pa.float32())
    assert schema.field("signals").type == pa.list_(pa.string()) and schema.field("task").type == pa.string()
    assert "off_track" not in schema.names and "world" in schema.names
    assert json.loads(schema.metadata[b"worldloop.features"]) == {"actions": ["x"], "world": "arm"}
    assert frames_schema().metadata is None
    features = features_of(SPEC)
    assert (features["world"], features["actions"], features["signals"]) == (
        "carracing", ["steer", "gas", "brake"], ["off_track"])
    assert features["state"] == list(SPEC.state_names) and features["rate_hz"] == 50.0


def test_span_verdict_travels_as_an_arrow_struct():
    clip = {"event": "off_track", "event_step": 3, "start_step": 0, "end_step": 8, "score": 1.5,
            "label_tags": {"track": "off"}}
    kept = SpanVerdict(span_id="ep-a", kept=True, reasons=(), detail="", counts={"frozen": 1, "dark": 0},
                       frames=30, fragments=('{"id": 0}', '{"id": 1}'), clips=(clip,),
                       clip_frames=np.arange(24, dtype=np.uint8).reshape(1, 2, 2, 2, 3))
    rejected = SpanVerdict(span_id="ep-b", kept=False, reasons=("frozen", "dropped_frames"),
                           detail="frozen: 9 of 10 rows", counts={"frozen": 9}, frames=10)
    column = pa.array([[kept.to_row(), rejected.to_row()], []], pa.list_(SpanVerdict.ARROW))
    back = [SpanVerdict.from_row(row) for row in column.to_pylist()[0]]
    for before, after in zip((kept, rejected), back):
        for field in ("span_id", "kept", "reasons", "detail", "counts", "frames", "fragments", "clips"):
            assert getattr(after, field) == getattr(before, field)
        np.testing.assert_array_equal(after.clip_frames, before.clip_frames)
    assert back[1].clip_frames.shape == (0,) and back[1].clips == ()


def test_ingest_result_travels_without_its_frames():
    episode = make_episode(12)
    out = curate(episode)
    light = out["frames"].drop_columns(["image", "height", "width"])
    result = IngestResult(content_hash="h", episodes=(out["episode"],), frames=(light,),
                          pixels=(Frames.of(episode["frames"]),), frames_seen=12, episodes_seen=1)
    assert result.spans == [(out["episode"], out["frames"])]  # the images decoded into the table
    back = IngestResult.from_bytes(result.without_frames().to_bytes())
    assert back.episodes == (out["episode"],) and back.frames == back.pixels == ()
    assert (back.content_hash, back.frames_seen, back.episodes_seen, back.rejects) == ("h", 12, 1, ())
    with pytest.raises(ValueError):
        _ = back.spans  # the frames stayed in the worker
    with pytest.raises(TypeError, match="not an IngestResult"):
        IngestResult.from_bytes(pickle.dumps({"spans": []}))
