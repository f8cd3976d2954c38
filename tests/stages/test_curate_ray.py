"""The curation adapters: checkpoint archives, chunked judging, per-log isolation (a failing
judge, a log that kills its worker)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa

from flows.config import resolve
from flows.curate import stage_params
from sim import worlds
from stages import images, sources, storage
from stages.curate import SpanVerdict
from stages.curate_ray import ingest_and_judge, ingest_and_judge_batch, judge_spans, pack, unpack
from stages.ingest import IngestResult, ingest_unit
from stages.lake import Lake
from stages.mcap_log import write_episode
from stages.schemas import features_of, frames_schema
from stages.streams import Mapping
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


def judged(tmp_path, episode: dict, chunk_bytes: int) -> tuple[SpanVerdict, Lake]:
    """One MCAP episode ingested and judged, its frames written ``chunk_bytes`` of pixels at a time."""
    path = tmp_path / "ep.mcap"
    write_episode(episode, str(path))
    unit, = sources.discover(storage.list_objects(str(tmp_path), suffix=".mcap"), root=str(tmp_path))
    params = stage_params(resolve("tiny", world="carracing"), turn=0)
    result = ingest_unit(unit, fetch=storage.read_bytes, mapping=Mapping(), **params["ingest"])
    (row, light, pixels), = result.lazy_spans
    lake = Lake(str(tmp_path / f"lake-{chunk_bytes}"))
    verdict, = judge_spans([(light, pixels)], lake=lake, chunk_bytes=chunk_bytes, **params["judge"])
    return verdict, lake


def test_a_span_judged_a_chunk_at_a_time_is_judged_as_a_whole(tmp_path):
    """Memory is bounded by the chunk: a span judged in chunks of 7 frames gets the verdict, the
    quality counts, the per-frame flags and the rows it gets in one piece (the frozen check
    compares a chunk's first frame with the chunk before it); a rejected span leaves no files."""
    episode = make_episode(40, size=32, seed=3)
    episode["frames"][21] = episode["frames"][20]  # a frozen frame, first of the fourth chunk of 7
    episode["timestamps_ns"][30:] += 25_000_000  # a drop before step 30 (not a gap that cuts the span)
    frame_bytes = 32 * 32 * 3
    whole, lake_whole = judged(tmp_path, episode, 1 << 30)
    chunked, lake_chunked = judged(tmp_path, episode, 7 * frame_bytes)
    assert whole.kept and chunked.kept and len(chunked.fragments) == 6 and len(whole.fragments) == 1
    assert (whole.counts, whole.clips) == (chunked.counts, chunked.clips)
    assert whole.counts["frozen"] == 1 and whole.counts["dropped"] == 1
    tables = []
    for lake, verdict in ((lake_whole, whole), (lake_chunked, chunked)):
        lake.commit_fragments("frames", list(verdict.fragments), frames_schema(features_of(worlds.spec("carracing"))))
        tables.append(lake.read("frames").sort_by("step"))
    assert tables[0].column("flags").to_pylist() == tables[1].column("flags").to_pylist()
    assert tables[0].column("flags")[21].as_py() == ["frozen"]
    np.testing.assert_array_equal(images.decode(tables[1]), episode["frames"])
    dark = make_episode(40, size=32, seed=4)
    dark["frames"][:] = 0
    (tmp_path / "dark").mkdir()
    rejected, _ = judged(tmp_path / "dark", dark, 7 * frame_bytes)
    assert not rejected.kept and "dark_or_overexposed" in rejected.reasons and rejected.fragments == ()
    assert not list((tmp_path / "dark").rglob("*.lance/data/*"))  # its six written chunks were deleted


def killing_the_worker_on_poison(batch: pa.Table, **kwargs) -> pa.Table:
    """``ingest_and_judge_batch``, except that a batch holding ``poison.mcap`` kills its worker
    process, as a decoder's crash or the kernel's OOM killer would."""
    if "poison.mcap" in batch.column("units")[0].as_py():
        os._exit(1)
    return ingest_and_judge_batch(batch, **kwargs)


def test_a_log_that_kills_its_worker_costs_only_itself(tmp_path, ray_cluster):
    for name in ("a", "b", "poison", "c"):
        write_episode(make_episode(30, size=32, seed=len(name)), str(tmp_path / f"{name}.mcap"))
    units = sources.discover(storage.list_objects(str(tmp_path)), root=str(tmp_path))
    params = stage_params(resolve("tiny", world="carracing"), turn=3)
    results, verdicts = ingest_and_judge(units, storage_options=None, params={k: params[k] for k in ("mapping", "ingest")},
                                         known=set(), lake=Lake(str(tmp_path / "lake")), judge_params=params["judge"],
                                         parallelism=2, batch_fn=killing_the_worker_on_poison)
    by_name = {u["uri"].rsplit("/", 1)[1]: r for u, r in zip(units, results)}
    poison = by_name.pop("poison.mcap")
    assert not poison.episodes and len(poison.rejects) == 1
    assert (poison.rejects[0]["reason"], poison.rejects[0]["turn"]) == ("crashed", 3)
    assert all(len(r.episodes) == 1 and not r.rejects for r in by_name.values())
    assert len(verdicts) == 3 and all(v.kept for v in verdicts)
