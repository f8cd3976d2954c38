"""The act endpoint on a real Ray Serve instance, over real HTTP: the CarRacing world (pixels only) and
an arm-like test world (4 actions, 7 named state inputs, instruction-conditioned tasks)."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import sim.worlds
from models.policy import Policy, preset, save
from models.text import build_vocab
from serving.app import build_app, deploy
from serving.client import ActClient, ActError, _server_message
from sim.worlds.base import ActionSpec, TaskSpec, World
from stages.registry import Registry
from tests.conftest import free_port

APP = "act_test"
CFG = preset("tiny")
SHAPE = (CFG.history, CFG.image_size, CFG.image_size, 3)


def _register_policy(registry: Registry, tmp_path, seed: int, cfg=CFG, name: str = "driver") -> tuple[Policy, int]:
    torch.manual_seed(seed)
    policy = Policy(cfg).eval()
    save(policy, tmp_path / f"{name}{seed}")
    mv = registry.register(name, tmp_path / f"{name}{seed}", kind="policy")
    registry.set_alias(name, "champion", mv.version)
    return policy, mv.version


def _png(frame: np.ndarray, mode: str = "RGB") -> str:
    buf = io.BytesIO()
    Image.fromarray(frame).convert(mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _raw(frame: np.ndarray) -> str:
    return base64.b64encode(frame.tobytes()).decode()


def _message(r: requests.Response) -> str:
    """The error text as the client shows it ("body.task: Input should be ...")."""
    return _server_message(r)


def _assert_actions(schema: dict, spec) -> None:
    """The Action schema has exactly the spec's actions, in order, with their bounds and descriptions."""
    assert list(schema["properties"]) == list(spec.action_names) == schema["required"]
    for a in spec.actions:
        prop = schema["properties"][a.name]
        assert (prop["type"], prop["minimum"], prop["maximum"]) == ("number", a.low, a.high)
        assert a.description in prop["description"]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """A tiny random policy registered as champion v1 and served on a free port."""
    tmp = tmp_path_factory.mktemp("serving")
    registry = Registry(tmp / "lake")
    policy, _ = _register_policy(registry, tmp, seed=1)
    port = free_port()
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
    assert body == {"status": "ok", "model_name": "driver", "model_version": 1, "world": "carracing",
                    "history": CFG.history, "image_size": CFG.image_size, "actions": ["steer", "gas", "brake"],
                    "state": [], "tasks": []}


