"""One checkpoint format for every model: ``model.safetensors`` + a JSON config in a directory.

The layout follows Hugging Face's (``save_pretrained``): a local directory holding the weights
as safetensors and the model's config dataclass as JSON (``dataclasses.asdict``), so a
checkpoint is readable without this code and the resolved config says how the model was made.
The safetensors header's metadata names the model class (``{"model": "Policy"}``), so loading
one kind of checkpoint as another is a clear error. Models may add small extra files (a
vocabulary, a tokenizer) beside them.

Checkpoints here are local directories only. Copying one to or from S3 is storage's work
(``stages.storage.upload_dir`` and ``local_copy``), done by the stages that need it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
C = TypeVar("C")
M = TypeVar("M", bound=torch.nn.Module)


def preset(presets: Mapping[str, C], name: str, what: str) -> C:
    """The named config of a model's ``PRESETS`` ("tiny" for tests, "default" for the CPU demo, "gpu");
    an unknown name is a ValueError naming ``what`` and the choices."""
    if name not in presets:
        raise ValueError(f"unknown {what} preset {name!r}; choose from {sorted(presets)}")
    return presets[name]


def config_from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
    """Rebuild a (frozen) config dataclass from its JSON form.

    Lists become tuples (nested ones too), a dict for a dataclass-typed field becomes that
    dataclass, unknown keys are an error, and missing keys take the field's default, so
    checkpoints written before a field existed still load.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls.__name__} config must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}; known: {sorted(fields)}")
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # annotations that cannot be evaluated here: no nested dataclasses
        hints = {}
    kwargs = {}
    for name, value in d.items():
        hint = hints.get(name)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(hint):
            value = config_from_dict(hint, value)
        kwargs[name] = _tuples(value)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a default is missing
        raise ValueError(f"cannot build {cls.__name__} from {sorted(d)}: {e}") from e


def _tuples(value: Any) -> Any:
    """JSON lists -> tuples, inside lists and dicts too."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def save(model: torch.nn.Module, directory: str | os.PathLike, *, config_name: str = CONFIG_NAME,
         extra_files: Mapping[str, str | bytes] | None = None) -> str:
    """Write ``model.safetensors`` (+ the class name in its metadata), ``config_name`` (the JSON of
    ``model.config``) and ``extra_files`` ({name: text or bytes}) to a local directory (made if
    missing). Returns ``str(directory)``."""
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        raise ValueError(f"{type(model).__name__}.config must be a config dataclass, got {type(config).__name__}")
    reserved = {WEIGHTS_NAME, config_name} & set(extra_files or {})
    if reserved:
        raise ValueError(f"extra_files may not be named {sorted(reserved)}")
    local = Path(os.path.abspath(directory))
    local.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(local / WEIGHTS_NAME), metadata={"format": "pt", "model": type(model).__name__})
    (local / config_name).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    for name, content in (extra_files or {}).items():
        (local / name).write_bytes(content.encode() if isinstance(content, str) else bytes(content))
    return str(directory)


@dataclass
class Checkpoint:
    """What ``read`` found: the config dict, the weights, the model class that wrote them (or "")
    and the requested extra files' bytes (absent ones are missing from ``files``)."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    model: str
    files: dict[str, bytes]


def read(directory: str | os.PathLike, *, config_name: str = CONFIG_NAME, extra_files: Sequence[str] = (),
         what: str = "model") -> Checkpoint:
    """Read a checkpoint written by ``save``; ValueError naming ``what`` when it is not one (and
    saying the directory may not exist when it is missing or empty, as a prefix copied from
    object storage that holds nothing is)."""
    local = Path(os.path.abspath(directory))
    needed = (WEIGHTS_NAME, config_name)
    if not all((local / n).is_file() for n in needed):
        where = "" if local.is_dir() and any(local.iterdir()) else "does not exist or "
        raise ValueError(f"{directory} {where}is not a {what} checkpoint (needs {WEIGHTS_NAME} and "
                         f"{config_name})")
    config = json.loads((local / config_name).read_text())
    with safe_open(str(local / WEIGHTS_NAME), framework="pt") as f:
        kind = (f.metadata() or {}).get("model", "")
    state = load_file(str(local / WEIGHTS_NAME))
    files = {n: (local / n).read_bytes() for n in extra_files if (local / n).is_file()}
    return Checkpoint(config=config, state=state, model=kind, files=files)


def load_state(directory: str | os.PathLike, *, config_name: str = CONFIG_NAME,
               what: str = "model") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) of a checkpoint written by ``save``."""
    ckpt = read(directory, config_name=config_name, what=what)
    return ckpt.config, ckpt.state


def load(model_cls: Callable[[C], M], config_from_dict: Callable[[dict], C], directory: str | os.PathLike, *,
         device: str | torch.device = "cpu", config_name: str = CONFIG_NAME, what: str = "model") -> M:
    """``model_cls(config_from_dict(config))`` with the saved weights, on ``device``, in eval mode.
    A checkpoint written by another model class is a ValueError."""
    ckpt = read(directory, config_name=config_name, what=what)
    name = getattr(model_cls, "__name__", "")
    if ckpt.model and name and ckpt.model != name:
        raise ValueError(f"{directory} holds a {ckpt.model} checkpoint, not a {what} ({name})")
    model = model_cls(config_from_dict(ckpt.config))
    model.load_state_dict(ckpt.state)
    return model.to(device).eval()
