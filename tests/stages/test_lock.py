"""One writer per lake: the lease lock on a local disk and on S3 (moto's server), and two real
processes appending to one Lance table under it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from stages import lock, storage
from stages.lake import Lake
from tests.stages.test_storage import root  # noqa: F401  (fixture: local and s3 roots)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def lake(root):
    """(lake URI, storage options) on a tmp dir and on the moto S3 server."""
    uri, options = root
    return storage.join(uri, "lake"), options


def stored(uri, options):
    found = lock.read_object(lock.lock_uri(uri), storage_options=options)
    return None if found is None else json.loads(found[0])


def plant(uri, options, **fields):
    """A lock record written by someone else (a crashed or remote run)."""
    record = {"owner": "someone", "host": "elsewhere", "pid": 1, "run": "old", "command": "worldloop run",
              "acquired_at": "then", "expires_at": "then", "expires_at_epoch": time.time() + 600, **fields}
    assert lock.create_object(lock.lock_uri(uri), json.dumps(record).encode(), storage_options=options)


def test_exclusive_renewed_then_released(lake):
    uri, options = lake
    with lock.hold(uri, run="flywheel/first", storage_options=options, wait_s=0, ttl_s=0.8) as lease:
        assert stored(uri, options)["owner"] == lease.record["owner"]
        other = lock.Lease(uri, run="second", storage_options=options)
        assert other.try_acquire()["run"] == "flywheel/first"
        with pytest.raises(lock.LakeBusy) as busy:
            other.acquire(wait_s=0)
        message = str(busy.value)
        for part in ("run 'flywheel/first'", f"pid {os.getpid()}", lock.lock_uri(uri), "WORLDLOOP_LOCK_WAIT", "since"):
            assert part in message
        first_beat = stored(uri, options)["expires_at_epoch"]
        time.sleep(1.0)  # longer than the ttl: only the heartbeat keeps it live
        assert stored(uri, options)["expires_at_epoch"] > first_beat and not lease.lost
        assert other.try_acquire() is not None
    assert stored(uri, options) is None


def test_reentrant_within_a_process(lake):
    uri, options = lake
    with lock.hold(uri, run="flywheel", storage_options=options, wait_s=0) as outer:
        with lock.hold(uri, run="curate", storage_options=options, wait_s=0) as inner:
            assert inner is outer and lock.require_held(uri) is outer
        assert stored(uri, options)["run"] == "flywheel"
    assert stored(uri, options) is None
    with pytest.raises(RuntimeError, match="needs its writer lock"):
        lock.require_held(uri)


def test_expired_lease_goes_to_exactly_one_of_racing_takers(lake, capsys):
    uri, options = lake
    plant(uri, options, expires_at_epoch=time.time() - 1)
    takers = [lock.Lease(uri, run=f"taker-{i}", storage_options=options) for i in range(4)]
    start, results = threading.Barrier(len(takers)), {}

    def take(lease):
        start.wait()
        results[lease.record["run"]] = lease.try_acquire()

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [run for run, holder in results.items() if holder is None]
    assert len(winners) == 1, results
    assert stored(uri, options)["run"] == winners[0]
    assert all(holder["run"] == winners[0] for holder in results.values() if holder is not None)
    assert "lease expired" in capsys.readouterr().err
    # the same race, interleaved by hand: both saw the stale record; only the first swap lands
    path = lock.lock_uri(uri)
    stale = lock.read_object(path, storage_options=options)[1]
    assert lock.swap_object(path, b'{"a": 1}', token=stale, storage_options=options)
    assert lock.swap_object(path, b'{"b": 2}', token=stale, storage_options=options) is None
    assert lock.swap_object(path, None, token=stale, storage_options=options) is None
    assert json.loads(lock.read_object(path, storage_options=options)[0]) == {"a": 1}


def test_dead_holder_on_this_host_is_taken_over_at_once(lake, capsys):
    uri, options = lake
    code = ("import json, os, sys; from stages import lock; "
            "lock.Lease(sys.argv[1], run='crashed', ttl_s=600, storage_options=json.loads(sys.argv[2])).acquire(); "
            "os._exit(0)")
    subprocess.run([sys.executable, "-c", code, uri, json.dumps(options)], cwd=ROOT, check=True, timeout=60)
    assert stored(uri, options)["run"] == "crashed"
    with lock.hold(uri, run="next", storage_options=options, wait_s=0):
        assert stored(uri, options)["run"] == "next"
    assert "is gone from this host" in capsys.readouterr().err


def test_live_holder_elsewhere_is_waited_for_then_taken(lake, capsys):
    uri, options = lake
    holder = lock.Lease(uri, run="nightly", storage_options=options, ttl_s=5)
    holder.acquire()
    timer = threading.Timer(1.0, holder.release)
    timer.start()
    began = time.monotonic()
    with lock.hold(uri, run="from-ui", storage_options=options, wait_s=30):
        assert time.monotonic() - began >= 0.9 and stored(uri, options)["run"] == "from-ui"
    timer.join()
    err = capsys.readouterr().err
    assert "waiting up to" in err and "run 'nightly'" in err


def test_a_lease_taken_over_while_held_is_reported(lake):
    uri, options = lake
    with pytest.raises(lock.LeaseLost, match="taken over by another run"), \
            lock.hold(uri, run="stalled", storage_options=options, wait_s=0, ttl_s=0.8) as lease:
        path = lock.lock_uri(uri)  # another run that judged this lease expired swaps it
        for _ in range(20):  # the holder's heartbeat may renew between our read and our swap
            if lock.swap_object(path, b"{}", token=lock.read_object(path, storage_options=options)[1],
                                storage_options=options):
                break
        else:
            pytest.fail("could not swap the lock object")
        deadline = time.monotonic() + 10
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.lost
        with pytest.raises(lock.LeaseLost):
            lock.require_held(uri)
    assert json.loads(lock.read_object(lock.lock_uri(uri), storage_options=options)[0]) == {}


def test_bad_settings_and_foreign_lock_objects_are_clear_errors(tmp_path, monkeypatch):
    uri = str(tmp_path / "lake")
    monkeypatch.setenv("WORLDLOOP_LOCK_WAIT", "soon")
    with pytest.raises(ValueError, match="WORLDLOOP_LOCK_WAIT='soon' is not a number"), lock.hold(uri):
        pass
    monkeypatch.setenv("WORLDLOOP_LOCK_WAIT", "0")
    monkeypatch.setenv("WORLDLOOP_LOCK_TTL", "-1")
    with pytest.raises(ValueError, match="WORLDLOOP_LOCK_TTL"), lock.hold(uri):
        pass
    monkeypatch.delenv("WORLDLOOP_LOCK_TTL")
    assert lock.create_object(lock.lock_uri(uri), b"not json")
    with pytest.raises(ValueError, match="is not a worldloop writer lock.*delete it"), lock.hold(uri):
        pass


# Two real processes append to one Lance table, each row numbered by reading the table first (a
# read-then-write step like the open turn or the next registry version): with two writers at once
# numbers would collide and rows be lost; under the lock they are 0..N-1, each writer's in one run.
WRITER = """
import signal, sys, time
import pyarrow as pa
from stages import lock
from stages.lake import Lake

