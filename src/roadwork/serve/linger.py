"""A lingering close, as nginx does it: a connection answered and closed while its client is still sending.

Closing a socket whose receive buffer holds unread bytes makes the kernel send a TCP reset instead of a FIN, and a
reset can reach the client before it has read the answer: ``requests`` or ``http.client`` sending a 60 MiB body
to ``/metrics`` saw ``ConnectionResetError`` instead of the JSON 405 (likewise the 413 of an oversized body, the
503 over ``max_inflight_body_mb``, the 431 of an oversized head). So when the request's head or body has not all
arrived, :meth:`LingeringTransport.close` sends the answer and a FIN (``write_eof``), then keeps reading and dropping
what arrives: it closes when the client closes its side, after :data:`LINGER_IDLE_S` without a byte, or after
``limit_s`` in all (``body_timeout_s``: an upload slower than that would have had its 408 on any path), whichever
comes first. A connection with nothing more to send closes at once, as before; so does every connection in a
shutdown. Lingering connections are the first ones evicted beyond ``max_connections``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

__all__ = ["LINGER_IDLE_S", "LingeringTransport"]

LINGER_IDLE_S = 5.0
"""Seconds without a byte from the client after which a lingering connection closes (nginx's default)."""


class LingeringTransport:
    """``transport`` (asyncio or uvloop) for a protocol to use in its place: ``close()`` lingers while
    ``sending()`` says the client may still be sending; everything else is the transport's own."""

    def __init__(
        self,
        transport: Any,
        loop: Any,
        sending: Callable[[], bool],
        limit_s: float,
        on_linger: Callable[[], None],
    ) -> None:
        self._t = transport
        self._loop = loop
        self._sending = sending
        self._limit_s = limit_s
        self._on_linger = on_linger
        self._timer: Any = None
        self._start = self._last = 0.0
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def is_closing(self) -> bool:
        return self.lingering or bool(self._t.is_closing())

    def write(self, data: bytes) -> None:
        if not self.lingering:  # after the FIN nothing more can be written
            self._t.write(data)

    def close(self) -> None:
        """Close now, or, while the client is still sending its request, linger (module docstring)."""
        if self.lingering or self._t.is_closing():
            return
        if not self._sending() or not self._t.can_write_eof():
            self._t.close()
            return
        try:
            self._t.write_eof()  # the answer already written, then a FIN
        except (OSError, RuntimeError):
            self._t.close()
            return
        self.lingering = True
        with contextlib.suppress(RuntimeError):  # reading may have been paused (flow control, a held answer)
            self._t.resume_reading()
        self._start = self._last = self._loop.time()
        self._timer = self._loop.call_later(LINGER_IDLE_S, self._check)
        self._on_linger()

    def dropping(self) -> bool:
        """Bytes arrived: ``True`` when they are to be dropped (the connection lingers)."""
        if self.lingering:
            self._last = self._loop.time()
        return self.lingering

    def _check(self) -> None:
        now = self._loop.time()
        idle_left = LINGER_IDLE_S - (now - self._last)
        total_left = self._limit_s - (now - self._start)
        if idle_left <= 0 or total_left <= 0:
            self._timer = None
            self.end()
        else:
            self._timer = self._loop.call_later(min(idle_left, total_left), self._check)

    def end(self) -> None:
        """Close now, lingering or not (a client that read nothing of the answer is aborted)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._t.is_closing():
            return
        if self._t.get_write_buffer_size():  # a close would wait for a client that does not read
            self._t.abort()
        else:
            self._t.close()
