"""What reaches the server before any request exists: uvicorn's httptools protocol with the limits it lacks.

- **Request head size and count**: more than ``max_header_kb`` of request line and headers, or more than
  ``max_headers`` headers, gets 431 (JSON) and the connection closed, before the parser buffers the rest (a
  128 MiB header used to take 30+ s of quadratic parsing before the API key was even looked at).
- **Head timeout**: a connection must complete each request's head within ``header_timeout_s`` of opening
  (or of its previous answer), however slowly it trickles bytes; else 408 and closed. uvicorn's keep-alive
  timer is reset by every byte and is not armed on a new connection at all: silent connections stayed forever.
  A head pipelined behind a running request has the same size limit and timeout (from its first byte), and
  its 431/408 goes out after the running request's answer.
- **Connections near the fd limit**: at startup the soft ``RLIMIT_NOFILE`` is raised to the hard one; beyond
  ``max_connections`` (default: that limit less a reserve for the model, logs and probes) a new connection
  closes the oldest one that has not sent a complete request head (else the oldest whose body has not all
  arrived), so probes and real clients still get in while 2,000 silent sockets knock. Each eviction is counted
  in ``/metrics``.
- **A transfer coding other than chunked** (``gzip, chunked``, which llhttp reads as chunked and the body then
  fails as JSON) gets a JSON 501, as RFC 9112 asks.
- **Parser errors are JSON** ``{"error": ...}`` 400s, as every other error of the server; a malformed body (a
  bad chunk) gets its 400 at once, not a 408 when the body timeout is up.
- **An answer before the body** that keeps the connection (a 401): the rest of the body is read and dropped (at most
  ``body_timeout_s``), not parsed as the next request's head.
- **A close while the client still sends** its request (413, 405 on an open path, 431, a 503 over
  ``max_inflight_body_mb``) lingers (:mod:`roadwork.serve.linger`): the answer and a FIN, the rest read and dropped,
  so the client reads its JSON answer instead of a TCP reset.
- **Upgrade requests are plain requests**: this server switches to no other protocol, so an ``Upgrade`` header
  (``h2c`` from ``curl --http2``, ``websocket``) is ignored and the request answered as HTTP/1.1, body and
  pipelined requests included (llhttp stops at such a head); ``CONNECT`` gets a JSON 405.
- **Admission of small prediction requests**: a ``POST /v1/classify`` of up to 64 KiB with the API key (if
  one is set) is held here until its body is in (its arrived bytes count in ``max_inflight_body_mb``; a head
  that declares a body and sends none holds nothing), then admitted or refused once by the gate (:meth:`~roadwork.serve.admission.Gate.admit_early`)
  before any ASGI scope or task exists: in overload most requests are refused, and a refusal through the whole
  stack took the CPU the admitted ones needed. A refused one's 503 (held until its connection's
  ``Retry-After`` is up, if it re-sent early) is written here; answers on a connection stay in order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from roadwork.serve.admission import ADMITTED, Refused
from roadwork.serve.linger import LingeringTransport
from roadwork.serve.metrics import ServerMetrics
from roadwork.serve.settings import ServeSettings

__all__ = ["EarlyGate", "GuardedProtocol", "guarded_protocol", "raise_fd_limit"]

log = logging.getLogger(__name__)


class EarlyGate(Protocol):
    """Admission of a small prediction request the protocol holds whole: :class:`~roadwork.serve.admission.Gate`."""

    draining: Callable[[], bool]

    def admit_early(self, headers: list[tuple[bytes, bytes]], client: Any) -> bool | Refused: ...

    def authorised(self, headers: list[tuple[bytes, bytes]]) -> bool: ...

    def hold_body(self, size: int) -> bool: ...

    def release_body(self, size: int) -> None: ...

    def refuse_early(self, client: Any, refused: Refused, seconds: float) -> tuple[str, int]: ...


class _Queued:
    """Stands for a response not yet sent (a held refusal): uvicorn queues a request behind it."""

    response_complete = False


_QUEUED: Any = _Queued()

_HOLD_BYTES = 1 << 16  # prediction requests up to this are admitted by the protocol once their body is in
_FD_RESERVE = 64  # descriptors kept for the model files, logs, the prediction log and the probes' connections


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a container may forbid it: keep the soft limit, bounded below
            pass
    return soft


def _json_response(status: int, reason: bytes, message: str, extra: bytes = b"", close: bool = True) -> bytes:
    body = json.dumps({"error": message}).encode()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            extra,
            b"connection: close\r\n\r\n" if close else b"\r\n",
            body,
        ]
    )


@dataclass
class _Limits:
    settings: ServeSettings
    metrics: ServerMetrics
    max_connections: int
    head_limit: int
    idle: OrderedDict[Any, None] = field(default_factory=OrderedDict)  # no complete head yet, oldest first
    reading: OrderedDict[Any, None] = field(default_factory=OrderedDict)  # a head, its body not all in yet
    blocked: OrderedDict[Any, None] = field(default_factory=OrderedDict)  # not reading our answer
    # answered and closing while the client still sends (serve/linger.py)
    lingering: OrderedDict[Any, None] = field(default_factory=OrderedDict)
    early: EarlyGate | None = None  # the gate's admission for small prediction requests (admit_early)


def guarded_protocol(
    settings: ServeSettings,
    metrics: ServerMetrics,
    early: EarlyGate | None = None,
    accept_batch: int = 0,
) -> type[HttpToolsProtocol]:
    """The protocol class uvicorn runs (``uvicorn.Config(http=...)``), bound to ``settings``; ``early``: the
    gate's admission of a small prediction request (:meth:`~roadwork.serve.admission.Gate.admit_early`).
    ``accept_batch``: how many connections the event loop may accept before the protocol hears of the first
    (asyncio's loop accepts up to its backlog at once; uvloop one at a time): kept free below the fd limit too,
    or eviction comes too late and ``accept`` fails with EMFILE in a loop."""
    fd_limit = raise_fd_limit()
    reserve = _FD_RESERVE + accept_batch
    if settings.max_connections and settings.max_connections > fd_limit - reserve:
        log.warning(
            "max_connections=%d is near or over the open-file limit (%d): raise it (ulimit -n) or lower "
            "max_connections",
            settings.max_connections,
            fd_limit,
        )
    limits = _Limits(
        settings,
        metrics,
        settings.max_connections or max(fd_limit - reserve, 16),
        settings.max_header_kb * 1024,
        early=early,
    )
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head limits, a head timeout and eviction (module docstring); a
    subclass made by :func:`guarded_protocol` carries the limits."""

    limits: _Limits
    # a refusal (status, reason, message) of a request pipelined after a good one: sent after its answer
    _error_after: tuple[int, bytes, str] | None = None
    _held: bytearray | None = None  # the body of a small prediction request, held until admission decides
    _body_timer: Any = None
    _holding: Any = None  # the timer of a refusal held until the connection's Retry-After is up
    _hold_args: tuple[Refused, bool, float] | None = None  # its refusal, keep-alive and start
    _closing = False  # uvicorn's shutdown came while a body or a refusal was held: close after its answer
    _held_size = 0  # its bytes that arrived so far, counted in the gate's bodies in flight until it is in
    _upgrade: bytes | None = None  # a request head that asked for an Upgrade, without it (see _feed)
    _head_open = False  # a request's head has begun and is not complete (pipelined ones included)
    _in_body = False  # a request's head is complete and its body not (it may have been answered already)
    _discard_timer: Any = None  # answered before its body was in: the rest is read and dropped until this
    _doomed: Any = None  # the cycle of a pipelined request whose body was malformed: refused when it starts
    _write_timer: Any = None  # the client stopped reading our answer: closed when this fires

    def connection_made(self, transport: Any) -> None:
        # every close of this connection (ours, uvicorn's) lingers while the client still sends its request
        self._linger = LingeringTransport(
            transport,
            self.loop,
            lambda: (self._in_body or self._head_open) and not self._closing,  # no lingering in a shutdown
            self.limits.settings.body_timeout_s,
            self._lingers,
        )
        super().connection_made(self._linger)  # type: ignore[arg-type]  # a Transport in all but name
        self._head_bytes = 0
        self._head_timer: Any = None
        self._awaiting_head()
        if len(self.connections) > self.limits.max_connections:
            self._evict_oldest_idle()

    def _lingers(self) -> None:
        self.limits.lingering[self] = None  # evicted first beyond max_connections

    def _awaiting_head(self) -> None:
        self._head_bytes = self._head_count = self._head_len = 0
        self.limits.idle[self] = None
        self.limits.idle.move_to_end(self)
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.settings.header_timeout_s, self._head_timeout)

    def _head_done(self) -> None:
        self.limits.idle.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _evict_oldest_idle(self) -> None:
        """Close the oldest lingering connection (answered, its client still sending); when there is none, the
        oldest without a complete request head, then the oldest one that does not read its answer, then the
        oldest whose request body has not arrived (a head then silence holds a descriptor as long)."""
        limits = self.limits
        if limits.lingering:
            limits.metrics.connections_evicted.inc()
            conn, _ = limits.lingering.popitem(last=False)
            conn._linger.end()
            return
        for waiting, what in (
            (limits.idle, "idle"),
            (limits.blocked, "unread"),
            (limits.reading, "body-less"),
        ):
            for conn in waiting:
                if conn is not self:
                    limits.metrics.connections_evicted.inc()
                    if conn in limits.blocked:  # its buffer is full: a close would wait for it forever
                        limits.blocked.pop(conn, None)
                        conn.transport.abort()
                    else:
                        conn._refuse(
                            503, b"Service Unavailable", f"too many connections; this {what} one is closed."
                        )
                        conn._linger.end()  # its descriptor is wanted now: no lingering
                    return

    def _head_timeout(self) -> None:
        self._head_timer = None
        if (self in self.limits.idle or self._head_open) and not self.transport.is_closing():
            self.limits.metrics.connections_evicted.inc()
            timeout = self.limits.settings.header_timeout_s
            self._refuse_in_order(  # a head pipelined behind a running request: after its answer
                408, b"Request Timeout", f"no complete request head within header_timeout_s={timeout:g} s."
            )

    def _refuse(self, status: int, reason: bytes, message: str) -> None:
        self.limits.idle.pop(self, None)
        self.limits.reading.pop(self, None)
        self.limits.blocked.pop(self, None)
        if not self.transport.is_closing():
            self.transport.write(_json_response(status, reason, message))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        self.limits.reading.pop(self, None)
        self.limits.blocked.pop(self, None)
        self.limits.lingering.pop(self, None)
        self._linger.end()  # its timer, if it lingered
        for timer in (self._body_timer, self._discard_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._release_held()
        if self._holding is not None and self.limits.early is not None and self._hold_args is not None:
            self._holding.cancel()  # the client left while its 503 was held: counted, as by the gate
            self._holding = None
            refused, _keep, t0 = self._hold_args
            self.limits.early.refuse_early(self.client, refused, time.perf_counter() - t0)
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client does not read our answer (the socket's buffer is full): it has ``body_timeout_s`` to
        start again, else the connection is closed; meanwhile it is the first to go beyond ``max_connections``
        after the idle ones."""
        super().pause_writing()
        self.limits.blocked[self] = None
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.settings.body_timeout_s, self._write_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.limits.blocked.pop(self, None)
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timeout(self) -> None:
        self._write_timer = None
        self.limits.blocked.pop(self, None)
        self.limits.metrics.connections_evicted.inc()
        self.transport.abort()  # no answer can reach a client that does not read

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown closes a connection with no request running; one whose body or 503 is
        held gets its answer first (with ``Connection: close``), then closes."""
        self._closing = True
        if self._linger.lingering:  # answered already: the rest of its request is not waited for
            self._linger.end()
        elif self._held is None and self._holding is None:
            super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self._linger.dropping():  # answered and closing: the rest of the request is dropped
            return
        if self._error_after is not None:  # the parser failed: nothing after it is read
            return
        # bytes of a request head: on an idle connection, or one pipelined behind a running request (counted
        # from the read after its start: at most one read, 256 KiB, more than the head itself)
        if self in self.limits.idle or self._head_open:
            self._head_bytes += len(data)
        self._feed(data)  # a read is at most 256 KiB: bounded work per call
        in_head = self in self.limits.idle or self._head_open
        if in_head and self._error_after is None and self._head_bytes > self.limits.head_limit:
            kb = self.limits.settings.max_header_kb
            self._refuse_in_order(
                431, b"Request Header Fields Too Large", f"the request head is over max_header_kb={kb} KiB."
            )

    def _feed(self, data: bytes) -> None:
        """uvicorn's ``data_received``, except for a request asking to switch protocols (``Upgrade: h2c``, as
        ``curl --http2`` sends, or ``websocket``): this server switches to none, so, as RFC 9110 allows, the
        Upgrade is ignored and the request answered as HTTP/1.1. llhttp hands everything after such a head over as
        the new protocol's bytes (the body and any pipelined request were lost: a JSON body read as empty): the
        head is parsed again without its Upgrade, by a fresh parser, followed by those bytes (a loop: every
        round answers at least that request, however many pipelined Upgrade requests the read holds)."""
        self._unset_keepalive_if_required()
        while True:
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as e:
                head, self._upgrade = self._upgrade, None
                if head is None:  # its connection is closing already: nothing to answer
                    return
                self.parser = _parser(self)
                data = head + data[int(e.args[0]) :]
            except httptools.HttpParserError as e:
                if self._error_after is not None or self.transport.is_closing():  # refused already
                    return
                if self._in_body:  # this request's own body is malformed (a bad chunk): answered now
                    self._bad_body(str(e))
                else:
                    self.send_400_response("Invalid HTTP request received.")
                return

    def _bad_body(self, why: str) -> None:
        """The running request's body cannot be parsed: 400 now (its handler gets a disconnect), or, when it
        was answered already (401 before its body), the connection closes."""
        cycle = self.cycle
        message = f"malformed request body ({why.rstrip('.')}); send valid HTTP/1.1."
        if any(c is cycle for c, _app in self.pipeline):  # queued behind answers still owed: after them
            self._doomed, self._error_after = cycle, (400, b"Bad Request", message)
            self.transport.pause_reading()
            return
        if self._held is None and cycle is not None and getattr(cycle, "response_started", False):
            self.transport.close()
            return
        self._refuse(400, b"Bad Request", message)

    def on_message_begin(self) -> None:
        self._head_len = self._head_count = 0  # each request's own head (pipelined ones included)
        self._head_open = True
        if self not in self.limits.idle:  # pipelined behind a running request: its own limits from now on
            self._head_bytes = 0
            if self._head_timer is None:
                timeout = self.limits.settings.header_timeout_s
                self._head_timer = self.loop.call_later(timeout, self._head_timeout)
        # a request is arriving: not idle. uvicorn cancels its keep-alive timeout per read, but an answer the
        # protocol writes mid-read (a refusal) arms it again with the rest of that read still to parse
        self._unset_keepalive_if_required()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._head_len += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_len += len(name) + len(value) + 4
        self._head_count += 1
        if self._head_count > self.limits.settings.max_headers:
            n = self.limits.settings.max_headers
            self._refuse_in_order(431, b"Request Header Fields Too Large", f"over max_headers={n} headers.")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_done()
        self._head_open, self._in_body = False, True
        self.limits.reading[self] = None
        if self.transport.is_closing():  # pipelined behind an answer that closed the connection: not run
            return
        if self.parser.should_upgrade():  # parsed again without its Upgrade (_feed)
            method = self.parser.get_method()
            if method == b"CONNECT":
                self._refuse_in_order(
                    405, b"Method Not Allowed", "CONNECT is not served: this is not a proxy."
                )
                raise _Refused
            self._upgrade = _plain_head(method, self.url, self.parser.get_http_version(), self.headers)
            return
        # llhttp reads "gzip, chunked" as chunked: the body would then fail as JSON
        codings = [v for k, v in self.headers if k == b"transfer-encoding"]
        if codings and b",".join(codings).replace(b" ", b"").lower() != b"chunked":
            coding = b", ".join(codings).decode("latin-1")[:60]
            self._refuse_in_order(
                501,
                b"Not Implemented",
                f"Transfer-Encoding {coding!r} is not supported; send 'Transfer-Encoding: chunked' or a "
                "Content-Length (compress nothing).",
            )
            raise _Refused
        if self._head_len > self.limits.head_limit:  # a head that arrived whole, in one read
            kb = self.limits.settings.max_header_kb
            self._refuse_in_order(
                431, b"Request Header Fields Too Large", f"the request head is over max_header_kb={kb} KiB."
            )
            raise _Refused
        if not self._hold_for_admission():
            self._start()

    def _start(self) -> None:
        """uvicorn's start of a request; behind a held refusal it queues (uvicorn's pipeline), so answers go out
        in order."""
        if self._holding is not None and (self.cycle is None or self.cycle.response_complete):
            self.cycle = _QUEUED
        super().on_headers_complete()

    def _hold_for_admission(self) -> bool:
        """A small ``POST /v1/classify`` (declared length up to ``_HOLD_BYTES``, about what uvicorn buffers
        per connection anyway) is held here until its body has arrived, then admitted or refused once, before
        any ASGI scope or task exists (:meth:`on_message_complete`)."""
        if self.limits.early is None or self.expect_100_continue:
            return False
        if self.parser.get_method() != b"POST" or self.url.split(b"?", 1)[0] != b"/v1/classify":
            return False
        length = dict(self.headers).get(b"content-length", b"")
        if (
            not length.isdigit()
            or int(length) > _HOLD_BYTES
            or not self.limits.early.authorised(self.headers)
        ):
            return False  # no key or a wrong one: the gate answers 401 without reading the body
        # its bytes count in the bodies in flight as they arrive (on_body): a head that declares a body and
        # sends none holds no memory, and cannot keep others out
        self._held, self._held_size = bytearray(), 0
        self._body_timer = self.loop.call_later(self.limits.settings.body_timeout_s, self._body_timeout)
        return True

    def _release_held(self) -> None:
        if self._held_size and self.limits.early is not None:  # held only with a gate (_hold_for_admission)
            self.limits.early.release_body(self._held_size)
        self._held_size = 0

    def _body_timeout(self) -> None:
        """As the gate's body timeout: 408 (JSON), the connection closed, counted the same way."""
        self.limits.metrics.body_timeouts.inc()
        self.limits.metrics.requests.labels("body", "408").inc()
        timeout = self.limits.settings.body_timeout_s
        msg = f"the request body did not arrive within body_timeout_s={timeout:g} seconds; send it at once."
        self._refuse(408, b"Request Timeout", msg)

    def on_body(self, body: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._held is None:
            super().on_body(body)
            return
        early = self.limits.early
        assert early is not None  # a body is held only with a gate (_hold_for_admission)
        if not early.hold_body(len(body)):  # at most the declared length: the parser ends the message there
            self.limits.metrics.requests.labels("body", "503").inc()
            msg = (
                f"the server holds max_inflight_body_mb={self.limits.settings.max_inflight_body_mb:g} MB of "
                "request bodies already; retry after a second."
            )
            self._refuse(503, b"Service Unavailable", msg)
            return
        self._held_size += len(body)
        self._held += body

    def on_message_complete(self) -> None:
        self._in_body = False
        self.limits.reading.pop(self, None)
        if self.transport.is_closing():
            return
        if self._upgrade is not None:  # the head with an Upgrade: parsed again (_feed), nothing runs now
            return
        if self._held is None:
            super().on_message_complete()
            if self._discard_timer is not None:  # answered before its body arrived: now it has
                self._discard_timer.cancel()
                self._discard_timer = None
                if not self._busy():
                    self._awaiting_head()
            return
        body, self._held = bytes(self._held), None
        self._body_timer.cancel()
        self._release_held()
        early = self.limits.early
        assert early is not None  # a body is held only with a gate (_hold_for_admission)
        decision = False if self._busy() else early.admit_early(self.headers, self.client)
        if isinstance(decision, Refused):  # 503 + Retry-After, no ASGI work
            keep = self.parser.should_keep_alive() and self.parser.get_http_version() == "1.1"
            t0 = time.perf_counter()
            if decision.wait > 0:  # as the gate's shed: held until the connection's Retry-After is up
                self.flow.pause_reading()
                self._hold_args = (decision, keep, t0)
                self._holding = self.loop.call_later(decision.wait, self._refuse_held, *self._hold_args)
            else:
                self._refuse_held(decision, keep, t0)
            return
        if decision:
            self.scope[ADMITTED] = True  # type: ignore[literal-required]
        self._start()
        if self._closing and self.cycle is not None:  # shut down while its body arrived: answered, closed
            self.cycle.keep_alive = False
        if body:
            super().on_body(body)
        super().on_message_complete()

    def _busy(self) -> bool:
        """An answer is still owed on this connection (a request running, its body held or its 503 held): a
        later one waits."""
        return (
            self._held is not None
            or self._holding is not None
            or (self.cycle is not None and not self.cycle.response_complete)
        )

    def _refuse_held(self, refused: Refused, keep: bool, t0: float) -> None:
        self._holding = self._hold_args = None
        early = self.limits.early
        assert early is not None
        message, retry_after = early.refuse_early(self.client, refused, time.perf_counter() - t0)
        if self.transport.is_closing():
            return
        keep = keep and not self._closing and not early.draining()  # draining: every answer says close
        extra = b"retry-after: %d\r\n" % retry_after
        self.transport.write(_json_response(503, b"Service Unavailable", message, extra, close=not keep))
        if keep:
            self.on_response_complete()  # as after any answer: reading resumed, a queued request started
        else:
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        doomed = self._doomed
        if doomed is not None and not any(c is doomed for c, _app in self.pipeline):
            # every answer owed before the malformed request is out (uvicorn just started it): its 400 now
            error, self._error_after, self._doomed = self._error_after, None, None
            if error is not None:
                self._refuse(*error)
            return
        if self._held is not None:  # the next request's body is arriving: no keep-alive timeout meanwhile
            self._unset_keepalive_if_required()
        if self._busy() or self.transport.is_closing():  # a pipelined request runs
            return
        error, self._error_after = self._error_after, None
        if error is not None:  # the bad request that followed a good one gets its 4xx now, in order
            self._refuse(*error)
            return
        if self._in_body:  # answered before its body was in (a 401): the rest is read and dropped, not
            self._unset_keepalive_if_required()  # parsed as the next request's head
            timeout = self.limits.settings.body_timeout_s
            self._discard_timer = self.loop.call_later(timeout, self._linger.end)  # no lingering after that
            return
        if self._head_open:  # the next head is half in (pipelined): its own counts and timer go on, and no
            self._unset_keepalive_if_required()  # keep-alive close cuts it short without a word (its 408)
            self.limits.idle[self] = None  # evictable as a connection without a complete head
            return
        self._awaiting_head()

    def send_400_response(self, msg: str) -> None:
        self._refuse_in_order(
            400, b"Bad Request", f"malformed HTTP request ({msg.rstrip('.')}); send valid HTTP/1.1."
        )

    def _refuse_in_order(self, status: int, reason: bytes, message: str) -> None:
        """:meth:`_refuse`, after the answers still owed on this connection: pipelined after a good request, that
        one is answered first, then this refusal, then the connection closes."""
        if self._busy():
            self._error_after = (status, reason, message)
            self.transport.pause_reading()
            return
        self._refuse(status, reason, message)


def _parser(protocol: Any) -> Any:
    """A request parser for ``protocol``, with uvicorn's settings (an answer to a request pipelined before a
    ``Connection: close`` one is still sent)."""
    parser = httptools.HttpRequestParser(protocol)
    with contextlib.suppress(AttributeError):  # httptools < 0.6.3
        parser.set_dangerous_leniencies(lenient_data_after_close=True)
    return parser


def _plain_head(method: bytes, url: bytes, version: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A request head again, without ``Upgrade`` and without the ``upgrade`` token of ``Connection``."""
    lines = [b"%s %s HTTP/%s\r\n" % (method, url, version.encode())]
    for name, value in headers:
        if name == b"upgrade":
            continue
        if name == b"connection":
            value = b", ".join(t.strip() for t in value.split(b",") if t.strip().lower() != b"upgrade")
            if not value:
                continue
        lines.append(b"%s: %s\r\n" % (name, value))
    return b"".join(lines) + b"\r\n"


class _Refused(Exception):
    """Raised from a parser callback after the connection was answered and closed: stops the parse."""
