"""What reaches the server before any request exists: uvicorn's httptools protocol with the limits it lacks.

- **Request head size and count**: more than ``max_header_kb`` of request line and headers, or more than
  ``max_headers`` headers, gets 431 (JSON) and the connection closed, before the parser buffers the rest (a
  128 MiB header used to take 30+ s of quadratic parsing before the API key was even looked at).
- **Head timeout**: a connection must complete each request's head within ``header_timeout_s`` of opening
  (or of its previous answer), however slowly it trickles bytes; else 408 and closed. uvicorn's keep-alive
  timer is reset by every byte and is not armed on a new connection at all: silent connections stayed forever.
- **Connections near the fd limit**: at startup the soft ``RLIMIT_NOFILE`` is raised to the hard one; beyond
  ``max_connections`` (default: that limit less a reserve for the model, logs and probes) a new connection
  closes the oldest one that has not sent a complete request head, so probes and real clients still get in
  while 2,000 silent sockets knock. Each eviction is counted in ``/metrics``.
- **Parser errors are JSON** ``{"error": ...}`` 400s, as every other error of the server.
"""

from __future__ import annotations

import json
import logging
import resource
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from roadwork.serve.metrics import ServerMetrics
from roadwork.serve.settings import ServeSettings

__all__ = ["GuardedProtocol", "guarded_protocol", "raise_fd_limit"]

log = logging.getLogger(__name__)

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


def _json_response(status: int, reason: bytes, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
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


def guarded_protocol(settings: ServeSettings, metrics: ServerMetrics) -> type[HttpToolsProtocol]:
    """The protocol class uvicorn runs (``uvicorn.Config(http=...)``), bound to ``settings``."""
    fd_limit = raise_fd_limit()
    if settings.max_connections and settings.max_connections > fd_limit - _FD_RESERVE:
        log.warning(
            "max_connections=%d is near or over the open-file limit (%d): raise it (ulimit -n) or lower "
            "max_connections",
            settings.max_connections,
            fd_limit,
        )
    limits = _Limits(
        settings,
        metrics,
        settings.max_connections or max(fd_limit - _FD_RESERVE, 16),
        settings.max_header_kb * 1024,
    )
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head limits, a head timeout and eviction (module docstring); a
    subclass made by :func:`guarded_protocol` carries the limits."""

    limits: _Limits
    _error_after: str | None = None  # a parse error after a pipelined good request: answered after it

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_timer: Any = None
        self._awaiting_head()
        if len(self.connections) > self.limits.max_connections:
            self._evict_oldest_idle()

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
        for conn in self.limits.idle:
            if conn is not self:
                self.limits.metrics.connections_evicted.inc()
                conn._refuse(503, b"Service Unavailable", "too many connections; this idle one is closed.")
                return

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self in self.limits.idle and not self.transport.is_closing():
            self.limits.metrics.connections_evicted.inc()
            timeout = self.limits.settings.header_timeout_s
            self._refuse(
                408, b"Request Timeout", f"no complete request head within header_timeout_s={timeout:g} s."
            )

    def _refuse(self, status: int, reason: bytes, message: str) -> None:
        self.limits.idle.pop(self, None)
        if not self.transport.is_closing():
            self.transport.write(_json_response(status, reason, message))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._error_after is not None:  # the parser failed: nothing after it is read
            return
        waiting = self in self.limits.idle
        if waiting:
            self._head_bytes += len(data)
        super().data_received(data)  # a read is at most 256 KiB: bounded work per call
        if waiting and self in self.limits.idle and self._head_bytes > self.limits.head_limit:
            kb = self.limits.settings.max_header_kb
            self._refuse(
                431, b"Request Header Fields Too Large", f"the request head is over max_header_kb={kb} KiB."
            )

    def on_message_begin(self) -> None:
        self._head_len = self._head_count = 0  # each request's own head (pipelined ones included)
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._head_len += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_len += len(name) + len(value) + 4
        self._head_count += 1
        if self._head_count > self.limits.settings.max_headers:
            n = self.limits.settings.max_headers
            self._refuse(431, b"Request Header Fields Too Large", f"over max_headers={n} headers.")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_done()
        if self._head_len > self.limits.head_limit:  # a head that arrived whole, in one read
            kb = self.limits.settings.max_header_kb
            self._refuse(
                431, b"Request Header Fields Too Large", f"the request head is over max_header_kb={kb} KiB."
            )
            raise _Refused
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        busy = self.cycle is not None and not self.cycle.response_complete  # a pipelined request runs
        if busy or self.transport.is_closing():
            return
        error, self._error_after = self._error_after, None
        if error is not None:  # the malformed request that followed a good one gets its 400 now, in order
            self._refuse(400, b"Bad Request", error)
            return
        self._awaiting_head()

    def send_400_response(self, msg: str) -> None:
        error = f"malformed HTTP request ({msg.rstrip('.')}); send valid HTTP/1.1."
        if (
            self.cycle is not None and not self.cycle.response_complete
        ):  # pipelined after a good request: that
            self._error_after = error  # one is answered first, then this 400, then the connection closes
            self.transport.pause_reading()
            return
        self._refuse(400, b"Bad Request", error)


class _Refused(Exception):
    """Raised from a parser callback after the connection was answered and closed: stops the parse."""
