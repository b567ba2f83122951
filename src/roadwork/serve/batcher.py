"""Dynamic batching: requests wait up to ``max_queue_delay_ms`` for a batch of up to ``max_batch_size`` images
(with an adaptive window, only while more requests are on their way).

One worker task takes a batch off a queue and runs the model in a thread (ONNX Runtime releases the GIL), so
the event loop keeps accepting requests.

Bounds, each answered with :class:`QueueFull` / :class:`QueueTimeout` (the server turns both into 503 +
``Retry-After``) instead of letting latency grow:

- ``max_queue`` images waiting: a hard bound.
- ``max_latency_ms``: a latency budget. The worker measures how long batches take (``t(n) ≈ a + b·n``, fitted
  online from every batch it runs), so it knows how long the images already ahead of a new request take to
  serve; a request that could not be answered within the budget is refused at once. The queue bound thus
  follows the measured throughput: more images are admitted when batches are fast, fewer when they are slow.
- ``max_queue_wait_ms`` (Triton's queue-policy timeout): a request that has already waited longer than that
  when its batch is formed fails instead of being run late.

Isolation: when a batch of several requests fails, each of its requests is run again alone, so only the one
that makes the model fail gets the error; the others get their answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DynamicBatcher", "QueueFull", "QueueTimeout", "ServiceTime"]


class QueueFull(Exception):
    """The queue is at ``max_queue``, over the latency budget, or stopping: the server answers 503."""


class QueueTimeout(Exception):
    """The request waited over ``max_queue_wait_ms`` before its batch: 503 rather than a late answer."""


class ServiceTime:
    """Time of one model call of ``n`` images, ``t(n) = a + b·n``, fitted by exponentially weighted least squares
    over the batches run so far (``halflife`` batches), so it follows a machine that gets busier or quieter."""

    def __init__(self, halflife: float = 50.0) -> None:
        self.decay = 0.5 ** (1 / halflife)
        self.w = self.sn = self.st = self.snn = self.snt = 0.0

    def observe(self, n: int, seconds: float) -> None:
        d = self.decay
        self.w = d * self.w + 1
        self.sn = d * self.sn + n
        self.st = d * self.st + seconds
        self.snn = d * self.snn + n * n
        self.snt = d * self.snt + n * seconds

    @property
    def seen(self) -> bool:
        return self.w > 0

    def coefficients(self) -> tuple[float, float]:
        """``(a, b)``: seconds per call and per image, both >= 0."""
        if not self.w:
            return 0.0, 0.0
        mn, mt = self.sn / self.w, self.st / self.w
        var = self.snn / self.w - mn * mn
        if var <= 1e-9 * max(mn * mn, 1.0):  # one batch size only: all of it per image
            return 0.0, mt / max(mn, 1.0)
        b = max((self.snt / self.w - mn * mt) / var, 0.0)
        a = max(mt - b * mn, 0.0)
        return a, b

    def seconds(self, n: int) -> float:
        a, b = self.coefficients()
        return a + b * n

    def drain_seconds(self, images: int, max_batch_size: int) -> float:
        """How long ``images`` images take, in full batches."""
        if images <= 0:
            return 0.0
        a, b = self.coefficients()
        return math.ceil(images / max_batch_size) * a + images * b


@dataclass
class _Item:
    x: Any  # (n, 3, H, W) float32 array, or a cascade's StageInputs for n images
    meta: dict[str, list[str]]
    future: asyncio.Future[list[Any]]
    enqueued: float = field(default_factory=time.perf_counter)


def _join(parts: list[Any]) -> Any:
    """One batch from several requests' inputs: arrays, or anything with a ``concat`` of its own (a cascade's
    :class:`~roadwork.export.bundle.StageInputs`)."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return type(parts[0]).concat(parts)


