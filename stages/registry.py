"""Model registry on the lake: versioned model artifacts plus Lance metadata tables.

Layout under ``<uri>/registry/`` (``uri`` a local path or ``s3://bucket/prefix``):

* ``models.lance``  — one row per version: name, version, artifact_uri, kind, metrics, lineage,
  config, manifest (the last four as JSON strings), created_at.
* ``aliases.lance`` — append-only alias history: name, alias, version, set_at, reason, flow_run,
  gate; the latest row of an alias wins.
* ``<name>/v<version>/`` — a copy of the registered model directory (immutable once written).
* ``<name>/_claims/v<version>`` — the marker that reserved the version number.

The two tables' schemas are ``stages.schemas.MODELS`` and ``ALIASES``; tables written before a
column existed gain it (all null) on their next write, and their rows read with defaults.

Integrity: ``register`` records every artifact file's sha256 and size (the manifest); ``fetch``
checks the files against it before it returns a directory, and refuses a tampered, partial or
padded artifact with ``ArtifactError``. Remote artifacts are cached under the manifest's hash.

Concurrency: the version number is claimed by a conditional create of its marker (O_EXCL on a
local disk, ``If-None-Match: *`` on S3) before anything is uploaded; the loser of a race takes
the next number, so two registrations never share a version.

Aliases: ``champion`` (what serves), ``previous`` (the champion before it; what ``rollback``
restores), ``challenger`` (the latest candidate evaluated and not promoted). ``promote`` and
``rollback`` write their moves as one commit.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import lance
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from stages.lock import create_object
from stages.schemas import ALIASES, MODELS
from stages.storage import is_s3, join, pyarrow_fs, resolve_options, upload_dir

KINDS = ("policy", "world_model", "dynamics", "reasoner")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


ALIAS_NAMES = ("champion", "challenger", "previous")
_CLAIM_ATTEMPTS = 1000


class ArtifactError(ValueError):
    """A registered artifact does not match its manifest (tampered, partial or with extra files)."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model; ``manifest`` is None on versions registered before
    manifests were recorded (their artifacts load unverified)."""

    name: str
    version: int
    kind: str
    artifact_uri: str
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    config: dict[str, Any]
    created_at: dt.datetime
    manifest: dict[str, dict[str, Any]] | None = None


@dataclass(frozen=True)
class AliasEvent:
    """One row of an alias's history: ``alias`` was pointed at ``version`` at ``set_at``, by
    ``flow_run`` (a Prefect flow run, else the command line), because ``reason``; ``gate`` is the
    gate's decision with its numbers when a gate decided."""

    name: str
    alias: str
    version: int
    set_at: dt.datetime
    reason: str = ""
    flow_run: str = ""
    gate: dict[str, Any] | None = None


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_of(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{relative path (POSIX): {"sha256", "size"}} of every file under a local directory."""
    root = Path(directory)
    return {p.relative_to(root).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file()}


def verify(directory: str | os.PathLike, manifest: Mapping[str, Mapping[str, Any]], *, what: str) -> None:
    """Raise ArtifactError unless the files under ``directory`` are exactly the manifest's."""
    found = manifest_of(directory)
    missing, extra = sorted(set(manifest) - set(found)), sorted(set(found) - set(manifest))
    changed = sorted(p for p in set(manifest) & set(found) if dict(manifest[p]) != found[p])
    problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else []) + \
               ([f"changed since registration (sha256 or size differs) {changed}"] if changed else [])
    if problems:
        raise ArtifactError(f"{what} at {directory} does not match its registered manifest: "
                            f"{'; '.join(problems)}; refusing to load it")


def _command_line() -> str:
    return "command: " + " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0]), *sys.argv[1:]])


def _row_to_version(row: dict[str, Any]) -> ModelVersion:
    manifest = row.get("manifest")
    return ModelVersion(name=row["name"], version=int(row["version"]), kind=row["kind"],
                        artifact_uri=row["artifact_uri"], metrics=json.loads(row["metrics"]),
                        lineage=json.loads(row["lineage"]), config=json.loads(row["config"]),
                        created_at=row["created_at"], manifest=json.loads(manifest) if manifest else None)


def _version_to_row(mv: ModelVersion) -> dict[str, Any]:
    return dataclasses.asdict(mv) | {k: _to_json(getattr(mv, k), k) for k in ("metrics", "lineage", "config")} | \
        {"manifest": json.dumps(mv.manifest, sort_keys=True) if mv.manifest is not None else None}


