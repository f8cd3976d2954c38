"""One writer per lake: a lease lock object at ``<lake>/_writer.lock``, held by every command that writes.

Two runs that write one lake at once (a scheduled run and one started from the UI, say) would
race on read-then-write steps: the open turn, curate's crash repair (it deletes frames whose
episode row is missing, which is exactly what another live run's in-flight episodes look like),
the next registry version. So every writing flow holds this lock for its whole body.

The lock is one small JSON object in the lake itself (owner id, host, pid, run, command,
acquired_at, heartbeat_at, expires_at, ttl_s), written with compare-and-swap on both backends:

* local disk: created with ``os.link`` of a fully written, fsynced temp file (atomic and
  exclusive like ``O_CREAT | O_EXCL``, and never shows a half-written record); replaced or
  deleted only under ``flock`` of ``<lake>/_writer.lock.guard`` after checking its content is
  the one expected (the kernel drops a dead taker's ``flock``, so the guard never goes stale);
* S3: ``put_object(IfNoneMatch="*")`` to create, ``put_object(IfMatch=etag)`` to renew or take
  over, ``delete_object(IfMatch=etag)`` to release.

A heartbeat thread renews the lease every ttl/4. A lock whose lease expired (its holder stopped
renewing: crashed, killed, host gone), or whose pid is gone on this same host, is taken over by
a compare-and-swap against the stale record, so of two racing takers exactly one wins. Lease
expiry compares the holder's wall clock with ours: hosts sharing a lake need synced clocks (NTP).

Settings (environment, so Prefect workers and the CLI share them): ``WORLDLOOP_LOCK_WAIT``,
seconds to wait for a lake another run holds (default 0: stop at once with an error naming the
holder); ``WORLDLOOP_LOCK_TTL``, the lease in seconds (default 60).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from stages import storage

LOCK_NAME = "_writer.lock"
DEFAULT_TTL_S = 60.0
_PROGRESS_EVERY_S = 30.0


class LakeBusy(ValueError):
    """Another live run holds the lake's writer lock (a ValueError: the CLI prints it as one line)."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run (it stopped renewing for longer than its ttl)."""


# --- compare-and-swap on one small object: a token is the content's sha256 locally, the ETag on S3 ---

