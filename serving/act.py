"""The ``act`` application: a registered policy for one world behind ``POST /act``.

``POST {url}/act`` takes the K most recent frames (oldest first; per encoding an exact schema),
the policy's state inputs and the task when the world and the policy have them, and returns one
named action and the model version; ``GET {url}/healthz`` says which model and world answer and
what a request needs; ``GET {url}/shadow`` compares a challenger run in shadow (same requests, its
answers logged, never returned). Requests are decoded one by one and inferred in batches
(``@serve.batch``). Models are generated from the world's spec (``sim.worlds``) and the policy's
config; nothing here names a world's fields.
"""
import logging
import time
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, create_model
from ray import serve

from models.policy import PolicyConfig, config_from_dict, load
from models.text import words
from serving.common import ERRORS, FrameError, body_limit, bounded_float, decode_frames, harden, png_base64, \
    request_variants
from sim import worlds
from sim.worlds.base import WorldSpec
from stages.registry import Registry

log = logging.getLogger("ray.serve")


class Health(BaseModel):
    """Liveness and identity of the serving replica, and what POST /act needs."""

    status: Literal["ok"] = Field(description="Always `ok` when the replica answers.")
    model_name: str = Field(description="Registry name of the serving model.", examples=["policy"])
    model_version: int = Field(description="Registry version of the serving model.", examples=[3])
    world: str = Field(description="The world the policy acts in (see `worldloop worlds`).", examples=[worlds.DEFAULT])
    history: int = Field(description="K: the number of frames POST /act expects.", examples=[3])
    image_size: int = Field(description="H = W of each frame in pixels.", examples=[64])
    actions: list[str] = Field(description="The action's fields, in the world's order.",
                               examples=[list(worlds.spec(worlds.DEFAULT).action_names)])
    state: list[str] = Field(description="The fields of `state` POST /act needs, in order; empty: no state.",
                             examples=[[]])
    tasks: list[str] = Field(description="Task names POST /act accepts in `task` (their instructions are "
                                         "accepted too); empty: the policy reads no task.", examples=[[]])


class ShadowStats(BaseModel):
    """How a challenger run in shadow compares with the champion on the same requests."""

    challenger_version: int | None = Field(description="The shadow's registry version; null: none runs.")
    requests: int = Field(description="Requests both answered with finite actions.")
    failures: int = Field(description="Requests the challenger failed (an error or a non-finite action); the "
                                      "champion answered them all the same.")
    mean_abs_difference: float | None = Field(description="Mean |champion - challenger| over actions and "
                                                          "dimensions; null before the first request.")
    agreement: float | None = Field(description="Share of requests whose actions differ by at most "
                                                "`tolerance` in every dimension.")
    tolerance: float = Field(description="The agreement tolerance, in action units.")


# --- the world's interface -------------------------------------------------------------------------------

def known_tasks(spec: WorldSpec, task_vocab: Any) -> tuple[str, ...]:
    """The world's task names whose instructions a model reads (every word in its ``task_vocab``);
    () = the model reads no task."""
    vocab = set(task_vocab)
    if not vocab:
        return ()
    return tuple(t.name for t in spec.tasks if set(words(t.instruction)) <= vocab)


def check_policy(spec: WorldSpec, policy_config: PolicyConfig, who: str) -> None:
    """Raise ValueError when the policy's inputs and outputs do not fit the world's spec."""
    c = policy_config
    if c.state_dim != len(spec.policy_state):
        raise ValueError(f"{who} reads {c.state_dim} state values but world {spec.name!r} gives "
                         f"{len(spec.policy_state)} ({', '.join(spec.policy_state) or 'pixels only'})")
    if c.action_dim != len(spec.actions):
        raise ValueError(f"{who} outputs {c.action_dim} actions but world {spec.name!r} has {len(spec.actions)} "
                         f"({', '.join(spec.action_names)})")
    if c.task_vocab and not known_tasks(spec, c.task_vocab):
        raise ValueError(f"{who} reads task instructions but knows the words of none of world {spec.name!r}'s "
                         f"tasks {list(spec.task_names)}")


