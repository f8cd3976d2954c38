"""The ``predict`` application: the world model (generator + dynamics model) behind ``POST /predict``.

One request is one step of the neural simulator (``sim.neural.NeuralSim``): the K most recent
frames (oldest first), the K-1 actions taken between them, the logged states at them (when the
dynamics model reads state), the task (when a model reads one) and the action at the latest frame
in; the next frame, the predicted state, reward, signal probabilities and success out, with the
two model versions that produced them. Requests are decoded one by one and stepped in batches
(``@serve.batch``). Which pair answers: the world model the alias names (else the latest) and the
dynamics model its lineage's ``condition_version`` names (else the latest), as the flows pair them.
"""
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, create_model
from ray import serve

from models import dynamics as dynamics_lib
from models import world_model as world_model_lib
from serving.act import instruction, known_tasks, named_floats, task_field
from serving.common import ERRORS, FrameError, body_limit, bounded_float, decode_frames, harden, png_base64, \
    raw_base64, raw_frame_type, request_variants
from sim import worlds
from sim.neural import NeuralSim, Start
from sim.worlds.base import WorldSpec
from stages.registry import Registry

WORLD_MODEL, DYNAMICS = "world_model", "dynamics"


class PredictHealth(BaseModel):
    """Liveness and identity of the predict replica, and what POST /predict needs."""

    status: str = Field(description="Always `ok` when the replica answers.", examples=["ok"])
    world: str = Field(description="The world the models simulate.", examples=[worlds.DEFAULT])
    world_model_version: int = Field(description="Registry version of the generator.", examples=[2])
    dynamics_version: int = Field(description="Registry version of the dynamics model.", examples=[2])
    history: int = Field(description="K: the number of frames POST /predict expects.", examples=[4])
    image_size: int = Field(description="H = W of each frame in pixels.", examples=[64])
    states: list[str] = Field(description="The state fields each of `states` holds; empty: no states sent.")
    tasks: list[str] = Field(description="Task names `task` accepts; empty: no task sent.")


def _models(spec: WorldSpec, *, history: int, image_size: int, with_state: bool,
            tasks: tuple[str, ...]) -> tuple[Any, type[BaseModel]]:
    K, A = history, len(spec.actions)
    Action = create_model(
        "PredictAction", __config__=ConfigDict(extra="forbid"),
        __doc__=f"One action of world {spec.name!r}, one field per dimension ({A}).",
        **named_floats(spec.action_names, lambda i, n: f"{spec.actions[i].description or n}; in "
                                                       f"[{spec.actions[i].low:g}, {spec.actions[i].high:g}].",
                       **{a.name: dict(ge=a.low, le=a.high) for a in spec.actions}))
    zero = {a.name: min(max(0.0, a.low), a.high) for a in spec.actions}
    fields: dict[str, Any] = {
        "actions": (list[Action], Field(min_length=K - 1, max_length=K - 1, description=(
            f"Exactly K-1 = {K - 1} actions: the one taken at each frame but the latest, oldest first."))),
        "action": (Action, Field(description="The action taken at the latest frame: what to predict the outcome of."))}
    example: dict[str, Any] = {"encoding": "png_base64", "actions": [zero] * (K - 1), "action": zero,
                               "frames": [png_base64(np.zeros((image_size, image_size, 3), np.uint8))] * K}
    if with_state:
        State = create_model(
            "PredictState", __config__=ConfigDict(extra="forbid"),
            __doc__=f"World {spec.name!r}'s logged state at one frame; every field is required.",
            **named_floats(spec.state_names, lambda i, n: f"`{n}` (finite, float32)."))
        fields["states"] = (list[State], Field(min_length=K, max_length=K,
                                               description=f"Exactly K = {K} states, one per frame, oldest first."))
        example["states"] = [{n: 0.0 for n in spec.state_names}] * K
    if tasks:
        fields["task"] = task_field(spec, tasks)
        example["task"] = tasks[0]
    body = request_variants(
        "PredictRequest", fields=fields, example=example,
        doc=f"K = {K} frames of world {spec.name!r} with the actions taken at them, and the next action.",
        frames={"frames": (K, image_size, f"Exactly K = {K} frames, oldest first, each {image_size}x{image_size}x3 "
                                          "uint8 RGB.")})
    Outcome = create_model(
        "PredictResponse", __doc__="The world model's next step and the model versions that produced it.",
        frame=(raw_frame_type(image_size), Field(description=f"The next frame: base64 of {image_size}x{image_size}x3 "
                                                             "raw uint8 bytes, row-major HWC.")),
        state=(dict[str, float] | None, Field(description=f"The predicted state ({', '.join(spec.state_names)}); "
                                                         "null when the dynamics model predicts none.")),
        reward=(bounded_float("The predicted reward of the step."), ...),
        signals=(dict[str, float], Field(description=f"Probability of each of the world's signals "
                                                     f"({', '.join(spec.signals) or 'none'}) at the next step.")),
        done=(bounded_float("Probability that the episode ends at this step.", ge=0.0, le=1.0), ...),
        success=(bool, Field(description="Whether the world's success signal is predicted (always false for a "
                                         "world scored by return).")),
        world=(str, Field(examples=[spec.name])),
        world_model_version=(int, Field(examples=[2])), dynamics_version=(int, Field(examples=[2])),
        latency_ms=(float, Field(description="Server-side time to decode and step, in milliseconds.")))
    return body, Outcome