@pytest.mark.parametrize("encoding", ["raw_base64", "png_base64", "list"])
def test_act_with_each_encoding_matches_the_policy(served, frames, encoding):
    encode = {"raw_base64": _raw, "png_base64": _png, "list": np.ndarray.tolist}[encoding]
    r = requests.post(f"{served['url']}/act", timeout=10,
                      json={"encoding": encoding, "frames": [encode(f) for f in frames]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["world"]) == ("driver", 1, "carracing")
    assert body["latency_ms"] > 0 and list(body["action"]) == ["steer", "gas", "brake"]
    action = [body["action"][k] for k in ("steer", "gas", "brake")]
    np.testing.assert_allclose(action, served["policy"].act(frames[None])[0], atol=1e-5)


def test_client_acts_and_keeps_the_version(served, frames):
    with ActClient(served["url"], world="carracing") as client:
        action = client.act(frames)
        assert action.dtype == np.float32 and action.shape == (3,)
        assert -1 <= action[0] <= 1 and 0 <= action[1] <= 1 and 0 <= action[2] <= 1
        assert client.model_version == 1 and client.health()["status"] == "ok"
        with pytest.raises(ActError, match="frames: List should have at least 2 items") as err:
            client.act(frames[:1])
        assert err.value.status_code == 422 and "frames" in err.value.message
        # what a fleet driver passes whatever the world: an empty state and the task (ignored here)
        np.testing.assert_array_equal(client.act(frames, state=np.zeros(0, np.float32), task="drive"), action)
        with pytest.raises(ActError, match="state: Extra inputs are not permitted"):
            client.act(frames, state={"speed": 1.0})
        with pytest.raises(ValueError, match="this endpoint takes no state"):
            client.act(frames, state=np.zeros(1))


@pytest.mark.parametrize("payload, status, message", [
    ({"encoding": "raw_base64", "frames": ["AAAA"] * 3}, 422, "frames: List should have at most 2 items"),
    ({"encoding": "raw_base64", "frames": ["AAAA"]}, 422, "frames.0: String should have at least 4096"),
    ({"encoding": "raw_base64", "frames": [_raw(np.zeros(SHAPE[1:], np.uint8)), "!" * 4096]}, 422,
     "frames.1: String should match pattern"),
    ({"encoding": "raw_base64", "frames": [_raw(np.zeros((8, 8, 3), np.uint8))] * 2}, 422,
     "frames.0: String should have at least 4096 characters"),
    ({"encoding": "list", "frames": [np.zeros((16, 16, 3), int).tolist()] * 2}, 422,
     "frames.0.0: List should have at least 32 items"),
    ({"encoding": "list", "frames": [np.full(SHAPE[1:], 300).tolist()] * 2}, 422,
     "frames.0.0.0.0: Input should be less than or equal to 255"),
    ({"encoding": "list", "frames": ["AAAA"] * 2}, 422, "frames.0: Input should be a valid list"),
    ({"encoding": "png_base64", "frames": [_png(np.zeros(SHAPE[1:], np.uint8), "RGBA")] * 2}, 400,
     "frames[0]: expected an 8-bit RGB PNG"),
    ({"encoding": "png_base64", "frames": [_png(np.zeros((1000, 1000, 3), np.uint8))] * 2}, 400,
     "frames[0]: PNG is 1000x1000, expected 32x32"),  # a bomb: refused by its header, never decoded
    ({"encoding": "png_base64", "frames": [_raw(np.zeros(SHAPE[1:], np.uint8))] * 2}, 400,
     "frames[0]: not a decodable PNG"),
    ({"encoding": "jpeg", "frames": []}, 422, "png_base64"),
    ({"frames": []}, 422, "encoding"),
    ({"encoding": "list", "frames": [[[[10 ** 30] * 3]] * 32] * 2}, 422, "integer 100000000000000000000000... is "
     "beyond 64 bits"),
    ({"encoding": "list", "frames": [[[[-2 ** 63] * 3]] * 32] * 2}, 422, "frames.0.0.0.0: Input should be greater than or equal to 0"),
    ({"encoding": "raw_base64", "frames": [_raw(np.zeros(SHAPE[1:], np.uint8))] * 2, "task": "drive"}, 422,
     "task: Extra inputs are not permitted"),
])
def test_malformed_requests_get_a_clear_4xx(served, payload, status, message):
    r = requests.post(f"{served['url']}/act", json=payload, timeout=10)
    assert r.status_code == status and message in _message(r), r.text
    assert len(r.content) < 2000  # the message, not an echo of the frames (nor thousands of pixel errors)


def test_bad_json_is_a_422(served):
    r = requests.post(f"{served['url']}/act", data=b"{not json", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON decode error: Expecting property name" in r.text


def test_openapi_describes_the_schemas(served):
    spec = requests.get(f"{served['url']}/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    variants = {"ActRequestRaw": "raw_base64", "ActRequestPng": "png_base64", "ActRequestList": "list"}
    assert {*variants, "ActResponse", "Action", "Health", "ErrorResponse"} <= set(schemas)
    assert "State" not in schemas
    for name, encoding in variants.items():
        request = schemas[name]
        assert list(request["properties"]) == ["encoding", "frames"] and request["additionalProperties"] is False
        assert request["properties"]["encoding"]["const"] == encoding
        frames = request["properties"]["frames"]
        assert frames["minItems"] == frames["maxItems"] == CFG.history and "oldest first" in frames["description"]
    raw = schemas["ActRequestRaw"]["properties"]["frames"]["items"]
    assert raw["minLength"] == raw["maxLength"] == 4 * 32 * 32 and raw["pattern"] == "^[A-Za-z0-9+/]{4096}$"
    rows = schemas["ActRequestList"]["properties"]["frames"]["items"]
    assert rows["minItems"] == rows["maxItems"] == 32 == rows["items"]["minItems"] == rows["items"]["maxItems"]
    assert rows["items"]["items"]["items"] == {"type": "integer", "minimum": 0, "maximum": 255}
    assert "32x32" in schemas["ActRequestPng"]["properties"]["frames"]["items"]["description"]
    _assert_actions(schemas["Action"], sim.worlds.spec("carracing"))
    act = spec["paths"]["/act"]["post"]
    assert set(act["responses"]) >= {"200", "400", "413", "415", "422"} and "401" not in act["responses"]
    r = requests.post(f"{served['url']}/act", json=schemas["ActRequestPng"]["examples"][0], timeout=10)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, headers, status, message", [
    (b"{}" + b" " * 200_000, {"Content-Type": "application/json"}, 413, "body larger than"),
    (b'{"encoding": "list"}', {"Content-Type": "text/plain"}, 415, "Content-Type: application/json"),
    (b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "application/json"}, 413, "body larger than"),
    (b"[" * 5000 + b"]" * 5000, {"Content-Type": "application/json"}, 422, "nested"),
    (b'{"encoding": "list", "frames": [Infinity]}', {"Content-Type": "application/json"}, 422,
     "Infinity is not a JSON number"),
    (b'{"encoding": "list", "frames": [' + b"9" * 5000 + b"]}", {"Content-Type": "application/json"}, 422,
     "beyond 64 bits"),
    (b"", {"Content-Type": "application/json"}, 422, "Field required"),
])
def test_limits_come_before_work(served, body, headers, status, message):
    r = requests.post(f"{served['url']}/act", data=body, headers=headers, timeout=10)
    assert r.status_code == status and message in _message(r), r.text