def named_floats(names: tuple[str, ...], describe: Any, **kw: Any) -> dict[str, Any]:
    """Bounded float fields keyed by the world's names (any string) through aliases, so that no name
    can clash with pydantic's own attributes; dump ``by_alias=True`` to get the names back.
    ``describe(i, name)`` gives each field's description; ``kw`` more Field bounds per name."""
    return {f"f{i}": (bounded_float(describe(i, n), **kw.get(n, {})), Field(alias=n, title=n))
            for i, n in enumerate(names)}


def task_field(spec: WorldSpec, tasks: tuple[str, ...]) -> tuple[Any, Any]:
    """A task name or its instruction, among ``tasks`` of the world."""
    choices = tuple(tasks) + tuple(spec.instruction(t) for t in tasks)
    default = {"default": tasks[0]} if len(tasks) == 1 else {}
    return Literal[choices], Field(description=f"What to do: a task name of world {spec.name!r} "
                                               f"({', '.join(tasks)}) or its instruction sentence.", **default)


def instruction(spec: WorldSpec, task: str) -> str:
    """The instruction of a task given by name or by instruction."""
    return next(t.instruction for t in spec.tasks if task in (t.name, t.instruction))


def make_models(spec: WorldSpec, *, history: int, image_size: int,
                tasks: tuple[str, ...] = ()) -> tuple[Any, type[BaseModel]]:
    """(the ActRequest body type, ActResponse) for the world ``spec`` and a policy reading ``history``
    frames of ``image_size`` pixels, its ``policy_state`` and (when ``tasks`` is not empty) one of ``tasks``."""
    K, S = history, len(spec.policy_state)
    fields: dict[str, Any] = {}
    example: dict[str, Any] = {"encoding": "png_base64",
                               "frames": [png_base64(np.zeros((image_size, image_size, 3), np.uint8))] * K}
    if S:
        State = create_model(
            "State", __config__=ConfigDict(extra="forbid"),
            __doc__=f"The policy's {S} state inputs at the latest frame, named as world {spec.name!r}'s "
                    "`policy_state`; every field is required.",
            **named_floats(spec.policy_state, lambda i, n: f"`{n}`: state input {i + 1} of {S} (finite, float32)."))
        fields["state"] = (State, Field(description=f"The state at the latest frame: one finite float per name "
                                                    f"({', '.join(spec.policy_state)})."))
        example["state"] = {n: 0.0 for n in spec.policy_state}
    if tasks:
        fields["task"] = task_field(spec, tasks)
        example["task"] = tasks[0]
    body = request_variants(
        "ActRequest", fields=fields, example=example,
        doc=f"The K = {K} most recent frames of world {spec.name!r}, oldest first"
            + (", the state" if S else "") + (", the task" if tasks else "") + ".",
        frames={"frames": (K, image_size, f"Exactly K = {K} frames (the policy's history), oldest first, each "
                                          f"HxWx3 = {image_size}x{image_size}x3 uint8 RGB from the world's "
                                          f"`{spec.camera}` camera.")})
    Action = create_model(
        "Action", __doc__=f"One action of world {spec.name!r}, one field per dimension in the world's order.",
        **named_floats(spec.action_names, lambda i, n: f"{spec.actions[i].description or n}; in "
                                                       f"[{spec.actions[i].low:g}, {spec.actions[i].high:g}].",
                       **{a.name: dict(ge=a.low, le=a.high) for a in spec.actions}))
    ActResponse = create_model(
        "ActResponse", __doc__="The policy's action for the request and the model and world that produced it.",
        action=(Action, Field(description=f"The action: {', '.join(spec.action_names)}.")),
        model_name=(str, Field(description="Registry name of the serving model.", examples=["policy"])),
        model_version=(int, Field(description="Registry version of the serving model.", examples=[3])),
        world=(str, Field(description="The world the action is for.", examples=[spec.name])),
        latency_ms=(float, Field(description="Server-side time to decode the request and run the policy, in "
                                             "milliseconds (excludes network and HTTP parsing).", examples=[2.5])))
    return body, ActResponse


