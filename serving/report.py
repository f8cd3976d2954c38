"""The ``report`` application: the scene reasoner on a clip, and a written report of a whole turn.

``POST {url}/clip``: a clip (k frames, oldest first) and its mined event in; the reasoner's tags, the
world's one-line caption and a short written report out: what was observed (the scene by tag, the
event and why it matters to the world) and what to do about it (recommendations for the data and
the next training run). ``GET {url}/turn/{turn}``: a report of one finished turn from the lake's
``turns`` table, no model needed: what the fleet did, what failed (rejected logs, interventions, the
world's failure signals in evaluation) and what changed (promoted or not, scores). Nothing here names
a world's fields: events, their weights and descriptions come from the world's spec.
"""
import json
from collections import Counter
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Path
from pydantic import BaseModel, Field, create_model
from ray import serve

from models.reasoner import load
from serving.common import ERRORS, FrameError, INT64, body_limit, decode_frames, harden, png_base64, request_variants
from sim import worlds
from sim.worlds.base import WorldSpec
from stages.registry import Registry


class Written(BaseModel):
    """A short written report: a title, observations, recommendations, and all of it as text."""

    title: str
    observations: list[str]
    recommendations: list[str]
    text: str = Field(description="The report as plain text, ready to read.")


class TurnReport(BaseModel):
    """One finished turn: what the fleet did, what failed, what changed."""

    turn: int
    promoted: bool
    candidate_version: int | None
    champion_version: int | None
    fleet: list[str] = Field(description="What the fleet did.")
    failures: list[str] = Field(description="What failed: rejected logs, interventions, failure signals.")
    changes: list[str] = Field(description="What changed: the promotion decision and the scores.")
    report: Written


class ReportHealth(BaseModel):
    """Liveness of the report replica and what POST /clip needs."""

    status: str = Field(examples=["ok"])
    world: str = Field(examples=[worlds.DEFAULT])
    reasoner_version: int | None = Field(description="Registry version of the reasoner; null: none, /clip is off.")
    frames_per_clip: int | None
    image_size: int | None
    events: list[str]


def _written(title: str, observations: list[str], recommendations: list[str]) -> Written:
    text = "\n".join([title, "", "Observations:", *(f"- {o}" for o in observations), "", "Recommendations:",
                      *(f"- {r}" for r in recommendations)])
    return Written(title=title, observations=observations, recommendations=recommendations, text=text)


def clip_report(spec: WorldSpec, tags: dict[str, str], event: str, caption: str) -> Written:
    """Observations and recommendations for one described clip, from the world's spec only."""
    events = {e.name: e for e in spec.events}
    observed = [f"Scene: {caption}.", *(f"{tag.replace('_', ' ')}: {value}." for tag, value in tags.items())]
    known = events.get(event)
    if known is not None:
        observed.append(f"Event {event!r}: {known.description or 'mined from the log'} "
                        f"(oversampled x{known.weight:g} in training).")
    else:
        observed.append(f"Event {event!r}: no event of world {spec.name!r} was mined here; a routine stretch.")
    unknown = [t for t, v in tags.items() if v == "unknown"]
    advice = []
    if known is not None and known.weight > 1:
        advice.append(f"Keep clips like this one: {event!r} is weighted x{known.weight:g}; check that the next "
                      "policy's training draws enough of them.")
        advice.append(f"Review the policy's behaviour in scenes with {', '.join(f'{k} {v}' for k, v in tags.items())} "
                      "in closed-loop evaluation before promoting.")
    else:
        advice.append("Routine data: keep it only when the lake holds few clips with these tags (novelty).")
    if unknown:
        advice.append(f"The reasoner could not determine {', '.join(unknown)}: label such clips for its next training.")
    return _written(f"Clip report, world {spec.name}: {caption}", observed, advice)


def _fleet(fleet: dict[str, Any], curate: dict[str, Any]) -> list[str]:
    did = [f"{fleet['episodes']} episodes driven by {fleet.get('driver', 'an unnamed driver')}: mean score "
           f"{fleet['mean_score']:.3g}, success rate {fleet.get('success_rate', 0.0):.0%}, "
           f"{fleet.get('frames', 0)} frames."] if fleet.get("episodes") else ["No fleet episodes were recorded."]
    if curate:
        did.append(f"Curation kept {curate.get('kept', 0)} of {curate.get('seen', 0)} logs "
                   f"({curate.get('frames_kept', 0)} frames) and rejected {curate.get('rejected', 0)}.")
    return did