def test_build_app_needs_the_alias_and_a_known_world(served):
    with pytest.raises(LookupError, match="no version with alias 'staging'"):
        build_app(registry_uri=served["registry"].uri, model_name="driver", alias="staging")
    with pytest.raises(ValueError, match="unknown world 'nowhere'"):
        build_app(registry_uri=served["registry"].uri, model_name="driver", world="nowhere")


# --- an arm-like world: 4 actions, 7 named state inputs, tasks with instructions ------------------------

ARM_APP = "act_arm_test"
ARM_STATE = ("hand_x", "hand_y", "hand_z", "gripper", "goal_x", "goal_y", "goal_z")


class ArmWorld(World):
    """Only its spec: serving reads nothing else (never instantiated, so no simulator)."""

    spec = dataclasses.replace(
        sim.worlds.spec("carracing"), name="arm-test", description="A test arm reaching and pushing.",
        camera="corner", image_size=32, state_names=ARM_STATE + ("obj_x",), policy_state=ARM_STATE,
        actions=(*(ActionSpec(f"d{axis}", -1.0, 1.0, f"hand velocity along {axis}") for axis in "xyz"),
                 ActionSpec("gripper", -1.0, 1.0, "close (+1) or open (-1)")),
        tasks=(TaskSpec("reach", "Reach the goal position with the gripper."),
               TaskSpec("push", "Push the puck to the goal."),
               TaskSpec("door-open", "Open the door by pulling its handle.")),
        score="success", signals=("success",), success_signal="success", rate_hz=80.0, max_steps=150)


ARM = ArmWorld.spec
ARM_CFG = dataclasses.replace(CFG, action_low=tuple(ARM.action_low.tolist()),
                              action_high=tuple(ARM.action_high.tolist()), state_dim=len(ARM_STATE),
                              task_vocab=build_vocab(t.instruction for t in ARM.tasks))


@pytest.fixture(scope="module")
def arm(served):
    """A tiny real state+task policy registered as `arm` champion and served for world `arm-test`."""
    sim.worlds.register(ArmWorld)
    tmp = served["tmp"] / "arm"
    registry = Registry(tmp / "lake")
    policy, _ = _register_policy(registry, tmp, seed=3, cfg=ARM_CFG, name="arm")
    try:
        url = deploy(registry_uri=registry.uri, model_name="arm", port=served["port"], app_name=ARM_APP,
                     world="arm-test")
        yield {"url": url, "registry": registry, "policy": policy}
    finally:
        from ray import serve
        serve.delete(ARM_APP)
        sim.worlds._REGISTRY.pop("arm-test", None)


def _arm_request(frames: np.ndarray, state: np.ndarray, task: str) -> dict:
    return {"encoding": "raw_base64", "frames": [_raw(f) for f in frames], "task": task,
            "state": {n: float(v) for n, v in zip(ARM_STATE, state)}}


def test_arm_healthz_lists_the_interface(arm):
    body = requests.get(f"{arm['url']}/healthz", timeout=10).json()
    assert body == {"status": "ok", "model_name": "arm", "model_version": 1, "world": "arm-test",
                    "history": CFG.history, "image_size": CFG.image_size, "actions": ["dx", "dy", "dz", "gripper"],
                    "state": list(ARM_STATE), "tasks": ["reach", "push", "door-open"]}


@pytest.mark.parametrize("task", ["push", "Push the puck to the goal."])
def test_arm_act_matches_the_policy_with_state_and_task(arm, frames, task):
    state = np.random.default_rng(1).normal(size=len(ARM_STATE)).astype(np.float32)
    r = requests.post(f"{arm['url']}/act", json=_arm_request(frames, state, task), timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["world"]) == ("arm", 1, "arm-test")
    assert list(body["action"]) == ["dx", "dy", "dz", "gripper"]
    want = arm["policy"].act(frames[None], state[None], ["Push the puck to the goal."])[0]
    np.testing.assert_allclose(list(body["action"].values()), want, atol=1e-5)
    other = arm["policy"].act(frames[None], state[None], ["Reach the goal position with the gripper."])[0]
    assert not np.allclose(want, other, atol=1e-6)  # the task reaches the policy


