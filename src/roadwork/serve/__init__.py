"""Serving a bundle over HTTP: ``roadwork serve BUNDLE`` (FastAPI on uvicorn, ONNX Runtime, no torch)."""

from __future__ import annotations

import logging
import threading

from roadwork.serve.app import create_app
from roadwork.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]

log = logging.getLogger(__name__)


def serve(bundle: str, settings: ServeSettings) -> None:
    """Run the server until SIGTERM/SIGINT, then drain the way Kubernetes expects: readiness answers 503 at once
    and every answer carries ``Connection: close``, while the listener keeps serving for ``drain_delay_s`` (the
    endpoints controller and load balancers take a few seconds to stop sending); then the listener closes,
    in-flight requests finish (up to ``drain_timeout_s``) and the process exits 0. A second signal skips
    the rest of the delay."""
    import uvicorn

    app = create_app(bundle, settings)

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

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        log_level="info",
        access_log=False,
    )
    _DrainingServer(config).run()