def _failures(fleet: dict[str, Any], curate: dict[str, Any], evaluate: dict[str, Any],
              promote: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(what failed, what to do about it) from the stage summaries."""
    failed, advice = [], []
    reasons = Counter((r.get("stage", "curation"), r.get("reason", "no reason recorded"))
                      for r in curate.get("rejects") or [])
    for (stage, reason), n in reasons.most_common():
        failed.append(f"{n} log{'s' if n > 1 else ''} rejected at {stage}: {reason}.")
    if reasons:
        (stage, reason), _ = reasons.most_common(1)[0]
        advice.append(f"Fix the source of the logs rejected at {stage} ({reason}); they are not in the lake.")
    if fleet.get("interventions"):
        failed.append(f"The safety driver intervened {fleet['interventions']} times in the fleet's episodes.")
        advice.append("Review the intervention clips (POST /clip with event `intervention`): they are the data "
                      "the next policy needs most.")
    if evaluate.get("screened_out"):
        screen = evaluate.get("screen") or {}
        failed.append(f"The candidate was screened out in the neural simulator before real evaluation "
                      f"({screen.get('reason', 'its scores fell short')}).")
    for name, g in (promote.get("guards") or {}).items():
        if g.get("enforced") and not g.get("ok"):
            failed.append(f"Guard {name} regressed: candidate {g['candidate']:.2f} vs champion {g['reference']:.2f} "
                          f"(tolerance {g['tolerance']:g}).")
            advice.append(f"Find why the candidate's {name} rose: mine the evaluation episodes where it happens "
                          "and weight those events up before the next training run.")
    return failed, advice


def _changes(row: dict[str, Any], evaluate: dict[str, Any], promote: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(what changed, what to do about it): the decision, the scores, the paired comparison."""
    cand, champ = row.get("candidate_version"), row.get("champion_version")
    reason = promote.get("reason", "no reason recorded")
    if row["promoted"]:
        changed = [f"Promoted candidate v{cand}: champion is now v{champ}. {reason}."]
        advice = [f"v{champ} now serves: compare the next turn's fleet scores with this one; roll back "
                  "(`worldloop models rollback`) if it does worse."]
    else:
        kept = f"Kept champion v{champ}" if champ is not None else "No champion yet"
        changed = [f"{kept}; candidate v{cand} was not promoted: {reason}."]
        lower, margin = (promote.get("ci95") or [None])[0], promote.get("margin", 0.0)
        advice = ([f"Candidate v{cand} did not beat the {promote.get('reference_role', 'reference')} with confidence "
                   f"(lower bound {lower:+.3g}, needs above {margin:g}): train longer or on more data, or evaluate on "
                   "more scenes, before the next turn."] if lower is not None and lower <= margin else [])
    for role, r in (evaluate.get("results") or {}).items():
        if "mean" in r:
            ci = f" (95% CI {r['ci95'][0]:.3g} .. {r['ci95'][1]:.3g})" if r.get("ci95") else ""
            changed.append(f"In evaluation, the {role} ({r.get('model', 'unnamed')}) scored {r['mean']:.3g}{ci} "
                           f"over {r.get('n', 0)} scenes.")
    if promote.get("mean_diff") is not None:
        changed.append(f"Candidate minus {promote.get('reference_role', 'reference')}: {promote['mean_diff']:+.3g} "
                       f"a scene, {promote.get('wins', 0)} wins of {promote.get('n', 0)}.")
    return changed, advice


def turn_report(row: dict[str, Any]) -> TurnReport:
    """The written report of one row of the ``turns`` table (its ``summary`` is every stage's JSON)."""
    s = json.loads(row.get("summary") or "{}")
    fleet, curate, evaluate, promote = (s.get(k) or {} for k in ("fleet", "curate", "evaluate", "promote"))
    did = _fleet(fleet, curate)
    failed, fixes = _failures(fleet, curate, evaluate, promote)
    changed, next_steps = _changes(row, evaluate, promote)
    title = (f"Turn {row['turn']} ({row.get('config') or 'unnamed'} config): "
             + (f"promoted v{row.get('champion_version')}" if row["promoted"] else "champion kept"))
    written = _written(title, did + (failed or ["Nothing failed."]) + changed,
                       fixes + next_steps or ["Nothing to act on: keep turning."])
    return TurnReport(turn=row["turn"], promoted=row["promoted"], candidate_version=row.get("candidate_version"),
                      champion_version=row.get("champion_version"), fleet=did, failures=failed or ["Nothing failed."],
                      changes=changed, report=written)


def make_api(spec: WorldSpec, *, reasoner: Any, reasoner_version: int | None, caption: Any, read_turn: Any,
             token: str | None) -> FastAPI:
    """The FastAPI app: ``reasoner`` (a ``models.reasoner.Reasoner`` or None: no /clip), ``caption(tags,
    event)`` the world's caption, ``read_turn(turn)`` the turn's row or None."""
    app = FastAPI(title=f"worldloop report: {spec.name}", version="1",
                  description=f"The scene reasoner and turn reports of world {spec.name!r}.")
    c = reasoner.config if reasoner is not None else None

    @app.get("/healthz", response_model=ReportHealth)
    def healthz() -> ReportHealth:
        return ReportHealth(status="ok", world=spec.name, reasoner_version=reasoner_version,
                            frames_per_clip=c.frames_per_clip if c else None, image_size=c.image_size if c else None,
                            events=list(c.events) if c else [])

    @app.get("/turn/{turn}", response_model=TurnReport,
             responses={401: ERRORS[401], 404: {"model": ERRORS[400]["model"], "description": "No such turn."}})
    def turn(turn: Annotated[int, Path(ge=0, lt=INT64, description="The turn number (0 is the first).")]) -> TurnReport:
        row = read_turn(turn)
        if row is None:
            raise HTTPException(status_code=404, detail=f"turn {turn} has not finished in this lake")
        return turn_report(row)

    if c is not None:
        Tags = create_model("Tags", **{k: (str, Field(description=f"one of {', '.join(v)} (or unknown)"))
                                       for k, v in c.tags.items()})
        ClipResponse = create_model(
            "ClipResponse", tags=(Tags, ...), caption=(str, ...), report=(Written, ...),
            reasoner_version=(int, ...), world=(str, ...))
        k, size = c.frames_per_clip, c.image_size
        ClipRequest = request_variants(
            "ClipRequest", doc=f"A clip of world {spec.name!r}: {k} frames, oldest first, and its mined event.",
            fields={"event": (Literal[tuple(c.events)], Field(description="The event mined from the log."))},
            frames={"frames": (k, size, f"Exactly {k} frames, oldest first, each {size}x{size}x3 uint8 RGB.")},
            example={"encoding": "png_base64", "event": c.events[0],
                     "frames": [png_base64(np.zeros((size, size, 3), np.uint8))] * k})

        @app.post("/clip", response_model=ClipResponse, responses=ERRORS)
        async def clip(request: ClipRequest) -> ClipResponse:
            try:
                frames = decode_frames(request.frames, request.encoding, image_size=size)
            except FrameError as e:
                raise HTTPException(status_code=400, detail=str(e)) from None
            described = reasoner.describe(frames[None], [request.event], caption_fn=caption)[0]
            return ClipResponse(tags=described["tags"], caption=described["caption"], world=spec.name,
                                report=clip_report(spec, described["tags"], request.event, described["caption"]),
                                reasoner_version=reasoner_version)

    limit = body_limit(frames=c.frames_per_clip, image_size=c.image_size) if c else 64 * 1024
    return harden(app, max_body=limit, token=token)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32, max_surge_percent=100)
