"""Pieces of the curation adapters that need no Ray cluster: checkpoint archives, per-log isolation."""
from __future__ import annotations

import json

import pyarrow as pa

from flows.config import resolve
from flows.curate import stage_params
from stages import sources, storage
from stages.curate import SpanVerdict
from stages.curate_ray import ingest_and_judge_batch, pack, unpack
from stages.ingest import IngestResult
from stages.lake import Lake
from stages.mcap_log import write_episode
from tests.stages.test_mcap_log import make_episode


def test_pack_and_unpack_a_checkpoint_directory(tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    dst = tmp_path / "out"
    dst.mkdir()
    unpack(pack(str(src)), str(dst))
    assert (dst / "config.json").read_text() == '{"a": 1}'
    assert (dst / "sub" / "weights.bin").read_bytes() == bytes(range(256))


def test_a_log_whose_judging_fails_is_rejected_and_the_batch_goes_on(tmp_path):
    """``ingest_and_judge_batch`` over two logs where judging fails (here: a world the judge
    cannot build): each log's spans come back rejected for ``error`` with the exception's type
    and message, instead of the worker raising and the run stopping."""
    for seed in (1, 2):
        write_episode(make_episode(30, size=32, seed=seed), str(tmp_path / f"ep-{seed}.mcap"))
    units = sources.discover(storage.list_objects(str(tmp_path)), root=str(tmp_path))
    params = stage_params(resolve("tiny", world="carracing"), turn=0)
    judge = {**params["judge"], "world": {"name": "no-such-world"}}
    out = ingest_and_judge_batch(pa.table({"units": [json.dumps(list(enumerate(units)))]}), storage_options=None,
                                 params={k: params[k] for k in ("mapping", "ingest")}, known=frozenset(),
                                 lake=Lake(str(tmp_path / "lake")), judge_params=judge)
    assert out.column("index").to_pylist() == [0, 1]
    for result, verdicts in zip(out.column("result").to_pylist(), out.column("verdicts").to_pylist()):
        episodes = IngestResult.from_bytes(result).episodes
        assert len(verdicts) == len(episodes) == 1
        v = SpanVerdict.from_row(verdicts[0])
        assert not v.kept and v.reasons == ("error",) and v.detail.startswith("ValueError: ")
        assert v.span_id == episodes[0]["episode_id"] and v.frames == episodes[0]["length"]
