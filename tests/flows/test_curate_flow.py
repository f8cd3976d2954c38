"""The curate flow on a landing zone of every supported format plus a folder of bad inputs,
on the local disk and on S3 (moto's server), incremental, and safe against a crash half-way."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tests.stages.lerobot_logs import write_lerobot
from tests.stages.ros_logs import write_mcap_protobuf, write_mcap_ros2, write_rosbag1, write_rosbag2
from tests.stages.test_mcap_log import custom_log, make_episode

from flows import describe
from flows.curate import curate_flow
from flows.runtime import Context
from stages import storage
from stages.images import decode
from stages.schemas import vectors
from stages.mcap_log import ACTION, write_episode

SIZE, LENGTH = 32, 40
SECRET = "wl-test-secret-5f0c2a"  # the S3 secret key of the S3 run: it must not be written anywhere
FORMATS = ("fleet.mcap", "ros2.mcap", "protobuf.mcap", "bag2-sqlite", "bag2-mcap", "ros1.bag",
           "lerobot-v21", "lerobot-v30")
BAD = {  # file -> (stage, reason) it must be rejected with
    "bad/truncated.mcap": ("read", "truncated"), "bad/empty.mcap": ("read", "empty"),
    "bad/depth.mcap": ("read", "bad_encoding"), "bad/nan-actions.mcap": ("quality", "nonfinite_action"),
    "bad/out-of-order.mcap": ("align", "timestamps_out_of_order"),
    "bad/no-camera.mcap": ("read", "missing_topic"), "bad/notes.txt": ("read", "unsupported_format"),
}


def episode(seed: int) -> dict:
    ep = make_episode(LENGTH, size=SIZE, seed=seed)
    ep["states"][:, 7] = 1.0  # on track
    return ep


def write_landing(root: Path) -> dict:
    """The same episode in every format, and one bad input per way a log can be broken."""
    ep = episode(1)
    write_episode(ep, str(root / "fleet.mcap"))
    write_mcap_ros2(ep, root / "ros2.mcap", compressed=True)
    write_mcap_protobuf(ep, root / "protobuf.mcap")
    write_rosbag2(ep, root / "bag2-sqlite", storage="sqlite3")
    write_rosbag2(ep, root / "bag2-mcap", storage="mcap")
    write_rosbag1(ep, root / "ros1.bag")
    write_lerobot([ep], root / "lerobot-v21", version="v2.1", codec="ffv1")
    write_lerobot([ep, episode(2)], root / "lerobot-v30", version="v3.0", codec="ffv1")
    bad = root / "bad"
    bad.mkdir()
    data = (root / "fleet.mcap").read_bytes()
    (bad / "truncated.mcap").write_bytes(data[: len(data) // 2])
    (bad / "empty.mcap").write_bytes(b"")
    (bad / "depth.mcap").write_bytes(custom_log(n=LENGTH, encoding="16UC1"))
    nan = episode(4)
    nan["actions"][7, 1] = np.nan
    write_episode(nan, str(bad / "nan-actions.mcap"))
    shuffled = episode(5)
    shuffled["timestamps_ns"][[5, 6]] = shuffled["timestamps_ns"][[6, 5]]
    write_episode(shuffled, str(bad / "out-of-order.mcap"))
    (bad / "no-camera.mcap").write_bytes(custom_log(n=LENGTH, topics=(ACTION,)))
    (bad / "notes.txt").write_text("not a log")
    return ep


def upload(local: Path, uri: str, options: dict) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes(f"{uri}/{path.relative_to(local).as_posix()}", path.read_bytes(), options)


@pytest.fixture(scope="module")
def curated(tmp_path_factory, ray_cluster, prefect_harness):
    root = tmp_path_factory.mktemp("curate")
    mp = pytest.MonkeyPatch()
    mp.setenv("WORLDLOOP_WORK_DIR", str(root / "work"))
    landing = root / "landing"
    landing.mkdir()
    ep = write_landing(landing)
    first = curate_flow(config="tiny", lake=str(root / "lake"), landing=str(landing), turn=0)
    again = curate_flow(config="tiny", lake=str(root / "lake"), landing=str(landing), turn=0)
    yield {"root": root, "landing": landing, "episode": ep, "first": first, "again": again,
           "ctx": Context.create(config="tiny", lake=str(root / "lake"), landing=str(landing))}
    mp.undo()


def test_every_format_ingests_the_same_frames_and_actions(curated):
    lake, ep = curated["ctx"].lake, curated["episode"]
    episodes = lake.read("episodes").to_pylist()
    by_source = {}
    for row in episodes:
        name = row["source_uri"].split("/landing/", 1)[1].split("/", 1)[0]
        by_source.setdefault(name, []).append(row)
    assert sorted(by_source) == sorted(FORMATS)
    assert len(by_source["lerobot-v30"]) == 2
    for name in FORMATS:
        row = min(by_source[name], key=lambda r: r["source_uri"])
        frames = lake.read("frames", filter=f"episode_id = '{row['episode_id']}'").sort_by("step")
        assert frames.num_rows == LENGTH, name
        np.testing.assert_array_equal(decode(frames), ep["frames"], err_msg=name)
        np.testing.assert_allclose(vectors(frames.column("action")), ep["actions"], err_msg=name)
        np.testing.assert_allclose(vectors(frames.column("state")), ep["states"], rtol=1e-6, err_msg=name)
    formats = {r["format"] for r in episodes}
    assert {"mcap-ros2", "mcap-protobuf", "rosbag1", "rosbag2-sqlite3", "rosbag2-mcap",
            "lerobot-v2.1", "lerobot-v3.0"} <= formats


def test_bad_inputs_are_accounted_for_with_reasons(curated):
    first = curated["first"]
    assert first["seen"] == len(FORMATS) + len(BAD) and first["kept"] + first["rejected"] == first["seen"]
    assert first["kept"] == len(FORMATS)
    rejects = {r["source_uri"].split("/landing/", 1)[1]: (r["stage"], r["reason"])
               for r in curated["ctx"].lake.read("rejects").to_pylist()}
    assert rejects == BAD
    sources = curated["ctx"].lake.read("sources").to_pylist()
    assert len(sources) == first["seen"]
    assert first["frames_seen"] == first["frames_kept"] + first["frames_rejected"] + 0


def test_second_run_processes_nothing(curated):
    again = curated["again"]
    assert (again["seen"], again["listed"]) == (0, curated["first"]["seen"])
    assert all(v == 0 for v in again["rows_added"].values() if isinstance(v, int))


def test_clips_events_embeddings_and_descriptions(curated):
    ctx = curated["ctx"]
    clips = ctx.lake.read("clips").to_pylist()
    episodes = ctx.lake.count("episodes")
    assert {c["episode_id"] for c in clips} == set(ctx.lake.keys("episodes", "episode_id"))
    assert len(clips) >= 2 * episodes  # routine tiles at least
    assert all(len(c["embedding"]) > 0 and c["caption"] and json.loads(c["tags"]) for c in clips)
    # the same episode ingested from eight formats: most of its clips are near-duplicates
    dup = [c for c in clips if c["duplicate_of"]]
    assert dup and all(c["duplicate_of"] in {k["clip_id"] for k in clips} for c in dup)
    reasoner = ctx.registry.get(describe.REASONER, alias="champion")
    assert reasoner is not None and reasoner.metrics["val"]["n"] > 0  # measured on held-out clips
    assert set(reasoner.metrics["val"]["accuracy"]) == {"curvature", "track", "speed"}


def test_local_and_s3_give_the_same_tables(curated, s3_server, monkeypatch):
    _, options = s3_server
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto's server takes any key
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    upload(curated["landing"], "s3://lake/curate/landing", options)
    summary = curate_flow(config="tiny", lake="s3://lake/curate/lake",
                          landing="s3://lake/curate/landing", turn=0)
    local, s3 = curated["first"], summary
    for key in ("seen", "kept", "rejected", "frames_seen", "frames_kept", "spans_kept"):
        assert s3[key] == local[key], key
    remote = Context.create(config="tiny", lake="s3://lake/curate/lake", landing="s3://lake/curate/landing")
    for table, key in (("episodes", "episode_id"), ("frames", "frame_id"), ("clips", "clip_id")):
        assert remote.lake.keys(table, key) == curated["ctx"].lake.keys(table, key), table
    reasons = lambda lake: sorted((r["reason"], r["source_uri"].split("/landing/")[1])  # noqa: E731
                                  for r in lake.read("rejects").to_pylist())
    assert reasons(remote.lake) == reasons(curated["ctx"].lake)
    written = storage.list_objects("s3://lake/curate/lake", suffix="", storage_options=options)
    assert written and not [o["uri"] for o in written  # tables, saved configs, manifest, registry
                            if SECRET.encode() in storage.read_bytes(o["uri"], options)]


def test_crash_half_way_then_rerun_loses_and_duplicates_nothing(curated, monkeypatch):
    root = curated["root"]
    landing = root / "crash-landing"
    for seed in (11, 12):
        write_episode(episode(seed), str(landing / f"ep-{seed}.mcap"))
    lake = str(root / "crash-lake")

    def crash(*args, **kwargs):
        raise RuntimeError("power cut after the frames were committed")

    with monkeypatch.context() as m:
        m.setattr("flows.curate.write_clips", crash)
        with pytest.raises(RuntimeError, match="power cut"):
            curate_flow(config="tiny", lake=lake, landing=str(landing), turn=0)
    ctx = Context.create(config="tiny", lake=lake, landing=str(landing))
    assert ctx.lake.count("frames") == 2 * LENGTH and not ctx.lake.exists("episodes")
    summary = curate_flow(config="tiny", lake=lake, landing=str(landing), turn=0)
    assert summary["repaired"] == {"frames": 2 * LENGTH}
    assert (summary["seen"], summary["kept"]) == (2, 2)
    assert ctx.lake.count("frames") == 2 * LENGTH and ctx.lake.count("episodes") == 2
    assert len(ctx.lake.keys("frames", "frame_id")) == 2 * LENGTH
    shutil.rmtree(landing)


def test_new_logs_on_a_curated_lake_are_added_alone_and_checked_against_it(curated):
    """Incremental: a later run reads only the new logs, and their clips are de-duplicated
    against the clips the lake already holds (a byte copy under a new name is a duplicate)."""
    root, landing = curated["root"], curated["landing"]
    lake = root / "incremental-lake"
    shutil.copytree(root / "lake", lake)  # the curated lake stays as the other tests see it
    added = [landing / "fleet-copy.mcap", landing / "new.mcap"]
    shutil.copy(landing / "fleet.mcap", added[0])
    write_episode(episode(21), str(added[1]))
    try:
        tables = Context.create(config="tiny", lake=str(lake), landing=str(landing)).lake
        old_clips = tables.keys("clips", "clip_id")
        reasoner = curated["ctx"].registry.get(describe.REASONER, alias="champion").artifact_uri
        summary = curate_flow(config="tiny", lake=str(lake), landing=str(landing), turn=1,
                              reasoner=reasoner)  # as `worldloop curate --reasoner DIR`
    finally:
        for path in added:
            path.unlink()
    assert (summary["listed"], summary["seen"], summary["kept"]) == (curated["first"]["seen"] + 2, 2, 2)
    assert summary["rows_added"]["frames"] == 2 * LENGTH and summary["rows_added"]["episodes"] == 2
    clips = tables.read("clips").to_pylist()
    copy_ids = {r["episode_id"] for r in tables.read("episodes").to_pylist()
                if r["source_uri"].endswith("/fleet-copy.mcap")}
    copied = [c for c in clips if c["episode_id"] in copy_ids]
    assert copied and all(c["duplicate_of"] in old_clips for c in copied)
    assert {c["turn"] for c in clips if c["clip_id"] not in old_clips} == {1}
    assert summary["clips"]["describer"] == {"source": "config"}
    assert sum(summary["clips"]["events"].values()) == summary["rows_added"]["clips"]
    assert summary["clips"]["duplicates"] >= len(copied)


@pytest.mark.timeout(300)
def test_special_files_and_crashing_readers_cost_only_themselves(tmp_path, ray_cluster, prefect_harness):
    """A dangling symlink, a FIFO (whose plain read would block forever) and a LeRobot dataset
    whose metadata makes its reader divide by zero, among good logs: each is one reject for its
    reason, the good logs are kept, and a second run retries none of them."""
    landing = tmp_path / "landing"
    landing.mkdir()
    for seed in (31, 32):
        write_episode(episode(seed), str(landing / f"good-{seed}.mcap"))
    os.symlink(tmp_path / "nowhere.mcap", landing / "dangling.mcap")
    os.mkfifo(landing / "pipe.mcap")
    write_lerobot([episode(33)], landing / "zero-chunks", version="v2.1", codec="ffv1")
    info = landing / "zero-chunks" / "meta" / "info.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "chunks_size": 0}))
    for n in (1, 3):  # a log of a moment is an episode when no minimum length is set
        write_episode(make_episode(n, size=SIZE, seed=40 + n), str(landing / f"short-{n}.mcap"))
    lake = str(tmp_path / "lake")
    first = curate_flow(config="tiny", lake=lake, landing=str(landing), turn=0, overrides=["curate.min_length=1"])
    assert (first["seen"], first["kept"], first["rejected"]) == (7, 4, 3)
    reasons = {r["source"].rsplit("/", 1)[-1]: (r["stage"], r["reason"]) for r in first["rejects"]}
    assert reasons == {"dangling.mcap": ("read", "unreadable"), "pipe.mcap": ("read", "unreadable"),
                       "zero-chunks": ("read", "corrupt")}
    lengths = sorted(r["length"] for r in Context.create(config="tiny", lake=lake, landing=str(landing))
                     .lake.read("episodes").to_pylist())
    assert lengths == [1, 3, LENGTH, LENGTH]
    again = curate_flow(config="tiny", lake=lake, landing=str(landing), turn=0)
    assert again["seen"] == 0 and again["listed"] == 7
