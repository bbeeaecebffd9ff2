"""Server-side micro-batching: one worker thread owns the model and runs queued images together.

A forward pass over 16 images costs far less than 16 passes over one (the weights are read once, the
matrix products are larger), so under load the server answers more images per second if concurrent
requests share passes. Each image of each request is queued; the worker takes the first, waits at
most ``max_wait_s`` for others (taking at once whatever is already queued), and runs up to
``max_batch`` of them in one call. An idle server therefore adds at most ``max_wait_s`` to a request.

Everything that touches the model runs on that one thread: the event loop never blocks on torch, and
Grad-CAM (hooks and gradients on the shared model) never runs concurrently with a forward pass.
Grad-CAM requests are :meth:`MicroBatcher.call` jobs, run alone between batches.

Pure standard library: results come back as :class:`concurrent.futures.Future` objects, which asyncio
code awaits with :func:`asyncio.wrap_future`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("dermcam.serve")


@dataclass
class _Item(Generic[T]):
    value: T
    future: Future


@dataclass
class _Call:
    function: Callable[[], Any]
    future: Future


_STOP = object()


class MicroBatcher(Generic[T, R]):
    """Queue items one by one, get results one by one; ``run_batch`` sees them in batches.

    ``run_batch(items) -> results`` (same length and order) runs on the worker thread only.
    """

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], *, max_batch: int, max_wait_s: float) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._sizes: Counter[int] = Counter()
        self._calls = 0

    # -- the caller's side --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker (again after :meth:`stop`); a no-op while it runs."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="dermcam-model", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then end the worker."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout)

    def submit(self, value: T) -> Future:
        """Queue one item; its future gets its result (or the batch's exception)."""
        self.start()
        future: Future = Future()
        self._queue.put(_Item(value, future))
        return future

    def call(self, function: Callable[[], Any]) -> Future:
        """Run ``function()`` on the worker thread, alone (between batches)."""
        self.start()
        future: Future = Future()
        self._queue.put(_Call(function, future))
        return future

    def stats(self) -> dict[str, Any]:
        """Batches run so far: how many, how many images, the largest, and how many of each size."""
        with self._lock:
            sizes = dict(sorted(self._sizes.items()))
            calls = self._calls
        return {"batches": sum(sizes.values()), "images": sum(n * k for n, k in sizes.items()),
                "largest_batch": max(sizes, default=0), "batch_sizes": {str(n): k for n, k in sizes.items()},
                "cam_calls": calls, "max_batch": self.max_batch, "max_wait_ms": round(self.max_wait_s * 1000, 3)}

    # -- the worker's side --------------------------------------------------------------------------

    def _work(self) -> None:
        stopping = False
        while not stopping:
            job = self._queue.get()
            if job is _STOP:
                break
            if isinstance(job, _Call):
                self._run_call(job)
                continue
            batch, held, stopping = self._gather(job)
            self._run(batch)
            for call in held:
                self._run_call(call)
        self._drain()

    def _gather(self, first: _Item) -> tuple[list[_Item], list[_Call], bool]:
        """``first`` and the items that join it: up to ``max_batch``, waiting until ``max_wait_s`` after
        ``first`` was taken, then taking only what is already queued. Calls met on the way run after."""
        batch, held = [first], []
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return batch, held, True
            if isinstance(job, _Call):
                held.append(job)
            else:
                batch.append(job)
        return batch, held, False

    def _run(self, batch: list[_Item]) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]  # a client gone: skipped
        if not live:
            return
        try:
            results = self._run_batch([item.value for item in live])
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
        except Exception as exc:  # every waiting request gets the error; the worker goes on
            log.exception("a batch of %d failed", len(live))
            for item in live:
                item.future.set_exception(exc)
        else:
            for item, result in zip(live, results):
                item.future.set_result(result)
        with self._lock:
            self._sizes[len(live)] += 1

    def _run_call(self, call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.function())
        except Exception as exc:
            call.future.set_exception(exc)
        with self._lock:
            self._calls += 1

    def _drain(self) -> None:
        """After a stop: what is still queued fails instead of waiting for ever."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, (_Item, _Call)) and job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))
