"""The HTTP server: Open Inference Protocol v2 + ``/v1/classify`` + ``/metrics``, on FastAPI/uvicorn.

No torch: the bundle's ONNX model runs in ONNX Runtime and the :class:`TrustPolicy` in numpy. Image decoding
and preprocessing run in a thread pool, the model in the batcher's thread, so the event loop only moves bytes.
Every error is a JSON body ``{"error": "..."}`` with a 4xx status that says what was wrong.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from roadwork.data.preprocess import preprocess
from roadwork.export.bundle import Bundle
from roadwork.export.onnx import INPUT_NAME, onnx_logits
from roadwork.serve.batcher import DynamicBatcher, QueueFull, QueueTimeout
from roadwork.serve.decode import IMAGE_TYPES, RequestError, decode_b64, decode_image
from roadwork.serve.metrics import ServerMetrics
from roadwork.serve.settings import ServeSettings

__all__ = ["create_app"]

_OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/metrics")


def _version() -> str:
    try:
        return metadata.version("roadwork")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class _Model:
    """The bundle plus what the server needs around it: run one batch, turn it into per-image results."""

    def __init__(self, bundle: Bundle, settings: ServeSettings, metrics: ServerMetrics) -> None:
        self.bundle = bundle
        self.settings = settings
        self.metrics = metrics
        self.name = settings.name or bundle.path.name
        self.size = bundle.card.preprocess.size
        self.slice_columns = bundle.policy.slice_columns

    def preprocess(self, blobs: list[bytes]) -> Any:
        """Decode (and, without a cascade, preprocess for the model). A cascade bundle gets the decoded images:
        each stage resizes them its own way, and only for the images that reach it."""
        images = [
            decode_image(
                b, max_pixels=self.settings.max_pixels, what=f"image {i}" if len(blobs) > 1 else "image"
            )
            for i, b in enumerate(blobs)
        ]
        if self.bundle.stage_runners is not None:
            return images
        return preprocess(images, self.bundle.card.preprocess)

    def run_batch(self, x: Any, meta: dict[str, list[str]]) -> list[dict[str, Any]]:
        slices = {k: v for k, v in meta.items() if k in self.slice_columns}
        if isinstance(x, list):  # decoded images through the cascade
            out = self.bundle.predict_images(x, slices or None)
            logits = np.log(np.clip(out.probs, 1e-300, None))  # the answering stage's calibrated log-probs
        else:  # a preprocessed tensor goes to the model (the cascade's last stage) directly
            logits = onnx_logits(self.bundle.session, x, batch_size=self.settings.max_batch_size)
            out = self.bundle.policy.apply(logits, slices or None)
        records = out.records(self.bundle.classes)
        m = self.metrics
        last = self.bundle.policy.cascade.names[-1] if self.bundle.policy.cascade is not None else "model"
        for i, rec in enumerate(records):
            rec.setdefault("stage", last)
            m.predictions.labels(rec["label"]).inc()
            m.stages.labels(rec["stage"]).inc()
            m.confidence.observe(rec["probability"])
            m.set_size.observe(len(rec["prediction_set"]))
            if rec["abstain"]:
                m.abstentions.inc()
            rec["_logits"] = logits[i]
            rec["_probs"] = out.probs[i]
            rec["_set"] = out.sets[i]
        return records


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(413, f"request body is {int(length)} bytes, over the limit of {limit}; send less.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes; send less.")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # so request.form() parses what was already read
    return body


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
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


class _Gate:
    """Pure ASGI middleware, outermost: admission control, API key, request metrics.

    Admission runs before the body is read: at most ``max_queue`` prediction requests are inside the server
    (reading, decoding, queued or running), so every internal queue stays bounded, accepted requests keep
    their latency, and the rest get 503 + Retry-After for the price of a header parse.
    """

    def __init__(self, app: Any, settings: ServeSettings, metrics: ServerMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.inside = 0
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key is not None and path not in _OPEN_PATHS:
                auth = dict(scope["headers"]).get(b"authorization", b"")
                given = auth[7:] if auth[:7].lower() == b"bearer " else b""
                if not hmac.compare_digest(given, self.key):
                    msg = "missing or wrong API key: send 'Authorization: Bearer <key>'."
                    for m in _json_bytes(401, msg, [(b"www-authenticate", b"Bearer")]):
                        await send_status(m)
                    return
            if scope["method"] != "POST":
                await self.app(scope, receive, send_status)
                return
            if self.inside >= self.settings.max_queue:
                self.metrics.rejected.inc()
                msg = "the server is at capacity; retry after a second."
                for m in _json_bytes(503, msg, [(b"retry-after", b"1")]):
                    await send_status(m)
                return
            self.inside += 1
            self.metrics.inflight.set(self.inside)
            try:
                await self.app(scope, receive, send_status)
            finally:
                self.inside -= 1
                self.metrics.inflight.set(self.inside)
        finally:
            # label by route template (bounded cardinality); refusals before routing by their gate
            gate = {401: "auth", 503: "admission"}.get(status, "other")
            handler = getattr(scope.get("route"), "path", gate)
            self.metrics.requests.labels(handler, str(status)).inc()
            self.metrics.latency.labels(handler).observe(time.perf_counter() - t0)


def create_app(bundle: Bundle | str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app. ``bundle`` is a loaded :class:`Bundle` or its folder."""
    settings = settings or ServeSettings()
    metrics = ServerMetrics()
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle, threads=settings.ort_threads, variant=settings.variant)
    model = _Model(bundle, settings, metrics)
    limit = int(settings.max_body_mb * 2**20)
    decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="roadwork-decode")
    model_pool = ThreadPoolExecutor(1, thread_name_prefix="roadwork-model")

    def on_batch(n: int, waits: list[float]) -> None:
        metrics.batch_size.observe(n)
        for w in waits:
            metrics.queue_wait.observe(w)

    batcher = DynamicBatcher(
        model.run_batch,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        max_queue=settings.max_queue,
        executor=model_pool,
        on_batch=on_batch,
        max_queue_wait_ms=settings.max_queue_wait_ms,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        await batcher.submit(np.zeros((1, 3, model.size, model.size), np.float32), {})  # warm-up
        app.state.ready = True
        yield
        app.state.ready = False
        await batcher.stop()
        if pred_log is not None:
            pred_log.flush()
        decode_pool.shutdown(wait=False)
        model_pool.shutdown(wait=True)

    reference = bundle.path / "reference.json"
    if reference.is_file():
        metrics.set_reference(json.loads(reference.read_text()).get("rows", []))
    pred_log = None
    if settings.log_dir:
        from roadwork.serve.prediction_log import PredictionLog

        pred_log = PredictionLog(settings.log_dir, settings.log_rows_per_file)

    app = FastAPI(title="roadwork", version=_version(), lifespan=lifespan)
    app.state.ready = False
    app.state.draining = False
    app.state.model = model
    app.state.metrics = metrics

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.url.path!r}; see /docs", 405: f"{request.method} is not allowed here"}
        return JSONResponse({"error": msg.get(e.status_code, str(e.detail))}, status_code=e.status_code)

    app.add_middleware(_Gate, settings=settings, metrics=metrics)

    def _check_name(name: str) -> None:
        if name != model.name:
            raise RequestError(404, f"unknown model {name!r}; this server serves {model.name!r}.")

    async def _predict(x: Any, meta: dict[str, list[str]]) -> list[dict[str, Any]]:
        metrics.queue_depth.set(batcher.waiting)
        try:
            return await batcher.submit(x, meta)
        except QueueFull:
            metrics.rejected.inc()
            raise RequestError(503, "the request queue is full; retry after a second.") from None
        except QueueTimeout:
            metrics.rejected.inc()
            raise RequestError(
                503, f"the request waited over max_queue_wait_ms={settings.max_queue_wait_ms:g}; retry."
            ) from None

    # ------------------------------------------------------------------------------------------- health

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        """Liveness (OIP v2): ``{"live": true}`` while the process serves HTTP; the Kubernetes liveness probe."""
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        """Readiness (OIP v2): 200 ``{"ready": true}`` once the model is loaded; 503 while starting or draining."""
        ok = bool(app.state.ready and not app.state.draining)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        """Server metadata (OIP v2): name, version, extensions."""
        return {"name": "roadwork", "version": _version(), "extensions": ["classification"]}

    @app.get("/v2/models/{name}")
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
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, model.size, model.size]}],
            "outputs": outputs,
            "parameters": {"classes": model.bundle.classes, "slice_columns": model.slice_columns},
        }

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> JSONResponse:
        """Model readiness (OIP v2): as ``/v2/health/ready`` for this model; 404 for another name."""
        _check_name(name)
        ok = bool(app.state.ready and not app.state.draining)
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Any:
        """Inference (OIP v2): ``{"inputs": [{"name": "input", "datatype": "FP32", "shape": [N, 3, S, S],
        "data": [...]}]}``, already preprocessed → outputs ``logits``, ``probabilities``, ``label``,
        ``prediction_set``, ``abstain``. Runs the last cascade stage only. 400 on a wrong shape or datatype.
        Triton's binary-tensor extension: with an ``Inference-Header-Content-Length`` header the body is that many
        bytes of JSON followed by the raw little-endian tensor (``parameters.binary_data_size`` on the input);
        outputs asked for with ``parameters.binary_data`` (or ``parameters.binary_data_output`` on the request)
        come back the same way."""
        _check_name(name)
        body = await _read_body(request, limit)
        req, blob = _split_binary(body, request.headers.get("inference-header-content-length"))
        x, meta = _v2_input(req, model.size, settings.max_queue, blob)
        recs = await _predict(x, meta)
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
        wanted = {o.get("name") for o in req.get("outputs", []) if isinstance(o, dict)}
        if wanted:
            outputs = [o for o in outputs if o["name"] in wanted]
        resp: dict[str, Any] = {"model_name": model.name, "model_version": "1", "outputs": outputs}
        if "id" in req:
            resp["id"] = req["id"]
        return _binary_response(resp, req)

    # ------------------------------------------------------------------------------------------- images

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        """Classify images: a raw body (``image/jpeg``, ``image/png`` …), ``multipart/form-data`` with one or more
        files, or JSON ``{"image": base64}`` / ``{"images": [...]}`` with optional ``"metadata"`` (slice values).
        Returns ``{"predictions": [{label, probability, prediction_set, abstain, score, stage}]}``: the bundle's
        whole policy and cascade. 400 corrupt image or bomb, 413 body too large, 415 other content types."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await _read_body(request, limit)
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
        x = await loop.run_in_executor(decode_pool, model.preprocess, blobs)
        meta = {
            col: [str(pi.get(col, query_meta.get(col, ""))) for pi in per_image]
            for col in model.slice_columns
        }
        recs = await _predict(x, meta)
        if pred_log is not None:
            request_meta = {k: v for k, v in request.query_params.items()} | {
                k: v for k, v in query_meta.items() if isinstance(v, str)
            }
            pred_log.add(recs, [request_meta | pi for pi in per_image])
        return {
            "model": model.name,
            "predictions": [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs],
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus metrics: requests, latency, queue wait, batch size, predictions, abstentions, cascade stages,
        confidence and set-size histograms, and the calibration split's reference values."""
        metrics.queue_depth.set(batcher.waiting)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


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


