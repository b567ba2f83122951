"""Serving a bundle over HTTP: ``roadwork serve BUNDLE`` (FastAPI on uvicorn, ONNX Runtime, no torch)."""

from __future__ import annotations

from roadwork.serve.app import create_app
from roadwork.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]


def serve(bundle: str, settings: ServeSettings) -> None:
    """Run the server until SIGTERM/SIGINT; then stop accepting, drain in-flight requests, exit."""
    import uvicorn

    app = create_app(bundle, settings)

    class _DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:  # readiness goes false at once
            app.state.draining = True
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        log_level="info",
        access_log=False,
    )
    _DrainingServer(config).run()
