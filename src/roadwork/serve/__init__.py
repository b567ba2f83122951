"""Serving a bundle over HTTP: ``roadwork serve BUNDLE`` (FastAPI on uvicorn, ONNX Runtime, no torch)."""

from __future__ import annotations

import logging
import sys
import threading

from roadwork.serve.app import create_app
from roadwork.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]

log = logging.getLogger(__name__)


def _check_port(host: str, port: int) -> None:
    """Raise :class:`~roadwork.errors.InputError` when ``host:port`` cannot be bound (in use, not an address of
    this machine, a privileged port), naming the setting and the fix — not uvicorn's bare ``[Errno 98]``."""
    import socket

    from roadwork.errors import InputError

    if port == 0:  # the OS picks a free one
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"host={host!r}: not an address of this machine ({e}); try host=0.0.0.0.") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(addr)
        except OSError as e:
            raise InputError(
                f"port={port}: cannot listen on {host}:{port} ({e.strerror or e}); another server may hold it: "
                "stop it or pass another port=N."
            ) from None


# asyncio's loop accepts up to its backlog per wake-up, and wakes up again before the connections it accepted reach
# the protocol (a task, then a callback): the backlog is kept small, and a few backlogs' worth of descriptors free
_ASYNCIO_BACKLOG = 64
_ASYNCIO_ACCEPT_BATCH = 4 * _ASYNCIO_BACKLOG


def _event_loop() -> str:
    """The event loop the server runs on: ``uvloop`` when installed (the serve extra brings it, except on
    Windows), else asyncio's own, with a warning: the demo bundle's 16-client capacity was 5–7 % lower on it
    (``benchmarks/serve_loop.py``), and near the fd limit it accepts connections in batches (see
    :func:`~roadwork.serve.protocol.guarded_protocol`'s ``accept_batch``)."""
    import importlib.util

    if importlib.util.find_spec("uvloop") is not None:
        return "uvloop"
    if sys.platform != "win32":
        print(
            "warning: uvloop is not installed: serving on asyncio's event loop, with less throughput and a longer "
            "tail under load; pip install 'roadwork[serve]' (or uvloop) brings it.",
            file=sys.stderr,
            flush=True,
        )
    return "asyncio"


def serve(bundle: str, settings: ServeSettings) -> None:
    """Run the server until SIGTERM/SIGINT, then drain the way Kubernetes expects: readiness answers 503 at once
    and every answer carries ``Connection: close``, while the listener keeps serving for ``drain_delay_s`` (the
    endpoints controller and load balancers take a few seconds to stop sending); then the listener closes,
    in-flight requests finish (up to ``drain_timeout_s``) and the process exits 0. A second signal skips
    the rest of the delay."""
    import uvicorn

    _check_port(settings.host, settings.port)  # before the bundle loads: a busy port is a second's error
    app = create_app(bundle, settings)
    statement, warn = (
        app.state.roadwork.model.bundle.answers_statement()
    )  # what clients will get, said up front
    print(("warning: " if warn else "roadwork serve: ") + statement, file=sys.stderr, flush=True)

    class _DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            state = app.state.roadwork
            if state.draining:  # a second signal: skip the rest of the delay (still a graceful drain)
                self.should_exit = True
                return
            state.draining = True  # readiness goes false at once; the listener stays open
            log.info("signal %d: draining; closing the listener in %.1f s", sig, settings.drain_delay_s)
            # not uvicorn's handler: that one re-raises the signal after shutdown (exit 143); a drain is a
            # clean exit
            timer = threading.Timer(settings.drain_delay_s, lambda: setattr(self, "should_exit", True))
            timer.daemon = True
            timer.start()

    from roadwork.serve.admission import Gate
    from roadwork.serve.protocol import guarded_protocol

    # what Starlette builds on first use, built now: the protocol admits small requests through it
    gate = app.middleware_stack = app.build_middleware_stack()
    assert isinstance(gate, Gate)  # the outermost layer (serve/app.py)

    loop = _event_loop()
    uv = loop == "uvloop"
    config = uvicorn.Config(
        app,
        # head limits, head timeout, eviction, and the gate's admission of small prediction requests
        http=guarded_protocol(
            settings,
            app.state.roadwork.metrics,
            early=gate,
            accept_batch=0 if uv else _ASYNCIO_ACCEPT_BATCH,
        ),
        ws="none",  # no WebSocket routes: an upgrade request is a plain request (and gets a JSON answer)
        loop=loop,
        backlog=2048 if uv else _ASYNCIO_BACKLOG,  # 2048: uvicorn's default
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        log_level="info",
        access_log=False,
    )
    _DrainingServer(config).run()