def _binary_response(resp: dict[str, Any], req: Any) -> Any:
    """Outputs asked for as binary leave the JSON and follow it as raw little-endian bytes (BYTES: each element
    prefixed with its 4-byte length), in order; JSON alone when none was asked for."""
    raw_params = req.get("parameters")
    params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    every = bool(params.get("binary_data_output", False))
    asked = {
        o.get("name")
        for o in req.get("outputs", [])
        if isinstance(o, dict)
        and isinstance(o.get("parameters"), dict)
        and o["parameters"].get("binary_data")
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


def _v2_input(req: Any, size: int, max_n: int, blob: bytes = b"") -> tuple[np.ndarray, dict[str, list[str]]]:
    """Validate an OIP v2 infer request: one FP32 tensor ``input`` of shape [N, 3, size, size], its values in
    ``data`` or, with the binary-tensor extension, in ``blob`` (``parameters.binary_data_size`` bytes)."""
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or len(req["inputs"]) != 1:
        raise RequestError(400, f"'inputs' must be a list with one tensor named {INPUT_NAME!r}.")
    t = req["inputs"][0]
    if not isinstance(t, dict):
        raise RequestError(400, "each input must be an object with name, shape, datatype and data.")
    if t.get("name") != INPUT_NAME:
        raise RequestError(400, f"unknown input {t.get('name')!r}; the model's input is {INPUT_NAME!r}.")
    dtype = t.get("datatype")
    if dtype not in _V2_TYPES:
        raise RequestError(400, f"datatype {dtype!r} is not supported for {INPUT_NAME!r}; use FP32.")
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
            f"shape {shape!r} is not [N, 3, {size}, {size}] with 1 <= N <= {max_n}; preprocess to that size.",
        )
    raw_params = t.get("parameters")
    tparams: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    if "binary_data_size" in tparams:
        nbytes = tparams["binary_data_size"]
        want = int(np.prod(shape)) * np.dtype(_V2_TYPES[dtype]).itemsize
        if not isinstance(nbytes, int) or nbytes != want or len(blob) != want:
            raise RequestError(
                400,
                f"binary_data_size={nbytes!r} and the {len(blob)} bytes after the JSON header must both be "
                f"{want} ({dtype} {shape}).",
            )
        x = np.frombuffer(blob, dtype=np.dtype(_V2_TYPES[dtype]).newbyteorder("<"))
    else:
        try:
            x = np.asarray(t.get("data"), dtype=_V2_TYPES[dtype])
        except (ValueError, TypeError):
            raise RequestError(400, "'data' must be a flat (or nested) list of numbers.") from None
    if x.size != int(np.prod(shape)):
        raise RequestError(400, f"'data' has {x.size} values; shape {shape} needs {int(np.prod(shape))}.")
    if not np.isfinite(x).all():
        raise RequestError(400, "'data' contains NaN or inf.")
    params = req.get("parameters", {})
    slices = params.get("slices", {}) if isinstance(params, dict) else {}
    meta: dict[str, list[str]] = {}
    if isinstance(slices, dict):
        for k, v in slices.items():
            vals = v if isinstance(v, list) else [v] * shape[0]
            if len(vals) != shape[0]:
                raise RequestError(
                    400, f"parameters.slices.{k} has {len(vals)} values for {shape[0]} images."
                )
            meta[str(k)] = [str(s) for s in vals]
    return x.reshape(shape).astype(np.float32), meta
