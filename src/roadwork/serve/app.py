"""The HTTP server: Open Inference Protocol v2 + ``/v1/classify`` + ``/metrics``, on FastAPI/uvicorn.

No torch: the bundle's ONNX model runs in ONNX Runtime and the :class:`TrustPolicy` in numpy. Image decoding
and preprocessing run in a thread pool, the model in the batcher's thread, so the event loop only moves bytes.
Every error is a JSON body ``{"error": "..."}``: a 4xx status when the request was at fault, saying what was
wrong; 503 + ``Retry-After`` when the server sheds load; 500 (still JSON) for a server fault.

A prediction request goes through, in order (the ASGI gate :class:`~roadwork.serve.admission.Gate`, then the
endpoint in :mod:`roadwork.serve.routes`):

1. API key (401), body size from ``Content-Length`` (413);
2. the whole body, read under ``body_timeout_s`` (408 and the connection closed for a client that trickles or
   declares more than it sends) and checked against ``max_body_mb`` as it arrives;
3. admission, *after* the body: the latency budget (``max_latency_ms``, from the measured batch times) and the
   hard bound ``max_queue``, 503 + ``Retry-After`` beyond them; so slow uploads hold no admission slot;
4. parsing and validation of the whole request, for v2 tensors after the cast to FP32 (shape, datatype,
   finite values), before it joins a batch; decoded pixels across requests are capped by
   ``max_inflight_pixels``;
5. the batch; a batch that fails is retried request by request, so only the guilty request gets the error,
   and a request whose tensor drives the model's outputs to inf/NaN gets a 400 while its batch-mates get
   their answers.

Layers, one way: ``app`` (assembly) → ``routes`` (endpoints) → ``state`` (the shared prediction path) →
``admission`` / ``model`` / ``batcher`` / ``v2`` (protocol) → ``decode``, ``metrics``, ``settings``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from roadwork.export.bundle import Bundle
from roadwork.serve import schemas
from roadwork.serve.admission import Gate
from roadwork.serve.decode import RequestError
from roadwork.serve.metrics import ServerMetrics
from roadwork.serve.model import ServedModel, served_name
from roadwork.serve.repository import load_bundle, repository_of
from roadwork.serve.routes import (
    fast_routes,
    request_error_response,
    router,
    server_error_response,
    version,
)
from roadwork.serve.settings import ServeSettings
from roadwork.serve.state import ServerState, build_state

__all__ = ["create_app", "served_name"]

log = logging.getLogger(__name__)


def create_app(bundle: Bundle | str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app. ``bundle`` is a loaded :class:`Bundle` or its folder. Its :class:`ServerState` is
    ``app.state.roadwork``."""
    settings = settings or ServeSettings()
    metrics = ServerMetrics()
    state = build_state(ServedModel(load_bundle(bundle, settings), settings, metrics), settings, metrics)
    if not isinstance(bundle, Bundle):  # the repository of versions: the start-up folder's parent, fixed now
        repository_of(state)
    if state.model.bundle.reference:  # reference.json, read with the rest in Bundle.load's one verified read
        metrics.set_reference(state.model.bundle.reference)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _warm_up(state)
        state.batcher.start()
        state.apply_online()  # offsets already in the store (a restart, another replica)
        await state.refresh_field_metrics(every_s=0)  # the field figures a restart finds in the store
        refresher = asyncio.get_running_loop().create_task(_refresh_online(state))
        state.ready = True
        yield
        state.ready = False
        refresher.cancel()
        await state.batcher.stop()
        if state.pred_log is not None:
            state.pred_log.flush()
        state.decode_pool.shutdown(wait=False)
        state.model_pool.shutdown(wait=True)
        if state.parse_pool is not None:
            state.parse_pool.shutdown(wait=False, cancel_futures=True)
        if state.field is not None:
            state.field.close()

    app = FastAPI(
        title="roadwork",
        version=version(),
        lifespan=lifespan,
        description="Open Inference Protocol v2 (KServe/Triton) and /v1/classify for a roadwork bundle. Every "
        'error is JSON {"error": "..."}.',
    )
    app.state.roadwork = state
    _add_error_handlers(app)
    _gate_outermost(app, state, settings, metrics)
    app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _gate_outermost(
    app: FastAPI, state: ServerState, settings: ServeSettings, metrics: ServerMetrics
) -> None:
    """The gate in front of Starlette's whole middleware stack (not inside it, where ``add_middleware`` puts it):
    a request it refuses or serves on the fast path costs no error, telemetry or body-limit middleware. Those
    still wrap everything the gate hands to the app."""
    build = app.build_middleware_stack

    def gated() -> Any:
        return Gate(
            build(),
            settings=settings,
            metrics=metrics,
            admission=state.admission,
            draining=lambda: state.draining,
            fast=fast_routes(state),
        )

    app.build_middleware_stack = gated  # type: ignore[method-assign]


async def _refresh_online(state: ServerState, every_s: float = 2.0) -> None:
    """Replicas share the online conformal state through the store: each re-reads it every ``every_s``."""
    if state.field is None or state.field.online is None:
        return
    while True:
        await asyncio.sleep(every_s)
        try:
            await state.refresh_online()
        except Exception:  # a store hiccup must not stop the server; the next round tries again
            log.exception("refreshing the online conformal state failed")


async def _warm_up(state: ServerState) -> None:
    """First model calls, counted nowhere: allocations, then the batch-time fit's first points; without a
    ``max_latency_ms`` the batcher's budget is a few full batches' worth of waiting."""
    loop = asyncio.get_running_loop()
    model, batcher, settings = state.model, state.batcher, state.settings
    await loop.run_in_executor(state.model_pool, model.warm, 1)  # first call: allocations, not timed
    for n in (1, settings.max_batch_size, 1, settings.max_batch_size):
        t0 = time.perf_counter()
        await loop.run_in_executor(state.model_pool, model.warm, n)
        batcher.service.observe(n, time.perf_counter() - t0)
    if not settings.max_latency_ms:
        full = batcher.service.seconds(settings.max_batch_size)
        batcher.budget = max(3 * full + batcher.delay, 0.05)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"error": ...}``: ours, Starlette's (404/405 keep their ``Allow``), request
    validation (422), and the last resort (500)."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return request_error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.url.path!r}; see /docs", 405: f"{request.method} is not allowed here"}
        return _error(e.status_code, msg.get(e.status_code, str(e.detail)), dict(e.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = jsonable_encoder(e.errors()[:1])
        where = ".".join(str(p) for p in first[0]["loc"]) if first else "request"
        return _error(422, f"{where}: {first[0]['msg'] if first else 'invalid'}.")

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:  # last resort: still JSON
        return server_error_response(e)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request models as components, for the bodies the routes declare."""
    if app.openapi_schema is None:
        spec = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        comps = spec.setdefault("components", {}).setdefault("schemas", {})
        for m in (schemas.InferRequest, schemas.ClassifyRequest, schemas.FeedbackRequest):
            js = m.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps[m.__name__] = js
        app.openapi_schema = spec
    return app.openapi_schema