class DynamicBatcher:
    """``run_batch(x, meta) -> list`` (one result per image) is called in ``executor``."""

    def __init__(
        self,
        run_batch: Callable[[Any, dict[str, list[str]]], list[Any]],
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue: int,
        executor: Executor,
        on_batch: Callable[[int, list[float]], None] | None = None,
        max_queue_wait_ms: float = 0.0,
        max_latency_ms: float = 0.0,
        incoming: Callable[[], int] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.delay = max_queue_delay_ms / 1000
        self.max_queue = max_queue
        self.executor = executor
        self.on_batch = on_batch
        self.max_wait = max_queue_wait_ms / 1000  # 0: no limit
        self.budget = max_latency_ms / 1000  # 0: no latency budget
        self.service = ServiceTime()
        self.incoming = incoming  # requests on their way to the queue (adaptive window); None: fixed window
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.waiting = 0  # images queued, not yet taken into a batch
        self.running = 0  # images in the batch the model runs now
        self._running_since = 0.0
        self._in_hand = 0  # requests the worker has taken off the queue and not yet answered
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        """Refuse new requests (:class:`QueueFull`), finish everything already queued or in a forming batch,
        then stop."""
        self._stopping = True
        while not self.queue.empty() or self.running or self._in_hand:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def expected_seconds(self, extra_images: int, ahead: int | None = None) -> float:
        """When a request of ``extra_images`` arriving now would be answered: the rest of the running batch, the
        images ahead of it (``ahead``, by default those waiting), its own batch and the batching window."""
        if not self.service.seen:
            return 0.0
        rest = 0.0
        if self.running:
            rest = max(self.service.seconds(self.running) - (time.perf_counter() - self._running_since), 0.0)
        ahead = self.waiting if ahead is None else ahead
        return rest + self.service.drain_seconds(ahead + extra_images, self.max_batch_size) + self.delay

    def over_budget(self, extra_images: int, ahead: int | None = None) -> bool:
        """Whether the latency budget refuses ``extra_images`` more now (never when nothing is ahead of them:
        an idle server always serves, however slow its model)."""
        if not self.budget:
            return False
        ahead = self.waiting if ahead is None else ahead
        if ahead <= 0 and not self.running:
            return False
        return self.expected_seconds(extra_images, ahead) > self.budget

    async def submit(self, x: Any, meta: dict[str, list[str]], *, admitted: bool = False) -> list[Any]:
        """Queue ``x`` and wait for its results. ``admitted``: the server already checked the latency budget for
        this request at admission (before reading and decoding it); only the hard ``max_queue`` bound is
        checked again."""
        n = len(x)
        if self._stopping:
            raise QueueFull
        if self.waiting + n > self.max_queue and self.waiting > 0:
            raise QueueFull
        if not admitted and self.over_budget(n):
            raise QueueFull
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.waiting += n
        self.queue.put_nowait(_Item(x, meta, fut))
        return await fut

    async def _run(self, items: list[_Item]) -> list[Any]:
        x = items[0].x if len(items) == 1 else _join([it.x for it in items])
        keys = {k for it in items for k in it.meta}
        meta = {k: [v for it in items for v in it.meta.get(k, [""] * len(it.x))] for k in keys}
        n = len(x)
        self.running, self._running_since = n, time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, x, meta)
        finally:
            self.running = 0
        self.service.observe(n, time.perf_counter() - self._running_since)
        return results

    async def _worker(self) -> None:
        while True:
            items = [await self.queue.get()]
            self._in_hand = 1
            try:
                await self._fill(items)
                self.waiting -= sum(len(it.x) for it in items)
                items = self._expire(items)
                if items:
                    await self._answer(items)
            finally:
                self._in_hand = 0

    async def _fill(self, items: list[_Item]) -> None:
        """Add queued requests to ``items`` until ``max_batch_size`` images or the batching window closes. The
        window is counted from the first request's arrival (Triton's ``max_queue_delay``), not from when the
        worker takes it: requests that queued while the model ran have waited already, so the next batch
        starts at once instead of leaving the model idle for another window. With ``incoming`` (the adaptive
        window), the window also closes when the queue is empty and no request is on its way to it."""
        n = len(items[0].x)
        deadline = items[0].enqueued + self.delay
        while n < self.max_batch_size:
            if self.incoming is not None and self.queue.empty() and self.incoming() <= 0:
                return
            timeout = deadline - time.perf_counter()
            try:
                nxt = (
                    self.queue.get_nowait()
                    if timeout <= 0
                    else await asyncio.wait_for(self.queue.get(), timeout)
                )
            except (asyncio.QueueEmpty, asyncio.TimeoutError):  # distinct before 3.11
                return
            items.append(nxt)
            self._in_hand = len(items)
            n += len(nxt.x)

    def _expire(self, items: list[_Item]) -> list[_Item]:
        """``max_queue_wait_ms``: requests already too late get :class:`QueueTimeout` (a 503 now rather than a
        slow 200); the others."""
        if self.max_wait <= 0:
            return items
        now = time.perf_counter()
        for it in items:
            if now - it.enqueued > self.max_wait and not it.future.done():
                it.future.set_exception(QueueTimeout())
        return [it for it in items if now - it.enqueued <= self.max_wait]

    async def _answer(self, items: list[_Item]) -> None:
        """Run one batch and hand each request its slice of the results; a failed batch of several requests is
        retried one by one, so only the request that makes the model fail gets the error."""
        now = time.perf_counter()
        waits = [now - it.enqueued for it in items]
        try:
            results = await self._run(items)
        except Exception as e:
            if len(items) > 1:
                await self._one_by_one(items)
            elif not items[0].future.done():
                items[0].future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(sum(len(it.x) for it in items), waits)
        start = 0
        for it in items:
            if not it.future.done():  # the client may have gone away
                it.future.set_result(results[start : start + len(it.x)])
            start += len(it.x)

    async def _one_by_one(self, items: list[_Item]) -> None:
        for it in items:
            if it.future.done():
                continue
            try:
                res = await self._run([it])
            except Exception as e:
                if not it.future.done():
                    it.future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(it.x), [time.perf_counter() - it.enqueued])
            if not it.future.done():
                it.future.set_result(res)
