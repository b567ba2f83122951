from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from roadwork.serve.batcher import DynamicBatcher, QueueFull


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_requests_are_batched_and_get_their_own_rows_back():
    calls: list[int] = []

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        calls.append(len(x))
        return [(float(v), m) for v, m in zip(x[:, 0], meta.get("weather", [""] * len(x)), strict=True)]

    async def main():  # type: ignore[no-untyped-def]
        b = DynamicBatcher(
            run_batch, max_batch_size=8, max_queue_delay_ms=50, max_queue=100, executor=ThreadPoolExecutor(1)
        )
        b.start()
        reqs = [
            b.submit(np.full((2, 1), i, np.float32), {"weather": [f"w{i}", f"w{i}"]} if i % 2 else {})
            for i in range(4)
        ]
        out = await asyncio.gather(*reqs)
        await b.stop()
        return out

    out = _run(main())
    assert calls == [8]  # four requests of two images, one model call
    assert out[1] == [(1.0, "w1"), (1.0, "w1")] and out[2] == [(2.0, ""), (2.0, "")]


def test_a_full_queue_refuses_at_once_and_a_model_error_fails_only_its_batch():
    gate = threading.Event()

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        gate.wait(5)
        if x[0, 0] < 0:
            raise RuntimeError("model exploded")
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = DynamicBatcher(
            run_batch, max_batch_size=1, max_queue_delay_ms=0, max_queue=2, executor=ThreadPoolExecutor(1)
        )
        b.start()
        first = asyncio.ensure_future(b.submit(np.ones((1, 1), np.float32), {}))
        await asyncio.sleep(0.05)  # the worker takes it and blocks on the gate
        queued = [asyncio.ensure_future(b.submit(np.full((1, 1), v, np.float32), {})) for v in (-1.0, 3.0)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await b.submit(np.ones((1, 1), np.float32), {})
        gate.set()
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        await b.stop()
        return results

    first, bad, good = _run(main())
    assert first == [1.0] and isinstance(bad, RuntimeError) and good == [3.0]


def test_requests_that_waited_past_the_budget_get_a_timeout_not_a_late_answer():
    from roadwork.serve.batcher import QueueTimeout

    gate = threading.Event()
    calls: list[int] = []

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        gate.wait(5)
        calls.append(len(x))
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = DynamicBatcher(
            run_batch,
            max_batch_size=1,
            max_queue_delay_ms=0,
            max_queue=10,
            executor=ThreadPoolExecutor(1),
            max_queue_wait_ms=50,
        )
        b.start()
        first = asyncio.ensure_future(b.submit(np.ones((1, 1), np.float32), {}))
        await asyncio.sleep(0.02)  # the worker runs it and blocks on the gate
        late = asyncio.ensure_future(b.submit(np.full((1, 1), 2.0, np.float32), {}))
        await asyncio.sleep(0.15)  # ... while this one waits three times its budget
        gate.set()
        results = await asyncio.gather(first, late, return_exceptions=True)
        fresh = await b.submit(np.full((1, 1), 3.0, np.float32), {})  # an idle server answers in time
        await b.stop()
        return results, fresh

    (first, late), fresh = _run(main())
    assert first == [1.0] and isinstance(late, QueueTimeout) and fresh == [3.0]
    assert calls == [1, 1]  # the late request never reached the model