def exit_on_sigterm(signum, frame):  # as flows.cli does
    raise SystemExit(128 + signum)

signal.signal(signal.SIGTERM, exit_on_sigterm)
uri, name, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
with lock.hold(uri, run=name):
    print("holding", flush=True)
    lake = Lake(uri)
    for _ in range(rows):
        seq = lake.count("log")
        time.sleep(0.05)
        lake.append("log", pa.table({"seq": [seq], "writer": [name]}), key="seq")
"""


def writer(lake_uri, name, rows, *, wait_s):
    env = {**os.environ, "WORLDLOOP_LOCK_WAIT": str(wait_s), "WORLDLOOP_LOCK_TTL": "5", "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-c", WRITER, lake_uri, name, str(rows)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def started(proc):
    assert proc.stdout.readline().strip() == "holding", proc.communicate(timeout=60)
    return proc


def test_two_processes_on_one_lake_one_waits_or_stops_and_no_row_is_lost_or_doubled(tmp_path):
    uri = str(tmp_path / "lake")
    first = started(writer(uri, "first", 24, wait_s=0))
    refused = writer(uri, "refused", 12, wait_s=0)
    second = writer(uri, "second", 12, wait_s=60)
    _, err = refused.communicate(timeout=60)
    assert refused.returncode != 0 and "LakeBusy" in err
    assert "is being written by another run: run 'first' (" in err and f"pid {first.pid} " in err
    for proc in (first, second):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert "waiting up to 60 s" in err and "held by run 'first'" in err
    rows = Lake(uri).read("log").to_pylist()
    assert sorted(r["seq"] for r in rows) == list(range(36))
    assert [r["writer"] for r in sorted(rows, key=lambda r: r["seq"])] == ["first"] * 24 + ["second"] * 12
    assert stored(uri, None) is None


def test_a_flow_stops_on_a_lake_another_process_holds_and_writes_nothing(tmp_path, prefect_harness):
    """Flows take the lock through Context.writer_lock: curate against a lake another live process
    holds stops before touching it, with the holder named."""
    from flows.curate import curate_flow

    uri = str(tmp_path / "lake")
    holder = started(writer(uri, "nightly", 1000, wait_s=0))
    try:
        with pytest.raises(lock.LakeBusy, match=f"run 'nightly' .*pid {holder.pid} "):
            curate_flow(config="tiny", lake=uri, landing=str(tmp_path / "landing"))
        assert set(os.listdir(uri)) <= {lock.LOCK_NAME, f"{lock.LOCK_NAME}.guard", "log.lance"}  # the holder's
    finally:
        holder.terminate()
        holder.communicate(timeout=60)
    assert stored(uri, None) is None


def test_nested_flows_share_the_outer_flow_runs_lease(tmp_path, prefect_harness):
    from prefect import flow

    from flows.config import resolve
    from flows.runtime import Context

    ctx = Context(resolve("tiny"), str(tmp_path / "lake"), str(tmp_path / "landing"))

    @flow(name="inner")
    def inner() -> tuple[str, str]:
        with ctx.writer_lock() as lease:
            return lease.record["owner"], stored(ctx.lake_uri, None)["run"]

    @flow(name="outer")
    def outer() -> tuple[str, tuple[str, str]]:
        with ctx.writer_lock() as lease:
            return lease.record["owner"], inner()

    owner, (inner_owner, run) = outer()
    assert owner == inner_owner and run.startswith("outer/")
    assert stored(ctx.lake_uri, None) is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_or_killed_writer_leaves_the_lake_to_the_next_one(tmp_path, sig):
    """SIGTERM releases the lock on the way out; after SIGKILL the next run takes it over at once
    (its pid is gone from this host). Rows the dead run committed stay, once each."""
    uri = str(tmp_path / "lake")
    victim = started(writer(uri, "victim", 1000, wait_s=0))
    time.sleep(0.5)
    victim.send_signal(sig)
    victim.communicate(timeout=60)
    assert (stored(uri, None) is None) == (sig == signal.SIGTERM)
    committed = Lake(uri).count("log")
    nxt = writer(uri, "next", 5, wait_s=0)
    _, err = nxt.communicate(timeout=60)
    assert nxt.returncode == 0, err
    assert ("is gone from this host" in err) == (sig == signal.SIGKILL)
    rows = Lake(uri).read("log").to_pylist()
    assert sorted(r["seq"] for r in rows) == list(range(committed + 5))