def make_api(spec: WorldSpec, step: Any, *, history: int, image_size: int, with_state: bool, tasks: tuple[str, ...],
             versions: dict[str, int], token: str | None) -> FastAPI:
    """The FastAPI app: ``await step(Start, action [A])`` gives the NeuralSim outcome of one request."""
    PredictRequest, PredictResponse = _models(spec, history=history, image_size=image_size, with_state=with_state,
                                              tasks=tasks)
    app = FastAPI(title=f"worldloop predict: {spec.name}", version="1",
                  description=f"The worldloop world model of world {spec.name!r}: history and action in, next "
                              "frame, predicted state, reward and success out.")

    @app.get("/healthz", response_model=PredictHealth)
    def healthz() -> PredictHealth:
        return PredictHealth(status="ok", world=spec.name, history=history, image_size=image_size,
                             states=list(spec.state_names) if with_state else [], tasks=list(tasks), **versions)

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(request: PredictRequest) -> PredictResponse:
        t0 = time.perf_counter()
        try:
            frames = decode_frames(request.frames, request.encoding, image_size=image_size)
        except FrameError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        names = spec.action_names
        actions = np.array([[a.model_dump(by_alias=True)[n] for n in names]
                            for a in [*request.actions, request.action]], np.float32)
        states = (np.array([[s.model_dump(by_alias=True)[n] for n in spec.state_names] for s in request.states],
                           np.float32) if with_state else np.zeros((history, len(spec.state_names)), np.float32))
        start = Start(frames=frames, actions=actions, states=states,
                      instruction=instruction(spec, request.task) if tasks else "")
        frame, out = await step((start, actions[-1]))
        state = None if np.isnan(out["state"]).any() else dict(zip(spec.state_names, map(float, out["state"])))
        return PredictResponse(frame=raw_base64(frame), state=state, reward=float(out["reward"]),
                               signals=dict(zip(spec.signals, map(float, out["signals"]))), done=float(out["done"]),
                               success=bool(out["success"]), world=spec.name, **versions,
                               latency_ms=(time.perf_counter() - t0) * 1e3)

    return harden(app, max_body=body_limit(frames=history, image_size=image_size), token=token)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32, max_surge_percent=100)
@serve.ingress()
class PredictDeployment:
    """One replica holding one generator + dynamics pair for one world."""

    def __init__(self, *, registry_uri: str, world_spec: WorldSpec, versions: dict[str, int],
                 storage_options: dict[str, str] | None = None, token: str | None = None) -> None:
        import torch

        torch.set_num_threads(1)
        registry = Registry(registry_uri, storage_options)
        self.generator = world_model_lib.load(registry.fetch(registry.get(WORLD_MODEL, version=versions[
            "world_model_version"])))
        self.dynamics = dynamics_lib.load(registry.fetch(registry.get(DYNAMICS, version=versions["dynamics_version"])))
        self.spec, self.versions, self.token = world_spec, versions, token
        NeuralSim(self.generator, self.dynamics, world_spec)  # refuses a pair that does not fit the world

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def step(self, items: list[tuple]) -> list[tuple]:
        sim = NeuralSim(self.generator, self.dynamics, self.spec)
        sim.reset([start for start, _ in items])
        obs, out = sim.step(np.stack([a for _, a in items]))
        return [(obs["image"][i], {k: v[i] for k, v in out.items()}) for i in range(len(items))]

    def __serve_build_asgi_app__(self) -> FastAPI:
        g, d = self.generator.config, self.dynamics.config
        tasks = known_tasks(self.spec, set(g.task_vocab) | set(d.task_vocab))
        return make_api(self.spec, self.step, history=max(g.history, d.history), image_size=g.image_size,
                        with_state=d.state_dim > 0, tasks=tasks, versions=self.versions, token=self.token)


def build_predict(*, registry_uri: str, world: str = worlds.DEFAULT, storage_options: dict[str, str] | None = None,
                  alias: str = "champion", version: int | None = None, token: str | None = None,
                  num_replicas: int = 1) -> serve.Application:
    """The bound predict application: world model ``version`` (else the one ``alias`` names, else the
    latest) and the dynamics model it was trained on (else the latest). LookupError when either is missing."""
    spec = worlds.spec(world)
    registry = Registry(registry_uri, storage_options)
    generator = (registry.get(WORLD_MODEL, version=version) if version is not None
                 else registry.get(WORLD_MODEL, alias=alias) or registry.get(WORLD_MODEL))
    if generator is None:
        raise LookupError(f"no {WORLD_MODEL} {'v' + str(version) if version is not None else ''} in the registry at "
                          f"{registry.uri}: train one first (`worldloop train --model {WORLD_MODEL}`)")
    paired = generator.lineage.get("condition_version")
    dynamics = registry.get(DYNAMICS, version=int(paired)) if paired is not None else registry.get(DYNAMICS)
    if dynamics is None:
        raise LookupError(f"no {DYNAMICS} model {'v' + str(paired) if paired is not None else ''} in the registry at "
                          f"{registry.uri} for {WORLD_MODEL} v{generator.version}")
    versions = {"world_model_version": generator.version, "dynamics_version": dynamics.version}
    return PredictDeployment.options(num_replicas=num_replicas).bind(
        registry_uri=registry.uri, world_spec=spec, versions=versions, storage_options=storage_options, token=token)