def test_arm_client_sends_state_and_task(arm, frames):
    state = np.linspace(-1, 1, len(ARM_STATE), dtype=np.float32)
    want = arm["policy"].act(frames[None], state[None], ["Open the door by pulling its handle."])[0]
    with ActClient(arm["url"], world="arm-test") as client:
        assert client.action_names == ["dx", "dy", "dz", "gripper"]
        action = client.act(frames, state=state, task="door-open")
        assert action.dtype == np.float32 and action.shape == (4,)
        np.testing.assert_allclose(action, want, atol=1e-5)
        named = client.act(frames, state=dict(zip(ARM_STATE, state.tolist())), task="door-open")
        np.testing.assert_allclose(named, want, atol=1e-5)
        with pytest.raises(ValueError, match="state must hold 7 values"):
            client.act(frames, state=state[:3], task="reach")
        with pytest.raises(ActError, match="body.state: Field required") as err:
            client.act(frames, task="reach")
        assert err.value.status_code == 422
    with pytest.raises(ValueError, match="serves world 'arm-test', not 'carracing'"):
        ActClient(arm["url"], world="carracing").act(frames)


def test_arm_openapi_names_actions_state_and_tasks(arm):
    schemas = requests.get(f"{arm['url']}/openapi.json", timeout=10).json()["components"]["schemas"]
    _assert_actions(schemas["Action"], ARM)
    state = schemas["State"]
    assert list(state["properties"]) == list(ARM_STATE) == state["required"]
    assert state["additionalProperties"] is False
    assert all(p["type"] == "number" and n in p["description"] for n, p in state["properties"].items())
    request = schemas["ActRequestRaw"]
    assert list(request["properties"]) == ["encoding", "frames", "state", "task"]
    assert set(request["required"]) == {"frames", "encoding", "state", "task"}
    assert "hand_x" in request["properties"]["state"]["description"]
    assert request["properties"]["task"]["enum"] == [*ARM.task_names, *(t.instruction for t in ARM.tasks)]
    r = requests.post(f"{arm['url']}/act", json=schemas["ActRequestPng"]["examples"][0], timeout=10)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("change, status, message", [
    (lambda p: p.pop("state"), 422, "body.state: Field required"),
    (lambda p: p["state"].pop("goal_z"), 422, "body.state.goal_z: Field required"),
    (lambda p: p["state"].update(elbow=0.0), 422, "body.state.elbow: Extra inputs are not permitted"),
    (lambda p: p["state"].update(hand_x="left"), 422, "body.state.hand_x: Input should be a valid number"),
    (lambda p: p["state"].update(hand_x=float("nan")), 422, "body: NaN is not a JSON number"),
    (lambda p: p["state"].update(hand_x=1e39), 422, "body.state.hand_x: Input should be less than or equal to 3402823466"),
    (lambda p: p.update(state=[0.0] * 7), 422, "body.state: Input should be a valid dictionary"),
    (lambda p: p.update(task="fly"), 422, "body.task: Input should be 'reach', 'push', 'door-open', 'Reach the goal"),
    (lambda p: p.pop("task"), 422, "body.task: Field required"),
    (lambda p: p.update(frames=p["frames"][:1]), 422, "body.frames: List should have at least 2 items"),
    (lambda p: p.update(frames=p["frames"] * 2), 422, "body.frames: List should have at most 2 items"),
    (lambda p: p.update(frames=[_raw(np.zeros((8, 8, 3), np.uint8))] * 2), 422, "frames.0: String should have at least"),
])
def test_arm_malformed_requests_get_a_clear_4xx(arm, frames, change, status, message):
    payload = _arm_request(frames, np.zeros(len(ARM_STATE), np.float32), "reach")
    change(payload)
    r = requests.post(f"{arm['url']}/act", data=json.dumps(payload), timeout=10,  # json.dumps writes NaN
                      headers={"Content-Type": "application/json"})
    assert r.status_code == status and message in _message(r), r.text


def test_build_app_refuses_a_policy_for_another_world(arm):
    with pytest.raises(ValueError, match="arm v1 reads 7 state values but world 'carracing' gives 0"):
        build_app(registry_uri=arm["registry"].uri, model_name="arm", world="carracing")


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
