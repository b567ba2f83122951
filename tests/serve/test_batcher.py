from __future__ import annotations

import asyncio
import threading
import time
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


def test_a_failing_batch_is_retried_request_by_request():
    calls: list[int] = []

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        calls.append(len(x))
        if (x < 0).any():
            raise ValueError("poison")
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = DynamicBatcher(
            run_batch, max_batch_size=8, max_queue_delay_ms=100, max_queue=100, executor=ThreadPoolExecutor(1)
        )
        b.start()
        reqs = [b.submit(np.full((2, 1), v, np.float32), {}) for v in (1.0, -1.0, 3.0)]
        out = await asyncio.gather(*reqs, return_exceptions=True)
        await b.stop()
        return out

    good, bad, other = _run(main())
    assert good == [1.0, 1.0] and other == [3.0, 3.0] and isinstance(bad, ValueError)
    assert calls == [6, 2, 2, 2]  # the batch, then each request alone


def test_service_time_fit_recovers_a_linear_batch_cost():
    from roadwork.serve.batcher import ServiceTime

    st = ServiceTime()
    rng = np.random.default_rng(0)
    for n in rng.integers(1, 33, 200):
        st.observe(int(n), 0.004 + 0.0005 * n + rng.normal(0, 1e-5))
    a, b = st.coefficients()
    assert a == pytest.approx(0.004, abs=2e-4) and b == pytest.approx(0.0005, rel=0.02)
    assert st.drain_seconds(64, 32) == pytest.approx(2 * a + 64 * b)
    one = ServiceTime()
    one.observe(4, 0.02)  # a single batch size: all of it per image
    assert one.coefficients() == (0.0, pytest.approx(0.005))


def test_the_latency_budget_bounds_the_queue_by_measured_throughput():
    gate = threading.Event()

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        gate.wait(5)
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = DynamicBatcher(
            run_batch,
            max_batch_size=4,
            max_queue_delay_ms=0,
            max_queue=1000,
            executor=ThreadPoolExecutor(1),
            max_latency_ms=100,
        )
        for _ in range(10):
            b.service.observe(4, 0.04)  # 10 ms per image in batches of 4: 100 ms serve ~10 images
        b.start()
        assert not b.over_budget(50)  # an idle server always admits
        running = asyncio.ensure_future(b.submit(np.ones((4, 1), np.float32), {}))
        await asyncio.sleep(0.05)  # the worker runs it and blocks on the gate (its 40 ms are almost spent)
        queued = []
        while True:
            try:
                queued.append(await asyncio.wait_for(b.submit(np.ones((1, 1), np.float32), {}), 0.001))
            except asyncio.TimeoutError:  # admitted: it waits (not builtin TimeoutError: 3.10)
                continue
            except QueueFull:
                break
        admitted = b.waiting
        gate.set()
        await running
        await b.stop()
        return admitted

    admitted = _run(main())
    assert 5 <= admitted <= 10  # (100 ms - the batching window) / 10 ms per image, less the running rest


def test_the_batching_window_counts_from_a_request_s_arrival_not_from_when_the_worker_takes_it():
    """Triton's max_queue_delay: a request that already waited its window (queued behind a running batch) is
    batched at once; counted from the worker's pick-up, it would wait a second window with the model idle."""
    from roadwork.serve.batcher import _Item

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = DynamicBatcher(
            run_batch,
            max_batch_size=8,
            max_queue_delay_ms=60_000,
            max_queue=100,
            executor=ThreadPoolExecutor(1),
        )
        b.start()
        fut = asyncio.get_running_loop().create_future()
        b.waiting += 1
        # arrived 61 s ago, as if it had queued behind a long batch: its window is over
        b.queue.put_nowait(_Item(np.ones((1, 1), np.float32), {}, fut, enqueued=time.perf_counter() - 61))
        out = await asyncio.wait_for(fut, 30)  # a safety net: a second window would take 60 s
        await b.stop()
        return out

    assert _run(main()) == [1.0]


def test_the_adaptive_window_closes_when_nothing_is_on_its_way_and_waits_while_something_is():
    """``incoming``: requests admitted but not yet queued. With none, a lone request runs at once instead of
    waiting out the (here 60 s) window; while one is on its way, the window stays open for it."""
    calls: list[int] = []
    on_the_way = [0]

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        calls.append(len(x))
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = DynamicBatcher(
            run_batch,
            max_batch_size=8,
            max_queue_delay_ms=60_000,
            max_queue=100,
            executor=ThreadPoolExecutor(1),
            incoming=lambda: on_the_way[0],
        )
        b.start()
        # nothing on its way: answered without the window (the 30 s guard only stops a hang)
        alone = await asyncio.wait_for(b.submit(np.ones((1, 1), np.float32), {}), 30)
        # one more on its way: the first waits for it, and both go in one batch
        on_the_way[0] = 1
        first = asyncio.ensure_future(b.submit(np.full((1, 1), 2.0, np.float32), {}))
        await asyncio.sleep(0.05)
        assert not first.done() and calls == [1]
        on_the_way[0] = 0
        second = await asyncio.wait_for(b.submit(np.full((1, 1), 3.0, np.float32), {}), 30)
        pair = await asyncio.wait_for(first, 30)
        await b.stop()
        return alone, pair, second

    alone, pair, second = _run(main())
    assert alone == [1.0] and pair == [2.0] and second == [3.0]
    assert calls == [1, 2]
