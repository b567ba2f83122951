"""The HTTP server: Open Inference Protocol v2 + ``/v1/classify`` + ``/metrics``, on FastAPI/uvicorn.

No torch: the bundle's ONNX model runs in ONNX Runtime and the :class:`TrustPolicy` in numpy. Image decoding
and preprocessing run in a thread pool, the model in the batcher's thread, so the event loop only moves bytes.
Every error is a JSON body ``{"error": "..."}``: a 4xx status when the request was at fault, saying what was
wrong; 503 + ``Retry-After`` when the server sheds load; 500 (still JSON) for a server fault.

A prediction request goes through, in order (the ASGI gate :class:`_Gate`, then the endpoint):

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
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import math
import threading
import time
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from roadwork.data.preprocess import decoded_size, preprocess
from roadwork.export.bundle import Bundle
from roadwork.export.onnx import INPUT_NAME, onnx_logits
from roadwork.serve import schemas
from roadwork.serve.batcher import DynamicBatcher, QueueFull, QueueTimeout
from roadwork.serve.decode import IMAGE_TYPES, RequestError, decode_b64, decode_image
from roadwork.serve.metrics import InferenceStats, ServerMetrics
from roadwork.serve.settings import ServeSettings

__all__ = ["create_app", "served_name"]

_OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/metrics")
_OUTPUT_NAMES = ("logits", "probabilities", "label", "prediction_set", "abstain")


def _version() -> str:
    try:
        return metadata.version("roadwork")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def served_name(bundle: Bundle) -> str:
    """The model's name in the v2 API: the manifest's ``name``, else the bundle folder's name, or the run's
    name for a bundle in its run folder (``runs/demo/export/bundle`` → ``demo``)."""
    name = bundle.manifest.get("name")
    if isinstance(name, str) and name:
        return name
    p = bundle.path.resolve()
    if p.name == "bundle" and p.parent.name == "export" and p.parent.parent.name:
        return p.parent.parent.name
    return p.name


class _RowError:
    """One image's failure inside a batch that otherwise succeeded (its request gets the 4xx)."""

    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message


class _Model:
    """The bundle plus what the server needs around it: run one batch, turn it into per-image results."""

    def __init__(self, bundle: Bundle, settings: ServeSettings, metrics: ServerMetrics) -> None:
        self.bundle = bundle
        self.settings = settings
        self.metrics = metrics
        self.name = settings.name or served_name(bundle)
        self.size = bundle.card.preprocess.size
        self.slice_columns = bundle.policy.slice_columns
        # v2 tensors are normalised pixels, (v/255 - mean)/std: a hundred times that range still admits any
        # preprocessing variant, and refuses values that can only overflow the network
        spec = bundle.card.preprocess
        reach = max(max(abs(-m / sd), abs((1 - m) / sd)) for m, sd in zip(spec.mean, spec.std, strict=True))
        self.input_bound = 100 * reach
        self.decode_side = (
            bundle.decode_side
        )  # JPEGs are decoded straight to this side, as the run decoded them
        self._pixels = 0  # decoded pixels of requests inside the server (max_inflight_pixels)
        self._pixel_lock = threading.Lock()

    def reserve_pixels(self, blobs: list[bytes]) -> int:
        """Count the pixels these images decode to (from their headers) against ``max_inflight_pixels``; 503
        when the server already holds that many. Release with :meth:`release_pixels` once answered."""
        from PIL import Image

        pixels = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode_image refuses those
            for b in blobs:
                try:
                    im = Image.open(io.BytesIO(b))
                    w, h = im.size
                except Exception:  # not an image: decode_image says why
                    continue
                if w * h <= self.settings.max_pixels:  # larger ones decode_image refuses without decoding
                    dw, dh = decoded_size((w, h), im.format, self.decode_side)
                    pixels += dw * dh
        with self._pixel_lock:
            if self._pixels and self._pixels + pixels > self.settings.max_inflight_pixels:
                raise RequestError(
                    503,
                    f"the server is decoding {self._pixels} pixels already (max_inflight_pixels="
                    f"{self.settings.max_inflight_pixels}); retry after a second, or send smaller images.",
                )
            self._pixels += pixels
        return pixels

    def release_pixels(self, pixels: int) -> None:
        with self._pixel_lock:
            self._pixels -= pixels

    def preprocess(self, blobs: list[bytes]) -> Any:
        """Decode (and, without a cascade, preprocess for the model). A cascade bundle gets the decoded images:
        each stage resizes them its own way, and only for the images that reach it."""
        images = [
            decode_image(
                b,
                max_pixels=self.settings.max_pixels,
                what=f"image {i}" if len(blobs) > 1 else "image",
                min_side=self.decode_side,
            )
            for i, b in enumerate(blobs)
        ]
        if self.bundle.stage_runners is not None:
            return images
        return preprocess(images, self.bundle.card.preprocess)

    def warm(self, n: int) -> None:
        """One model call of ``n`` zero images, counted nowhere (warm-up and the batch-time measurement)."""
        onnx_logits(self.bundle.session, np.zeros((n, 3, self.size, self.size), np.float32), batch_size=n)

    def run_batch(self, x: Any, meta: dict[str, list[str]]) -> list[Any]:
        slices = {k: v for k, v in meta.items() if k in self.slice_columns}
        n = len(x)
        if isinstance(x, list):  # decoded images through the cascade
            out: Any = self.bundle.predict_images(x, slices or None)
            logits = np.log(np.clip(out.probs, 1e-300, None))  # the answering stage's calibrated log-probs
            good = np.arange(n)
        else:  # a preprocessed tensor goes to the model (the cascade's last stage) directly
            logits = onnx_logits(self.bundle.session, x, batch_size=self.settings.max_batch_size)
            finite = np.isfinite(logits).all(axis=1)
            good = np.flatnonzero(finite)
            if len(good) < n:  # finite inputs far outside the preprocessed range overflow the network
                logits = logits[good]
                slices = {k: [v[i] for i in good] for k, v in slices.items()}
            out = self.bundle.policy.apply(logits, slices or None) if len(good) else None
        records: list[Any] = [
            _RowError(
                400,
                "the model's outputs for this input are not finite (inf/NaN): its values are far outside "
                "the preprocessed range (normalised pixels, about -3..3); send preprocessed images.",
            )
        ] * n
        if out is None:
            return records
        m = self.metrics
        last = self.bundle.policy.cascade.names[-1] if self.bundle.policy.cascade is not None else "model"
        for j, rec in enumerate(out.records(self.bundle.classes)):
            rec.setdefault("stage", last)
            m.predictions.labels(rec["label"]).inc()
            m.stages.labels(rec["stage"]).inc()
            m.confidence.observe(rec["probability"])
            m.set_size.observe(len(rec["prediction_set"]))
            if rec["abstain"]:
                m.abstentions.inc()
            rec["_logits"] = logits[j]
            rec["_probs"] = out.probs[j]
            rec["_set"] = out.sets[j]
            records[int(good[j])] = rec
        return records


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError(400, "the JSON body is nested too deeply; send at most a few levels.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e}).") from None


