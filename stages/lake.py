"""The Lance lake adapter: versioned tables at ``<uri>/<name>.lance`` (local dir or s3://).

This is the one place (with ``stages.sampler``) that imports Lance. Writes go from the driver
with ``lance.write_dataset`` / ``merge_insert`` (Ray 2.60's ``write_lance`` is broken with
pylance >= 6). Appends are idempotent on a key column. Resolved configs are saved beside each
table version at ``<uri>/_configs/<name>/v<version>.json``.
"""
from __future__ import annotations

import json
from typing import Any

import lance
import pyarrow as pa
import pyarrow.compute as pc

from stages import storage

_SECRET_KEYS = ("secret", "password", "token", "access_key", "credential")
# Lance file format of new tables: 2.0 wrote 320x240 frames 5x and took random rows 2x faster than
# the default 2.2 here (0.09 against 0.48 ms a frame; 44 against 91 ms for 192 rows); for 64x64
# frames its random takes are ~25% slower (3.8 against 3.1 ms for 128 rows), which costs the CPU
# demo's policy training ~10% (the sampler is ~45% of a step there)
STORAGE_VERSION = "2.0"
COMPACT_MIN_FRAGMENTS = 16  # Lake.compact leaves a table with at most this many small fragments alone
COMPACT_TARGET_ROWS = 65_536  # and rewrites only fragments under this many rows (not the whole lake each time)