def make_api(spec: WorldSpec, config: PolicyConfig, infer: Any, *, model_name: str, model_version: int,
             token: str | None = None, shadow: Any = None) -> FastAPI:
    """The FastAPI app for a policy with ``config``: ``await infer((frames [K,H,W,3], state [S] | None,
    instruction | None))`` gives its action [A] (one item of a ``@serve.batch``); ``shadow()`` the ShadowStats."""
    c = config
    tasks = known_tasks(spec, c.task_vocab)
    ActRequest, ActResponse = make_models(spec, history=c.history, image_size=c.image_size, tasks=tasks)
    state_names = spec.policy_state
    app = FastAPI(title=f"worldloop act: {spec.name}", version="3",
                  description=f"A pixels{'+state' if state_names else ''}{'+task' if tasks else ''}-to-action policy "
                              f"from the worldloop model registry, for world {spec.name!r}: {spec.description}")

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok", model_name=model_name, model_version=model_version, world=spec.name,
                      history=c.history, image_size=c.image_size, actions=list(spec.action_names),
                      state=list(state_names), tasks=list(tasks))

    @app.get("/shadow", response_model=ShadowStats, responses={401: ERRORS[401]})
    def shadow_stats() -> ShadowStats:
        return shadow() if shadow else ShadowStats(challenger_version=None, requests=0, failures=0,
                                                   mean_abs_difference=None, agreement=None, tolerance=0.0)

    @app.post("/act", response_model=ActResponse, responses=ERRORS)
    async def act(request: ActRequest) -> ActResponse:
        t0 = time.perf_counter()
        try:
            frames = decode_frames(request.frames, request.encoding, image_size=c.image_size)
        except FrameError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        state = None
        if state_names:
            values = request.state.model_dump(by_alias=True)
            state = np.array([values[n] for n in state_names], np.float32)
        task = instruction(spec, request.task) if tasks else None
        raw = spec.clip_action(await infer((frames, state, task)), f"{model_name} v{model_version}")
        # clip again in float64: a float32 bound such as 0.1 may lie just outside the spec's
        action = {a.name: min(max(float(v), a.low), a.high) for a, v in zip(spec.actions, raw)}
        return ActResponse(action=action, model_name=model_name, model_version=model_version, world=spec.name,
                           latency_ms=(time.perf_counter() - t0) * 1e3)

    return harden(app, max_body=body_limit(frames=c.history, image_size=c.image_size), token=token)


def _batch_act(policy: Any, items: list[tuple]) -> np.ndarray:
    """One forward pass for a batch of (frames, state, instruction) -> actions [B, A]."""
    frames = np.stack([f for f, _, _ in items])
    state = np.stack([s for _, s, _ in items]) if items[0][1] is not None else None
    tasks = [t for _, _, t in items] if items[0][2] is not None else None
    return policy.act(frames, state, tasks)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32, max_surge_percent=100)