def _s3_conflict(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412")


def read_object(uri: str, *, storage_options: dict | None = None) -> tuple[bytes, str] | None:
    """(content, token) of the object at ``uri``; None when it does not exist."""
    if storage.is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = storage._split_s3(uri)
        try:
            got = storage._s3_client(storage_options).get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return got["Body"].read(), got["ETag"].strip('"')
    try:
        with open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return data, hashlib.sha256(data).hexdigest()


def create_object(uri: str, data: bytes, *, storage_options: dict | None = None) -> str | None:
    """Create the object at ``uri`` only if absent; its token, or None when it already exists."""
    if storage.is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = storage._split_s3(uri)
        try:
            put = storage._s3_client(storage_options).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if _s3_conflict(exc):
                return None
            raise
        return put["ETag"].strip('"')
    directory = os.path.dirname(uri)
    os.makedirs(directory, exist_ok=True)
    tmp = _written_temp(directory, data)
    try:
        os.link(tmp, uri)  # atomic create-if-absent of a complete file
    except FileExistsError:
        return None
    finally:
        os.unlink(tmp)
    _fsync_dir(directory)
    return hashlib.sha256(data).hexdigest()


def swap_object(uri: str, data: bytes | None, *, token: str, storage_options: dict | None = None) -> str | None:
    """Replace (``data``) or delete (``data=None``) the object at ``uri`` only if its token is still
    ``token``; the new token ("" after a delete), or None when the object changed or is gone."""
    if storage.is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = storage._split_s3(uri)
        client = storage._s3_client(storage_options)
        try:
            if data is None:
                client.delete_object(Bucket=bucket, Key=key, IfMatch=token)
                return ""
            return client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=token)["ETag"].strip('"')
        except ClientError as exc:
            if _s3_conflict(exc):
                return None
            raise
    directory = os.path.dirname(uri)
    with open(uri + ".guard", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released when closed, or by the kernel if this process dies
        current = read_object(uri)
        if current is None or current[1] != token:
            return None
        if data is None:
            os.unlink(uri)
        else:
            os.replace(_written_temp(directory, data), uri)
        _fsync_dir(directory)
    return "" if data is None else hashlib.sha256(data).hexdigest()


def _written_temp(directory: str, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-lock-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the lease ---

def lock_uri(lake_uri: str) -> str:
    """Where a lake's writer lock lives."""
    return storage.join(lake_uri.rstrip("/") if storage.is_s3(lake_uri) else os.path.abspath(lake_uri), LOCK_NAME)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def parse_record(data: bytes, *, uri: str) -> dict[str, Any]:
    """A lock record, or a ValueError that says the object is not one (and how to clear it)."""
    try:
        record = json.loads(data)
        float(record["expires_at_epoch"]), int(record["pid"]), str(record["owner"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{uri} is not a worldloop writer lock ({type(exc).__name__}: {exc}); "
                         "if no worldloop run is writing this lake, delete it") from None
    return record


def stale_reason(record: dict[str, Any], *, now: float | None = None) -> str | None:
    """Why the holder of ``record`` may be taken over (its lease expired, or its process is gone
    from this host), or None while it is live."""
    now = time.time() if now is None else now
    if now > float(record["expires_at_epoch"]):
        return f"its lease expired at {record.get('expires_at')}"
    if record.get("host") == socket.gethostname() and not _pid_alive(int(record["pid"])):
        return f"its process {record['pid']} is gone from this host"
    return None


def describe(record: dict[str, Any]) -> str:
    """Who holds a lock, in words: run, command, pid, host, since when, lease."""
    run = f"run {record['run']!r} " if record.get("run") else ""
    return (f"{run}({record.get('command', '?')}, pid {record['pid']} on host {record.get('host', '?')}) "
            f"since {record.get('acquired_at', '?')}, lease renewed {record.get('heartbeat_at', '?')} "
            f"until {record.get('expires_at', '?')}")


class Lease:
    """One run's hold on one lake's lock: acquire (wait, take over, or fail), renew, release.

    ``hold`` is the way in; this class is what it yields (``record``, ``lost``, ``check``)."""

    def __init__(self, lake_uri: str, *, run: str = "", ttl_s: float = DEFAULT_TTL_S,
                 storage_options: dict | None = None) -> None:
        if not ttl_s > 0:
            raise ValueError(f"the lock's ttl must be a positive number of seconds, got {ttl_s!r}")
        self.lake_uri, self.uri, self.ttl_s = lake_uri, lock_uri(lake_uri), float(ttl_s)
        self.storage_options = storage_options if storage.is_s3(self.uri) else None
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "run": run,
                       "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:2]])}
        self.token: str | None = None
        self.lost = False
        self.depth = 0
        self._mutex = threading.Lock()  # one renew or release at a time
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _renewed(self) -> dict[str, Any]:
        """This lease's record as of now: acquired_at kept, heartbeat and expiry moved on."""
        now = time.time()
        return {"acquired_at": _iso(now), **self.record, "heartbeat_at": _iso(now), "ttl_s": self.ttl_s,
                "expires_at": _iso(now + self.ttl_s), "expires_at_epoch": now + self.ttl_s}

    def _put(self, *, token: str | None) -> bool:
        """Write this lease's renewed record: create it (``token=None``) or swap it for ``token``."""
        record = self._renewed()
        data, options = json.dumps(record, sort_keys=True).encode(), self.storage_options
        new = (create_object(self.uri, data, storage_options=options) if token is None
               else swap_object(self.uri, data, token=token, storage_options=options))
        if new is not None:
            self.record, self.token = record, new
        return new is not None

    def try_acquire(self) -> dict[str, Any] | None:
        """Take the lock if it is free or stale; None when taken, else the live holder's record."""
        while True:
            if self._put(token=None):
                return None
            current = read_object(self.uri, storage_options=self.storage_options)
            if current is None:  # released in between: try to create it again
                continue
            holder = parse_record(current[0], uri=self.uri)
            reason = stale_reason(holder)
            if reason is None:
                return holder
            if self._put(token=current[1]):  # of racing takers, only the first swap finds the stale token
                print(f"worldloop: took over the writer lock of {self.lake_uri} from {describe(holder)}: "
                      f"{reason}", file=sys.stderr, flush=True)
                return None

    def acquire(self, *, wait_s: float = 0.0) -> None:
        """Take the lock, waiting up to ``wait_s`` seconds for a live holder (a line on stderr says
        who every 30 s); LakeBusy when it is still held after that."""
        deadline, said = time.monotonic() + wait_s, -_PROGRESS_EVERY_S
        while (holder := self.try_acquire()) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LakeBusy(self._busy_message(holder, wait_s))
            if time.monotonic() - said >= _PROGRESS_EVERY_S:
                said = time.monotonic()
                print(f"worldloop: waiting up to {left:.0f} s for the writer lock of {self.lake_uri}: held by "
                      f"{describe(holder)}", file=sys.stderr, flush=True)
            time.sleep(min(left, 1.0, self.ttl_s / 8))
        self._beat = threading.Thread(target=self._heartbeat, name="worldloop-lake-lock", daemon=True)
        self._beat.start()

    def _busy_message(self, holder: dict[str, Any], wait_s: float) -> str:
        waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
        return (f"the lake {self.lake_uri} is being written by another run{waited}: {describe(holder)}. "
                f"Run again when it is done, or set WORLDLOOP_LOCK_WAIT=SECONDS to wait for it. A crashed "
                f"run's lock is taken over by itself once its lease expires, or at once on host "
                f"{holder.get('host')} when pid {holder['pid']} is gone; only if that run is surely "
                f"stopped and its lease keeps being renewed, delete {self.uri}")

    def _heartbeat(self) -> None:
        """Renew the lease every ttl/4 until released; a renewal that finds the lock changed, or
        no renewal before the lease ran out, marks it lost."""
        while not self._stop.wait(self.ttl_s / 4):
            with self._mutex:
                if self._stop.is_set() or self.lost:
                    return
                try:
                    renewed = self._put(token=self.token)
                except Exception as exc:  # noqa: BLE001 -- unreachable for now: retry until the lease runs out
                    renewed = time.time() < float(self.record["expires_at_epoch"])
                    print(f"worldloop: could not renew the writer lock of {self.lake_uri} "
                          f"({type(exc).__name__}); retrying", file=sys.stderr, flush=True)
                if not renewed:
                    self.lost = True
                    print(f"worldloop: LOST the writer lock of {self.lake_uri}: another run may be writing "
                          "it; this run stops with an error", file=sys.stderr, flush=True)
                    return

    def check(self) -> None:
        """LeaseLost if another run took this lease over."""
        if self.lost:
            raise LeaseLost(f"the writer lock of {self.lake_uri} was taken over by another run while this "
                            f"one held it (no renewal for {self.ttl_s:g} s): its writes may overlap this run's")

    def release(self) -> None:
        """Stop renewing and delete the lock if it is still ours; LeaseLost if it was not."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        with self._mutex:
            if not self.lost and self.token is not None:
                self.lost = swap_object(self.uri, None, token=self.token,
                                        storage_options=self.storage_options) is None
        self.check()


_HELD: dict[str, Lease] = {}  # lock URI -> this process's lease (nested flows share it)
_HELD_GUARD = threading.Lock()


def settings_from_env() -> dict[str, float]:
    """``wait_s`` and ``ttl_s`` from WORLDLOOP_LOCK_WAIT / WORLDLOOP_LOCK_TTL (defaults 0 and 60 s)."""
    out = {}
    for key, name, default in (("wait_s", "WORLDLOOP_LOCK_WAIT", 0.0), ("ttl_s", "WORLDLOOP_LOCK_TTL", DEFAULT_TTL_S)):
        text = os.environ.get(name, "").strip()
        try:
            out[key] = float(text) if text else default
        except ValueError:
            raise ValueError(f"{name}={text!r} is not a number of seconds") from None
        if out[key] < 0 or out[key] != out[key]:
            raise ValueError(f"{name}={text!r} must be a number of seconds >= 0")
    return out


@contextlib.contextmanager
def hold(lake_uri: str, *, run: str = "", storage_options: dict | None = None,
         wait_s: float | None = None, ttl_s: float | None = None) -> Iterator[Lease]:
    """Hold the lake's writer lock for the block: taken on entry (see ``Lease.acquire``), renewed
    meanwhile, released on exit (also on an exception or SystemExit, which the CLI makes of SIGTERM).

    Reentrant within a process: a flow inside another that holds it (the flywheel's subflows) shares
    the outer lease. ``wait_s`` / ``ttl_s`` default to ``settings_from_env``. A lease lost meanwhile is
    a LeaseLost on exit, unless the block is already raising.
    """
    uri = lock_uri(lake_uri)
    with _HELD_GUARD:
        lease = _HELD.get(uri)
        if lease is not None:
            lease.depth += 1
    if lease is None:
        settings = settings_from_env()
        lease = Lease(lake_uri, run=run, storage_options=storage_options,
                      ttl_s=settings["ttl_s"] if ttl_s is None else ttl_s)
        lease.acquire(wait_s=settings["wait_s"] if wait_s is None else wait_s)
        lease.depth = 1
        with _HELD_GUARD:
            _HELD[uri] = lease
    raising = True
    try:
        yield lease
        raising = False
    finally:
        with _HELD_GUARD:
            lease.depth -= 1
            last = lease.depth == 0
            if last:
                del _HELD[uri]
        if last:
            with contextlib.suppress(LeaseLost) if raising else contextlib.nullcontext():
                lease.release()


def require_held(lake_uri: str) -> Lease:
    """This process's live lease on the lake; RuntimeError when it holds none (a step that is only
    safe with no other writer, such as deleting a crashed run's leftovers, calls this first)."""
    with _HELD_GUARD:
        lease = _HELD.get(lock_uri(lake_uri))
    if lease is None:
        raise RuntimeError(f"this step writes {lake_uri} and needs its writer lock: run it inside "
                           "stages.lock.hold (flows: Context.writer_lock)")
    lease.check()
    return lease
