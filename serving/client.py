"""HTTP client for the ``act`` endpoint (serving/app.py): frames (+ state, task) in, an action out.

The client reads what the endpoint needs (its world, action names in order, state names, tasks)
from ``GET /healthz`` once, so it names no world's fields itself."""
from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np
import requests


class ActError(RuntimeError):
    """The endpoint answered with a non-2xx status; ``message`` is the server's explanation."""

    def __init__(self, status_code: int, message: str, url: str) -> None:
        super().__init__(f"{url} answered {status_code}: {message}")
        self.status_code, self.message, self.url = status_code, message, url


def _server_message(response: requests.Response) -> str:
    """The server's error text: FastAPI's ``detail`` (a string or a list of field errors)."""
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text.strip() or response.reason
    if isinstance(detail, list):  # pydantic validation errors
        return "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in detail)
    return str(detail)


class ActClient:
    """A session to one ``act`` application; ``url`` is what ``serving.app.deploy`` returned.

    ``world``: the world the caller expects (None: whichever the endpoint serves); a different
    one is an error at the first call. ``model_name`` / ``model_version`` hold the identity
    reported by the latest answer.
    """

    def __init__(self, url: str, timeout: float = 10.0, world: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.world = world
        self.session = requests.Session()
        self.model_name: str | None = None
        self.model_version: int | None = None
        self._interface: dict[str, Any] | None = None

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        url = f"{self.url}{path}"
        response = self.session.request(method, url, timeout=self.timeout, **kwargs)
        if not response.ok:
            raise ActError(response.status_code, _server_message(response), url)
        body = response.json()
        self.model_name, self.model_version = body["model_name"], body["model_version"]
        return body

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: status, model name and version, world, history K, image size, and the
        names of the actions, state fields and tasks of the endpoint's interface."""
        body = self._call("GET", "/healthz")
        if self.world is not None and body.get("world") != self.world:
            raise ValueError(f"{self.url} serves world {body.get('world')!r}, not {self.world!r}")
        self._interface = body
        return body

    @property
    def interface(self) -> dict[str, Any]:
        """The latest ``health()`` answer (fetched on first use)."""
        return self._interface if self._interface is not None else self.health()

    @property
    def action_names(self) -> list[str]:
        """The action's fields in the world's order: the order of ``act``'s result."""
        return list(self.interface["actions"])

    def act(self, frames_KHWC: np.ndarray, state: np.ndarray | Mapping[str, float] | None = None,
            task: str | None = None) -> np.ndarray:
        """The action float32 [A] (in ``action_names`` order) for the K most recent frames, oldest first.

        ``state``: the policy's state at the latest frame, float [S] in the order of
        ``interface["state"]`` or a {name: value} mapping; an empty one is not sent.
        ``task``: a task name or its instruction; like ``Policy.act``, it is not sent to an endpoint
        whose policy reads no task (``interface["tasks"]`` empty), so a fleet may always pass it.
        """
        frames = np.asarray(frames_KHWC)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [K, H, W, 3], got {frames.dtype} {frames.shape}")
        interface = self.interface  # the first call asks /healthz (and checks the world)
        payload: dict[str, Any] = {
            "encoding": "raw_base64",
            "frames": [base64.b64encode(np.ascontiguousarray(f).tobytes()).decode("ascii") for f in frames]}
        if state is not None and len(state):
            payload["state"] = self._state(state)
        if task is not None and interface.get("tasks"):
            payload["task"] = task
        body = self._call("POST", "/act", json=payload)
        if body.get("world") != interface.get("world"):
            self.health()  # the endpoint was rolled to another world since the last look
        action = body["action"]
        return np.array([action[n] for n in self.action_names], dtype=np.float32)

    def _state(self, state: np.ndarray | Mapping[str, float]) -> dict[str, float]:
        if isinstance(state, Mapping):
            return {str(k): float(v) for k, v in state.items()}
        names = list(self.interface.get("state", ()))
        values = np.asarray(state, dtype=np.float64).reshape(-1)
        if values.shape != (len(names),):
            wanted = ", ".join(names) or "this endpoint takes no state"
            raise ValueError(f"state must hold {len(names)} values ({wanted}), got shape {np.shape(state)}")
        return dict(zip(names, map(float, values)))

    def close(self) -> None:
        """Close the HTTP session."""
        self.session.close()

    def __enter__(self) -> ActClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
