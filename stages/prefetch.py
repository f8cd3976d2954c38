"""Background prefetching: batches made ahead of the consumer, in threads, into a bounded queue.

``Prefetcher(make_batch)`` starts ``workers`` threads that call ``make_batch()`` again and
again and put the results into a queue of at most ``depth`` batches (a full queue blocks them:
at most ``depth`` batches wait, plus one in the making per thread); iterating takes batches out
in the order they were finished. The consumer waits only when the queue is empty: while it
works on a batch (a training step on an accelerator), the next ones are being made. It suits
loaders whose time goes to I/O and native code that releases the GIL (Lance ``take``,
decoding, NumPy copies).

* ``count``: the number of batches to make in all (then iteration stops), or None for endless.
* An exception in ``make_batch`` stops the making and is re-raised in the consumer at the
  batch where it happened (batches queued before it are delivered first).
* ``close()`` (or leaving a ``with`` block) stops the threads and waits for them: a thread in
  the middle of ``make_batch`` finishes that call first. Batches still queued are dropped.
* With ``workers > 1``, ``make_batch`` must be safe to call from several threads at once, and
  batches may arrive in another order than they were started.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_POLL_S = 0.05  # how often a blocked thread looks for a stop


class _Failure:
    """An exception of ``make_batch``, on its way to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()  # a thread has made its last batch


class Prefetcher(Generic[T]):
    """Iterate batches of ``make_batch()`` made ahead by ``workers`` threads (see the module doc)."""

    def __init__(self, make_batch: Callable[[], T], *, depth: int = 2, workers: int = 1,
                 count: int | None = None, name: str = "prefetch") -> None:
        if depth < 1 or workers < 1 or (count is not None and count < 0):
            raise ValueError(f"depth and workers must be >= 1 and count >= 0 or None, got "
                             f"depth={depth}, workers={workers}, count={count}")
        self._make = make_batch
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()  # set by close() or by a failure
        self._closed = False
        self._lock = threading.Lock()
        self._left = count
        self._running = workers  # threads whose _DONE the consumer has not yet seen
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def _claim(self) -> bool:
        """Reserve one of the ``count`` batches for the calling thread; False when none is left."""
        with self._lock:
            if self._left is None:
                return True
            if self._left <= 0:
                return False
            self._left -= 1
            return True

    def _put(self, item: object, *, until_closed: bool = False) -> None:
        """Queue ``item``, waiting for room while not stopped (a failure: while not closed)."""
        while not (self._closed if until_closed else self._stop.is_set()):
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _work(self) -> None:
        while not self._stop.is_set() and self._claim():
            try:
                batch = self._make()
            except BaseException as error:  # the consumer re-raises it
                self._stop.set()
                self._put(_Failure(error), until_closed=True)
                return
            self._put(batch)
        self._put(_DONE)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        while self._running and not self._closed:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is _DONE:  # each thread's batches come before its _DONE
                self._running -= 1
            elif isinstance(item, _Failure):
                self.close()
                raise item.error
            else:
                return item
        raise StopIteration

    def close(self) -> None:
        """Stop the threads and wait for them; queued batches are dropped. Idempotent."""
        self._closed = True
        self._stop.set()
        for thread in self._threads:
            while thread.is_alive():
                self._drain()
                thread.join(timeout=_POLL_S)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
