"""Clips of the newly kept episodes: reasoner, embeddings, tags, captions, near-duplicates.

Called by the curate flow before it commits the episodes rows. The reasoner is, in order: the
directory or URI in ``curate.reasoner`` (ours, or a local vision-language model), the registry's
``reasoner`` champion, or a new one trained here on the clips whose logs carry privileged state
(tag accuracy measured on the clips of held-out episodes and recorded in the registry). With
none of these, clips are written without embedding, tags or caption and are not de-duplicated.
The work is in the stages: the clips' rows, training set and final table in ``stages.describe``,
training and describing on Ray in ``stages.curate_ray``; this module decides and records.
"""
from __future__ import annotations

import dataclasses
import tempfile

import pyarrow as pa

from flows.runtime import Context
from stages import curate_ray, describe, events
from stages.curate import SpanVerdict, now_utc
from stages.schemas import to_json

REASONER = "reasoner"


def reasoner_uri(ctx: Context, clips: pa.Table, turn: int) -> tuple[str, dict]:
    """Where the reasoner is (see the module docstring); ("", {}) when there is none."""
    c = ctx.config.curate
    if c.reasoner:
        return c.reasoner, {"source": "config"}
    champion = ctx.registry.get(REASONER, alias="champion")
    if champion is not None:
        return champion.artifact_uri, {"source": f"registry v{champion.version}", **champion.metrics}
    data = describe.training_clips(clips)
    if data is None:
        return "", {}
    with tempfile.TemporaryDirectory() as d:
        metrics = curate_ray.train_reasoner(data, preset=c.reasoner_preset, world=ctx.world_name,
                                            use_gpu=ctx.config.train.use_gpu, out_dir=d)
        mv = ctx.registry.register(REASONER, d, kind="reasoner", metrics=metrics,
                                   lineage={"turn": turn, "clips": len(data.events),
                                            "held_out_clips": int(data.held.sum()),
                                            "frames_version": ctx.lake.version("frames")})
    ctx.registry.set_alias(REASONER, "champion", mv.version)
    return mv.artifact_uri, {"source": f"trained v{mv.version}", **metrics}


def write_clips(ctx: Context, verdicts: dict[str, SpanVerdict], episodes: list[dict], turn: int) -> dict:
    """Describe, de-duplicate and write the clips of ``episodes``.

    Returns ``{"added": rows, "events": {event: clips}, "duplicates": clips marked,
    "describer": where the reasoner came from and its held-out metrics}``.
    """
    c = ctx.config.curate
    clips = describe.candidate_clips(verdicts, episodes, turn=turn)
    if clips.num_rows == 0:
        return {"added": 0, "events": {}, "duplicates": 0, "describer": {}}
    uri, info = reasoner_uri(ctx, clips, turn)
    described = bank = None
    if uri:
        described = curate_ray.describe_clips(clips, reasoner_uri=uri, storage_options=ctx.storage_options,
                                              world=dataclasses.asdict(ctx.config.world),
                                              parallelism=ctx.config.fleet.parallelism)
        bank = ctx.lake.read("clips", columns=["clip_id", "event", "embedding"],
                             filter="duplicate_of = ''") if ctx.lake.exists("clips") else None
    table = describe.clips_table(clips, described=described, bank=bank, describer=to_json(info) if uri else "",
                                 weights=events.oversample(ctx.config.spec), dedup_threshold=c.dedup_threshold,
                                 novelty_threshold=c.novelty_threshold, created_at=now_utc())
    added = ctx.lake.append("clips", table, key="clip_id")
    return {"added": added, **describe.clip_counts(table), "describer": info}