@serve.ingress()
class ActDeployment:
    """One replica holding one registered policy version (and optionally a shadow challenger) for one world."""

    TOLERANCE = 0.05

    def __init__(self, *, registry_uri: str, model_name: str, version: int, world: str, world_spec: WorldSpec,
                 storage_options: dict[str, str] | None = None, shadow_version: int | None = None,
                 token: str | None = None) -> None:
        import torch

        torch.set_num_threads(1)  # replicas share small machines; one inference thread each
        if world_spec.name != world:
            raise ValueError(f"world_spec is for world {world_spec.name!r}, not {world!r}")
        registry = Registry(registry_uri, storage_options)
        self.policy = load(registry.fetch(_version(registry, model_name, version)))
        self.shadow = load(registry.fetch(_version(registry, model_name, shadow_version))) if shadow_version else None
        self.spec, self.token = world_spec, token
        self.model_name, self.model_version, self.shadow_version = model_name, version, shadow_version
        self.compared, self.diff_sum, self.agreed, self.failed = 0, 0.0, 0, 0

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def infer(self, items: list[tuple]) -> list[np.ndarray]:
        actions = _batch_act(self.policy, items)
        if self.shadow is not None:
            self._shadow(actions, items)
        return list(actions)

    def _shadow(self, champion: np.ndarray, items: list[tuple]) -> None:
        """Run the challenger on the same batch and compare; whatever it does, the champion's answer stands."""
        try:
            challenger = np.asarray(_batch_act(self.shadow, items), np.float32).reshape(champion.shape)
        except Exception as e:  # noqa: BLE001 - a broken challenger is what shadowing is for
            self.failed += len(items)
            log.warning("shadow %s v%d failed a batch of %d: %s: %s", self.model_name, self.shadow_version,
                        len(items), type(e).__name__, e)
            return
        finite = np.isfinite(challenger).all(axis=1)
        self.failed += int((~finite).sum())
        if finite.any():
            self._compare(champion[finite], challenger[finite])

    def _compare(self, champion: np.ndarray, challenger: np.ndarray) -> None:
        diff = np.abs(champion - challenger)
        self.compared += len(diff)
        self.diff_sum += float(diff.mean(axis=1).sum())
        self.agreed += int((diff.max(axis=1) <= self.TOLERANCE).sum())
        log.info("shadow %s v%d vs v%d: mean |diff| %.4f over %d requests", self.model_name, self.shadow_version,
                 self.model_version, float(diff.mean()), len(diff))

    def stats(self) -> ShadowStats:
        n = self.compared
        return ShadowStats(challenger_version=self.shadow_version, requests=n, failures=self.failed,
                           tolerance=self.TOLERANCE,
                           mean_abs_difference=self.diff_sum / n if n else None,
                           agreement=self.agreed / n if n else None)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.spec, self.policy.config, self.infer, model_name=self.model_name,
                        model_version=self.model_version, token=self.token, shadow=self.stats)


def _version(registry: Registry, name: str, version: int) -> Any:
    mv = registry.get(name, version=version)
    if mv is None:
        raise LookupError(f"model {name!r} v{version} is not in the registry at {registry.uri}")
    return mv


def resolve(registry: Registry, name: str, *, alias: str, version: int | None, kind: str) -> Any:
    """The registry version to serve: exactly ``version`` when given, else the one ``alias`` points at."""
    mv = registry.get(name, version=version) if version is not None else registry.get(name, alias=alias)
    if mv is None:
        which = f"version {version}" if version is not None else f"version with alias {alias!r}"
        raise LookupError(f"model {name!r} has no {which} in the registry at {registry.uri}")
    if mv.kind != kind:
        raise ValueError(f"{name} v{mv.version} is a {mv.kind!r} model; this endpoint serves {kind!r} models")
    return mv


def build_act(*, registry_uri: str, model_name: str, alias: str = "champion", version: int | None = None,
              storage_options: dict[str, str] | None = None, num_replicas: int = 1, world: str = worlds.DEFAULT,
              shadow_alias: str | None = None, token: str | None = None) -> serve.Application:
    """The bound act application for ``world``: the version ``alias`` points at (or exactly ``version``),
    with the version ``shadow_alias`` points at (if any) in shadow beside it."""
    spec = worlds.spec(world)
    registry = Registry(registry_uri, storage_options)
    mv = resolve(registry, model_name, alias=alias, version=version, kind="policy")
    check_policy(spec, config_from_dict(mv.config or {}), f"{model_name} v{mv.version}")
    shadow = registry.get(model_name, alias=shadow_alias) if shadow_alias else None
    if shadow is not None:
        c, s = config_from_dict(mv.config or {}), config_from_dict(shadow.config or {})
        check_policy(spec, s, f"{model_name} v{shadow.version}")
        if (c.history, c.image_size, c.task_vocab) != (s.history, s.image_size, s.task_vocab):
            raise ValueError(f"shadow {model_name} v{shadow.version} reads other inputs (history, image size or "
                             f"tasks) than v{mv.version}: it cannot answer the same requests")
    return ActDeployment.options(num_replicas=num_replicas).bind(
        registry_uri=registry.uri, model_name=model_name, version=mv.version, storage_options=storage_options,
        world=world, world_spec=spec, shadow_version=shadow.version if shadow else None, token=token)
