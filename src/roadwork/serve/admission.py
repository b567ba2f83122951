"""Who gets in: the outermost ASGI gate (API key, the body read under a timeout, admission, request metrics,
``Connection: close`` while draining) and :class:`Admission`, the load-shedding rule it and the v2 endpoint ask.

Admission runs *after* the body has arrived, so a slow upload holds no slot; beyond the bounds a request gets
503 + ``Retry-After`` (JSON), never an unbounded wait."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from roadwork.serve.batcher import DynamicBatcher
from roadwork.serve.decode import RequestError
from roadwork.serve.metrics import ServerMetrics
from roadwork.serve.settings import ServeSettings

__all__ = ["ADMITTED", "OPEN_PATHS", "Admission", "Gate", "Refused", "Shed", "body_of"]

OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/metrics")
"""Paths served without the API key (probes and the scraper)."""


def _json_bytes(
    status: int, message: str, extra: list[tuple[bytes, bytes]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    return {"type": "http.response.start", "status": status, "headers": headers}, {
        "type": "http.response.body",
        "body": body,
    }


class Shed(RequestError):
    """503 + ``Retry-After`` from admission."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(503, message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Refused:
    """Admission's refusal of a request the protocol holds: why, and how long to hold it first (the rest of
    the ``Retry-After`` its connection was told; 0: answer now)."""

    reason: str
    wait: float  # > 0: counted in ``Admission.held`` until :meth:`Gate.refuse_early`


class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class _OverTotal(Exception):
    pass


