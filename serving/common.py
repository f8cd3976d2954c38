"""What every served application shares: limits before work, bearer-token auth, exact frame schemas
and their decoding, bounded numbers, error handlers and the deploy plumbing.

Limits run in an ASGI middleware before FastAPI parses anything: an unauthenticated request is
refused (401) before its body is read; a body over the application's size limit gets a 413 while
it streams in; a POST that is not JSON gets a 415; JSON that FastAPI would turn into a 500 or an
unbounded value (integers beyond int64, NaN / Infinity literals, nesting deeper than
``MAX_DEPTH``) gets a 422. PNG frames are checked by their header (size, mode) before a single
pixel is decoded, so a decompression bomb costs nothing. The OpenAPI schema states every frame
exactly, per encoding, so a schema-driven client can build valid requests.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import os
from typing import Annotated, Any, Literal, Union, get_args

import numpy as np
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, Field, StringConstraints
from starlette.routing import Match

TOKEN_ENV = "WORLDLOOP_API_TOKEN"  # the bearer token every route but /healthz needs, when set
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_DEPTH = 32  # JSON nesting (the deepest valid request: a list frame, 5 levels)
INT64 = 2 ** 63
FLOAT32_MAX = float(np.finfo(np.float32).max)
PUBLIC = ("/healthz",)
MAX_ERRORS = 5  # validation errors listed in a 422 (a frame of bad pixels has thousands)
Encoding = Literal["png_base64", "raw_base64", "list"]
ENCODINGS = get_args(Encoding)


class ErrorResponse(BaseModel):
    """A request refused with a reason."""

    detail: str = Field(description="What was wrong with the request.",
                        examples=["frames[1]: PNG is 32x32, expected 64x64"])


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Frames that do not decode (a PNG of the wrong size, mode, "
                                                 "or not a PNG)."},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token (only when the service has one)."},
    413: {"model": ErrorResponse, "description": "The body is larger than this application accepts."},
    415: {"model": ErrorResponse, "description": "The body is not `application/json`."},
}


class FrameError(ValueError):
    """A frame that cannot be decoded into an HxWx3 uint8 array."""


# --- exact frame types, per encoding ---------------------------------------------------------------------

def raw_frame_type(image_size: int) -> Any:
    """A base64 string of exactly H*W*3 raw bytes (no padding: the byte count is a multiple of 3)."""
    n = 4 * image_size * image_size  # = 4/3 * H*W*3 characters
    return Annotated[str, StringConstraints(min_length=n, max_length=n, pattern=f"^[A-Za-z0-9+/]{{{n}}}$"),
                     Field(description=f"base64 of {image_size}*{image_size}*3 raw uint8 bytes, row-major HWC "
                                       f"({n} characters)", json_schema_extra={"contentEncoding": "base64"})]


def png_frame_type(image_size: int) -> Any:
    """A base64 PNG string, bounded in length (an 8-bit RGB PNG of HxW never needs more)."""
    limit = 4 * ((image_size * image_size * 3 + image_size + 4096) // 3 + 1)
    return Annotated[str, StringConstraints(
        min_length=4, max_length=limit, pattern=r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"),
        Field(description=f"base64 of an 8-bit RGB PNG of exactly {image_size}x{image_size} pixels; anything "
                          "else (another size or mode, not a PNG) is a 400",
              json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/png"})]


def _json_number(value: Any) -> Any:
    """A JSON integer may be written 104 or 104.0, but a boolean or a string is no number (pydantic's lax
    mode would take ``true`` as 1 and ``"104"`` as 104)."""
    if isinstance(value, (bool, str)):
        raise ValueError("must be a JSON number")
    return value


def list_frame_type(image_size: int) -> Any:
    """Nested lists [H][W][3] of integers 0..255."""
    pixel = Annotated[list[Annotated[int, Field(ge=0, le=255), BeforeValidator(_json_number)]],
                      Field(min_length=3, max_length=3)]
    row = Annotated[list[pixel], Field(min_length=image_size, max_length=image_size)]
    return Annotated[list[row], Field(min_length=image_size, max_length=image_size,
                                      description=f"[{image_size}][{image_size}][3] integers 0..255")]


def frames_field(frame_type: Any, count: int, description: str) -> tuple[Any, Any]:
    """A pydantic field of exactly ``count`` frames of ``frame_type``."""
    return Annotated[list[frame_type], Field(min_length=count, max_length=count, description=description)], ...


def bounded_float(description: str, **kw: Any) -> Any:
    """A finite float within float32's range (what the models compute in); strict: a JSON number, never a
    boolean or a numeric string, as the schema says."""
    kw.setdefault("ge", -FLOAT32_MAX)
    kw.setdefault("le", FLOAT32_MAX)
    return Annotated[float, Field(allow_inf_nan=False, strict=True, description=description, **kw)]


def request_variants(name: str, *, fields: dict[str, Any], frames: dict[str, tuple[Any, Any]], doc: str,
                     example: dict[str, Any]) -> Any:
    """One request model per encoding (``{name}Raw``, ``{name}Png``, ``{name}List``) sharing ``fields``,
    joined as a union discriminated by ``encoding``: each frame field ``frames[key] = (count, desc)``
    gets that encoding's exact frame type. Returns the annotated union (the route's body type)."""
    from pydantic import ConfigDict, create_model

    variants = []
    for suffix, enc, make in (("Raw", "raw_base64", raw_frame_type), ("Png", "png_base64", png_frame_type),
                              ("List", "list", list_frame_type)):
        per = {key: frames_field(make(size), count, desc) for key, (count, size, desc) in frames.items()}
        extra = {"examples": [example]} if enc == example.get("encoding") else {}
        variants.append(create_model(
            f"{name}{suffix}", __config__=ConfigDict(extra="forbid", json_schema_extra=extra or None),
            __doc__=f"{doc} Frames encoded as `{enc}`.",
            encoding=(Literal[enc], Field(description=f"How the frames are encoded: `{enc}`.")), **per, **fields))
    return Annotated[Union[tuple(variants)], Body(discriminator="encoding")]


# --- decoding ---------------------------------------------------------------------------------------------

def _decode_png(data: bytes, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """Header first (format, size, mode from PIL's lazy open), pixels only when they fit ``shape``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            if img.size != (shape[1], shape[0]):
                raise FrameError(f"{where}: PNG is {img.size[0]}x{img.size[1]}, expected {shape[1]}x{shape[0]}")
            if img.mode != "RGB":
                raise FrameError(f"{where}: expected an 8-bit RGB PNG, got mode {img.mode}")
            img.load()
            return np.asarray(img, dtype=np.uint8)
    except FrameError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FrameError(f"{where}: not a decodable PNG ({e})") from None


def decode_frame(frame: str | list, encoding: Encoding, *, image_size: int, where: str) -> np.ndarray:
    """One validated frame (its type already checked by the request model) -> uint8 [H, W, 3]."""
    shape = (image_size, image_size, 3)
    if encoding == "list":
        return np.asarray(frame, dtype=np.uint8)
    try:
        data = base64.b64decode(frame, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FrameError(f"{where}: invalid base64 ({e})") from None
    if encoding == "png_base64":
        return _decode_png(data, shape, where)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def decode_frames(frames: list, encoding: Encoding, *, image_size: int, name: str = "frames") -> np.ndarray:
    """A request's frames -> uint8 [K, H, W, 3]; raises FrameError naming the bad frame."""
    return np.stack([decode_frame(f, encoding, image_size=image_size, where=f"{name}[{i}]")
                     for i, f in enumerate(frames)])


def png_base64(frame: np.ndarray) -> str:
    """A uint8 [H, W, 3] frame as base64 PNG (examples and responses)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def raw_base64(frame: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(frame, dtype=np.uint8).tobytes()).decode("ascii")


# --- limits and auth --------------------------------------------------------------------------------------

def body_limit(*, frames: int, image_size: int) -> int:
    """Bytes a request with ``frames`` frames may take: the list encoding (<= 5 characters a value) plus room."""
    return 64 * 1024 + frames * image_size * image_size * 3 * 5


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send finite numbers")


def _bounded_int(text: str) -> int:
    if len(text) > 20 or not -INT64 <= int(text) < INT64:
        raise ValueError(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is beyond 64 bits")
    return int(text)


def _json_problem(body: bytes) -> str | None:
    """Why FastAPI should not parse this body (None: let it, syntax errors included)."""
    try:
        json.loads(body, parse_constant=_reject_constant, parse_int=_bounded_int)
    except json.JSONDecodeError:
        return None  # FastAPI reports the position
    except RecursionError:
        return "JSON nested too deeply"
    except ValueError as e:
        return str(e)
    depth = level = 0
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH:  # cheap pre-check; strings may hold brackets too
        for ch in body.translate(None, b'"\\').decode("latin-1"):
            if ch in "[{":
                level += 1
                depth = max(depth, level)
            elif ch in "]}":
                level -= 1
            if depth > MAX_DEPTH:
                return f"JSON nested deeper than {MAX_DEPTH} levels"
    return None


def _error(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


class LimitsMiddleware:
    """Auth, body size, content type and JSON sanity before the app sees a request (see the module doc)."""

    def __init__(self, app: Any, *, max_body: int, token: str | None, router: Any) -> None:
        self.app, self.max_body, self.token, self.router = app, max_body, token, router

    def _routed(self, scope: dict) -> bool:
        """Whether a route takes this method at this path (else FastAPI answers 404 or 405, unread)."""
        return any(route.matches(scope)[0] == Match.FULL for route in self.router.routes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        root, path = scope.get("root_path", ""), scope["path"]
        path = path[len(root):] if root and path.startswith(root) else path
        if self.token and path not in PUBLIC and not _authorized(headers.get("authorization", ""), self.token):
            return await _error(401, "missing or wrong bearer token: send `Authorization: Bearer <token>`",
                                {"WWW-Authenticate": 'Bearer realm="worldloop"'})(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH") or not self._routed(scope):
            return await self.app(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self._too_large(scope, receive, send)
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return await _error(415, "send the body as JSON with `Content-Type: application/json`")(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        problem = _json_problem(body) if body else None
        if problem:
            return await _error(422, [{"type": "json_invalid", "loc": ["body"], "msg": problem}])(scope, receive, send)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        await _error(413, f"body larger than {self.max_body} bytes")(scope, receive, send)


def _authorized(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _brief(error: dict[str, Any]) -> dict[str, Any]:
    msg, why = error["msg"], error.get("ctx", {}).get("error")
    if isinstance(why, str):  # e.g. the position of a JSON syntax error
        msg = f"{msg}: {why}"
    loc = list(error["loc"])
    if len(loc) > 1 and loc[1] in ENCODINGS:  # the discriminated union's tag: the client sent it
        del loc[1]
    return {"type": error["type"], "loc": loc, "msg": msg}


def harden(app: FastAPI, *, max_body: int, token: str | None) -> FastAPI:
    """Add the limits middleware, the brief 422 handler and (with a token) the bearer scheme to the
    OpenAPI schema of ``app``; returns it."""
    app.add_middleware(LimitsMiddleware, max_body=max_body, token=token, router=app.router)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 without the echo of the (possibly megabytes of) input."""
        errors = exc.errors()
        brief = [_brief(e) for e in errors[:MAX_ERRORS]]
        if len(errors) > MAX_ERRORS:
            brief.append({"type": "more", "loc": ["body"], "msg": f"and {len(errors) - MAX_ERRORS} more errors"})
        return JSONResponse(status_code=422, content={"detail": brief})

    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": f"The token in ${TOKEN_ENV}."}}
            for path, ops in schema["paths"].items():
                for op in ops.values():
                    if token and path not in PUBLIC:
                        op["security"] = [{"bearer": []}]
                    else:
                        op["responses"].pop("401", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def api_token(host: str) -> str | None:
    """The bearer token from ``$WORLDLOOP_API_TOKEN``; refuses a non-loopback ``host`` without one."""
    token = os.environ.get(TOKEN_ENV) or None
    if token is None and host not in LOOPBACK:
        raise PermissionError(f"refusing to serve on {host!r} without authentication: set {TOKEN_ENV} "
                              "(clients then send `Authorization: Bearer <token>`), or bind 127.0.0.1")
    return token
