"""Model registry on the lake: versioned model artifacts plus Lance metadata tables.

Layout under ``<uri>/registry/`` (``uri`` a local path or ``s3://bucket/prefix``):

* ``models.lance``  — one row per version: name, version, artifact_uri, kind, metrics, lineage,
  config (the last three as JSON strings), created_at.
* ``aliases.lance`` — append-only alias history: name, alias, version, set_at; the latest row wins.
* ``<name>/v<version>/`` — a copy of the registered model directory (immutable once written).

The two tables' schemas are ``stages.schemas.MODELS`` and ``ALIASES``.

A single writer is assumed. Versions are monotonic per name and ``register`` never writes into
an existing version's artifact folder (a folder left by an interrupted register is skipped).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import lance
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from stages.schemas import ALIASES, MODELS
from stages.storage import is_s3, join, pyarrow_fs, resolve_options, upload_dir

KINDS = ("policy", "world_model", "dynamics", "reasoner")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model."""

    name: str
    version: int
    kind: str
    artifact_uri: str
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    config: dict[str, Any]
    created_at: dt.datetime


@dataclass(frozen=True)
class AliasEvent:
    """One row of an alias's history: ``alias`` was pointed at ``version`` at ``set_at``."""

    name: str
    alias: str
    version: int
    set_at: dt.datetime


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"invalid {what} {value!r}: use letters, digits, '_', '.', '-' "
                         "(starting with a letter or digit, at most 128 characters)")
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (Path, dt.datetime, dt.date)):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def _to_json(value: Any, what: str) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict (or a dataclass), got {type(value).__name__}")
    try:
        return json.dumps(dict(value), default=_json_default, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serializable: {e}") from None


def git_commit() -> str | None:
    """The commit of the checkout this code runs from, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _row_to_version(row: dict[str, Any]) -> ModelVersion:
    return ModelVersion(name=row["name"], version=int(row["version"]), kind=row["kind"],
                        artifact_uri=row["artifact_uri"], metrics=json.loads(row["metrics"]),
                        lineage=json.loads(row["lineage"]), config=json.loads(row["config"]),
                        created_at=row["created_at"])


class Registry:
    """Model registry rooted at ``<uri>/registry`` on a local path or an s3:// URI."""

    def __init__(self, uri: str | os.PathLike, storage_options: dict[str, str] | None = None) -> None:
        uri = str(uri)
        if uri.startswith("file://"):
            uri = uri[len("file://"):]
        if "://" in uri and not is_s3(uri):
            raise ValueError(f"unsupported registry URI {uri!r}: use a local path or s3://bucket/prefix")
        self.uri = uri if is_s3(uri) else os.path.abspath(uri)
        self.root = join(self.uri, "registry")
        self.storage_options = resolve_options(storage_options) if is_s3(uri) else None
        self._fs, self._root_path = pyarrow_fs(self.root, self.storage_options)

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    # ---- Lance tables -------------------------------------------------------------------
    def _table_uri(self, table: str) -> str:
        return join(self.root, f"{table}.lance")

    def _dataset(self, table: str) -> lance.LanceDataset | None:
        info = self._fs.get_file_info(f"{self._root_path}/{table}.lance/_versions")
        if info.type == pafs.FileType.NotFound:
            return None
        return lance.dataset(self._table_uri(table), storage_options=self.storage_options)

    def _rows(self, table: str, name: str) -> list[dict[str, Any]]:
        ds = self._dataset(table)
        if ds is None:
            return []
        return ds.to_table(filter=f"name = '{_check_name(name, 'model name')}'").to_pylist()

    def _append(self, table: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
        data = pa.Table.from_pylist(rows, schema=schema)
        mode = "create" if self._dataset(table) is None else "append"
        lance.write_dataset(data, self._table_uri(table), mode=mode, storage_options=self.storage_options)

    # ---- versions -----------------------------------------------------------------------
    def versions(self, name: str) -> list[ModelVersion]:
        """All versions of ``name``, oldest first (empty if the name is unknown)."""
        return sorted((_row_to_version(r) for r in self._rows("models", name)), key=lambda m: m.version)

    def _next_version(self, name: str) -> int:
        """1 + the highest version in the table or among existing artifact folders."""
        taken = [m.version for m in self.versions(name)]
        listing = self._fs.get_file_info(pafs.FileSelector(f"{self._root_path}/{name}", allow_not_found=True))
        taken += [int(i.base_name[1:]) for i in listing if re.fullmatch(r"v\d+", i.base_name)]
        return max(taken, default=0) + 1

    def register(self, name: str, model_dir: str | os.PathLike, *, kind: str,
                 metrics: Mapping[str, Any] | None = None, lineage: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | Any | None = None) -> ModelVersion:
        """Copy ``model_dir`` into the registry as the next version of ``name`` and record it.

        ``config`` defaults to the directory's ``config.json``; ``lineage`` (table versions,
        parent versions, ...) gets ``git_commit`` added when the code runs from a git checkout.
        """
        _check_name(name, "model name")
        if kind not in KINDS:
            raise ValueError(f"invalid kind {kind!r}: choose from {list(KINDS)}")
        src = Path(model_dir)
        if not src.is_dir() or not any(src.iterdir()):
            raise ValueError(f"model_dir {str(src)!r} is not a non-empty directory")
        if config is None:
            config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
        lineage = dict(lineage or {})
        lineage.setdefault("git_commit", git_commit())
        row = {"name": name, "kind": kind, "metrics": _to_json(metrics or {}, "metrics"),
               "lineage": _to_json(lineage, "lineage"), "config": _to_json(config, "config")}
        version = self._next_version(name)
        dest_path = f"{self._root_path}/{name}/v{version}"
        if self._fs.get_file_info(dest_path).type != pafs.FileType.NotFound:  # never overwrite
            raise FileExistsError(f"artifacts for {name} v{version} already exist at {dest_path}")
        artifact_uri = upload_dir(src, join(self.root, name, f"v{version}"), self.storage_options)
        row.update(version=version, artifact_uri=artifact_uri, created_at=dt.datetime.now(dt.timezone.utc))
        self._append("models", [row], MODELS)
        return _row_to_version(row)

    def get(self, name: str, *, version: int | None = None, alias: str | None = None) -> ModelVersion | None:
        """A version by number, by alias, or (neither given) the latest; None if there is none."""
        if version is not None and alias is not None:
            raise ValueError("pass either version or alias, not both")
        if alias is not None:
            history = self.alias_history(name, alias)
            if not history:
                return None
            version = history[-1].version
        all_versions = self.versions(name)
        if version is None:
            return all_versions[-1] if all_versions else None
        return next((m for m in all_versions if m.version == int(version)), None)

    def update_metrics(self, name: str, version: int, metrics: Mapping[str, Any]) -> ModelVersion:
        """Merge ``metrics`` into a version's metrics (new keys win); returns the updated version."""
        mv = self.get(name, version=version)
        if mv is None:
            raise LookupError(f"model {name!r} has no version {version}")
        merged = json.loads(_to_json({**mv.metrics, **dict(metrics)}, "metrics"))
        updated = dataclasses.replace(mv, metrics=merged)
        row = dataclasses.asdict(updated) | {k: _to_json(getattr(updated, k), k)
                                             for k in ("metrics", "lineage", "config")}
        data = pa.Table.from_pylist([row], schema=MODELS)
        self._dataset("models").merge_insert(["name", "version"]).when_matched_update_all().execute(data)
        return updated

    # ---- aliases ------------------------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: int) -> AliasEvent:
        """Point ``alias`` (e.g. "champion") of ``name`` at an existing ``version``."""
        _check_name(alias, "alias")
        if self.get(name, version=version) is None:
            raise LookupError(f"model {name!r} has no version {version}; cannot set alias {alias!r}")
        event = AliasEvent(name, alias, int(version), dt.datetime.now(dt.timezone.utc))
        self._append("aliases", [dataclasses.asdict(event)], ALIASES)
        return event

    def alias_history(self, name: str, alias: str) -> list[AliasEvent]:
        """Every assignment of ``alias`` for ``name``, oldest first (the last one is current)."""
        _check_name(alias, "alias")
        rows = [r for r in self._rows("aliases", name) if r["alias"] == alias]
        return [AliasEvent(**r) for r in sorted(rows, key=lambda r: r["set_at"])]

    # ---- artifacts ----------------------------------------------------------------------
    def fetch(self, mv: ModelVersion, dest_dir: str | os.PathLike | None = None) -> str:
        """A local directory holding ``mv``'s artifacts.

        Local registries return the artifact folder itself unless ``dest_dir`` is given. Remote
        artifacts are downloaded once into a cache (``$WORLDLOOP_CACHE``, default
        ``~/.cache/worldloop``) keyed by store and version; artifacts are immutable, so the
        cache never goes stale.
        """
        if not is_s3(mv.artifact_uri) and dest_dir is None:
            return mv.artifact_uri
        fs, src = pyarrow_fs(mv.artifact_uri, self.storage_options)
        if fs.get_file_info(src).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"artifacts of {mv.name} v{mv.version} are missing at {mv.artifact_uri}")
        if dest_dir is not None:
            Path(dest_dir).mkdir(parents=True, exist_ok=True)
            pafs.copy_files(src, str(Path(dest_dir).resolve()), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            return str(dest_dir)
        store = (self.storage_options or {}).get("endpoint", "") + "|" + mv.artifact_uri
        cache = Path(os.environ.get("WORLDLOOP_CACHE", Path.home() / ".cache" / "worldloop"))
        target = cache / "registry" / f"{mv.name}-v{mv.version}-{hashlib.sha256(store.encode()).hexdigest()[:12]}"
        if target.is_dir():
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".fetch-"))
        try:
            pafs.copy_files(src, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            os.rename(tmp, target)  # atomic; a concurrent fetch that won the race is fine too
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(target)
