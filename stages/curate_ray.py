"""Ray adapters for curation: ingest and judge source units in a Ray Data pipeline, describe clips.

1. ``ingest_and_judge`` — a Ray Data pipeline over the new source units, one unit a batch:
   each worker decodes and aligns its unit (``stages.ingest.ingest_unit``), then judges the
   unit's new spans (``judge_spans``), a chunk of frames at a time: quality signals (``stages.quality``) on
   every frame, keep/reject per span, events and clips (``stages.events``) for kept spans, and
   the kept frames written as uncommitted Lance fragments. Frames never leave the worker that
   decoded them: only each unit's ``IngestResult`` without frames and a ``SpanVerdict`` per
   new span (fragment metadata as JSON, clips, each clip's ``k`` frames for the reasoner, with
   label tags where the log has privileged state) come back.
2. ``describe`` — describer actors hold the reasoner and give each clip an embedding,
   structured tags and a caption; the actors live as long as the driver's Ray job, so later
   curate runs of the same process (the turns of a flywheel run) skip loading torch again.
3. ``train_reasoner`` — a Ray task trains a reasoner on labelled clips
   (``stages.describe.training_clips``) and sends its checkpoint back as a tar archive.
Resources are declared here, beside the adapters.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from sim import worlds
from sim.worlds.base import WorldConfig
from stages import describe, events, quality, storage
from stages import images as image_columns
from stages.curate import SpanVerdict, reject_row, with_images
from stages.frames import Frames
from stages.ingest import IngestResult, ingest_unit
from stages.lake import Lake
from stages.schemas import images, to_json, vectors
from stages.streams import LogError, Mapping

INGEST_CPUS = 1
CHUNK_BYTES = 64 << 20  # pixels of one span decoded, judged and written at once
REASONER_TRAIN_CPUS = 1
# Describer actors outlive the describe step (see ``_describers``) and are idle outside it: they
# reserve no CPU, so the stages after curation (Ray Train, rollouts) can always be scheduled.
DESCRIBE_CPUS = 0


def _span(sub: pa.Table, signal_names: tuple[str, ...]) -> dict[str, Any]:
    raised = sub.column("signals").to_pylist()
    return {"timestamps_ns": sub.column("timestamp_ns").to_numpy(),
            "actions": vectors(sub.column("action")), "states": vectors(sub.column("state")),
            "rewards": sub.column("reward").to_numpy(zero_copy_only=False).astype(np.float32),
            "interventions": sub.column("intervention").to_numpy(zero_copy_only=False).astype(bool),
            "signals": {name: np.array([name in r for r in raised], bool) for name in signal_names}}


def judge_spans(spans: list[tuple[pa.Table, Frames]], *, lake: Lake, world: dict, signal_params: dict,
                verdict_params: dict, event_params: dict, clip_k: int,
                chunk_bytes: int = CHUNK_BYTES) -> list[SpanVerdict]:
    """Quality, verdict, events, clips and fragment writes of spans (each its frames table
    without images, and its ``Frames``): a ``SpanVerdict`` per span.

    A span's frames are decoded, judged and written ``chunk_bytes`` of pixels at a time, so memory
    is bounded by the chunk, not the log; a span rejected after some of its chunks were written
    has those fragments deleted. A span of the curating ``world`` is judged by its rules (action
    bounds, events, privileged tags); a span of another world (a foreign log) by the rules of
    any log: finite values, frames, drops, and routine clips. Clip frames are shrunk to the
    world's image size, the resolution the reasoner describes."""
    w = worlds.get(WorldConfig(**world))
    config, thresholds = events.EventConfig.split(event_params)
    return [_judge(light, pixels, w=w, lake=lake, signal_params=signal_params, verdict_params=verdict_params,
                   config=config, thresholds=thresholds, clip_k=clip_k, chunk_bytes=chunk_bytes)
            for light, pixels in spans]


_SIGNALS = ("frozen", "dark", "overexposed", "dropped_before", "bad_action", "bad_state")


