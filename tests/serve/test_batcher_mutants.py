"""Tests that kill the mutants of ``serve/batcher.py`` the first mutation run left alive (issue 20): the
batching delay, admission counted in images, the cascade join, the metrics hook, draining on stop and a client
that goes away. The mutant table (mutant → the test here that kills it) is in CHANGELOG.md (issue 20).

No wall-clock thresholds on speed: the batching window is checked through the timeouts the worker asks
``asyncio.wait_for`` for (computed, not measured) and by which requests share a batch; every await is guarded
so that a mutant that hangs fails in seconds instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from roadwork.serve.batcher import DynamicBatcher, QueueFull

GUARD_S = 10.0  # a mutant that never answers fails after this long instead of hanging the suite


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _guard(aw):  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(aw, GUARD_S)


def _batcher(run_batch, **kw: Any) -> DynamicBatcher:  # type: ignore[no-untyped-def]
    opts: dict[str, Any] = {"max_batch_size": 8, "max_queue_delay_ms": 0, "max_queue": 100}
    opts.update(kw)
    return DynamicBatcher(run_batch, executor=ThreadPoolExecutor(1), **opts)


def _ones(n: int, v: float = 1.0) -> np.ndarray:
    return np.full((n, 1), v, np.float32)


# ---------------------------------------------------------------------------------------------- the delay


def test_a_lone_request_waits_out_the_window_and_requests_inside_it_share_a_batch(monkeypatch):
    """Mutants: the delay's unit or scale (``/ 1000`` → ``/ 100``, ``+ 2 * delay``), the delay ignored, a
    full batch still waiting (``n < max`` → ``n <= max``)."""
    timeouts: list[float] = []
    real_wait_for = asyncio.wait_for

    def spy(aw, timeout):  # type: ignore[no-untyped-def]
        if sys._getframe(1).f_globals.get("__name__") == "roadwork.serve.batcher":
            timeouts.append(timeout)
        return real_wait_for(aw, timeout)

    monkeypatch.setattr(asyncio, "wait_for", spy)
    calls: list[int] = []
    waits: list[list[float]] = []

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        calls.append(len(x))
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = _batcher(run_batch, max_queue_delay_ms=200, on_batch=lambda n, w: waits.append(w))
        b.start()
        assert await _guard(b.submit(_ones(1), {})) == [1.0]
        first_window = list(timeouts)
        second = asyncio.ensure_future(b.submit(_ones(1, 2.0), {}))
        await asyncio.sleep(0.02)  # well inside the 200 ms window the second request opened
        third = asyncio.ensure_future(b.submit(_ones(1, 3.0), {}))
        assert await _guard(asyncio.gather(second, third)) == [[2.0], [3.0]]
        before_full = len(timeouts)
        assert await _guard(b.submit(_ones(8, 4.0), {})) == [4.0] * 8  # a full batch does not wait
        full_waited = len(timeouts) - before_full
        await _guard(b.stop())
        return first_window, full_waited

    first_window, full_waited = _run(main())
    assert calls == [1, 2, 8]
    # the window opens when the first request of a batch is taken: the worker's first wait is the whole delay
    assert first_window and first_window[0] == pytest.approx(0.2, abs=0.01)
    assert all(0 < t <= 0.2 + 1e-9 for t in timeouts)  # never longer than the window
    assert waits[0][0] >= 0.2 - 0.005  # a batch that is not full forms when its window closes, not before
    assert full_waited == 0


# ---------------------------------------------------------------------------------------------- admission


def test_the_queue_bound_counts_images_not_requests():
    """Mutants: ``waiting += n`` → ``+= 1``, ``waiting + n > max_queue`` → ``waiting + 1``, ``waiting -= n`` in
    the worker → ``-= len(items)``, and the idle exception (``and self.waiting > 0``) dropped."""
    gate = threading.Event()
    calls: list[int] = []

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        gate.wait(GUARD_S)
        calls.append(len(x))
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = _batcher(run_batch, max_batch_size=2, max_queue=4)
        b.start()
        gate.set()
        oversized = await _guard(b.submit(_ones(6, 6.0), {}))  # 6 images > max_queue, but nothing waits
        gate.clear()
        running = asyncio.ensure_future(b.submit(_ones(1), {}))
        await asyncio.sleep(0.05)  # the worker runs it and blocks on the gate
        three = asyncio.ensure_future(b.submit(_ones(3, 3.0), {}))
        await asyncio.sleep(0.01)
        waiting_after_three = b.waiting
        with pytest.raises(QueueFull):  # 3 + 2 images > 4, although only one request waits
            await b.submit(_ones(2), {})
        one = asyncio.ensure_future(b.submit(_ones(1, 5.0), {}))  # 3 + 1 = 4 images fit
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit(_ones(1), {})
        gate.set()
        results = await _guard(asyncio.gather(running, three, one))
        await _guard(b.stop())
        return oversized, waiting_after_three, results, b.waiting

    oversized, waiting_after_three, results, waiting_at_end = _run(main())
    assert oversized == [6.0] * 6  # an idle queue admits a request larger than max_queue (it is alone)
    assert waiting_after_three == 3
    assert results == [[1.0], [3.0] * 3, [5.0]]
    assert waiting_at_end == 0
    assert calls == [6, 1, 3, 1]


def test_the_latency_budget_counts_the_images_of_the_new_request():
    """Mutants: ``over_budget(n)`` → ``over_budget(1)`` in ``submit``, ``drain_seconds(ahead + extra_images)``
    → ``ahead + 1``."""
    gate = threading.Event()

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        gate.wait(GUARD_S)
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = _batcher(run_batch, max_batch_size=4, max_queue=1000, max_latency_ms=100)
        for _ in range(10):
            b.service.observe(4, 0.04)  # 10 ms per image
        b.start()
        running = asyncio.ensure_future(b.submit(_ones(1), {}))
        await asyncio.sleep(0.05)
        assert b.expected_seconds(20) > 0.1 > b.expected_seconds(1)
        with pytest.raises(QueueFull):  # 20 images x 10 ms > 100 ms: refused, though it is one request
            await b.submit(_ones(20), {})
        small = asyncio.ensure_future(b.submit(_ones(1, 2.0), {}))
        await asyncio.sleep(0.01)
        gate.set()
        out = await _guard(asyncio.gather(running, small))
        await _guard(b.stop())
        return out

    assert _run(main()) == [[1.0], [2.0]]


# ---------------------------------------------------------------------------------------------- cascade join


def test_cascade_requests_are_joined_stage_by_stage_in_arrival_order():
    """Mutants of ``_join`` for a cascade's stage inputs: stages mixed up, requests reordered, or the inputs
    concatenated as one array; and the meta join (missing keys padded with one ``""`` per image)."""
    from roadwork.export.bundle import StageInputs

    seen: list[tuple[Any, dict[str, list[str]]]] = []

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        seen.append((x, meta))
        return [f"out:{v:g}" for v in x.arrays[1]]

    def request(*values: float) -> StageInputs:  # stage 0 holds -v, stage 1 (the model) v
        v = np.array(values)
        return StageInputs((-v, v))

    async def main():  # type: ignore[no-untyped-def]
        b = _batcher(run_batch, max_queue_delay_ms=100)
        b.start()
        reqs = [
            b.submit(request(0, 1), {"camera": ["c1", "c1"]}),
            b.submit(request(2, 3), {}),
            b.submit(request(4, 5, 6), {"camera": ["c3"] * 3}),
        ]
        out = await _guard(asyncio.gather(*reqs))
        await _guard(b.stop())
        return out

    out = _run(main())
    assert len(seen) == 1
    x, meta = seen[0]
    assert type(x) is StageInputs and len(x) == 7
    assert x.arrays[0].tolist() == [-0.0, -1, -2, -3, -4, -5, -6] and x.arrays[1].tolist() == list(range(7))
    assert meta == {"camera": ["c1", "c1", "", "", "c3", "c3", "c3"]}
    assert out == [["out:0", "out:1"], ["out:2", "out:3"], ["out:4", "out:5", "out:6"]]


# ---------------------------------------------------------------------------------------------- metrics hook


def test_the_metrics_hook_is_called_once_per_batch_that_ran_with_its_images_and_one_wait_per_request():
    """Mutants: the hook not called, called per request, given the number of requests instead of images, called
    for a batch that failed, or not called for the requests retried one by one."""
    hook: list[tuple[int, list[float]]] = []

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        if (x < 0).any():
            raise ValueError("poison")
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = _batcher(run_batch, max_queue_delay_ms=100, on_batch=lambda n, w: hook.append((n, list(w))))
        b.start()
        await _guard(asyncio.gather(*(b.submit(_ones(k), {}) for k in (2, 1, 3))))
        after_first = list(hook)
        out = await _guard(
            asyncio.gather(b.submit(_ones(2, 5.0), {}), b.submit(_ones(1, -1.0), {}), return_exceptions=True)
        )
        await _guard(b.stop())
        return after_first, out

    after_first, (good, bad) = _run(main())
    assert [n for n, _ in after_first] == [6] and len(after_first[0][1]) == 3
    assert all(w >= 0 for w in after_first[0][1])
    assert good == [5.0, 5.0] and isinstance(bad, ValueError)
    # the failed batch of 3 images reports nothing; the good request retried alone reports its own 2 images
    assert [n for n, _ in hook] == [6, 2] and len(hook[1][1]) == 1


# ---------------------------------------------------------------------------------------------- draining


def test_stop_lets_the_running_batch_and_every_queued_request_finish():
    """Mutants: ``stop`` cancelling the worker at once, or waiting only for the queue (not the running batch)."""
    gates = {1.0: threading.Event(), 3.0: threading.Event()}  # the first and the last request block

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        gate = gates.get(float(x[0, 0]))
        if gate is not None:
            gate.wait(GUARD_S)
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = _batcher(run_batch, max_batch_size=1)
        b.start()
        reqs = [asyncio.ensure_future(b.submit(_ones(1, float(v)), {})) for v in (1, 2, 3)]
        await asyncio.sleep(0.05)  # the first runs (blocked), two wait in the queue
        stopping = asyncio.ensure_future(b.stop())
        await asyncio.sleep(0.05)
        stopped_while_queued = stopping.done()
        gates[1.0].set()  # the second runs at once, the last one runs and blocks: the queue is empty now
        await asyncio.sleep(0.1)
        stopped_while_running = stopping.done()
        gates[3.0].set()
        await _guard(stopping)
        return stopped_while_queued, stopped_while_running, [r.result() if r.done() else None for r in reqs]

    stopped_while_queued, stopped_while_running, results = _run(main())
    assert not stopped_while_queued and not stopped_while_running  # stop waits for the work in flight
    assert results == [[1.0], [2.0], [3.0]]


def test_stop_finishes_a_batch_that_is_still_forming():
    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = _batcher(run_batch, max_queue_delay_ms=300)
        b.start()
        req = asyncio.ensure_future(b.submit(_ones(1, 7.0), {}))
        await asyncio.sleep(0.05)  # taken by the worker, which waits for more until the window closes
        await asyncio.wait_for(b.stop(), 2.0)
        return await asyncio.wait_for(req, 2.0)

    assert _run(main()) == [7.0]


def test_a_request_after_stop_is_refused():
    async def main():  # type: ignore[no-untyped-def]
        b = _batcher(lambda x, meta: list(x[:, 0]))
        b.start()
        await b.stop()
        with pytest.raises(QueueFull):
            await asyncio.wait_for(b.submit(_ones(1), {}), 1.0)

    _run(main())


# ---------------------------------------------------------------------------------------------- disconnects


def test_a_client_that_goes_away_mid_batch_does_not_break_the_batch_or_the_worker():
    """Mutant: the ``if not it.future.done()`` guard dropped when results are handed out (a cancelled future
    raises ``InvalidStateError`` in the worker, the rest of the batch is never answered and the worker dies)."""
    gate = threading.Event()
    entered = threading.Event()

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        entered.set()
        gate.wait(GUARD_S)
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = _batcher(run_batch, max_queue_delay_ms=50)
        b.start()
        reqs = [asyncio.ensure_future(b.submit(_ones(1, float(v)), {})) for v in (1, 2, 3)]
        while not entered.is_set():
            await asyncio.sleep(0.01)
        reqs[1].cancel()  # the client of the second request disconnects while its batch runs
        gate.set()
        first, second, third = await _guard(asyncio.gather(*reqs, return_exceptions=True))
        later = await _guard(b.submit(_ones(1, 4.0), {}))  # the worker is still alive
        await _guard(b.stop())
        return first, second, third, later, b.waiting

    first, second, third, later, waiting = _run(main())
    assert first == [1.0] and third == [3.0] and later == [4.0]
    assert isinstance(second, asyncio.CancelledError)
    assert waiting == 0


def test_a_client_that_goes_away_from_a_failing_batch_is_not_retried_and_does_not_kill_the_worker():
    """Mutants: the retry loop not skipping a cancelled request (``if it.future.done(): continue`` dropped), and
    the ``done()`` guards dropped before ``set_exception`` (a single cancelled request whose batch fails)."""
    calls: list[list[float]] = []
    gate = threading.Event()
    entered = threading.Event()

    def run_batch(x, meta):  # type: ignore[no-untyped-def]
        calls.append([float(v) for v in x[:, 0]])
        entered.set()
        gate.wait(GUARD_S)
        if (x < 0).any():
            raise ValueError("poison")
        return list(x[:, 0])

    async def main():  # type: ignore[no-untyped-def]
        b = _batcher(run_batch, max_queue_delay_ms=50)
        b.start()
        reqs = [asyncio.ensure_future(b.submit(_ones(1, v), {})) for v in (1.0, -1.0, 3.0)]
        while not entered.is_set():
            await asyncio.sleep(0.01)
        reqs[2].cancel()
        gate.set()
        out = await _guard(asyncio.gather(*reqs, return_exceptions=True))
        entered.clear()
        gate.clear()
        lone = asyncio.ensure_future(b.submit(_ones(1, -2.0), {}))  # alone, fails, its client gone
        while not entered.is_set():
            await asyncio.sleep(0.01)
        lone.cancel()
        gate.set()
        later = await _guard(b.submit(_ones(1, 4.0), {}))
        await _guard(b.stop())
        return out, later

    (good, bad, gone), later = _run(main())
    assert good == [1.0] and isinstance(bad, ValueError) and isinstance(gone, asyncio.CancelledError)
    assert later == [4.0]
    assert calls == [[1.0, -1.0, 3.0], [1.0], [-1.0], [-2.0], [4.0]]  # the cancelled 3.0 is not run again
