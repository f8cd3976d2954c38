"""The Lance lake adapter on a tmp dir and on moto S3: idempotent appends, tags, configs."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from tests.stages.test_curate import curate_log
from tests.stages.test_mcap_log import make_episode
from tests.stages.test_storage import root  # noqa: F401  (fixture: local and s3 roots)

from stages import storage
from stages.curate import now_utc
from stages import images
from stages.lake import Lake
from stages.mcap_log import episode_to_mcap_bytes, write_episode
from stages.schemas import EPISODES, EVALUATIONS, REJECTS, frames_schema

OPTS = {"turn": 0, "max_side": 16, "min_length": 4, "val_fraction": 0.5}


def curated(seed: int, length: int = 6) -> dict:
    return curate_log(episode_to_mcap_bytes(make_episode(length, size=16, seed=seed)),
                      source_uri=f"/landing/{seed}.mcap", **OPTS)


def episodes_table(*results: dict) -> pa.Table:
    return pa.Table.from_pylist([r["episode"] for r in results], schema=EPISODES)


def test_append_is_idempotent(root):
    uri, options = root
    lake = Lake(storage.join(uri, "lake"), options)
    assert not lake.exists("episodes") and lake.count("episodes") == 0 and lake.version("episodes") == 0
    a, b = curated(1), curated(2)
    assert lake.append("episodes", episodes_table(a), key="episode_id") == 1
    assert lake.append("frames", a["frames"], key="frame_id") == 6
    version = lake.version("frames")
    assert lake.append("frames", a["frames"], key="frame_id") == 0  # same rows again: nothing
    assert lake.version("frames") == version  # and no empty commit
    assert lake.append("episodes", episodes_table(a, b, b), key="episode_id") == 1
    assert lake.count("episodes") == 2 and lake.count("frames") == 6
    assert lake.table_uri("frames") == storage.join(uri, "lake", "frames.lance")
    frames = lake.read("frames", filter=f"episode_id = '{a['episode']['episode_id']}'")
    assert frames.schema.field("image").type == frames_schema().field("image").type
    np.testing.assert_array_equal(images.decode(frames), images.decode(a["frames"]))


def test_tags_and_checkout(root):
    uri, options = root
    lake = Lake(storage.join(uri, "lake"), options)
    lake.append("episodes", episodes_table(curated(1)), key="episode_id")
    assert lake.tag("episodes", "turn-0") == 1
    lake.append("episodes", episodes_table(curated(2)), key="episode_id")
    assert lake.checkout("episodes", "turn-0").count_rows() == 1
    assert lake.read("episodes", version="turn-0").num_rows == 1
    assert lake.checkout("episodes", 2).to_table().num_rows == 2
    lake.tag("episodes", "turn-0")  # re-tagging moves the tag to the latest version
    assert lake.tags("episodes") == {"turn-0": 2}
    assert lake.checkout("episodes", "turn-0").count_rows() == 2


def test_save_config_beside_version(root):
    uri, options = root
    lake = Lake(storage.join(uri, "lake"), options)
    lake.append("episodes", episodes_table(curated(3)), key="episode_id")
    config = {"image_size": 16, "storage": {"secret_access_key": "hunter2", "region": "x"}}
    path = lake.save_config("episodes", config)
    assert path == storage.join(uri, "lake", "_configs", "episodes", "v1.json")
    assert b"hunter2" not in storage.read_bytes(path, options)  # credentials are never written
    assert lake.load_config("episodes") == {"image_size": 16,
                                            "storage": {"secret_access_key": "***", "region": "x"}}


def test_rejects_and_evaluations_tables(tmp_path):
    lake = Lake(str(tmp_path))
    bad = curate_log(b"junk", source_uri="/landing/junk.mcap", **OPTS)["reject"]
    rejects = pa.Table.from_pylist([bad, bad], schema=REJECTS)
    assert lake.append("rejects", rejects, key="reject_id") == 1
    assert lake.append("rejects", rejects, key="reject_id") == 0
    row = {"eval_id": "e1", "model_name": "policy", "model_version": "3", "role": "candidate",
           "task": "drive", "seed": 7, "score": 812.5, "success": True, "steps": 900,
           "signal_rates": '{"off_track":0.01}', "interventions": 0, "turn": 1, "created_at": now_utc()}
    assert "off_track_rate" not in EVALUATIONS.names
    assert lake.append("evaluations", pa.Table.from_pylist([row], schema=EVALUATIONS),
                       key="eval_id") == 1
    back = lake.read("evaluations", columns=["score", "task", "success", "signal_rates"]).to_pylist()
    assert back == [{"score": 812.5, "task": "drive", "success": True, "signal_rates": '{"off_track":0.01}'}]


def test_append_rejects_mismatched_schema_and_null_keys(tmp_path):
    lake = Lake(str(tmp_path))
    lake.append("episodes", episodes_table(curated(1)), key="episode_id")
    with pytest.raises(ValueError, match="do not match"):
        lake.append("episodes", pa.table({"episode_id": ["x"]}), key="episode_id")
    with pytest.raises(ValueError, match="null"):
        lake.append("episodes", pa.table({"episode_id": pa.array([None], pa.string())}),
                    key="episode_id")


def test_fragments_travel_as_json_and_commit_as_one_version(tmp_path):
    lake = Lake(str(tmp_path))
    tables = [curated(seed)["frames"] for seed in range(2)]
    fragments = [f for t in tables for f in lake.write_fragments("frames", t)]
    assert all(isinstance(f, str) for f in fragments)
    assert sum(json.loads(f)["physical_rows"] for f in fragments) == 12
    assert not lake.exists("frames")  # written, not committed
    lake.commit_fragments("frames", fragments, tables[0].schema)
    assert lake.count("frames") == 12 and lake.version("frames") == 1
    # a table and a writer of different versions: the error names the columns that differ
    older = tables[0].drop_columns(["height", "width"])
    with pytest.raises(ValueError, match=r"extra \['height', 'width'\].*another version"):
        lake.commit_fragments("frames", lake.write_fragments("frames", tables[1]), older.schema)


def test_compact_merges_a_fragment_per_log_into_one_with_the_same_rows(root):
    uri, options = root
    lake = Lake(storage.join(uri, "lake"), options)
    tables = [curated(seed, length=4)["frames"] for seed in range(18)]
    lake.commit_fragments("frames", [f for t in tables for f in lake.write_fragments("frames", t)], tables[0].schema)
    before, version = lake.read("frames"), lake.version("frames")
    assert len(lake.dataset("frames").get_fragments()) == 18
    assert lake.compact("frames", min_fragments=20) == 0 and lake.version("frames") == version  # few enough
    assert lake.compact("frames") == 18  # over the default 16: merged, in a later version
    ds = lake.dataset("frames")
    assert len(ds.get_fragments()) == 1 and lake.version("frames") > version
    assert ds.data_storage_version == lake.dataset("frames", version).data_storage_version
    assert lake.read("frames").equals(before)  # the same rows, in the same order
    assert lake.compact("frames") == 0 and lake.compact("episodes") == 0  # nothing left to do; no table
    assert lake.compact("frames", min_fragments=0, target_rows=10) == 0  # its one fragment is not small


def test_repr_hides_credentials(s3_server):
    _, options = s3_server
    assert "testing" not in repr(Lake("s3://lake/x", options))


def test_landing_to_lake_on_s3(s3_server):
    """The full path on S3: write MCAP logs, list, curate, append twice."""
    _, options = s3_server
    landing = "s3://lake/e2e/landing"
    for seed in range(2):
        write_episode(make_episode(6, size=16, seed=seed), f"{landing}/ep-{seed}.mcap", options)
    storage.write_bytes(f"{landing}/broken.mcap", b"\x89MCAP0\r\nbroken", options)
    lake = Lake("s3://lake/e2e/lake", options)
    for _ in range(2):
        for obj in storage.list_objects(landing, storage_options=options):
            out = curate_log(storage.read_bytes(obj["uri"], options), source_uri=obj["uri"], **OPTS)
            if out["reject"] is not None:
                lake.append("rejects", pa.Table.from_pylist([out["reject"]], schema=REJECTS),
                            key="reject_id")
            else:
                lake.append("episodes", episodes_table(out), key="episode_id")
                lake.append("frames", out["frames"], key="frame_id")
    assert (lake.count("episodes"), lake.count("frames"), lake.count("rejects")) == (2, 12, 1)
    assert lake.read("rejects").column("reason").to_pylist() == ["truncated"]
