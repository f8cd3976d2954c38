"""Ray Serve application ``act``: the registry's policy for an alias behind an HTTP endpoint.

``POST {url}/act`` takes the K most recent frames (oldest first) and returns one action;
``GET {url}/healthz`` says which model version answers; ``GET {url}/openapi.json`` describes both.
``deploy`` starts Serve if needed and rolls the application to the version the alias points at
now: calling it again after a promotion replaces the replica in place at the same URL, and the
old replica keeps answering until the new one is ready (``max_surge_percent=100``).
"""

import base64
import binascii
import io
import time
from typing import Literal

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.context import _get_global_client

from models.policy import load
from models.registry import Registry

Encoding = Literal["png_base64", "raw_base64", "list"]
FrameList = list[list[list[int]]]


class ActRequest(BaseModel):
    """The K most recent camera frames, oldest first."""

    frames: list[str | FrameList] = Field(
        description="Exactly K frames (K = the policy's history), oldest first, each HxWx3 uint8 RGB "
                    "(H = W = the policy's image size; see GET /healthz). With encoding `png_base64` each "
                    "frame is a base64 8-bit RGB PNG; with `raw_base64` the base64 of the H*W*3 raw bytes "
                    "in row-major HWC order; with `list` nested lists [H][W][3] of integers 0..255.",
        examples=[["<base64 of 32*32*3 bytes>", "<base64 of 32*32*3 bytes>"]])
    encoding: Encoding = Field(
        description="How each frame is encoded: `raw_base64` (fastest), `png_base64` or `list`.",
        examples=["raw_base64"])


class Action(BaseModel):
    """One driving action."""

    steer: float = Field(ge=-1.0, le=1.0, description="Steering in [-1, 1]; positive turns right.",
                         examples=[0.1])
    gas: float = Field(ge=0.0, le=1.0, description="Throttle in [0, 1].", examples=[0.6])
    brake: float = Field(ge=0.0, le=1.0, description="Brake in [0, 1].", examples=[0.0])


class ActResponse(BaseModel):
    """The policy's action for the given frames and the model version that produced it."""

    action: Action
    model_name: str = Field(description="Registry name of the serving model.", examples=["policy"])
    model_version: int = Field(description="Registry version of the serving model.", examples=[3])
    latency_ms: float = Field(description="Server-side time to decode the frames and run the policy, "
                                          "in milliseconds (excludes network and HTTP parsing).",
                              examples=[2.5])


class Health(BaseModel):
    """Liveness and identity of the serving replica."""

    status: Literal["ok"] = Field(description="Always `ok` when the replica answers.")
    model_name: str = Field(description="Registry name of the serving model.", examples=["policy"])
    model_version: int = Field(description="Registry version of the serving model.", examples=[3])
    history: int = Field(description="K: the number of frames POST /act expects.", examples=[3])
    image_size: int = Field(description="H = W of each frame in pixels.", examples=[64])


class ErrorResponse(BaseModel):
    """A request that was well-formed JSON but did not hold valid frames."""

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
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise FrameError(f"{where}: not a decodable PNG ({e})") from None


def _decode_one(frame: str | FrameList, encoding: Encoding, shape: tuple[int, int, int], where: str) -> np.ndarray:
    if encoding == "list":
        if isinstance(frame, str):
            raise FrameError(f"{where}: encoding 'list' expects nested lists [H][W][3] of integers, got a string")
        try:
            arr = np.asarray(frame, dtype=np.int64)
        except ValueError:
            raise FrameError(f"{where}: ragged nested lists; expected shape {shape}") from None
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


app = FastAPI(title="worldloop act", version="1",
              description="A pixels-to-action driving policy from the worldloop model registry.")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32, max_surge_percent=100)
@serve.ingress(app)
class ActDeployment:
    """One replica holding one registered policy version."""

    def __init__(self, *, registry_uri: str, model_name: str, version: int,
                 storage_options: dict[str, str] | None = None) -> None:
        import torch

        torch.set_num_threads(1)  # replicas share small machines; one inference thread each
        registry = Registry(registry_uri, storage_options)
        mv = registry.get(model_name, version=version)
        if mv is None:
            raise LookupError(f"model {model_name!r} v{version} is not in the registry at {registry_uri}")
        self.policy = load(registry.fetch(mv))
        self.model_name, self.model_version = mv.name, mv.version

    @app.get("/healthz", response_model=Health)
    def healthz(self) -> Health:
        c = self.policy.config
        return Health(status="ok", model_name=self.model_name, model_version=self.model_version,
                      history=c.history, image_size=c.image_size)

    @app.post("/act", response_model=ActResponse, responses={400: {"model": ErrorResponse}})
    def act(self, request: ActRequest) -> ActResponse:
        t0 = time.perf_counter()
        c = self.policy.config
        try:
            frames = decode_frames(request.frames, request.encoding, history=c.history, image_size=c.image_size)
        except FrameError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        steer, gas, brake = (float(v) for v in self.policy.act(frames[None])[0])
        return ActResponse(action=Action(steer=steer, gas=gas, brake=brake), model_name=self.model_name,
                           model_version=self.model_version, latency_ms=(time.perf_counter() - t0) * 1e3)


def build_app(*, registry_uri: str, model_name: str, alias: str = "champion",
              storage_options: dict[str, str] | None = None, num_replicas: int = 1) -> serve.Application:
    """The bound application serving the version ``alias`` points at now.

    Replicas get the registry's absolute URI and the given ``storage_options`` (not the AWS_*
    environment of this process: on a cluster, give the workers their own credentials).
    """
    registry = Registry(registry_uri, storage_options)
    mv = registry.get(model_name, alias=alias)
    if mv is None:
        raise LookupError(f"model {model_name!r} has no version with alias {alias!r} in the registry at "
                          f"{registry_uri}")
    if mv.kind != "policy":
        raise ValueError(f"{model_name} v{mv.version} is a {mv.kind!r} model; the act endpoint serves policies")
    return ActDeployment.options(num_replicas=num_replicas).bind(
        registry_uri=registry.uri, model_name=model_name, version=mv.version, storage_options=storage_options)


def deploy(*, registry_uri: str, model_name: str, alias: str = "champion",
           storage_options: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 8000,
           app_name: str = "act", num_replicas: int = 1, route_prefix: str | None = None) -> str:
    """Serve (or roll to) the policy ``alias`` points at; returns the application's base URL.

    Serve is started on ``host:port`` unless it already runs, in which case its existing HTTP
    address is kept (Serve cannot move it) and reflected in the returned URL. The route prefix
    defaults to ``/<app_name>``, so several applications share one Serve instance.
    """
    application = build_app(registry_uri=registry_uri, model_name=model_name, alias=alias,
                            storage_options=storage_options, num_replicas=num_replicas)
    serve.start(http_options={"host": host, "port": port})
    prefix = route_prefix or f"/{app_name}"
    serve.run(application, name=app_name, route_prefix=prefix)
    http = _get_global_client().http_config
    url_host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    return f"http://{url_host}:{http.port}{prefix}"
