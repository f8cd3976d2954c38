"""Ray Serve application ``act``: the registry's policy for an alias behind an HTTP endpoint, for one world.

``POST {url}/act`` takes the K most recent frames (oldest first), the policy's state inputs and the
task when the world and the policy have them, and returns one action; ``GET {url}/healthz`` says
which model version and world answer and what a request needs; ``GET {url}/openapi.json`` describes
both. The request and response models are generated from the world's spec (``sim.worlds``) and the
policy's config: one named, bounded field per action, one named float per ``policy_state`` entry,
the world's task names and instructions as an enum. Nothing here names a world's fields.

``deploy`` starts Serve if needed and rolls the application to the version the alias points at
now: calling it again after a promotion replaces the replica in place at the same URL, and the
old replica keeps answering until the new one is ready (``max_surge_percent=100``).
"""

import base64
import binascii
import io
import time
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from ray import serve
from ray.serve.context import _get_global_client

from models.policy import PolicyConfig, config_from_dict, load
from models.text import words
from sim import worlds
from sim.worlds.base import WorldSpec
from stages.registry import Registry

Encoding = Literal["png_base64", "raw_base64", "list"]
FrameList = list[list[list[int]]]


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


class ErrorResponse(BaseModel):
    """A request that passed the schema but did not hold valid frames (or float32 state values)."""

    detail: str = Field(description="What was wrong with the request.",
                        examples=["frames[1]: expected shape (64, 64, 3), got (32, 32, 3)"])


class FrameError(ValueError):
    """A frame that cannot be decoded into an HxWx3 uint8 array."""


def _decode_png(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG" or img.mode != "RGB":
                raise FrameError(f"{where}: expected an 8-bit RGB PNG, got {img.format} in mode {img.mode}")
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, FrameError):
            raise
        raise FrameError(f"{where}: not a decodable PNG ({e})") from None


def _decode_one(frame: str | FrameList, encoding: Encoding, shape: tuple[int, int, int], where: str) -> np.ndarray:
    if encoding == "list":
        if isinstance(frame, str):
            raise FrameError(f"{where}: encoding 'list' expects nested lists [H][W][3] of integers, got a string")
        try:
            arr = np.asarray(frame, dtype=np.int64)
        except (ValueError, OverflowError, TypeError):
            raise FrameError(f"{where}: ragged nested lists or integers out of range; expected shape {shape} "
                             "of integers 0..255") from None
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise FrameError(f"{where}: values must be in 0..255, got min {arr.min()} and max {arr.max()}")
        arr = arr.astype(np.uint8)
    else:
        if not isinstance(frame, str):
            raise FrameError(f"{where}: encoding {encoding!r} expects a base64 string, got nested lists")
        try:
            data = base64.b64decode(frame, validate=True)
        except (binascii.Error, ValueError) as e:
            raise FrameError(f"{where}: invalid base64 ({e})") from None
        if encoding == "png_base64":
            arr = _decode_png(data, where)
        elif len(data) != int(np.prod(shape)):
            raise FrameError(f"{where}: raw frame has {len(data)} bytes, expected "
                             f"{'*'.join(map(str, shape))} = {int(np.prod(shape))} (HxWx3 uint8)")
        else:
            arr = np.frombuffer(data, dtype=np.uint8).reshape(shape)
    if arr.shape != shape:
        raise FrameError(f"{where}: expected shape {shape}, got {arr.shape}")
    return arr


def decode_frames(frames: list[str | FrameList], encoding: Encoding, *, history: int, image_size: int) -> np.ndarray:
    """Decode a request's frames into uint8 [K, H, W, 3]; raises FrameError naming the bad frame."""
    if len(frames) != history:
        raise FrameError(f"expected exactly {history} frames (the policy's history K, oldest first), "
                         f"got {len(frames)}")
    shape = (image_size, image_size, 3)
    return np.stack([_decode_one(f, encoding, shape, f"frames[{i}]") for i, f in enumerate(frames)])


# --- the world's interface -------------------------------------------------------------------------------

def policy_tasks(spec: WorldSpec, policy_config: PolicyConfig) -> tuple[str, ...]:
    """The world's task names whose instructions the policy reads (every word in its ``task_vocab``);
    () = the policy reads no task."""
    vocab = set(policy_config.task_vocab)
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
    if c.task_vocab and not policy_tasks(spec, c):
        raise ValueError(f"{who} reads task instructions but knows the words of none of world {spec.name!r}'s "
                         f"tasks {list(spec.task_names)}")