@serve.ingress()
class ReportDeployment:
    """One replica: the world's reasoner (when registered) and read access to the lake's turns."""

    def __init__(self, *, registry_uri: str, world: str, reasoner_name: str, reasoner_version: int | None,
                 storage_options: dict[str, str] | None = None, token: str | None = None) -> None:
        import torch

        from stages.lake import Lake

        torch.set_num_threads(1)
        registry = Registry(registry_uri, storage_options)
        self.reasoner = (load(registry.fetch(registry.get(reasoner_name, version=reasoner_version)))
                         if reasoner_version is not None else None)
        self.world, self.version, self.token = worlds.get(world), reasoner_version, token
        self.lake = Lake(registry_uri, storage_options=storage_options)

    def read_turn(self, turn: int) -> dict[str, Any] | None:
        if not self.lake.exists("turns"):
            return None
        rows = self.lake.read("turns", filter=f"turn = {int(turn)}").to_pylist()
        return rows[-1] if rows else None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.world.spec, reasoner=self.reasoner, reasoner_version=self.version,
                        caption=self.world.caption, read_turn=self.read_turn, token=self.token)


def build_report(*, registry_uri: str, world: str = worlds.DEFAULT, storage_options: dict[str, str] | None = None,
                 reasoner_name: str = "reasoner", alias: str = "champion", token: str | None = None,
                 num_replicas: int = 1) -> serve.Application:
    """The bound report application for ``world``: the reasoner ``alias`` names, if any (without one,
    only the turn reports are served)."""
    worlds.spec(world)  # an unknown world is an error here, not in the replica
    registry = Registry(registry_uri, storage_options)
    mv = registry.get(reasoner_name, alias=alias)
    if mv is not None and mv.kind != "reasoner":
        raise ValueError(f"{reasoner_name} v{mv.version} is a {mv.kind!r} model, not a reasoner")
    return ReportDeployment.options(num_replicas=num_replicas).bind(
        registry_uri=registry.uri, world=world, reasoner_name=reasoner_name,
        reasoner_version=mv.version if mv else None, storage_options=storage_options, token=token)