def _json_bytes(
    status: int, message: str, extra: list[tuple[bytes, bytes]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    return {"type": "http.response.start", "status": status, "headers": headers}, {
        "type": "http.response.body",
        "body": body,
    }


class _Shed(RequestError):
    """503 + ``Retry-After`` from admission."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(503, message)
        self.retry_after = retry_after


class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class Admission:
    """Which prediction requests get in. Three bounds, each answered 503 + ``Retry-After``:

    - ``max_queue`` requests inside at once (a hard bound);
    - the model's queue: the batcher's latency budget on the images ahead (``pending`` counts requests admitted
      but not yet in its queue, being decoded, one image each until their count is known);
    - the whole request's latency, by Little's law: at most ``budget × throughput`` requests inside, where the
      throughput is the measured rate of answered requests (a decaying maximum over 1 s windows, so it
      follows capacity rather than demand) and the budget is ``max_latency_ms`` or, by default, three times the
      fastest recent answer (a windowed minimum; at least an efficient batch's time). This
      counts everything a request waits for (reading, decoding, the event loop, the batch), not only the
      model, and needs no tuning: the bound follows the machine and the model."""

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
        base = 3 * self.base_s if math.isfinite(self.base_s) else 0.0
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
        counted inside (a v2 request asks again once validated); ``hard_only``: only ``max_queue``."""
        inside = self.inside - own
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
        if b.over_budget(1, ahead=b.waiting + self.pending):
            expected = b.expected_seconds(1, ahead=b.waiting + self.pending) * 1000
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


class _Gate:
    """Pure ASGI middleware, outermost: API key, the body under a timeout, admission, request metrics, and
    ``Connection: close`` on every answer while draining (so keep-alive clients reconnect elsewhere)."""

    def __init__(
        self, app: Any, settings: ServeSettings, metrics: ServerMetrics, admission: Admission
    ) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.admission = admission
        self.key = settings.api_key.encode() if settings.api_key else None
        self.limit = int(settings.max_body_mb * 2**20)

    async def _read(self, receive: Any) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        status = 500
        app_state = getattr(scope.get("app"), "state", None)

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if getattr(app_state, "draining", False):
                    message = message | {"headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        async def refuse(code: int, msg: str, extra: list[tuple[bytes, bytes]]) -> None:
            for m in _json_bytes(code, msg, extra):
                await send_status(m)

        gate = "other"
        try:
            if self.key is not None and path not in _OPEN_PATHS:
                auth = dict(scope["headers"]).get(b"authorization", b"")
                given = auth[7:] if auth[:7].lower() == b"bearer " else b""
                if not hmac.compare_digest(given, self.key):
                    gate = "auth"
                    msg = "missing or wrong API key: send 'Authorization: Bearer <key>'."
                    await refuse(401, msg, [(b"www-authenticate", b"Bearer")])
                    return
            if scope["method"] != "POST":
                await self.app(scope, receive, send_status)
                return
            close = [(b"connection", b"close")]  # the rest of an unread body must not be parsed as a request
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                gate = "body"
                msg = f"request body is {int(length)} bytes, over the limit of {self.limit}; send less."
                await refuse(413, msg, close)
                return
            try:
                body = await asyncio.wait_for(self._read(receive), self.settings.body_timeout_s)
            except TimeoutError:
                gate = "body"
                self.metrics.body_timeouts.inc()
                msg = (
                    f"the request body did not arrive within body_timeout_s={self.settings.body_timeout_s:g} "
                    "seconds; send it at once."
                )
                await refuse(408, msg, close)
                return
            except _BodyTooLarge:
                gate = "body"
                await refuse(413, f"request body is over the limit of {self.limit} bytes; send less.", close)
                return
            except _Disconnected:
                status, gate = 499, "body"  # nginx's "client closed request"; nothing to answer
                return
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return dict(await receive())

            if not path.endswith(_PREDICT_SUFFIXES):
                await self.app(scope, replay, send_status)
                return
            adm = self.admission
            # v2 tensors are parsed and validated first (a malformed one gets its 400 even under load) and ask
            # for admission again before they join a batch; images are refused before they are decoded
            refusal = adm.refusal(hard_only=path.endswith("/infer"))
            if refusal is not None:
                gate = "admission"
                self.metrics.rejected.inc()
                msg, retry_after = await adm.shed(scope.get("client"), refusal)
                await refuse(503, msg, [(b"retry-after", str(retry_after).encode())])
                return
            adm.inside += 1
            adm.pending += 1
            scope.setdefault("state", {})["roadwork_pending"] = True
            self.metrics.inflight.set(adm.inside)
            t_in = time.perf_counter()
            try:
                await self.app(scope, replay, send_status)
            finally:
                adm.inside -= 1
                if scope["state"].get("roadwork_pending"):
                    adm.pending -= 1
                adm.finished(time.perf_counter() - t_in, status == 200)
                self.metrics.inflight.set(adm.inside)
        finally:
            # label by route template (bounded cardinality); refusals before routing by their gate
            handler = getattr(scope.get("route"), "path", gate)
            self.metrics.requests.labels(handler, str(status)).inc()
            self.metrics.latency.labels(handler).observe(time.perf_counter() - t0)


def create_app(bundle: Bundle | str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app. ``bundle`` is a loaded :class:`Bundle` or its folder."""
    settings = settings or ServeSettings()
    metrics = ServerMetrics()
    if not isinstance(bundle, Bundle):
        if settings.require_signature:
            from roadwork.export.signing import verify_bundle

            verify_bundle(bundle, settings.require_signature)
        from roadwork.export.onnx import execution_device

        with execution_device(settings.device, fp16=settings.trt_fp16, cache_dir=settings.trt_cache_dir):
            bundle = Bundle.load(bundle, threads=settings.ort_threads, variant=settings.variant)
    elif settings.require_signature:
        from roadwork.export.signing import verify_bundle

        verify_bundle(bundle.path, settings.require_signature)
    model = _Model(bundle, settings, metrics)
    decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="roadwork-decode")
    model_pool = ThreadPoolExecutor(1, thread_name_prefix="roadwork-model")
    stats = InferenceStats()

    def on_batch(n: int, waits: list[float]) -> None:
        metrics.batch_size.observe(n)
        stats.batch(n)
        for w in waits:
            metrics.queue_wait.observe(w)
            stats.queue_ns += int(w * 1e9)

    batcher = DynamicBatcher(
        model.run_batch,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        max_queue=settings.max_queue,
        executor=model_pool,
        on_batch=on_batch,
        max_queue_wait_ms=settings.max_queue_wait_ms,
        max_latency_ms=settings.max_latency_ms,
    )
    admission = Admission(settings, batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(model_pool, model.warm, 1)  # first call: allocations, not timed
        for n in (
            1,
            settings.max_batch_size,
            1,
            settings.max_batch_size,
        ):  # the batch-time fit's first points
            t0 = time.perf_counter()
            await loop.run_in_executor(model_pool, model.warm, n)
            batcher.service.observe(n, time.perf_counter() - t0)
        if not settings.max_latency_ms:  # auto: a few full batches' worth of waiting
            full = batcher.service.seconds(settings.max_batch_size)
            batcher.budget = max(3 * full + batcher.delay, 0.05)
        batcher.start()
        app.state.ready = True
        yield
        app.state.ready = False
        await batcher.stop()
        if pred_log is not None:
            pred_log.flush()
        decode_pool.shutdown(wait=False)
        model_pool.shutdown(wait=True)

    reference = bundle.path / "reference.json"  # hashed in the manifest, verified by Bundle.load
    if reference.is_file():
        metrics.set_reference(json.loads(reference.read_text()).get("rows", []))
    pred_log = None
    if settings.log_dir:
        from roadwork.serve.prediction_log import PredictionLog

        pred_log = PredictionLog(settings.log_dir, settings.log_rows_per_file)

    app = FastAPI(
        title="roadwork",
        version=_version(),
        lifespan=lifespan,
        description="Open Inference Protocol v2 (KServe/Triton) and /v1/classify for a roadwork bundle. Every "
        'error is JSON {"error": "..."}.',
    )
    app.state.ready = False
    app.state.draining = False
    app.state.model = model
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.admission = admission

    def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        retry = e.retry_after if isinstance(e, _Shed) else 1
        headers = {"Retry-After": str(retry)} if e.status == 503 else None
        return _error(e.status, e.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.url.path!r}; see /docs", 405: f"{request.method} is not allowed here"}
        return _error(e.status_code, msg.get(e.status_code, str(e.detail)), dict(e.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = jsonable_encoder(e.errors()[:1])
        where = ".".join(str(p) for p in first[0]["loc"]) if first else "request"
        return _error(422, f"{where}: {first[0]['msg'] if first else 'invalid'}.")

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> JSONResponse:  # last resort: still JSON
        return _error(500, f"internal error ({type(e).__name__}); the server log has the details.")

    app.add_middleware(_Gate, settings=settings, metrics=metrics, admission=admission)

    def _check_name(name: str) -> None:
        if name != model.name:
            raise RequestError(404, f"unknown model {name!r}; this server serves {model.name!r}.")

    def _leave_pending(request: Request) -> None:
        state = request.scope.get("state", {})
        if state.get("roadwork_pending"):
            state["roadwork_pending"] = False
            admission.pending -= 1

    async def _predict(
        request: Request, x: Any, meta: dict[str, list[str]], *, admit: bool = False
    ) -> list[dict[str, Any]]:
        if admit:  # a v2 request, now validated: the latency budget's admission (the gate checked max_queue)
            refusal = admission.refusal(own=1)
            if refusal is not None:
                metrics.rejected.inc()
                _leave_pending(request)
                admission.inside -= 1  # a refused request holds no slot while it waits out its Retry-After
                try:
                    msg, retry_after = await admission.shed(request.scope.get("client"), refusal)
                finally:
                    admission.inside += 1
                raise _Shed(msg, retry_after)
        _leave_pending(request)
        metrics.queue_depth.set(batcher.waiting)
        t0 = time.perf_counter()
        try:
            recs = await batcher.submit(x, meta, admitted=True)
        except QueueFull:
            metrics.rejected.inc()
            raise RequestError(503, "the request queue is full; retry after a second.") from None
        except QueueTimeout:
            metrics.rejected.inc()
            raise RequestError(
                503, f"the request waited over max_queue_wait_ms={settings.max_queue_wait_ms:g}; retry."
            ) from None
        except RequestError:
            raise
        except Exception as e:  # the model failed on this request alone (the batcher retried it by itself)
            stats.fail(time.perf_counter() - t0)
            raise RequestError(
                500, f"the model failed on this request ({type(e).__name__}: {str(e)[:200]})."
            ) from None
        bad = next((r for r in recs if isinstance(r, _RowError)), None)
        if bad is not None:
            stats.fail(time.perf_counter() - t0)
            which = [i for i, r in enumerate(recs) if isinstance(r, _RowError)]
            raise RequestError(bad.status, f"image(s) {which}: {bad.message}")
        stats.success(len(recs), time.perf_counter() - t0)
        return recs

    _errors: dict[int | str, dict[str, Any]] = {
        400: {"model": schemas.ErrorBody, "description": "the request is malformed; the error says how"},
        401: {"model": schemas.ErrorBody, "description": "missing or wrong API key"},
        404: {"model": schemas.ErrorBody, "description": "no such model"},
        408: {"model": schemas.ErrorBody, "description": "the body did not arrive within body_timeout_s"},
        413: {"model": schemas.ErrorBody, "description": "body or image count over the limits"},
        503: {
            "model": schemas.ErrorBody,
            "description": "load shed (latency budget, queue bound) or draining; retry after Retry-After",
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
        },
        500: {"model": schemas.ErrorBody, "description": "a server fault"},
    }
    _get_errors: dict[int | str, dict[str, Any]] = {404: _errors[404], 401: _errors[401]}

    # ------------------------------------------------------------------------------------------- health

    @app.get("/v2/health/live", response_model=schemas.Live)
    async def live() -> dict[str, bool]:
        """Liveness (OIP v2): ``{"live": true}`` while the process serves HTTP; the Kubernetes liveness probe."""
        return {"live": True}

    @app.get(
        "/v2/health/ready",
        response_model=schemas.Ready,
        responses={503: {"model": schemas.Ready, "description": "starting or draining"}},
    )
    async def ready() -> JSONResponse:
        """Readiness (OIP v2): 200 ``{"ready": true}`` once the model is loaded; 503 while starting or draining
        (from the first SIGTERM on, while the listener still answers for ``drain_delay_s``)."""
        ok = bool(app.state.ready and not app.state.draining)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2", response_model=schemas.ServerMetadata, responses={401: _errors[401]})
    async def server_metadata() -> dict[str, Any]:
        """Server metadata (OIP v2): name, version, extensions."""
        return {
            "name": "roadwork",
            "version": _version(),
            "extensions": ["classification", "binary_tensor_data", "model_repository", "statistics"],
        }

    @app.get("/v2/models/stats", responses={401: _errors[401]})
    async def all_stats() -> dict[str, Any]:
        """Inference statistics of every model (here: the one)."""
        return {"model_stats": [stats.triton(model.name)]}

    @app.get("/v2/models/{name}", response_model=schemas.ModelMetadata, responses=_get_errors)
    async def model_metadata(name: str) -> dict[str, Any]:
        """Model metadata (OIP v2): input ``input`` FP32 ``[-1, 3, S, S]``, outputs and class names; 404 for
        another name."""
        _check_name(name)
        k = len(model.bundle.classes)
        outputs = [
            {"name": "logits", "datatype": "FP32", "shape": [-1, k]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "prediction_set", "datatype": "BOOL", "shape": [-1, k]},
            {"name": "abstain", "datatype": "BOOL", "shape": [-1]},
        ]
        return {
            "name": model.name,
            "versions": ["1"],
            "platform": "openvino"
            if model.bundle.runtime.get("runtime") == "openvino"
            else "onnxruntime_onnx",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, model.size, model.size]}],
            "outputs": outputs,
            "parameters": {
                "classes": model.bundle.classes,
                "slice_columns": model.slice_columns,
                "variant": model.bundle.variant,
                "runtime": model.bundle.runtime.get("runtime"),
                "precision": model.bundle.runtime.get("precision"),
            },
        }

    @app.get(
        "/v2/models/{name}/ready",
        response_model=schemas.ModelReady,
        responses={**_get_errors, 503: {"model": schemas.ModelReady, "description": "not ready"}},
    )
    async def model_ready(name: str) -> JSONResponse:
        """Model readiness (OIP v2): as ``/v2/health/ready`` for this model; 404 for another name."""
        _check_name(name)
        ok = bool(app.state.ready and not app.state.draining)
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}/config", responses=_get_errors)
    async def model_config(name: str) -> dict[str, Any]:
        """Triton's model configuration (``tritonclient`` ``get_model_config``), read from the ONNX graph: the
        input and the network's output with their types and dims (batch dimension left out), and the
        dynamic-batching settings."""
        _check_name(name)
        return model_config_of(model, settings)

    @app.get(
        "/v2/repository/index",
        response_model=list[schemas.RepositoryEntry],
        responses={401: _errors[401]},
        operation_id="repository_index_get",
    )
    @app.post(
        "/v2/repository/index",
        response_model=list[schemas.RepositoryEntry],
        responses={401: _errors[401]},
        operation_id="repository_index_post",
    )
    async def repository_index() -> list[dict[str, str]]:
        """Triton's model-repository index (``get_model_repository_index``): the one model this server serves."""
        state = "READY" if app.state.ready and not app.state.draining else "UNAVAILABLE"
        return [{"name": model.name, "version": "1", "state": state}]

    @app.get("/v2/models/{name}/stats", responses=_get_errors)
    async def model_stats(name: str) -> dict[str, Any]:
        """Triton's inference statistics (``get_inference_statistics``): counts and cumulative nanoseconds of
        successful and failed requests, queue wait, and batches (warm-up excluded)."""
        _check_name(name)
        return {"model_stats": [stats.triton(model.name)]}

    @app.post(
        "/v2/models/{name}/infer",
        response_model=schemas.InferResponse,
        responses=_errors,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
                    "application/octet-stream": {
                        "schema": {"type": "string", "format": "binary"},
                        "description": "Triton's binary-tensor extension: Inference-Header-Content-Length bytes "
                        "of JSON (an InferRequest) followed by the raw tensors",
                    },
                },
            }
        },
    )
    async def infer(name: str, request: Request) -> Any:
        """Inference (OIP v2): ``{"inputs": [{"name": "input", "datatype": "FP32", "shape": [N, 3, S, S],
        "data": [...]}]}``, already preprocessed → outputs ``logits``, ``probabilities``, ``label``,
        ``prediction_set``, ``abstain``. Runs the last cascade stage only. 400 on a wrong shape or datatype,
        non-finite values (after the cast to FP32), or values that drive the model to inf/NaN.
        Triton's binary-tensor extension: with an ``Inference-Header-Content-Length`` header the body is that many
        bytes of JSON followed by the raw little-endian tensor (``parameters.binary_data_size`` on the input);
        outputs asked for with ``parameters.binary_data`` (or ``parameters.binary_data_output`` on the request)
        come back the same way."""
        _check_name(name)
        body = await request.body()
        req, blob = _split_binary(body, request.headers.get("inference-header-content-length"))
        x, meta = _v2_input(req, model.size, settings.max_queue, blob, bound=model.input_bound)
        wanted = _v2_outputs(req)
        recs = await _predict(request, x, meta, admit=True)
        n, k = len(recs), len(model.bundle.classes)

        def out(name: str, dtype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
            return {"name": name, "datatype": dtype, "shape": shape, "data": data}

        outputs = [
            out("logits", "FP32", [n, k], np.concatenate([r["_logits"] for r in recs]).tolist() if n else []),
            out(
                "probabilities",
                "FP32",
                [n, k],
                np.concatenate([r["_probs"] for r in recs]).tolist() if n else [],
            ),
            out("label", "BYTES", [n], [r["label"] for r in recs]),
            out("prediction_set", "BOOL", [n, k], [bool(b) for r in recs for b in r["_set"]]),
            out("abstain", "BOOL", [n], [r["abstain"] for r in recs]),
        ]
        if wanted:
            outputs = [o for o in outputs if o["name"] in wanted]
        resp: dict[str, Any] = {"model_name": model.name, "model_version": "1", "outputs": outputs}
        if "id" in req:
            resp["id"] = req["id"]
        return _binary_response(resp, req)

    # ------------------------------------------------------------------------------------------- images

    @app.post(
        "/v1/classify",
        response_model=schemas.ClassifyResponse,
        responses=_errors | {415: {"model": schemas.ErrorBody, "description": "unsupported content type"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyRequest"}},
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                            },
                        }
                    },
                },
            }
        },
    )
    async def classify(request: Request) -> dict[str, Any]:
        """Classify images: a raw body (``image/jpeg``, ``image/png`` …), ``multipart/form-data`` with one or more
        files, or JSON ``{"image": base64}`` / ``{"images": [...]}`` with optional ``"metadata"`` (slice values).
        Returns ``{"predictions": [{label, probability, prediction_set, abstain, score, stage}]}``: the bundle's
        whole policy and cascade. 400 corrupt image or bomb, 413 body too large, 415 other content types."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await request.body()
        query_meta = {k: v for k, v in request.query_params.items() if k in model.slice_columns}
        if ctype == "application/json":
            blobs, per_image = _json_images(_json(body), settings.max_images)
        elif ctype == "multipart/form-data":
            form = await request.form(max_files=settings.max_images, max_fields=64)
            blobs = [await f.read() for _, f in form.multi_items() if hasattr(f, "read")]
            query_meta |= {
                k: v for k, v in form.multi_items() if isinstance(v, str) and k in model.slice_columns
            }
            if not blobs:
                raise RequestError(400, "the multipart body has no files; send the images as file fields.")
            per_image = [{} for _ in blobs]
        elif ctype in IMAGE_TYPES or (ctype == "" and body):
            blobs, per_image = [body], [{}]
        else:
            raise RequestError(
                415,
                f"content type {ctype!r} is not accepted; send image/jpeg|png|webp (raw body), "
                'multipart/form-data (files), or application/json {"image": base64}.',
            )
        if len(blobs) > settings.max_images:
            raise RequestError(
                413, f"{len(blobs)} images in one request; the limit is {settings.max_images}."
            )
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(decode_pool, model.reserve_pixels, blobs)
        try:
            x = await loop.run_in_executor(decode_pool, model.preprocess, blobs)
            meta = {
                col: [str(pi.get(col, query_meta.get(col, ""))) for pi in per_image]
                for col in model.slice_columns
            }
            recs = await _predict(request, x, meta)
        finally:
            model.release_pixels(pixels)
        if pred_log is not None:
            request_meta = {k: v for k, v in request.query_params.items()} | {
                k: v for k, v in query_meta.items() if isinstance(v, str)
            }
            pred_log.add(recs, [request_meta | pi for pi in per_image])
        return {
            "model": model.name,
            "predictions": [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs],
        }

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics: requests, latency, queue wait, batch size, predictions, abstentions, cascade stages,
        confidence and set-size histograms, and the calibration split's reference values (warm-up excluded)."""
        metrics.queue_depth.set(batcher.waiting)
        metrics.latency_budget.set(admission.budget_s())
        metrics.admission_limit.set(admission.limit() or settings.max_queue)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:  # the request models as components, for the bodies declared above
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            comps = spec.setdefault("components", {}).setdefault("schemas", {})
            for m in (schemas.InferRequest, schemas.ClassifyRequest):
                js = m.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[m.__name__] = js
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def model_config_of(model: _Model, settings: ServeSettings) -> dict[str, Any]:
    """Triton's ``config.pbtxt`` as JSON, from the ONNX session's inputs and outputs."""
    types = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64"}

    def tensor(t: Any) -> dict[str, Any]:
        dims = [d if isinstance(d, int) else -1 for d in t.shape[1:]]
        return {"name": t.name, "data_type": types.get(t.type, "TYPE_FP32"), "dims": dims}

    sess = model.bundle.session
    return {
        "name": model.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": settings.max_batch_size,
        "input": [tensor(t) for t in sess.get_inputs()],
        "output": [tensor(t) for t in sess.get_outputs()],
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000),
            "preferred_batch_size": [settings.max_batch_size],
        },
        "instance_group": [
            {"count": 1, "kind": "KIND_GPU" if settings.device in ("cuda", "tensorrt") else "KIND_CPU"}
        ],
        "parameters": {"classes": {"string_value": ",".join(model.bundle.classes)}},
    }


