"""One checkpoint format for every model: ``model.safetensors`` + a JSON config, local or on S3.

The layout follows Hugging Face's (``save_pretrained``): a directory (a local path or an
``s3://bucket/prefix``) holding the weights as safetensors and the model's config dataclass
as JSON (``dataclasses.asdict``), so a checkpoint is readable without this code and the
resolved config says how the model was made. The safetensors header's metadata names the
model class (``{"model": "Policy"}``), so loading one kind of checkpoint as another is a
clear error. Models may add small extra files (a vocabulary, a tokenizer) beside them.

Remote storage goes through ``pyarrow.fs``; storage options are the lake's keys
(``access_key_id``, ``secret_access_key``, ``session_token``, ``endpoint``, ``region``,
``allow_http``), the AWS_* environment filling in the ones not given.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_ENV = {"access_key_id": ("AWS_ACCESS_KEY_ID",), "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
        "session_token": ("AWS_SESSION_TOKEN",),
        "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
        "region": ("AWS_REGION", "AWS_DEFAULT_REGION"), "allow_http": ("AWS_ALLOW_HTTP",)}
C = TypeVar("C")
M = TypeVar("M", bound=torch.nn.Module)


def filesystem(uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
               ) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it (``bucket/key`` on S3, absolute locally)."""
    uri = str(uri)
    if not uri.startswith("s3://"):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    opts = {k: str(v) for k, v in (storage_options or {}).items() if v is not None}
    for key, names in _ENV.items():
        value = next((os.environ[n] for n in names if os.environ.get(n)), None)
        if key not in opts and value is not None:
            opts[key] = value
    endpoint = opts.get("endpoint")
    scheme = "http" if opts.get("allow_http", "false").lower() in ("1", "true", "yes") else "https"
    if endpoint and "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
    fs = pafs.S3FileSystem(access_key=opts.get("access_key_id"), secret_key=opts.get("secret_access_key"),
                           session_token=opts.get("session_token"), region=opts.get("region", "us-east-1"),
                           endpoint_override=endpoint, scheme=scheme)
    return fs, uri[len("s3://"):].rstrip("/")


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


def save(model: torch.nn.Module, dir_or_uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None,
         config_name: str = CONFIG_NAME, extra_files: Mapping[str, str | bytes] | None = None) -> str:
    """Write ``model.safetensors`` (+ the class name in its metadata), ``config_name`` (the JSON of
    ``model.config``) and ``extra_files`` ({name: text or bytes}) to a local dir or an s3:// prefix.
    Returns ``str(dir_or_uri)``."""
    target = str(dir_or_uri)
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        raise ValueError(f"{type(model).__name__}.config must be a config dataclass, got {type(config).__name__}")
    reserved = {WEIGHTS_NAME, config_name} & set(extra_files or {})
    if reserved:
        raise ValueError(f"extra_files may not be named {sorted(reserved)}")
    fs, path = filesystem(target, storage_options)
    remote = not isinstance(fs, pafs.LocalFileSystem)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) if remote else Path(path)
        local.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(local / WEIGHTS_NAME), metadata={"format": "pt", "model": type(model).__name__})
        (local / config_name).write_text(json.dumps(dataclasses.asdict(config), indent=2))
        for name, content in (extra_files or {}).items():
            (local / name).write_bytes(content.encode() if isinstance(content, str) else bytes(content))
        if remote:
            for f in sorted(local.iterdir()):
                with f.open("rb") as src, fs.open_output_stream(f"{path}/{f.name}") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
    return target


@contextmanager
def local_copy(dir_or_uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None,
               names: Sequence[str] | None = None) -> Iterator[Path]:
    """The directory at ``dir_or_uri`` as a local path while the context lasts. An s3:// prefix is
    downloaded to a temporary directory first (only ``names`` when given; absent ones are skipped;
    a prefix holding nothing yields an empty directory)."""
    fs, path = filesystem(dir_or_uri, storage_options)
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if names is None:
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        else:
            infos = fs.get_file_info([f"{path}/{n}" for n in names])
            for name, info in zip(names, infos):
                if info.type == pafs.FileType.File:
                    with fs.open_input_stream(info.path) as src, open(Path(tmp) / name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
        yield Path(tmp)


@dataclass
class Checkpoint:
    """What ``read`` found: the config dict, the weights, the model class that wrote them (or "")
    and the requested extra files' bytes (absent ones are missing from ``files``)."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    model: str
    files: dict[str, bytes]


def read(dir_or_uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None,
         config_name: str = CONFIG_NAME, extra_files: Sequence[str] = (), what: str = "model") -> Checkpoint:
    """Read a checkpoint written by ``save``; ValueError naming ``what`` when it is not one."""
    needed = (WEIGHTS_NAME, config_name)
    with local_copy(dir_or_uri, storage_options, names=(*needed, *extra_files)) as local:
        if not all((local / n).is_file() for n in needed):
            where = "does not exist or " if str(dir_or_uri).startswith("s3://") else ""
            raise ValueError(f"{dir_or_uri} {where}is not a {what} checkpoint (needs {WEIGHTS_NAME} and "
                             f"{config_name})")
        config = json.loads((local / config_name).read_text())
        with safe_open(str(local / WEIGHTS_NAME), framework="pt") as f:
            kind = (f.metadata() or {}).get("model", "")
        state = load_file(str(local / WEIGHTS_NAME))
        files = {n: (local / n).read_bytes() for n in extra_files if (local / n).is_file()}
    return Checkpoint(config=config, state=state, model=kind, files=files)


def load_state(dir_or_uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None,
               config_name: str = CONFIG_NAME, what: str = "model") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) of a checkpoint written by ``save``."""
    ckpt = read(dir_or_uri, storage_options=storage_options, config_name=config_name, what=what)
    return ckpt.config, ckpt.state


def load(model_cls: Callable[[C], M], config_from_dict: Callable[[dict], C], dir_or_uri: str | os.PathLike, *,
         storage_options: Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
         config_name: str = CONFIG_NAME, what: str = "model") -> M:
    """``model_cls(config_from_dict(config))`` with the saved weights, on ``device``, in eval mode.
    A checkpoint written by another model class is a ValueError."""
    ckpt = read(dir_or_uri, storage_options=storage_options, config_name=config_name, what=what)
    name = getattr(model_cls, "__name__", "")
    if ckpt.model and name and ckpt.model != name:
        raise ValueError(f"{dir_or_uri} holds a {ckpt.model} checkpoint, not a {what} ({name})")
    model = model_cls(config_from_dict(ckpt.config))
    model.load_state_dict(ckpt.state)
    return model.to(device).eval()