def _judge(light: pa.Table, pixels: Frames, *, w: Any, lake: Lake, signal_params: dict, verdict_params: dict,
           config: events.EventConfig, thresholds: dict, clip_k: int, chunk_bytes: int) -> SpanVerdict:
    span_id = light.column("episode_id")[0].as_py()
    own = light.column("world")[0].as_py() == w.spec.name
    n, (height, width) = light.num_rows, pixels.shape[1:3]
    steps, stamps = light.column("step").to_numpy(), light.column("timestamp_ns").to_numpy()
    actions, states = vectors(light.column("action")), vectors(light.column("state"))
    median = float(np.median(np.diff(stamps))) if n > 1 else 0.0
    # events and clips need no pixels: found first, so each clip's frames are taken from the
    # chunks as they pass (not decoded again); a failure here counts only if the span is kept
    span = _span(light, w.spec.signals if own else ())
    try:
        found = events.mine_events(span, world=w, config=config, params=thresholds) if own else []
        clips, failure = events.event_clips(n, found, config=config), None
    except Exception as err:  # the verdict's reasons come first; see below
        clips, failure = [], err
    picks = [describe.clip_indices(n, c["start_step"], c["end_step"], clip_k) for c in clips]
    wanted, taken = np.unique(np.concatenate(picks)) if picks else np.zeros(0, np.int64), {}
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _SIGNALS}
    fragments: list[str] = []
    previous = None  # the last frame of the chunk before: frozen compares with it
    try:
        for a, b in pixels.chunks(max(1, chunk_bytes // (height * width * 3))):
            chunk = pixels[a:b]
            lo = a - (previous is not None)
            signals = quality.frame_signals(
                {"span_id": np.full(b - lo, span_id, object), "step": steps[lo:b], "timestamp_ns": stamps[lo:b],
                 "image": chunk if previous is None else np.concatenate([previous[None], chunk]),
                 "action": actions[lo:b], "state": states[lo:b]}, median_interval_ns=median, **signal_params)
            rows = slice(a - lo, b - lo)
            for k in _SIGNALS:
                parts[k].append(signals[k][rows])
            offsets, names = quality.flag_names(signals, rows)
            flags = pa.ListArray.from_arrays(pa.array(offsets), pa.array(names.tolist(), pa.string()))
            table = with_images(light.slice(a, b - a), chunk)
            table = table.set_column(table.schema.get_field_index("flags"), "flags", flags)
            fragments += lake.write_fragments("frames", table)
            here = wanted[(wanted >= a) & (wanted < b)]
            if len(here):
                small = image_columns.resize(chunk[here - a], image_columns.hw(w.image_size))
                taken.update(zip(here.tolist(), small))
            previous = chunk[-1]
        verdict, = quality.span_verdicts(
            {"span_id": np.full(n, span_id, object), "action": actions, "state": states,
             **{k: np.concatenate(v) for k, v in parts.items()}},
            **(verdict_params if own else {**verdict_params, "action_low": None, "action_high": None}))
        if verdict["kept"] and failure is not None:
            raise failure
    except BaseException:
        lake.discard_fragments("frames", fragments)
        raise
    sampled = {}
    if not verdict["kept"]:
        lake.discard_fragments("frames", fragments)
        fragments, clips = [], []
    elif clips:
        sampled["clip_frames"] = np.stack([np.stack([taken[i] for i in idx.tolist()]) for idx in picks])
    for c in clips if own else ():
        c["label_tags"] = w.privileged_tags(
            span["states"][c["start_step"]:], {k: v[c["start_step"]:] for k, v in span["signals"].items()},
            clip_len=c["end_step"] - c["start_step"])
    return SpanVerdict(span_id=span_id, kept=bool(verdict["kept"]), reasons=tuple(verdict["reasons"]),
                       detail=verdict["detail"], counts=verdict["counts"], frames=n, fragments=tuple(fragments),
                       clips=tuple(clips), **sampled)


def ingest_and_judge_batch(batch: pa.Table, *, storage_options: dict | None, params: dict,
                           known: frozenset, lake: Lake, judge_params: dict) -> pa.Table:
    """``ingest_unit`` then ``judge_spans`` for the source units of a batch (column units: JSON
    lists of [index, unit]), in one worker: a unit's frames never leave the process that
    decoded them.

    Spans already in the lake (``known`` episode ids) are not judged again; an exception while
    judging a span (a frame that does not decode, ...) rejects it for its reason (``error``
    with the type and message for one no check foresaw) and the batch goes on. Returns one row per unit: index, result
    (``IngestResult.to_bytes`` of its result without frames), verdicts (``SpanVerdict.ARROW``
    structs of its new spans).
    """
    mapping = Mapping.from_dict(params["mapping"])
    out: dict[str, list] = {"index": [], "result": [], "verdicts": []}
    for index, unit in (pair for units in batch.column("units").to_pylist() for pair in json.loads(units)):
        result = ingest_unit(unit, fetch=lambda uri: storage.read_bytes(uri, storage_options),
                             mapping=mapping, **params["ingest"])
        verdicts = []
        for row, table, pixels in result.lazy_spans:
            if row["episode_id"] in known:
                continue
            try:
                verdicts += judge_spans([(table, pixels)], lake=lake, **judge_params)
            except Exception as err:  # this span is rejected for it; the others go on
                reason, detail = (err.reason, err.detail) if isinstance(err, LogError) else \
                    ("error", f"{type(err).__name__}: {err}")
                verdicts.append(SpanVerdict(span_id=row["episode_id"], kept=False, reasons=(reason,), detail=detail,
                                            counts={}, frames=int(row["length"])))
        out["index"].append(index)
        out["result"].append(result.without_frames().to_bytes())
        out["verdicts"].append([v.to_row() for v in verdicts])
    return pa.table({"index": pa.array(out["index"], pa.int64()),
                     "result": pa.array(out["result"], pa.binary()),
                     "verdicts": pa.array(out["verdicts"], pa.list_(SpanVerdict.ARROW))})


def task_bins(units: list[dict], *, parallelism: int, units_per_task: int = 16) -> list[list[int]]:
    """Unit indexes grouped into tasks: as few tasks as hold ``units_per_task`` units at most,
    in multiples of ``parallelism``, balanced by bytes (the largest unit first, each to the
    lightest task so far)."""
    count = -(-len(units) // (parallelism * units_per_task)) * parallelism
    sizes = [sum(f["size"] for f in unit["files"]) for unit in units]
    bins: list[list[int]] = [[] for _ in range(min(len(units), count))]
    loads = [0] * len(bins)
    for i in sorted(range(len(units)), key=lambda i: -sizes[i]):
        lightest = loads.index(min(loads))
        bins[lightest].append(i)
        loads[lightest] += sizes[i]
    return bins


def _quiet_console() -> None:
    """Only warnings from Ray Data on the console: its INFO lines (each pipeline's plan, and
    its progress where stdout is not a terminal) still go to its log file in the Ray session
    directory."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; its file handler is not one
            handler.setLevel(logging.WARNING)


def ingest_and_judge(units: list[dict], *, storage_options: dict | None, params: dict, known: set,
                     lake: Lake, judge_params: dict, parallelism: int,
                     batch_fn: Callable[..., pa.Table] = ingest_and_judge_batch) -> tuple[list[IngestResult], list[SpanVerdict]]:
    """``batch_fn`` (``ingest_and_judge_batch``) over source units with Ray Data, one task per
    ``task_bins`` bin and at most ``parallelism`` at once; returns the units' results in order
    and the verdicts of all new spans.

    Few, large tasks: Ray Data notices finished tasks in polls up to 0.1 s apart, which idled a
    worker after every small log when each log was its own task. A task whose worker dies (killed
    for memory, a crash inside a decoder) is retried once, not forever (Ray Data's default); if it
    dies again the units run again one task each (``_one_by_one``), and a unit whose worker dies
    is rejected for ``crashed``: one log that kills its worker costs only itself.
    """
    if not units:
        return [], []
    # With a few CPUs, Ray Data's default reservation (a share of the cluster held back per
    # operator) let this one-operator pipeline run half the tasks its concurrency allows.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    _quiet_console()
    bins = task_bins(units, parallelism=max(1, parallelism))
    items = [{"units": json.dumps([[i, units[i]] for i in b])} for b in bins]
    kwargs = {"storage_options": storage_options, "params": params, "known": frozenset(known), "lake": lake,
              "judge_params": judge_params}
    with warnings.catch_warnings():  # Ray 2.60 names no max_retries and warns that the generic form will go
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            batch_fn, batch_size=None, batch_format="pyarrow", num_cpus=INGEST_CPUS, max_retries=1,
            compute=ray.data.TaskPoolStrategy(size=min(len(items), max(1, parallelism))), fn_kwargs=kwargs)
    try:
        rows = ds.take_all()
    except Exception as err:  # a worker died twice: find the unit that kills it
        logging.getLogger(__name__).warning("a curate worker died (%s): running each log alone",
                                            type(err).__name__)
        rows = _one_by_one(units, kwargs, batch_fn, parallelism=max(1, parallelism))
    results, verdicts = [None] * len(units), []
    for row in rows:
        results[row["index"]] = IngestResult.from_bytes(row["result"])
        verdicts += [SpanVerdict.from_row(v) for v in row["verdicts"]]
    return results, verdicts


@ray.remote(num_cpus=INGEST_CPUS, max_retries=0)
def _run_alone(batch_fn: Callable[..., pa.Table], index: int, unit: dict, kwargs: dict) -> pa.Table:
    return batch_fn(pa.table({"units": [json.dumps([[index, unit]])]}), **kwargs)


def _one_by_one(units: list[dict], kwargs: dict, batch_fn: Callable[..., pa.Table], *,
                parallelism: int) -> list[dict]:
    """``batch_fn`` on each unit in its own Ray task (no retries), ``parallelism`` at a time; a
    unit whose task fails is one reject of reason ``crashed`` (the failure in its detail)."""
    rows, pending = [], {}
    queue = list(enumerate(units))
    while queue or pending:
        while queue and len(pending) < parallelism:
            index, unit = queue.pop(0)
            pending[_run_alone.remote(batch_fn, index, unit, kwargs)] = (index, unit)
        done, _ = ray.wait(list(pending), num_returns=1)
        index, unit = pending.pop(done[0])
        try:
            rows += ray.get(done[0]).to_pylist()
        except Exception as err:  # the worker died (or the task could not run): this unit's reject
            reject = reject_row(unit["uri"], stage="read", reason="crashed", turn=kwargs["params"]["ingest"]["turn"],
                                detail=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            rows.append({"index": index, "result": IngestResult(rejects=(reject,)).to_bytes(), "verdicts": []})
    return rows


_REASONERS: dict[tuple, Any] = {}  # per process: the loaded reasoner by (URI, its files)


def _reasoner(uri: str, storage_options: dict | None, spec: Any) -> Any:
    """The reasoner at ``uri`` (a local directory or an s3:// prefix, copied here first), loaded
    once per process while its files stay the same; a changed file (size or etag) loads the
    model again. A pretrained vision-language model is asked for the world's tags and told its events."""
    files = tuple((o["uri"], o["size"], o["etag"]) for o in storage.list_objects(
        uri, suffix="", storage_options=storage_options))
    key = (uri, files)
    if key not in _REASONERS:
        from models.reasoner import load_reasoner

        _REASONERS.clear()
        with storage.local_copy(uri, storage_options) as local:
            tags, events = describe.vocabulary(spec)
            _REASONERS[key] = load_reasoner(local, tags=tags, events=events, source=uri)
    return _REASONERS[key]


def describe_batch(clips: pa.Table, *, reasoner: Any, caption_fn) -> pa.Table:
    """Embedding (``describe_and_embed``: the L2-normalised mean over a clip's frames), tags
    and caption (the world's ``caption``) for clip rows (clip_id, event, frames: a uint8
    [k, H, W, 3] tensor column)."""
    frames = images(clips.column("frames"))  # [N, k, H, W, 3]
    emb, described = reasoner.describe_and_embed(frames, [str(e) for e in clips.column("event").to_pylist()],
                                                 caption_fn=caption_fn)
    return pa.table({"clip_id": clips.column("clip_id"),
                     "embedding": pa.array(emb.astype(np.float32).tolist(), pa.list_(pa.float32())),
                     "tags": pa.array([to_json(d["tags"]) for d in described], pa.string()),
                     "caption": pa.array([d["caption"] for d in described], pa.string())})


@ray.remote(num_cpus=DESCRIBE_CPUS)
class Describer:
    """A Ray actor holding reasoners (``_reasoner``) across the curate runs of one driver process."""

    def __init__(self) -> None:
        import torch

        import models.reasoner  # noqa: F401 -- importing is most of the start-up: do it at creation

        torch.set_num_threads(1)

    def describe(self, clips: pa.Table, reasoner_uri: str, storage_options: dict | None, world: dict) -> pa.Table:
        w = worlds.get(WorldConfig(**world))
        return describe_batch(clips, reasoner=_reasoner(reasoner_uri, storage_options, w.spec),
                              caption_fn=w.caption)


_DESCRIBERS: dict[str, list] = {}  # Ray job id -> describer actors, reused by later runs of this process


def _describers(count: int) -> list:
    """``count`` describer actors of this Ray job, created on first use and kept (torch and
    the reasoner load once per actor, not once per curate run)."""
    job = ray.get_runtime_context().get_job_id()
    actors = _DESCRIBERS.setdefault(job, [])
    actors += [Describer.remote() for _ in range(count - len(actors))]
    return actors[:count]


def describe_clips(clips: pa.Table, *, reasoner_uri: str, storage_options: dict | None, world: dict,
                   parallelism: int, batch_size: int = 128) -> pa.Table:
    """Embedding, tags and caption for each clip (columns clip_id, event, frames), in chunks of
    ``batch_size`` spread over ``parallelism`` describer actors."""
    if clips.num_rows == 0:
        return pa.table({"clip_id": pa.array([], pa.string())})
    clips = clips.select(["clip_id", "event", "frames"])
    actors = _describers(max(1, parallelism))  # always all: a later, larger run finds them warm
    futures = [actors[i % len(actors)].describe.remote(clips.slice(start, batch_size), reasoner_uri,
                                                       storage_options, world)
               for i, start in enumerate(range(0, clips.num_rows, batch_size))]
    return pa.concat_tables(ray.get(futures))


@ray.remote(num_cpus=REASONER_TRAIN_CPUS)
def _train_reasoner(data: describe.TrainingClips, preset: str, world: str, device: str) -> tuple[bytes, dict]:
    import torch

    from models import reasoner

    torch.set_num_threads(1)
    spec = worlds.spec(world)
    # the world's vocabulary, at the resolution its clips were curated at
    config = describe.reasoner_config_for(spec, preset, image_size=int(data.frames.shape[-2]))
    held = data.held

    def part(values: list, keep: bool) -> list:
        return [v for v, h in zip(values, held) if h == keep]
    model, metrics = reasoner.train_reasoner(
        data.frames[~held], part(data.events, False), part(data.tags, False), config=config,
        val_clips=data.frames[held], val_events=part(data.events, True), val_tags=part(data.tags, True),
        device=device)
    if "val" in metrics:  # the one-line plan from predicted tags against the plan from the simulator's
        pred = [d["tags"] for d in model.describe(data.frames[held], part(data.events, True))]
        names = {**{t.name: t.name for t in spec.tasks}, **{t.instruction: t.name for t in spec.tasks}}
        metrics["val"]["plan"] = describe.plan_accuracy(worlds.get(world).plan, names, part(data.tasks, True),
                                                        pred, part(data.tags, True))
    with tempfile.TemporaryDirectory() as d:
        reasoner.save(model, d)
        return pack(d), metrics


def pack(directory: str) -> bytes:
    """A directory (a checkpoint) as an uncompressed tar archive."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(directory, arcname=".")
    return buf.getvalue()


def unpack(data: bytes, directory: str) -> None:
    """Extract a ``pack`` archive into ``directory`` (only plain files and folders inside it)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(directory, filter="data")


def train_reasoner(data: describe.TrainingClips, *, preset: str, world: str, use_gpu: bool, out_dir: str) -> dict:
    """Train a reasoner of ``preset`` for ``world`` on ``data`` in a Ray task (on a GPU with
    ``use_gpu``), measured on its held-out clips; saves it into ``out_dir`` and returns its metrics."""
    packed, metrics = ray.get(_train_reasoner.options(num_gpus=int(use_gpu)).remote(
        data, preset, world, "cuda" if use_gpu else "cpu"))
    unpack(packed, out_dir)
    return metrics
