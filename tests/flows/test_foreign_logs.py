"""A team's own logs: a folder written by the real libraries, with topic names, rates, widths and
cameras unlike the project's own, curates with the default config and no mapping. Every good
log's frames (at their own resolution), stamps and actions arrive exactly, with their names and
recorded as the world they are; each bad log is rejected for its real reason and costs only itself."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tests.stages import foreign_logs as fl

from flows.curate import curate_flow
from flows.runtime import Context
from stages.images import decode
from stages.schemas import vectors

GOOD = {  # landing name -> writer
    "arm-1.mcap": lambda p: fl.write_arm_mcap(p, seed=0), "arm-2.mcap": lambda p: fl.write_arm_mcap(p, seed=5),
    "base.bag": fl.write_base_bag, "teleop.mcap": fl.write_teleop_protobuf, "car-bag2": fl.write_car_bag2,
    "so100": fl.write_so100_lerobot,
}
BAD = {  # landing name -> (writer, stage, reason)
    "bad/nan-command.mcap": (lambda p: fl.write_arm_mcap(p, seed=7, poison="nan"), "quality", "nonfinite_action"),
    "bad/no-camera.mcap": (lambda p: fl.write_arm_mcap(p, seed=8, poison="no_camera"), "read", "missing_topic"),
    "bad/backwards.bag": (lambda p: fl.write_base_bag(p, seed=9, backwards=True), "align", "timestamps_out_of_order"),
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, ray_cluster, prefect_harness):
    root = tmp_path_factory.mktemp("foreign")
    landing = root / "landing"
    (landing / "bad").mkdir(parents=True)
    expected = {name: write(landing / name) for name, write in GOOD.items()}
    for name, (write, _, _) in BAD.items():
        write(landing / name)
    shutil.copy(landing / "arm-1.mcap", landing / "bad" / "cut.mcap")  # a recording cut short
    with open(landing / "bad" / "cut.mcap", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    mp = pytest.MonkeyPatch()
    mp.setenv("WORLDLOOP_WORK_DIR", str(root / "work"))
    summary = curate_flow(config="default", lake=str(root / "lake"), landing=str(landing), turn=0)
    yield {"summary": summary, "expected": expected,
           "ctx": Context.create(config="default", lake=str(root / "lake"), landing=str(landing))}
    mp.undo()


def source_of(uri: str) -> str:
    return uri.split("/landing/", 1)[1].split("/", 1)[0] if "/bad/" not in uri else uri.split("/landing/", 1)[1]


def test_every_log_is_accounted_for_and_only_the_bad_ones_are_rejected(fleet):
    s = fleet["summary"]
    assert (s["seen"], s["kept"], s["rejected"]) == (len(GOOD) + len(BAD) + 1, len(GOOD), len(BAD) + 1)
    rejects = {r["source_uri"].split("/landing/", 1)[1]: (r["stage"], r["reason"])
               for r in fleet["ctx"].lake.read("rejects").to_pylist()}
    assert rejects == {**{name: (stage, reason) for name, (_, stage, reason) in BAD.items()},
                       "bad/cut.mcap": ("read", "truncated")}


def test_frames_stamps_and_actions_arrive_exactly_with_names_and_world(fleet):
    lake = fleet["ctx"].lake
    episodes = lake.read("episodes").to_pylist()
    for name, want in fleet["expected"].items():
        rows = sorted((r for r in episodes if source_of(r["source_uri"]) == name),
                      key=lambda r: (r["source_uri"], r["start_ns"]))
        assert {r["world"] for r in rows} == {want.world}, name
        for camera, (frames, stamps) in want.cameras.items():
            mine = [r for r in rows if json.loads(r["topics"])["topic.camera"] == camera]
            assert len(mine) == want.episodes, (name, camera)
            got = [lake.read("frames", filter=f"episode_id = '{r['episode_id']}'").sort_by("step") for r in mine]
            np.testing.assert_array_equal(np.concatenate([decode(t) for t in got]), frames, err_msg=f"{name} {camera}")
            np.testing.assert_array_equal(np.concatenate([t.column("timestamp_ns").to_numpy() for t in got]),
                                          stamps, err_msg=name)
            np.testing.assert_array_equal(np.concatenate([vectors(t.column("action")) for t in got]), want.actions,
                                          err_msg=name)
            states = np.concatenate([vectors(t.column("state")) for t in got])
            np.testing.assert_allclose(states, want.states, rtol=1e-5, atol=1e-5, err_msg=name)
            assert {r["action_names"] for r in mine} == {json.dumps(want.action_names, separators=(",", ":"))}
            assert {r["state_names"] for r in mine} == {json.dumps(want.state_names, separators=(",", ":"))}
            assert {tuple(t.column("world").unique().to_pylist()) for t in got} == {(want.world,)}


def test_foreign_rows_stay_out_of_the_worlds_training_data(fleet):
    """The lake's own world (here the default, CarRacing) trains only on its rows."""
    lake, ctx = fleet["ctx"].lake, fleet["ctx"]
    assert lake.count("frames") > 0
    assert lake.read("frames", columns=["world"], filter=f"world = '{ctx.world_name}'").num_rows == 0
    clips = lake.read("clips").to_pylist()
    assert clips and {c["event"] for c in clips} <= {"none", "novelty"}  # no world's events on foreign logs
