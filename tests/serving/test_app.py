"""The act endpoint on a real Ray Serve instance, over real HTTP."""
from __future__ import annotations

import base64
import io
import socket
import threading

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from models.policy import Policy, preset, save
from models.registry import Registry
from serving.app import build_app, deploy
from serving.client import ActClient, ActError

APP = "act_test"
CFG = preset("tiny")
SHAPE = (CFG.history, CFG.image_size, CFG.image_size, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _register_policy(registry: Registry, tmp_path, seed: int) -> tuple[Policy, int]:
    torch.manual_seed(seed)
    policy = Policy(CFG).eval()
    save(policy, tmp_path / f"ckpt{seed}")
    mv = registry.register("driver", tmp_path / f"ckpt{seed}", kind="policy")
    registry.set_alias("driver", "champion", mv.version)
    return policy, mv.version


def _png(frame: np.ndarray, mode: str = "RGB") -> str:
    buf = io.BytesIO()
    Image.fromarray(frame).convert(mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _raw(frame: np.ndarray) -> str:
    return base64.b64encode(frame.tobytes()).decode()


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """A tiny random policy registered as champion v1 and served on a free port."""
    tmp = tmp_path_factory.mktemp("serving")
    registry = Registry(tmp / "lake")
    policy, _ = _register_policy(registry, tmp, seed=1)
    port = _free_port()
    try:
        url = deploy(registry_uri=registry.uri, model_name="driver", port=port, app_name=APP)
        yield {"url": url, "port": port, "registry": registry, "policy": policy, "tmp": tmp}
    finally:
        from ray import serve
        serve.delete(APP)


@pytest.fixture
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)


def test_healthz_names_the_champion(served):
    body = requests.get(f"{served['url']}/healthz", timeout=10).json()
    assert body == {"status": "ok", "model_name": "driver", "model_version": 1,
                    "history": CFG.history, "image_size": CFG.image_size}


@pytest.mark.parametrize("encoding", ["raw_base64", "png_base64", "list"])
def test_act_with_each_encoding_matches_the_policy(served, frames, encoding):
    encode = {"raw_base64": _raw, "png_base64": _png, "list": np.ndarray.tolist}[encoding]
    r = requests.post(f"{served['url']}/act", timeout=10,
                      json={"encoding": encoding, "frames": [encode(f) for f in frames]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"]) == ("driver", 1) and body["latency_ms"] > 0
    action = [body["action"][k] for k in ("steer", "gas", "brake")]
    np.testing.assert_allclose(action, served["policy"].act(frames[None])[0], atol=1e-5)


def test_client_acts_and_keeps_the_version(served, frames):
    with ActClient(served["url"]) as client:
        action = client.act(frames)
        assert action.dtype == np.float32 and action.shape == (3,)
        assert -1 <= action[0] <= 1 and 0 <= action[1] <= 1 and 0 <= action[2] <= 1
        assert client.model_version == 1 and client.health()["status"] == "ok"
        with pytest.raises(ActError, match="expected exactly 2 frames") as err:
            client.act(frames[:1])
        assert err.value.status_code == 400


@pytest.mark.parametrize("payload, status, message", [
    ({"encoding": "raw_base64", "frames": ["AAAA"] * 3}, 400, "expected exactly 2 frames"),
    ({"encoding": "raw_base64", "frames": [_raw(np.zeros(SHAPE[1:], np.uint8)), "not base64!"]}, 400,
     "frames[1]: invalid base64"),
    ({"encoding": "raw_base64", "frames": [_raw(np.zeros((8, 8, 3), np.uint8))] * 2}, 400,
     "frames[0]: raw frame has 192 bytes, expected 32*32*3"),
    ({"encoding": "list", "frames": [np.zeros((16, 16, 3), int).tolist()] * 2}, 400,
     "frames[0]: expected shape (32, 32, 3), got (16, 16, 3)"),
    ({"encoding": "list", "frames": [np.full(SHAPE[1:], 300).tolist()] * 2}, 400,
     "frames[0]: values must be in 0..255"),
    ({"encoding": "list", "frames": ["AAAA"] * 2}, 400, "encoding 'list' expects nested lists"),
    ({"encoding": "png_base64", "frames": [_png(np.zeros(SHAPE[1:], np.uint8), "RGBA")] * 2}, 400,
     "frames[0]: expected an 8-bit RGB PNG"),
    ({"encoding": "png_base64", "frames": [_raw(np.zeros(SHAPE[1:], np.uint8))] * 2}, 400,
     "frames[0]: not a decodable PNG"),
    ({"encoding": "jpeg", "frames": []}, 422, "png_base64"),
    ({"frames": []}, 422, "encoding"),
])
def test_malformed_requests_get_a_clear_4xx(served, payload, status, message):
    r = requests.post(f"{served['url']}/act", json=payload, timeout=10)
    assert r.status_code == status and message in r.text, r.text


def test_bad_json_is_a_422(served):
    r = requests.post(f"{served['url']}/act", data=b"{not json", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text


def test_openapi_describes_the_schemas(served):
    spec = requests.get(f"{served['url']}/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    assert {"ActRequest", "ActResponse", "Action", "Health", "ErrorResponse"} <= set(schemas)
    assert set(schemas["ActRequest"]["properties"]["encoding"]["enum"]) == {"png_base64", "raw_base64", "list"}
    assert "oldest first" in schemas["ActRequest"]["properties"]["frames"]["description"]
    assert schemas["Action"]["properties"]["steer"]["maximum"] == 1
    act = spec["paths"]["/act"]["post"]
    assert set(act["responses"]) >= {"200", "400", "422"}


def test_build_app_needs_the_alias(served):
    with pytest.raises(LookupError, match="no version with alias 'staging'"):
        build_app(registry_uri=served["registry"].uri, model_name="driver", alias="staging")


def test_redeploy_after_promotion_rolls_in_place_without_dropping_requests(served, frames):
    """Last in the module: promotes v2 and redeploys while a client keeps asking."""
    _, v2 = _register_policy(served["registry"], served["tmp"], seed=2)
    statuses: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                statuses.append(s.get(f"{served['url']}/healthz", timeout=10).status_code)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        url = deploy(registry_uri=served["registry"].uri, model_name="driver", port=served["port"], app_name=APP)
    finally:
        stop.set()
        poller.join(timeout=20)
    assert url == served["url"]
    with ActClient(url) as client:
        assert client.health()["model_version"] == v2 == 2
        client.act(frames)
        assert client.model_version == 2
    assert statuses and set(statuses) == {200}