class Admission:
    """Which prediction requests get in. Three bounds, each answered 503 + ``Retry-After``:

    - ``max_queue`` requests inside at once (a hard bound);
    - the model's queue: the batcher's latency budget on the images ahead (``pending`` counts requests admitted
      but not yet in its queue, being decoded, one image each until their count is known);
    - the whole request's latency, by Little's law: at most ``budget × throughput`` requests inside, where the
      throughput is the measured rate of answered requests (a decaying maximum over 1 s windows, so it
      follows capacity rather than demand) and the budget is ``max_latency_ms`` (500 ms by default, an absolute
      budget: a load under capacity is never shed), or with ``max_latency_ms=0`` ``latency_factor`` (3) times
      the fastest recent answer (a windowed minimum; at least an efficient batch's time). This counts
      everything a request waits for (reading, decoding, the event loop, the batch), not only the model.

    What it does is in ``/metrics``: ``roadwork_rejected_total``, ``roadwork_admission_limit``,
    ``roadwork_latency_budget_seconds``, ``roadwork_inflight_requests``."""

    def __init__(self, settings: ServeSettings, batcher: DynamicBatcher) -> None:
        self.settings = settings
        self.batcher = batcher
        self.inside = 0
        self.pending = 0
        self.capacity = 0.0  # answered requests per second, decaying maximum
        self.base_s = math.inf  # the fastest recent answer (see finished)
        self._base_cur = self._base_prev = math.inf
        self._base_start = time.perf_counter()
        self._window_start = time.perf_counter()
        self._window_done = 0
        self._retry_until: dict[Any, float] = {}  # connection (client address) → end of its Retry-After
        self.held = 0

    def enter(self) -> None:
        """One more request inside (admitted), pending until it joins the batcher's queue."""
        self.inside += 1
        self.pending += 1

    def budget_s(self) -> float:
        if self.settings.max_latency_ms:
            return self.settings.max_latency_ms / 1000
        # at least the time of a batch big enough to be efficient (its fixed cost a under a quarter of the
        # per-image cost b times its size) and the batching window, so that batching still pays
        b = self.batcher
        a, per_image = b.service.coefficients()
        n = (
            b.max_batch_size
            if per_image <= 0
            else min(b.max_batch_size, max(1, math.ceil(4 * a / per_image)))
        )
        base = self.settings.latency_factor * self.base_s if math.isfinite(self.base_s) else 0.0
        return max(base, b.service.seconds(n) + b.delay, 0.01)

    def limit(self) -> int | None:
        """Requests allowed inside by the latency budget; ``None`` until the throughput has been measured."""
        if not self.capacity:
            return None
        budget = self.budget_s()
        # never fewer than the budget allows one after another at the fastest recent speed: the measured rate
        # is only a lower bound of the capacity when demand is low
        floor = math.ceil(budget / self.base_s) if math.isfinite(self.base_s) and self.base_s > 0 else 2
        return max(2, floor, math.ceil(budget * self.capacity))

    def finished(self, seconds: float, ok: bool) -> None:
        now = time.perf_counter()
        if ok:
            self._window_done += 1
            # the base latency: the fastest answer of the last 10-20 s (a windowed minimum, as TCP's min RTT:
            # under load some requests still pass straight through, so it does not creep up with the load)
            if now - self._base_start >= 10.0:
                self._base_prev, self._base_cur, self._base_start = self._base_cur, math.inf, now
            self._base_cur = min(self._base_cur, seconds)
            self.base_s = min(self._base_cur, self._base_prev)
        elapsed = now - self._window_start
        if elapsed >= 1.0:
            rate = self._window_done / elapsed
            self.capacity = max(rate, 0.7 * self.capacity + 0.3 * rate)
            self._window_start, self._window_done = now, 0

    def refusal(self, *, hard_only: bool = False, own: int = 0) -> str | None:
        """Why a new request is refused now (``None``: admitted). ``own``: 1 when the asking request is already
        counted inside and pending (a v2 request asks again once validated): it never counts as ahead of itself,
        so an idle server always serves it; ``hard_only``: only ``max_queue``."""
        inside = self.inside - own
        pending = max(self.pending - own, 0)
        if inside >= self.settings.max_queue:
            return f"the server holds max_queue={self.settings.max_queue} requests already"
        if hard_only:
            return None
        limit = self.limit()
        if limit is not None and inside >= limit:
            return (
                f"{inside} requests are inside, as many as the server answers within its latency budget "
                f"of {self.budget_s() * 1000:.0f} ms at {self.capacity:.0f} requests/s"
            )
        b = self.batcher
        if b.over_budget(1, ahead=b.waiting + pending):
            expected = b.expected_seconds(1, ahead=b.waiting + pending) * 1000
            return (
                f"a new request would wait about {expected:.0f} ms for the model, over its budget of "
                f"{b.budget * 1000:.0f} ms"
            )
        return None

    def retry_after(self) -> int:
        b = self.batcher
        return max(1, math.ceil(b.expected_seconds(0, ahead=b.waiting + self.pending)))

    async def shed(self, client: Any, refusal: str) -> tuple[str, int]:
        """The 503's message and ``Retry-After``. A connection that was told to retry later and did not wait
        gets its refusal only when that time is up: a client that re-sends at once then costs the server one
        request per ``Retry-After``, not a storm that starves the admitted requests."""
        wait = self.told_to_wait(client)
        if wait and self.held < self.settings.max_queue:
            self.held += 1
            try:
                await asyncio.sleep(wait)
            finally:
                self.held -= 1
        return self.answer(client, refusal)

    def answer(self, client: Any, refusal: str) -> tuple[str, int]:
        """The 503's message and ``Retry-After`` now, remembered for this connection."""
        retry_after = self.retry_after()
        self.refused(client, retry_after)
        return f"{refusal}; retry after {retry_after} s.", retry_after

    def told_to_wait(self, client: Any) -> float:
        """Seconds left of the ``Retry-After`` this connection was given (0: none, or it has passed)."""
        until = self._retry_until.get(client)
        if until is None:
            return 0.0
        left = until - time.perf_counter()
        if left <= 0:
            del self._retry_until[client]
        return max(left, 0.0)

    def refused(self, client: Any, retry_after: float) -> None:
        if client is None:
            return
        if len(self._retry_until) >= 4096:  # bounded: forget the oldest
            self._retry_until.pop(next(iter(self._retry_until)))
        self._retry_until[client] = time.perf_counter() + retry_after


