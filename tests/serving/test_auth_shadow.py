"""Bearer-token auth and a challenger in shadow, on a real Ray Serve instance over real HTTP: one act
application with a token, the champion v1 answering and v2 (then a broken v3) in shadow."""
from __future__ import annotations

import base64

import numpy as np
import pytest
import requests
import torch

from models.policy import Policy, preset, save
from serving.app import deploy, deploy_world
from serving.common import TOKEN_ENV, api_token
from stages.registry import Registry
from tests.conftest import free_port

APP = "auth_shadow_test"
CFG = preset("tiny")
TOKEN = "s3cret-token"


def _register(registry: Registry, tmp, seed: int, *, broken: bool = False) -> tuple[Policy, int]:
    torch.manual_seed(seed)
    policy = Policy(CFG).eval()
    if broken:  # a candidate whose weights went bad: every action it computes is NaN
        with torch.no_grad():
            for p in policy.parameters():
                p.fill_(float("nan"))
    save(policy, tmp / f"p{seed}")
    return policy, registry.register("driver", tmp / f"p{seed}", kind="policy").version


def _body(seed: int) -> dict:
    frames = np.random.default_rng(seed).integers(0, 256, (CFG.history, CFG.image_size, CFG.image_size, 3), np.uint8)
    return {"encoding": "raw_base64", "frames": [base64.b64encode(f.tobytes()).decode() for f in frames]}, frames


def _deploy(registry: Registry, port: int) -> str:
    """Deploy with the token in this process's environment only while ``deploy`` runs: the replica (a Ray
    worker started before it was set) can only have it from the deployment's arguments."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        return deploy(registry_uri=registry.uri, model_name="driver", port=port, app_name=APP,
                      shadow_alias="challenger")


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    tmp = tmp_path_factory.mktemp("auth_shadow")
    registry = Registry(str(tmp / "lake"))
    champion, v1 = _register(registry, tmp, seed=1)
    _, v2 = _register(registry, tmp, seed=2)
    registry.set_alias("driver", "champion", v1)
    registry.set_alias("driver", "challenger", v2)
    port = free_port()
    try:
        yield {"url": _deploy(registry, port), "port": port, "registry": registry, "tmp": tmp, "champion": champion}
    finally:
        serve.delete(APP)


def _auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_requests_without_the_right_token_get_401(served):
    url = served["url"]
    body, _ = _body(0)
    for headers in ({}, _auth("wrong"), {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        for method, path, kw in (("POST", "/act", {"json": body}), ("GET", "/shadow", {}),
                                 ("GET", "/openapi.json", {})):
            r = requests.request(method, f"{url}{path}", headers=headers, timeout=10, **kw)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.headers["WWW-Authenticate"].startswith("Bearer") and "bearer token" in r.json()["detail"]
    assert requests.get(f"{url}/healthz", timeout=10).json()["model_version"] == 1  # open: probes need no token
    r = requests.post(f"{url}/act", json=body, headers=_auth(), timeout=10)
    assert r.status_code == 200 and r.json()["model_version"] == 1, r.text
    schema = requests.get(f"{url}/openapi.json", headers=_auth(), timeout=10).json()
    assert schema["paths"]["/act"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_non_loopback_host_without_a_token_is_refused(monkeypatch, served):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for host in ("0.0.0.0", "10.1.2.3"):
        with pytest.raises(PermissionError, match=f"refusing to serve on '{host}' without authentication: set "
                                                  f"{TOKEN_ENV}"):
            deploy(registry_uri=served["registry"].uri, model_name="driver", host=host, app_name="never")
        with pytest.raises(PermissionError, match=TOKEN_ENV):
            deploy_world(registry_uri=served["registry"].uri, host=host)
    assert api_token("127.0.0.1") is None
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert api_token("0.0.0.0") == TOKEN


def _shadow(url: str) -> dict:
    r = requests.get(f"{url}/shadow", headers=_auth(), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_shadow_compares_the_challenger_and_answers_with_the_champion(served):
    url = served["url"]
    before = _shadow(url)
    assert before["challenger_version"] == 2 and before["failures"] == 0
    for seed in range(6):
        body, frames = _body(seed)
        r = requests.post(f"{url}/act", json=body, headers=_auth(), timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == 1, r.text
        action = [r.json()["action"][k] for k in ("steer", "gas", "brake")]
        np.testing.assert_allclose(action, served["champion"].act(frames[None])[0], atol=1e-5)
    after = _shadow(url)
    assert after["requests"] == before["requests"] + 6 and after["failures"] == 0
    assert after["mean_abs_difference"] > 0 and 0 <= after["agreement"] <= 1  # two random policies differ


def test_a_broken_challenger_never_breaks_the_champions_answer(served):
    registry = served["registry"]
    _, v3 = _register(registry, served["tmp"], seed=3, broken=True)
    registry.set_alias("driver", "challenger", v3)
    url = _deploy(registry, served["port"])  # rolls the application in place
    assert _shadow(url)["challenger_version"] == v3
    for seed in range(4):
        body, _ = _body(seed)
        r = requests.post(f"{url}/act", json=body, headers=_auth(), timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == 1, r.text
    stats = _shadow(url)
    assert (stats["requests"], stats["failures"], stats["mean_abs_difference"]) == (0, 4, None), stats