def _row_to_event(row: dict[str, Any]) -> AliasEvent:
    return AliasEvent(name=row["name"], alias=row["alias"], version=int(row["version"]), set_at=row["set_at"],
                      reason=row.get("reason") or "", flow_run=row.get("flow_run") or "",
                      gate=json.loads(row["gate"]) if row.get("gate") else None)


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

    def _migrated(self, table: str, schema: pa.Schema) -> lance.LanceDataset | None:
        """The table, with the columns of ``schema`` it lacks added (all null): older lakes."""
        ds = self._dataset(table)
        if ds is not None:
            missing = [f for f in schema if f.name not in ds.schema.names]
            if missing:
                try:
                    ds.add_columns(missing)
                except (OSError, ValueError, RuntimeError):  # a concurrent writer migrated it first
                    pass
                ds = self._dataset(table)
                still = [f.name for f in schema if f.name not in ds.schema.names]
                if still:
                    raise RuntimeError(f"could not add columns {still} to {self._table_uri(table)}")
        return ds

    def _append(self, table: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
        data = pa.Table.from_pylist(rows, schema=schema)
        if self._migrated(table, schema) is None:
            try:
                lance.write_dataset(data, self._table_uri(table), mode="create", storage_options=self.storage_options)
                return
            except (OSError, ValueError, RuntimeError):  # another writer created it first: append below
                if self._dataset(table) is None:
                    raise
                self._migrated(table, schema)
        lance.write_dataset(data, self._table_uri(table), mode="append", storage_options=self.storage_options)

    # ---- versions -----------------------------------------------------------------------
    def versions(self, name: str) -> list[ModelVersion]:
        """All versions of ``name``, oldest first (empty if the name is unknown)."""
        return sorted((_row_to_version(r) for r in self._rows("models", name)), key=lambda m: m.version)

    def _taken(self, name: str) -> set[int]:
        """Versions in the table, among artifact folders, and claimed."""
        taken = {m.version for m in self.versions(name)}
        for folder in (f"{self._root_path}/{name}", f"{self._root_path}/{name}/_claims"):
            listing = self._fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            taken |= {int(i.base_name[1:]) for i in listing if re.fullmatch(r"v\d+", i.base_name)}
        return taken

    def _claim(self, name: str, version: int) -> bool:
        """Reserve ``version`` of ``name`` by creating its marker only if absent; False if taken."""
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "at": dt.datetime.now(dt.timezone.utc).isoformat()}).encode()
        uri = join(self.root, name, "_claims", f"v{version}")
        return create_object(uri, body, storage_options=self.storage_options) is not None

    def _claim_next(self, name: str) -> int:
        version = max(self._taken(name), default=0) + 1
        for _ in range(_CLAIM_ATTEMPTS):
            if self._fs.get_file_info(f"{self._root_path}/{name}/v{version}").type == pafs.FileType.NotFound \
                    and self._claim(name, version):
                return version
            version += 1
        raise RuntimeError(f"could not claim a version of {name!r} after {_CLAIM_ATTEMPTS} attempts")

    def register(self, name: str, model_dir: str | os.PathLike, *, kind: str,
                 metrics: Mapping[str, Any] | None = None, lineage: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | Any | None = None) -> ModelVersion:
        """Copy ``model_dir`` into the registry as the next version of ``name`` and record it with
        the manifest (sha256 and size) of every file.

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
        manifest = manifest_of(src)
        version = self._claim_next(name)
        artifact_uri = upload_dir(src, join(self.root, name, f"v{version}"), self.storage_options)
        row.update(version=version, artifact_uri=artifact_uri, created_at=dt.datetime.now(dt.timezone.utc),
                   manifest=json.dumps(manifest, sort_keys=True))
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
        data = pa.Table.from_pylist([_version_to_row(updated)], schema=MODELS)
        self._migrated("models", MODELS).merge_insert(["name", "version"]).when_matched_update_all().execute(data)
        return updated

    # ---- aliases ------------------------------------------------------------------------
    def _events(self, name: str, moves: list[tuple[str, int]], *, reason: str, flow_run: str | None,
                gate: Mapping[str, Any] | None) -> list[AliasEvent]:
        """Write ``moves`` (alias, version) as one commit, in order, with distinct timestamps."""
        now = dt.datetime.now(dt.timezone.utc)
        for alias, version in moves:
            _check_name(alias, "alias")
            if self.get(name, version=version) is None:
                raise LookupError(f"model {name!r} has no version {version}; cannot set alias {alias!r}")
        events = [AliasEvent(name, alias, int(version), now + dt.timedelta(microseconds=i), reason=str(reason),
                             flow_run=flow_run or _command_line(), gate=dict(gate) if gate is not None else None)
                  for i, (alias, version) in enumerate(moves)]
        rows = [dataclasses.asdict(e) | {"gate": _to_json(e.gate, "gate") if e.gate is not None else ""}
                for e in events]
        self._append("aliases", rows, ALIASES)
        return events

    def set_alias(self, name: str, alias: str, version: int, *, reason: str = "", flow_run: str | None = None,
                  gate: Mapping[str, Any] | None = None) -> AliasEvent:
        """Point ``alias`` (e.g. "challenger") of ``name`` at an existing ``version``; ``flow_run``
        defaults to this process's command line."""
        return self._events(name, [(alias, version)], reason=reason, flow_run=flow_run, gate=gate)[0]

    def aliases(self, name: str) -> dict[str, int]:
        """Each alias of ``name`` and the version it points at now."""
        return {e.alias: e.version for e in self.history(name)}

    def history(self, name: str) -> list[AliasEvent]:
        """Every alias move of ``name``, oldest first."""
        return sorted((_row_to_event(r) for r in self._rows("aliases", name)), key=lambda e: e.set_at)

    def alias_history(self, name: str, alias: str) -> list[AliasEvent]:
        """Every assignment of ``alias`` for ``name``, oldest first (the last one is current)."""
        _check_name(alias, "alias")
        return [e for e in self.history(name) if e.alias == alias]

    def promote(self, name: str, version: int, *, reason: str, flow_run: str | None = None,
                gate: Mapping[str, Any] | None = None) -> list[AliasEvent]:
        """``champion`` -> ``version`` and ``previous`` -> the champion it replaces, in one commit."""
        champion = self.aliases(name).get("champion")
        if champion == int(version):
            raise ValueError(f"{name} v{version} is already the champion")
        moves = ([("previous", champion)] if champion is not None else []) + [("champion", int(version))]
        return self._events(name, moves, reason=reason, flow_run=flow_run, gate=gate)

    def rollback(self, name: str, *, reason: str, flow_run: str | None = None) -> list[AliasEvent]:
        """``champion`` -> ``previous`` and ``previous`` -> the champion rolled back from (a swap, so
        a second rollback undoes the first), in one commit."""
        current = self.aliases(name)
        if "previous" not in current or "champion" not in current:
            raise ValueError(f"{name} has no previous champion to roll back to")
        moves = [("previous", current["champion"]), ("champion", current["previous"])]
        return self._events(name, moves, reason=reason, flow_run=flow_run, gate=None)

    # ---- artifacts ----------------------------------------------------------------------
    def _check(self, mv: ModelVersion, directory: str | os.PathLike) -> None:
        if mv.manifest is not None:
            verify(directory, mv.manifest, what=f"{mv.name} v{mv.version}")

    def fetch(self, mv: ModelVersion, dest_dir: str | os.PathLike | None = None) -> str:
        """A local directory holding ``mv``'s artifacts, checked against its manifest.

        Local registries return the artifact folder itself (verified in place) unless ``dest_dir``
        is given. Remote artifacts are downloaded once into a cache (``$WORLDLOOP_CACHE``, default
        ``~/.cache/worldloop``) keyed by the manifest's hash; a cached copy is verified on every
        fetch and downloaded again if it was damaged. Raises ArtifactError on a mismatch.
        """
        fs, src = pyarrow_fs(mv.artifact_uri, self.storage_options)
        if fs.get_file_info(src).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"artifacts of {mv.name} v{mv.version} are missing at {mv.artifact_uri}")
        if not is_s3(mv.artifact_uri) and dest_dir is None:
            self._check(mv, mv.artifact_uri)
            return mv.artifact_uri
        local = pafs.LocalFileSystem()
        if dest_dir is not None:
            Path(dest_dir).mkdir(parents=True, exist_ok=True)
            pafs.copy_files(src, str(Path(dest_dir).resolve()), source_filesystem=fs, destination_filesystem=local)
            self._check(mv, dest_dir)
            return str(dest_dir)
        key = json.dumps(mv.manifest, sort_keys=True) if mv.manifest is not None else \
            (self.storage_options or {}).get("endpoint", "") + "|" + mv.artifact_uri
        cache = Path(os.environ.get("WORLDLOOP_CACHE", Path.home() / ".cache" / "worldloop"))
        target = cache / "registry" / f"{mv.name}-v{mv.version}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
        if target.is_dir():
            try:
                self._check(mv, target)
                return str(target)
            except ArtifactError:  # a damaged cache: download again
                shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".fetch-"))
        try:
            pafs.copy_files(src, str(tmp), source_filesystem=fs, destination_filesystem=local)
            self._check(mv, tmp)
            os.rename(tmp, target)  # atomic; a concurrent fetch that won the race is fine too
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(target)