_PREDICT_SUFFIXES = ("/infer", "/v1/classify")
ADMITTED = "roadwork_admitted"
"""Scope key: the protocol admitted this request (:meth:`Gate.admit_early`); the gate does not ask again."""


class Gate:
    """Pure ASGI middleware, outermost: API key, the body under a timeout, admission, request metrics, and
    ``Connection: close`` on every answer while draining (so keep-alive clients reconnect elsewhere)."""

    def __init__(
        self,
        app: Any,
        settings: ServeSettings,
        metrics: ServerMetrics,
        admission: Admission,
        draining: Callable[[], bool],
        fast: dict[str, Any] | None = None,
    ) -> None:
        self.app = app
        self.fast = fast or {}  # POST path → a plain ASGI endpoint served past the app (the hot path)
        self.settings = settings
        self.metrics = metrics
        self.admission = admission
        self.draining = draining
        self.key = settings.api_key.encode() if settings.api_key else None
        self.limit = int(settings.max_body_mb * 2**20)
        self.total_limit = int(settings.max_inflight_body_mb * 2**20)
        self.buffered = 0  # bytes of request bodies being read or held, declared or arrived

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        answer = _Answer(send, self.draining)
        gate = "other"
        try:
            gate = await self._serve(scope, receive, answer)
        finally:
            if scope.pop(ADMITTED, False):  # admitted by the protocol, answered before reaching admission
                self.admission.inside -= 1
                self.admission.pending -= 1
            # label by route template (bounded cardinality); refusals before routing by their gate
            handler = getattr(scope.get("route"), "path", gate)
            self.metrics.requests.labels(handler, str(answer.status)).inc()
            self.metrics.latency.labels(handler).observe(time.perf_counter() - t0)

    async def _serve(self, scope: dict[str, Any], receive: Any, answer: _Answer) -> str:
        """Answer one request; returns the gate that refused it (``"other"`` when none did)."""
        auths = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(auths) > 1:  # which one counts is ambiguous between proxies and us: neither
            await answer.refuse(
                400, "send one Authorization header, not several.", [(b"connection", b"close")]
            )
            return "auth"
        if scope["path"] in OPEN_PATHS and scope["method"] not in ("GET", "HEAD"):
            self.metrics.bodies_refused.inc()  # probes and the scraper take no body: never read one
            msg = f"{scope['method']} is not allowed on {scope['path']}; use GET."
            await answer.refuse(405, msg, [(b"allow", b"GET"), (b"connection", b"close")])
            return "other"
        if self.key is not None and scope["path"] not in OPEN_PATHS and not self._authorised(scope):
            msg = "missing or wrong API key: send 'Authorization: Bearer <key>'."
            await answer.refuse(401, msg, [(b"www-authenticate", b"Bearer")])
            return "auth"
        if scope["method"] != "POST":
            await self.app(scope, receive, answer)
            return "other"
        body = await self._body(scope, receive, answer)
        if body is None:
            return "body"
        try:
            return await self._handle(scope, receive, answer, body)
        finally:
            self.buffered -= len(body)

    async def _handle(self, scope: dict[str, Any], receive: Any, answer: _Answer, body: bytearray) -> str:
        scope.setdefault("state", {})["roadwork_body"] = body  # read without a copy by body_of
        replay = _Replay(body, receive)
        if not scope["path"].endswith(_PREDICT_SUFFIXES):
            await self.app(scope, replay, answer)
            return "other"
        adm = self.admission
        # v2 tensors are parsed and validated first (a malformed one gets its 400 even under load) and ask
        # for admission again before they join a batch; images are refused before they are decoded; a request
        # the protocol admitted (admit_early) is inside already
        early = scope.pop(ADMITTED, False)
        refusal = None if early else adm.refusal(hard_only=scope["path"].endswith("/infer"))
        if refusal is not None:
            self.metrics.rejected.inc()
            msg, retry_after = await adm.shed(scope.get("client"), refusal)
            await answer.refuse(503, msg, [(b"retry-after", str(retry_after).encode())])
            return "admission"
        if not early:
            adm.enter()
        scope.setdefault("state", {})["roadwork_pending"] = True
        self.metrics.inflight.set(adm.inside)
        t_in = time.perf_counter()
        fast = self.fast.get(scope["path"])
        try:
            await (fast or self.app)(scope, replay, answer)
        finally:
            adm.inside -= 1
            if scope["state"].get("roadwork_pending"):
                adm.pending -= 1
            adm.finished(time.perf_counter() - t_in, answer.status == 200)
            self.metrics.inflight.set(adm.inside)
        return scope["path"] if fast is not None else "other"  # the metrics label: the route's path

    def _authorised(self, scope: dict[str, Any]) -> bool:
        return self._key_matches(dict(scope["headers"]).get(b"authorization", b""))

    def _key_matches(self, auth: bytes) -> bool:
        given = auth[7:] if auth[:7].lower() == b"bearer " else b""
        return self.key is not None and hmac.compare_digest(given, self.key)

    def admit_early(self, headers: list[tuple[bytes, bytes]], client: Any) -> bool | Refused:
        """Admission for a small ``POST /v1/classify`` whose whole body the protocol holds, before any ASGI scope
        or task exists. ``True``: admitted (counted inside; the gate serves it without asking again);
        :class:`Refused`: the protocol answers 503 itself (:meth:`refuse_early`), after the rest of the
        ``Retry-After`` this connection was told and did not wait; ``False``: the gate decides, as for every
        other request (an auth error, draining, a pipelined request).

        In overload most requests are refused; each refusal answered through the ASGI stack took CPU from the
        admitted requests, so goodput fell as the offered load rose. Deciding here also decides once: a
        decision made at the head and again in the gate saw different loads."""
        if self.draining() or not self.authorised(headers):
            return False  # 400/401 from the gate, as without load
        adm = self.admission
        refusal = adm.refusal()
        if refusal is None:
            adm.enter()
            self.metrics.inflight.set(adm.inside)
            return True
        wait = adm.told_to_wait(client)
        if wait and adm.held < self.settings.max_queue:  # the gate's own holds count in the same bound
            adm.held += 1
            return Refused(refusal, wait)
        return Refused(refusal, 0.0)

    def authorised(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether a request with these headers passes the API key (always, without one): exactly one
        ``Authorization`` header, with the key. The protocol holds no body of a request that does not."""
        if self.key is None:
            return True
        auths = [v for k, v in headers if k == b"authorization"]
        return len(auths) == 1 and self._key_matches(auths[0])

    def hold_body(self, size: int) -> bool:
        """Count ``size`` more bytes of a body the protocol holds for :meth:`admit_early` (as they arrive) in the
        bodies in flight (``max_inflight_body_mb``); ``False`` when they do not fit (the protocol refuses it)."""
        if self.buffered + size > self.total_limit:
            return False
        self.buffered += size
        return True

    def release_body(self, size: int) -> None:
        """Give back what :meth:`hold_body` counted (the gate counts the body again while it serves it)."""
        self.buffered -= size

    def refuse_early(self, client: Any, refused: Refused, seconds: float) -> tuple[str, int]:
        """The message and ``Retry-After`` of the 503 the protocol sends for ``refused`` (``seconds`` after the
        request arrived, its hold over), counted as the gate counts its own."""
        if refused.wait:
            self.admission.held -= 1
        self.metrics.rejected.inc()
        self.metrics.requests.labels("admission", "503").inc()
        self.metrics.latency.labels("admission").observe(seconds)
        return self.admission.answer(client, refused.reason)

    async def _body(self, scope: dict[str, Any], receive: Any, answer: _Answer) -> bytearray | None:
        """The whole body, read under ``body_timeout_s`` and the size limit; ``None`` once refused (413/408, the
        connection closed: the rest of an unread body must not be parsed as a request) or disconnected."""
        close = [(b"connection", b"close")]
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            msg = f"request body is {int(length)} bytes, over the limit of {self.limit}; send less."
            await answer.refuse(413, msg, close)
            return None
        declared = int(length) if length.isdigit() else 0
        if self.buffered + declared > self.total_limit:
            self.metrics.bodies_refused.inc()
            msg = (
                f"the server holds max_inflight_body_mb={self.settings.max_inflight_body_mb:g} MB of request "
                "bodies already; retry after a second."
            )
            await answer.refuse(503, msg, [*close, (b"retry-after", b"1")])
            return None
        self.buffered += declared  # released by _serve once the request is answered
        try:
            return await asyncio.wait_for(self._read(receive, declared), self.settings.body_timeout_s)
        except (asyncio.TimeoutError, _BodyTooLarge, _Disconnected, _OverTotal) as e:
            self.buffered -= declared  # given back before the refusal is written: others may use it meanwhile
            await self._refuse_body(e, answer)
        except BaseException:
            self.buffered -= declared
            raise
        return None

    async def _refuse_body(self, e: BaseException, answer: _Answer) -> None:
        """The answer to a body that could not be read (:meth:`_body`)."""
        close = [(b"connection", b"close")]
        if isinstance(e, asyncio.TimeoutError):  # a distinct class before Python 3.11
            self.metrics.body_timeouts.inc()
            msg = (
                f"the request body did not arrive within body_timeout_s={self.settings.body_timeout_s:g} "
                "seconds; send it at once."
            )
            await answer.refuse(408, msg, close)
        elif isinstance(e, _BodyTooLarge):
            await answer.refuse(
                413, f"request body is over the limit of {self.limit} bytes; send less.", close
            )
        elif isinstance(e, _Disconnected):
            answer.status = 499  # nginx's "client closed request"; nothing to answer
        else:  # _OverTotal
            self.metrics.bodies_refused.inc()
            msg = "the server holds too many request bodies at once; retry after a second."
            await answer.refuse(503, msg, [*close, (b"retry-after", b"1")])

    async def _read(self, receive: Any, declared: int) -> bytearray:
        """The body, in one buffer of its declared size (no second copy to join chunks: a 60 MB body costs
        60 MB); bytes beyond ``declared`` (chunked bodies) count against the total as they arrive."""
        buf, size, extra = bytearray(declared), 0, 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected
                chunk = message.get("body", b"")
                if size + len(chunk) > self.limit:
                    raise _BodyTooLarge
                if size + len(chunk) > declared:
                    grow = size + len(chunk) - declared - extra
                    if self.buffered + grow > self.total_limit:
                        raise _OverTotal
                    self.buffered += grow
                    extra += grow
                if size + len(chunk) <= len(buf):
                    buf[size : size + len(chunk)] = chunk
                else:
                    del buf[size:]
                    buf += chunk
                size += len(chunk)
                if not message.get("more_body", False):
                    del buf[size:]  # a body shorter than declared (uvicorn refuses that; keep it exact)
                    self.buffered += size - declared - extra  # from now on the body holds exactly its size
                    extra = 0
                    return buf
        finally:
            self.buffered -= extra


class _Answer:
    """The ASGI ``send`` that remembers the status and adds ``Connection: close`` while draining."""

    def __init__(self, send: Any, draining: Callable[[], bool]) -> None:
        self.send, self.draining, self.status = send, draining, 500

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.draining():
                message = message | {"headers": [*message.get("headers", []), (b"connection", b"close")]}
        await self.send(message)

    async def refuse(self, code: int, msg: str, extra: list[tuple[bytes, bytes]]) -> None:
        for m in _json_bytes(code, msg, extra):
            await self(m)


def body_of(scope: Mapping[str, Any]) -> bytearray | None:
    """The body the gate read for this request (the very buffer: no copy), or ``None``."""
    body: bytearray | None = scope.get("state", {}).get("roadwork_body")
    return body


class _Replay:
    """The ASGI ``receive`` of a body already read: the body once, then the connection's own messages."""

    def __init__(self, body: bytes | bytearray, receive: Any) -> None:
        self.body, self.receive, self.replayed = body, receive, False

    async def __call__(self) -> dict[str, Any]:
        if not self.replayed:
            self.replayed = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        return dict(await self.receive())