def _black_png(image_size: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (image_size, image_size)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _named(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Float fields {name: Field kwargs} keyed by the world's names (any string) through aliases, so
    that no name can clash with pydantic's own attributes; dump ``by_alias=True`` to get the names back."""
    return {f"f{i}": (float, Field(alias=name, title=name, **kw)) for i, (name, kw) in enumerate(fields.items())}


def make_models(spec: WorldSpec, *, history: int, image_size: int,
                tasks: tuple[str, ...] = ()) -> tuple[type[BaseModel], type[BaseModel]]:
    """(ActRequest, ActResponse) for the world ``spec`` and a policy reading ``history`` frames of
    ``image_size`` pixels, its ``policy_state`` and (when ``tasks`` is not empty) one of ``tasks``."""
    K, S, size = history, len(spec.policy_state), f"{image_size}x{image_size}x3"
    fields: dict[str, Any] = {}
    fields["frames"] = (list[str | FrameList], Field(
        description=f"Exactly K = {K} frames (the policy's history), oldest first, each HxWx3 = {size} uint8 RGB "
                    f"from the world's `{spec.camera}` camera. With encoding `png_base64` each frame is a base64 "
                    f"8-bit RGB PNG; with `raw_base64` the base64 of the {image_size}*{image_size}*3 raw bytes in "
                    f"row-major HWC order; with `list` nested lists [{image_size}][{image_size}][3] of integers "
                    "0..255.",
        json_schema_extra={"minItems": K, "maxItems": K}))
    fields["encoding"] = (Encoding, Field(
        description="How each frame is encoded: `raw_base64` (fastest), `png_base64` or `list`.",
        examples=["raw_base64"]))
    example: dict[str, Any] = {"frames": [_black_png(image_size)] * K, "encoding": "png_base64"}
    if S:
        State = create_model(
            "State", __config__=ConfigDict(extra="forbid"), __doc__=(
                f"The policy's {S} state inputs at the latest frame, named as world {spec.name!r}'s "
                "`policy_state`; every field is required."),
            **_named({n: dict(allow_inf_nan=False, examples=[0.0],
                              description=f"`{n}`: state input {i + 1} of {S} (a finite float).")
                      for i, n in enumerate(spec.policy_state)}))
        fields["state"] = (State, Field(description=f"The state at the latest frame: one finite float per name "
                                                    f"({', '.join(spec.policy_state)})."))
        example["state"] = {n: 0.0 for n in spec.policy_state}
    if tasks:
        choices = tuple(tasks) + tuple(spec.instruction(t) for t in tasks)
        default = {"default": tasks[0]} if len(tasks) == 1 else {}
        fields["task"] = (Literal[choices], Field(
            description="What to do: a task name of world "
                        f"{spec.name!r} ({', '.join(tasks)}) or its instruction sentence.", **default))
        example["task"] = tasks[0]

    def _k_frames(cls: type, frames: list) -> list:
        if len(frames) != K:
            raise ValueError(f"expected exactly {K} frames (the policy's history K, oldest first), got {len(frames)}")
        return frames

    ActRequest = create_model(
        "ActRequest", __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [example]}),
        __doc__=f"The K = {K} most recent frames of world {spec.name!r}, oldest first"
                + (", the state" if S else "") + (", the task" if tasks else "") + ".",
        __validators__={"k_frames": field_validator("frames")(_k_frames)}, **fields)

    Action = create_model(
        "Action", __doc__=f"One action of world {spec.name!r}, one field per dimension in the world's order.",
        **_named({a.name: dict(ge=a.low, le=a.high, examples=[round((a.low + a.high) / 2, 6)],
                               description=f"{a.description or a.name}; in [{a.low:g}, {a.high:g}].")
                  for a in spec.actions}))
    ActResponse = create_model(
        "ActResponse", __doc__="The policy's action for the request and the model and world that produced it.",
        action=(Action, Field(description=f"The action: {', '.join(spec.action_names)}.")),
        model_name=(str, Field(description="Registry name of the serving model.", examples=["policy"])),
        model_version=(int, Field(description="Registry version of the serving model.", examples=[3])),
        world=(str, Field(description="The world the action is for.", examples=[spec.name])),
        latency_ms=(float, Field(description="Server-side time to decode the request and run the policy, in "
                                             "milliseconds (excludes network and HTTP parsing).", examples=[2.5])))
    return ActRequest, ActResponse


def _brief(error: dict[str, Any]) -> dict[str, Any]:
    msg, why = error["msg"], error.get("ctx", {}).get("error")
    if isinstance(why, str):  # e.g. the position of a JSON syntax error
        msg = f"{msg}: {why}"
    return {"type": error["type"], "loc": list(error["loc"]), "msg": msg}