def _json_images(req: Any, max_images: int) -> tuple[list[bytes], list[dict[str, Any]]]:
    """``{"image": b64, "metadata": {...}}`` or ``{"images": [b64, ...], "metadata": [{...}, ...] | {...}}``."""
    if not isinstance(req, dict) or ("image" not in req and "images" not in req):
        raise RequestError(400, 'send {"image": "<base64>"} or {"images": ["<base64>", ...]}.')
    if "image" in req:
        items = [req["image"]]
    else:
        items = req["images"]
        if not isinstance(items, list) or not items:
            raise RequestError(400, "'images' must be a non-empty list of base64 strings.")
        if len(items) > max_images:
            raise RequestError(413, f"{len(items)} images in one request; the limit is {max_images}.")
    meta = req.get("metadata", {})
    if meta is None:
        meta = {}
    if isinstance(meta, dict):
        per_image = [meta] * len(items)
    elif isinstance(meta, list) and len(meta) == len(items) and all(isinstance(m, dict) for m in meta):
        per_image = meta
    else:
        raise RequestError(400, "'metadata' must be an object, or a list of objects (one per image).")
    field = "image" if "image" in req else "images[]"
    return [decode_b64(b, field) for b in items], per_image


_V2_TYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}


def _split_binary(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The JSON part and the binary part of a request (Triton's binary-tensor extension)."""
    if header_length is None:
        return _json(body), b""
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 <= n <= len(body):
        raise RequestError(
            400,
            f"Inference-Header-Content-Length={header_length!r} must be an integer between 0 and the body's "
            f"{len(body)} bytes: the length of the JSON part.",
        )
    return _json(body[:n]), body[n:]


def _v2_outputs(req: dict[str, Any]) -> set[str]:
    """The outputs asked for (none: all). Each must be ``{"name": <an output>, "parameters": {...}?}``."""
    outs = req.get("outputs")
    if outs is None:
        return set()
    if not isinstance(outs, list):
        raise RequestError(
            400, f"'outputs' must be a list of {{\"name\": ...}} objects; got {type(outs).__name__}."
        )
    names = set()
    for o in outs:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in _OUTPUT_NAMES:
            raise RequestError(
                400, f'each output must be {{"name": one of {list(_OUTPUT_NAMES)}}}; got {str(o)[:80]}.'
            )
        if "parameters" in o and not isinstance(o["parameters"], dict):
            raise RequestError(400, f"outputs[{name!r}].parameters must be an object.")
        names.add(name)
    return names


def _binary_response(resp: dict[str, Any], req: Any) -> Any:
    """Outputs asked for as binary leave the JSON and follow it as raw little-endian bytes (BYTES: each element
    prefixed with its 4-byte length), in order; JSON alone when none was asked for."""
    raw_params = req.get("parameters")
    params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    every = bool(params.get("binary_data_output", False))
    asked = {
        o["name"]
        for o in req.get("outputs") or []
        if isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data")
    }
    if not every and not asked:
        return resp
    chunks = []
    for o in resp["outputs"]:
        if not (every or o["name"] in asked):
            continue
        data = o.pop("data")
        if o["datatype"] == "BYTES":
            raw = b"".join(len(b).to_bytes(4, "little") + b for b in (str(v).encode() for v in data))
        else:
            dt = {"FP32": "<f4", "BOOL": "?"}[o["datatype"]]
            raw = np.asarray(data, dtype=dt).tobytes()
        o["parameters"] = {"binary_data_size": len(raw)}
        chunks.append(raw)
    head = json.dumps(resp).encode()
    return Response(
        content=head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def _v2_input(
    req: Any, size: int, max_n: int, blob: bytes = b"", *, bound: float = math.inf
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Validate an OIP v2 infer request: one tensor ``input`` of shape [N, 3, size, size], FP32 (or FP16/FP64,
    cast to FP32), its values in ``data`` or, with the binary-tensor extension, in ``blob``
    (``parameters.binary_data_size`` bytes). The checks run on the FP32 values the model will see: FP64 ``1e300``
    becomes inf there and is refused."""
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or len(req["inputs"]) != 1:
        raise RequestError(400, f"'inputs' must be a list with one tensor named {INPUT_NAME!r}.")
    t = req["inputs"][0]
    if not isinstance(t, dict):
        raise RequestError(400, "each input must be an object with name, shape, datatype and data.")
    if t.get("name") != INPUT_NAME:
        raise RequestError(
            400, f"unknown input {str(t.get('name'))[:80]!r}; the model's input is {INPUT_NAME!r}."
        )
    dtype = t.get("datatype")
    if not isinstance(dtype, str) or dtype not in _V2_TYPES:
        raise RequestError(
            400, f"datatype {str(dtype)[:40]!r} is not supported for {INPUT_NAME!r}; use FP32."
        )
    shape = t.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
        or shape[1:] != [3, size, size]
        or not 1 <= shape[0] <= max_n
    ):
        raise RequestError(
            400,
            f"shape {str(shape)[:80]} is not [N, 3, {size}, {size}] with 1 <= N <= {max_n}; preprocess to that "
            "size.",
        )
    count = int(np.prod(shape))
    raw_params = t.get("parameters")
    if raw_params is not None and not isinstance(raw_params, dict):
        raise RequestError(400, "inputs[0].parameters must be an object.")
    tparams: dict[str, Any] = raw_params or {}
    if "binary_data_size" in tparams:
        nbytes = tparams["binary_data_size"]
        want = count * np.dtype(_V2_TYPES[dtype]).itemsize
        if not isinstance(nbytes, int) or nbytes != want or len(blob) != want:
            raise RequestError(
                400,
                f"binary_data_size={str(nbytes)[:40]} and the {len(blob)} bytes after the JSON header must both "
                f"be {want} ({dtype} {shape}).",
            )
        x = np.frombuffer(blob, dtype=np.dtype(_V2_TYPES[dtype]).newbyteorder("<"))
    else:
        data = t.get("data")
        if not isinstance(data, list):
            raise RequestError(400, "'data' must be a flat (or nested) list of numbers.")
        try:
            x = np.asarray(data, dtype=_V2_TYPES[dtype])
        except (ValueError, TypeError, RecursionError):
            raise RequestError(400, "'data' must be a flat (or nested) list of numbers.") from None
        except OverflowError:
            raise RequestError(400, f"'data' has a number too large for {dtype}.") from None
    if x.size != count:
        raise RequestError(400, f"'data' has {x.size} values; shape {shape} needs {count}.")
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = x.reshape(shape).astype(np.float32)  # what the model sees: FP64 1e300 is inf here
    if not np.isfinite(x32).all():
        raise RequestError(400, "'data' contains NaN or inf (after the cast to FP32: |values| < 3.4e38).")
    if bound < math.inf and float(np.abs(x32).max(initial=0.0)) > bound:
        raise RequestError(
            400,
            f"'data' has values up to {float(np.abs(x32).max()):.3g}, far outside the model's preprocessed range "
            f"(normalised pixels; |values| <= {bound:.3g} accepted): send images preprocessed as "
            "/v2/models/{name} describes (resize, /255, mean/std).",
        )
    params = req.get("parameters", {})
    slices = params.get("slices", {}) if isinstance(params, dict) else {}
    meta: dict[str, list[str]] = {}
    if isinstance(slices, dict):
        for k, v in slices.items():
            vals = v if isinstance(v, list) else [v] * shape[0]
            if len(vals) != shape[0]:
                raise RequestError(
                    400, f"parameters.slices.{str(k)[:40]} has {len(vals)} values for {shape[0]} images."
                )
            meta[str(k)] = [str(s)[:256] for s in vals]
    return x32, meta
