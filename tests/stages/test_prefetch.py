"""The background prefetcher: batches in order, a count, failures re-raised where they happened,
and a clean stop."""
from __future__ import annotations

import itertools
import threading
import time

import pytest

from stages.prefetch import Prefetcher


def counter():
    numbers = itertools.count()
    return lambda: next(numbers)


def test_one_thread_gives_the_batches_in_order_and_stops_at_the_count():
    with Prefetcher(counter(), depth=2, count=5) as batches:
        assert list(batches) == [0, 1, 2, 3, 4]
    with Prefetcher(counter(), count=0) as batches:
        assert list(batches) == []


def test_several_threads_make_each_batch_once():
    lock, made = threading.Lock(), []

    def make() -> int:
        with lock:
            made.append(len(made))
            return made[-1]
    with Prefetcher(make, depth=3, workers=3, count=20) as batches:
        assert sorted(batches) == list(range(20))
    assert len(made) == 20


def test_a_failure_is_raised_where_it_happened_after_the_batches_before_it():
    numbers = counter()

    def make() -> int:
        n = numbers()
        if n == 3:
            raise RuntimeError("bad batch 3")
        return n
    batches = Prefetcher(make, depth=2)
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="bad batch 3"):
        next(batches)
    with pytest.raises(StopIteration):  # closed by the failure
        next(batches)


@pytest.mark.timeout(10)
def test_close_stops_threads_blocked_on_a_full_queue():
    batches = Prefetcher(counter(), depth=1, workers=2)
    assert next(batches) == 0
    time.sleep(0.2)  # both threads now wait for room in the queue
    batches.close()
    assert not any(t.is_alive() for t in batches._threads)
    batches.close()  # idempotent
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(counter(), depth=0)


def test_the_next_batch_is_made_while_the_consumer_works():
    def slow() -> float:
        time.sleep(0.05)
        return time.perf_counter()
    with Prefetcher(slow, depth=2, count=4) as batches:
        first = next(batches)
        time.sleep(0.2)  # a training step
        waited = time.perf_counter()
        second = next(batches)
        assert time.perf_counter() - waited < 0.03 and second < waited  # made during the step
        assert second > first
