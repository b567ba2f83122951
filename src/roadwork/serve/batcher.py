"""Dynamic batching: requests wait up to ``max_queue_delay_ms`` for a batch of up to ``max_batch_size`` images.

One worker task takes a batch off a bounded queue and runs the model in a thread (ONNX Runtime releases the
GIL), so the event loop keeps accepting requests. When ``max_queue`` images are waiting, :meth:`submit`
raises :class:`QueueFull` at once (the server answers 503 with ``Retry-After``) instead of letting latency grow.
With ``max_queue_wait_ms`` (Triton's queue-policy timeout), a request that has already waited longer than that
when its batch is formed fails with :class:`QueueTimeout` (also a 503) instead of being run late: under overload
the answered requests keep their latency and the late ones are told to retry at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DynamicBatcher", "QueueFull", "QueueTimeout"]


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


@dataclass
class _Item:
    x: Any  # (n, 3, H, W) float32 array, or a list of n decoded images (cascade bundles)
    meta: dict[str, list[str]]
    future: asyncio.Future[list[Any]]
    enqueued: float = field(default_factory=time.perf_counter)


def _join(parts: list[Any]) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [im for p in parts for im in p]


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
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.delay = max_queue_delay_ms / 1000
        self.max_queue = max_queue
        self.executor = executor
        self.on_batch = on_batch
        self.max_wait = max_queue_wait_ms / 1000  # 0: no limit
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.waiting = 0  # images queued, not yet taken into a batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        """Finish everything already queued, then stop."""
        while not self.queue.empty():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, x: Any, meta: dict[str, list[str]]) -> list[Any]:
        if self.waiting + len(x) > self.max_queue and self.waiting > 0:
            raise QueueFull
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.waiting += len(x)
        self.queue.put_nowait(_Item(x, meta, fut))
        return await fut

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            n = len(items[0].x)
            deadline = loop.time() + self.delay
            while n < self.max_batch_size:
                timeout = deadline - loop.time()
                try:
                    nxt = (
                        self.queue.get_nowait()
                        if timeout <= 0
                        else await asyncio.wait_for(self.queue.get(), timeout)
                    )
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                items.append(nxt)
                n += len(nxt.x)
            self.waiting -= n
            now = time.perf_counter()
            if self.max_wait > 0:  # too late to answer within budget: 503 now rather than a slow 200
                late = [it for it in items if now - it.enqueued > self.max_wait]
                for it in late:
                    if not it.future.done():
                        it.future.set_exception(QueueTimeout())
                items = [it for it in items if now - it.enqueued <= self.max_wait]
                if not items:
                    continue
                n = sum(len(it.x) for it in items)
            waits = [now - it.enqueued for it in items]
            x = items[0].x if len(items) == 1 else _join([it.x for it in items])
            keys = {k for it in items for k in it.meta}
            meta = {k: [v for it in items for v in it.meta.get(k, [""] * len(it.x))] for k in keys}
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, x, meta)
            except Exception as e:  # a model failure fails this batch's requests, not the server
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(n, waits)
            start = 0
            for it in items:
                if not it.future.done():  # the client may have gone away
                    it.future.set_result(results[start : start + len(it.x)])
                start += len(it.x)