def make_api(spec: WorldSpec, policy: Any, *, model_name: str, model_version: int) -> FastAPI:
    """The FastAPI app serving ``policy`` (a ``models.policy.Policy``) for the world ``spec``."""
    c = policy.config
    check_policy(spec, c, f"{model_name} v{model_version}")
    tasks = policy_tasks(spec, c)
    ActRequest, ActResponse = make_models(spec, history=c.history, image_size=c.image_size, tasks=tasks)
    state_names = spec.policy_state
    app = FastAPI(title=f"worldloop act: {spec.name}", version="2",
                  description=f"A pixels{'+state' if state_names else ''}{'+task' if tasks else ''}-to-action policy "
                              f"from the worldloop model registry, for world {spec.name!r}: {spec.description}")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 without the echo of the (possibly megabytes of) input."""
        return JSONResponse(status_code=422, content={"detail": [_brief(e) for e in exc.errors()]})

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok", model_name=model_name, model_version=model_version, world=spec.name,
                      history=c.history, image_size=c.image_size, actions=list(spec.action_names),
                      state=list(state_names), tasks=list(tasks))

    @app.post("/act", response_model=ActResponse, responses={400: {"model": ErrorResponse}})
    def act(request: ActRequest) -> ActResponse:
        t0 = time.perf_counter()
        try:
            frames = decode_frames(request.frames, request.encoding, history=c.history, image_size=c.image_size)
        except FrameError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        state = None
        if state_names:
            values = request.state.model_dump(by_alias=True)
            with np.errstate(over="ignore"):
                state = np.array([[values[n] for n in state_names]], np.float32)
            if not np.isfinite(state).all():
                bad = [n for n, v in zip(state_names, state[0]) if not np.isfinite(v)]
                raise HTTPException(status_code=400, detail=f"state {', '.join(bad)}: beyond float32 range")
        task = None
        if tasks:  # the policy reads the instruction sentence
            task = [next(t.instruction for t in spec.tasks if request.task in (t.name, t.instruction))]
        raw = spec.clip_action(policy.act(frames[None], state, task)[0], f"{model_name} v{model_version}")
        # clip again in float64: a float32 bound such as 0.1 may lie just outside the spec's
        action = {a.name: min(max(float(v), a.low), a.high) for a, v in zip(spec.actions, raw)}
        return ActResponse(action=action, model_name=model_name, model_version=model_version, world=spec.name,
                           latency_ms=(time.perf_counter() - t0) * 1e3)

    return app


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32, max_surge_percent=100)
@serve.ingress()
class ActDeployment:
    """One replica holding one registered policy version for one world (its app is built at init)."""

    def __init__(self, *, registry_uri: str, model_name: str, version: int,
                 storage_options: dict[str, str] | None = None, world: str = worlds.DEFAULT,
                 world_spec: WorldSpec | None = None) -> None:
        import torch

        torch.set_num_threads(1)  # replicas share small machines; one inference thread each
        if world_spec is None:
            import sim.worlds

            world_spec = sim.worlds.spec(world)
        if world_spec.name != world:
            raise ValueError(f"world_spec is for world {world_spec.name!r}, not {world!r}")
        registry = Registry(registry_uri, storage_options)
        mv = registry.get(model_name, version=version)
        if mv is None:
            raise LookupError(f"model {model_name!r} v{version} is not in the registry at {registry_uri}")
        self.policy = load(registry.fetch(mv))
        self.spec = world_spec
        self.model_name, self.model_version = mv.name, mv.version

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.spec, self.policy, model_name=self.model_name, model_version=self.model_version)


def build_app(*, registry_uri: str, model_name: str, alias: str = "champion",
              storage_options: dict[str, str] | None = None, num_replicas: int = 1,
              world: str = worlds.DEFAULT) -> serve.Application:
    """The bound application serving the version ``alias`` points at now, for the registered ``world``.

    The world's spec is read here (``sim.worlds.spec(world)``) and travels to the replicas with its
    name, so any world registered in this process can be served. Replicas get the registry's
    absolute URI and the given ``storage_options`` (not the AWS_* environment of this process: on a
    cluster, give the workers their own credentials).
    """
    import sim.worlds

    spec = sim.worlds.spec(world)
    registry = Registry(registry_uri, storage_options)
    mv = registry.get(model_name, alias=alias)
    if mv is None:
        raise LookupError(f"model {model_name!r} has no version with alias {alias!r} in the registry at "
                          f"{registry_uri}")
    if mv.kind != "policy":
        raise ValueError(f"{model_name} v{mv.version} is a {mv.kind!r} model; the act endpoint serves policies")
    check_policy(spec, config_from_dict(mv.config or {}), f"{model_name} v{mv.version}")
    return ActDeployment.options(num_replicas=num_replicas).bind(
        registry_uri=registry.uri, model_name=model_name, version=mv.version, storage_options=storage_options,
        world=world, world_spec=spec)


def deploy(*, registry_uri: str, model_name: str, alias: str = "champion",
           storage_options: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 8000,
           app_name: str = "act", num_replicas: int = 1, route_prefix: str | None = None,
           world: str = worlds.DEFAULT) -> str:
    """Serve (or roll to) the policy ``alias`` points at, for ``world``; returns the application's base URL.

    Serve is started on ``host:port`` unless it already runs, in which case its existing HTTP
    address is kept (Serve cannot move it) and reflected in the returned URL. The route prefix
    defaults to ``/<app_name>``, so several applications share one Serve instance.
    """
    application = build_app(registry_uri=registry_uri, model_name=model_name, alias=alias,
                            storage_options=storage_options, num_replicas=num_replicas, world=world)
    serve.start(http_options={"host": host, "port": port})
    prefix = route_prefix or f"/{app_name}"
    serve.run(application, name=app_name, route_prefix=prefix)
    http = _get_global_client().http_config
    url_host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    return f"http://{url_host}:{http.port}{prefix}"