def _redact(value: Any) -> Any:
    """Config with credential-like keys replaced, so secrets are never written."""
    if isinstance(value, dict):
        return {k: "***" if any(s in str(k).lower() for s in _SECRET_KEYS) else _redact(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    return value


def _mismatch(name: str, have: pa.Schema, want: pa.Schema) -> str:
    """What differs between a table's schema and the one being written, in words."""
    missing = [n for n in want.names if n not in have.names]
    extra = [n for n in have.names if n not in want.names]
    changed = [n for n in want.names if n in have.names and have.field(n).type != want.field(n).type]
    return (f"{name}: the table's columns differ from what this worldloop writes (missing {missing}, "
            f"extra {extra}, other types {changed}): it was written by another version; curate into a "
            f"new lake (--lake) or move this one aside")


class Lake:
    """Named Lance tables under one root URI."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = storage.resolve_options(storage_options) if storage.is_s3(uri) else None

    def __repr__(self) -> str:  # no storage options: they hold credentials
        return f"Lake({self.uri!r})"

    def table_uri(self, name: str) -> str:
        return storage.join(self.uri, f"{name}.lance")

    def dataset(self, name: str, version: int | str | None = None) -> lance.LanceDataset:
        """The Lance dataset (latest, or at a version number or tag)."""
        return lance.dataset(self.table_uri(name), version=version,
                             storage_options=self.storage_options)

    def exists(self, name: str) -> bool:
        try:
            self.dataset(name)
        except ValueError as exc:
            if "not found" in str(exc).lower():
                return False
            raise
        return True

    def append(self, name: str, table: pa.Table, *, key: str) -> int:
        """Add the rows of ``table`` whose ``key`` is not in the table yet; returns rows added.

        Creates the table if absent. Duplicate keys inside ``table`` keep their first row.
        Nothing is committed when every key is already present.
        """
        if table.num_rows == 0:
            return 0
        if table.column(key).null_count:
            raise ValueError(f"{name}: {table.column(key).null_count} rows have a null {key!r}")
        first: dict[Any, int] = {}
        for i, k in enumerate(table.column(key).to_pylist()):
            first.setdefault(k, i)
        if len(first) < table.num_rows:
            table = table.take(sorted(first.values()))
        if not self.exists(name):
            lance.write_dataset(table, self.table_uri(name), mode="create", data_storage_version=STORAGE_VERSION,
                                storage_options=self.storage_options)
            return table.num_rows
        ds = self.dataset(name)
        if set(table.schema.names) != set(ds.schema.names):
            raise ValueError(f"{name}: columns {sorted(table.schema.names)} do not match the "
                             f"table's {sorted(ds.schema.names)}")
        table = table.select(ds.schema.names).cast(ds.schema)
        known = ds.to_table(columns=[key]).column(key)
        table = table.filter(pc.invert(pc.is_in(table.column(key), value_set=known)))
        if table.num_rows == 0:
            return 0
        result = ds.merge_insert(key).when_not_matched_insert_all().execute(table)
        return int(result["num_inserted_rows"])

    def write_fragments(self, name: str, table: pa.Table) -> list[str]:
        """Write ``table`` as data files of ``name`` without committing them (any worker may
        call this); ``commit_fragments`` on the driver makes them visible in one version.

        Returns each fragment's metadata as JSON (Lance's ``FragmentMetadata.to_json``), a plain
        string that travels between processes without pickling Lance objects."""
        from lance.fragment import write_fragments

        written = write_fragments(table, self.table_uri(name), schema=table.schema, data_storage_version=STORAGE_VERSION,
                                  storage_options=self.storage_options)
        return [json.dumps(fragment.to_json()) for fragment in written]

    def discard_fragments(self, name: str, fragments: list[str]) -> None:
        """Delete the data files of fragments written by ``write_fragments`` that will never be
        committed (a span judged after its first chunks were written, then rejected)."""
        for fragment in fragments:
            for file in json.loads(fragment).get("files", []):
                storage.delete(storage.join(self.table_uri(name), "data", file["path"]), self.storage_options)

    def commit_fragments(self, name: str, fragments: list[str], schema: pa.Schema) -> int:
        """Commit fragments written by ``write_fragments`` (their JSON metadata) as one new
        version; returns its number.

        Creates the table if absent. Fragments never committed (a crash before this call) are
        invisible: a re-run writes them again, and nothing is duplicated.
        """
        if not fragments:
            return self.version(name)
        fragments = [lance.FragmentMetadata.from_json(f) for f in fragments]
        if self.exists(name):
            ds = self.dataset(name)
            if ds.schema.remove_metadata() != schema.remove_metadata():
                raise ValueError(_mismatch(name, ds.schema, schema))
            operation, read_version = lance.LanceOperation.Append(fragments), ds.version
        else:
            operation, read_version = lance.LanceOperation.Overwrite(schema, fragments), None
        return lance.LanceDataset.commit(self.table_uri(name), operation, read_version=read_version,
                                         storage_options=self.storage_options).version

    def compact(self, name: str, *, min_fragments: int = COMPACT_MIN_FRAGMENTS,
                target_rows: int = COMPACT_TARGET_ROWS) -> int:
        """Merge the small fragments of ``name`` (under ``target_rows`` rows) into fewer files once
        there are more than ``min_fragments`` of them, in a new version with the same rows in the same order;
        returns the fragments removed (0: nothing to do). Curate commits a fragment per log, and a
        random-access ``take`` slows with their count: 250 rows of a 25,841-frame table took 90 ms
        over 301 fragments and 13 ms over one (the samplers' every batch is such a take)."""
        if not self.exists(name):
            return 0
        ds = self.dataset(name)
        if sum(f.metadata.physical_rows < target_rows for f in ds.get_fragments()) <= min_fragments:
            return 0
        return int(ds.optimize.compact_files(target_rows_per_fragment=target_rows).fragments_removed)

    def keys(self, name: str, column: str) -> set:
        """The distinct values of ``column`` (empty for a table that does not exist yet)."""
        if not self.exists(name):
            return set()
        return set(pc.unique(self.dataset(name).to_table(columns=[column]).column(column)).to_pylist())

    def read(self, name: str, *, columns: list[str] | None = None, filter: str | None = None,
             version: int | str | None = None) -> pa.Table:
        """Rows of a table (optionally at a version or tag) as Arrow."""
        return self.dataset(name, version).to_table(columns=columns, filter=filter)

    def count(self, name: str, filter: str | None = None) -> int:
        """Row count; 0 for a table that does not exist yet."""
        return self.dataset(name).count_rows(filter) if self.exists(name) else 0

    def version(self, name: str) -> int:
        """Latest version number; 0 for a table that does not exist yet."""
        return self.dataset(name).version if self.exists(name) else 0

    def tag(self, name: str, tag: str, version: int | None = None) -> int:
        """Point ``tag`` at ``version`` (default latest), moving it if it exists; returns the version."""
        ds = self.dataset(name)
        version = ds.version if version is None else int(version)
        if tag in ds.tags.list():
            ds.tags.update(tag, version)
        else:
            ds.tags.create(tag, version)
        return version

    def tags(self, name: str) -> dict[str, int]:
        return {t: info["version"] for t, info in self.dataset(name).tags.list().items()}

    def checkout(self, name: str, tag_or_version: int | str) -> lance.LanceDataset:
        """The dataset as of a tag or version number (``.to_table()`` for Arrow)."""
        return self.dataset(name, tag_or_version)

    def config_uri(self, name: str, version: int) -> str:
        return storage.join(self.uri, "_configs", name, f"v{int(version)}.json")

    def save_config(self, name: str, config: dict[str, Any], version: int | None = None) -> str:
        """Write ``config`` (credentials redacted) as JSON beside a table version; returns its URI."""
        version = self.version(name) if version is None else version
        uri = self.config_uri(name, version)
        data = json.dumps(_redact(config), indent=2, sort_keys=True, default=str).encode()
        storage.write_bytes(uri, data, self.storage_options)
        return uri

    def load_config(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The config saved beside a table version (default latest)."""
        version = self.version(name) if version is None else version
        return json.loads(storage.read_bytes(self.config_uri(name, version), self.storage_options))
