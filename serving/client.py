"""HTTP client for the ``act`` endpoint (serving/app.py): frames in, an action out."""
from __future__ import annotations

import base64
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

    ``model_name`` / ``model_version`` hold the identity reported by the latest answer.
    """

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.model_name: str | None = None
        self.model_version: int | None = None

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        url = f"{self.url}{path}"
        response = self.session.request(method, url, timeout=self.timeout, **kwargs)
        if not response.ok:
            raise ActError(response.status_code, _server_message(response), url)
        body = response.json()
        self.model_name, self.model_version = body["model_name"], body["model_version"]
        return body

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: status, model name and version, history K and image size."""
        return self._call("GET", "/healthz")

    def act(self, frames_KHWC: np.ndarray) -> np.ndarray:
        """The action float32 [3] = (steer, gas, brake) for the K most recent frames, oldest first."""
        frames = np.asarray(frames_KHWC)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [K, H, W, 3], got {frames.dtype} {frames.shape}")
        payload = {"encoding": "raw_base64",
                   "frames": [base64.b64encode(np.ascontiguousarray(f).tobytes()).decode("ascii") for f in frames]}
        action = self._call("POST", "/act", json=payload)["action"]
        return np.array([action["steer"], action["gas"], action["brake"]], dtype=np.float32)

    def close(self) -> None:
        """Close the HTTP session."""
        self.session.close()

    def __enter__(self) -> ActClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
