"""The shared checkpoint format: config dataclasses from JSON, save/load in local directories.

To and from S3 through stages.storage: tests/stages/test_model_storage.py."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pytest
import torch
from safetensors import safe_open

from models import checkpoint


@dataclass(frozen=True)
class Inner:
    scale: float = 1.0
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ToyConfig:
    width: int = 4
    widths: tuple[int, ...] = (2, 3)
    grid: tuple[tuple[int, ...], ...] = ((1, 2), (3,))
    inner: Inner = field(default_factory=Inner)
    label: str | None = None
    table: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Required:
    size: int


class Toy(torch.nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.lin = torch.nn.Linear(config.width, sum(config.widths))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))


class Other(Toy):
    pass


def toy_from_dict(d: dict) -> ToyConfig:
    return checkpoint.config_from_dict(ToyConfig, d)


def test_config_from_dict():
    cfg = ToyConfig(width=3, widths=(1,), grid=((4, 5),), inner=Inner(2.0, ("a", "b")), label="x",
                    table={"a": (1, 2)})
    assert toy_from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg  # lists -> tuples, nested too
    assert toy_from_dict({}) == ToyConfig()  # missing keys take defaults (older checkpoints)
    assert toy_from_dict({"inner": {"scale": 3.0}}) == ToyConfig(inner=Inner(scale=3.0))
    with pytest.raises(ValueError, match=r"unknown ToyConfig fields: \['colour'\]"):
        toy_from_dict({"width": 2, "colour": "red"})
    with pytest.raises(ValueError, match="unknown Inner fields"):
        toy_from_dict({"inner": {"bogus": 1}})
    with pytest.raises(ValueError, match="cannot build Required"):
        checkpoint.config_from_dict(Required, {})
    with pytest.raises(ValueError, match="mapping"):
        checkpoint.config_from_dict(ToyConfig, [1, 2])


def test_save_load_local(tmp_path):
    torch.manual_seed(0)
    model = Toy(ToyConfig(widths=(2, 5), inner=Inner(names=("a",))))
    model.seen.fill_(12.0)
    where = checkpoint.save(model, tmp_path / "toy", extra_files={"vocab.txt": "a\nb\n", "raw.bin": b"\x00\x01"})
    assert where == str(tmp_path / "toy")
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["config.json", "model.safetensors", "raw.bin",
                                                                    "vocab.txt"]
    assert json.loads((tmp_path / "toy" / "config.json").read_text()) == json.loads(json.dumps(asdict(model.config)))
    with safe_open(str(tmp_path / "toy" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["model"] == "Toy"
    config, state = checkpoint.load_state(tmp_path / "toy")
    assert toy_from_dict(config) == model.config and state.keys() == model.state_dict().keys()
    again = checkpoint.load(Toy, toy_from_dict, tmp_path / "toy")
    assert isinstance(again, Toy) and again.config == model.config and not again.training
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v) and again.state_dict()[k].dtype == v.dtype
    ckpt = checkpoint.read(tmp_path / "toy", extra_files=("vocab.txt", "raw.bin", "absent.txt"))
    assert ckpt.model == "Toy" and ckpt.files == {"vocab.txt": b"a\nb\n", "raw.bin": b"\x00\x01"}
    with pytest.raises(ValueError, match="holds a Toy checkpoint, not a other"):
        checkpoint.load(Other, toy_from_dict, tmp_path / "toy", what="other")
    with pytest.raises(ValueError, match="is not a toy checkpoint"):
        checkpoint.load(Toy, toy_from_dict, tmp_path / "missing", what="toy")
    with pytest.raises(ValueError, match="may not be named"):
        checkpoint.save(model, tmp_path / "bad", extra_files={"config.json": "{}"})
    with pytest.raises(ValueError, match="config dataclass"):
        checkpoint.save(torch.nn.Linear(2, 2), tmp_path / "bad")


def test_custom_config_name(tmp_path):
    model = Toy(ToyConfig())
    checkpoint.save(model, tmp_path / "r", config_name="toy_config.json")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["model.safetensors", "toy_config.json"]
    with pytest.raises(ValueError, match="needs model.safetensors and config.json"):
        checkpoint.load_state(tmp_path / "r")
    again = checkpoint.load(Toy, toy_from_dict, tmp_path / "r", config_name="toy_config.json")
    assert again.config == model.config

