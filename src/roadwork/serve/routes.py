"""The HTTP endpoints, as one router over the app's :class:`ServerState`: health, OIP v2 metadata and
inference, Triton's model-repository and statistics extensions, ``/v1/classify`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from roadwork.export.onnx import INPUT_NAME
from roadwork.serve import repository, schemas, v2
from roadwork.serve.admission import Shed, body_of
from roadwork.serve.decode import IMAGE_TYPES, RequestError
from roadwork.serve.model import model_config_of
from roadwork.serve.state import ServerState, server_state

__all__ = [
    "all_stats",
    "classify",
    "fast_routes",
    "feedback",
    "infer",
    "live",
    "model_config",
    "model_metadata",
    "model_ready",
    "model_stats",
    "prometheus",
    "ready",
    "repository_index",
    "repository_load",
    "repository_unload",
    "request_error_response",
    "router",
    "server_error_response",
    "server_metadata",
    "version",
]

log = logging.getLogger(__name__)

router = APIRouter()
"""Every endpoint; :func:`roadwork.serve.app.create_app` includes it."""
State = Annotated[ServerState, Depends(server_state)]


def version() -> str:
    """The installed roadwork version (``0+unknown`` from a source tree)."""
    try:
        return metadata.version("roadwork")
    except metadata.PackageNotFoundError:
        return "0+unknown"


_ERRORS: dict[int | str, dict[str, Any]] = {
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
_GET_ERRORS: dict[int | str, dict[str, Any]] = {404: _ERRORS[404], 401: _ERRORS[401]}
_INFER_BODY = {
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
}
_CLASSIFY_BODY = {
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
}

# ----------------------------------------------------------------------------------------------- health


@router.get("/v2/health/live", response_model=schemas.Live)
async def live() -> dict[str, bool]:
    """Liveness (OIP v2): ``{"live": true}`` while the process serves HTTP; the Kubernetes liveness probe."""
    return {"live": True}


@router.get(
    "/v2/health/ready",
    response_model=schemas.Ready,
    responses={503: {"model": schemas.Ready, "description": "starting or draining"}},
)
async def ready(state: State) -> JSONResponse:
    """Readiness (OIP v2): 200 ``{"ready": true}`` once the model is loaded; 503 while starting or draining
    (from the first SIGTERM on, while the listener still answers for ``drain_delay_s``)."""
    return JSONResponse({"ready": state.serving}, status_code=200 if state.serving else 503)


# ----------------------------------------------------------------------------------------------- metadata


@router.get("/v2", response_model=schemas.ServerMetadata, responses={401: _ERRORS[401]})
async def server_metadata() -> dict[str, Any]:
    """Server metadata (OIP v2): name, version, extensions."""
    return {
        "name": "roadwork",
        "version": version(),
        "extensions": ["classification", "binary_tensor_data", "model_repository", "statistics"],
    }


@router.get("/v2/models/stats", responses={401: _ERRORS[401]})
async def all_stats(state: State) -> dict[str, Any]:
    """Inference statistics of every model (here: the one)."""
    return {"model_stats": [state.stats.triton(state.model.name)]}


@router.get("/v2/models/{name}", response_model=schemas.ModelMetadata, responses=_GET_ERRORS)
async def model_metadata(name: str, state: State) -> dict[str, Any]:
    """Model metadata (OIP v2): input ``input`` FP32 ``[-1, 3, S, S]``, outputs, class names, the served
    variant, and ``parameters.preprocess`` (resize side, crop, interpolation, mean/std: how to build the input
    tensor from an image); 404 for another name."""
    state.check_name(name)
    model = state.model
    bundle = model.bundle
    k = len(bundle.classes)
    outputs = [
        {"name": "logits", "datatype": "FP32", "shape": [-1, k]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "prediction_set", "datatype": "BOOL", "shape": [-1, k]},
        {"name": "abstain", "datatype": "BOOL", "shape": [-1]},
    ]
    runtime = bundle.runtime.get("runtime")
    return {
        "name": model.name,
        "versions": ["1"],
        "platform": "openvino" if runtime == "openvino" else "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, model.size, model.size]}],
        "outputs": outputs,
        "parameters": {
            "classes": bundle.classes,
            "slice_columns": model.slice_columns,
            "variant": bundle.variant,
            "runtime": runtime,
            "precision": bundle.runtime.get("precision"),
            # what a v2 client must do to an image before sending its tensor
            "preprocess": bundle.card.preprocess.to_dict() | {"decode_side": model.decode_side},
            "answers": _answers(bundle),
            # what /v2 infer applies to its tensors: the model alone's certified policy when the bundle has a cascade
            "infer_policy": (
                f"model alone ({bundle.tensor_policy_file})"
                if bundle.model_policy is not None
                else bundle.tensor_policy_file
            ),
        },
    }


def _answers(bundle: Any) -> dict[str, Any]:
    """What share of images the policy answers (abstain=false) and under which certified bound."""
    a = bundle.policy.abstention
    recorded = bundle.manifest.get("export", {}).get("answers") or {}
    statement, warn = bundle.answers_statement()
    return {
        "test_share": recorded.get("test") if bundle.variant == "fp32" else None,
        "calib_share": a.coverage,
        "target_risk": a.target_risk,
        "delta": a.delta,
        "abstains_on_every_image": warn,
        "statement": statement,
    }


@router.get(
    "/v2/models/{name}/ready",
    response_model=schemas.ModelReady,
    responses={**_GET_ERRORS, 503: {"model": schemas.ModelReady, "description": "not ready"}},
)
async def model_ready(name: str, state: State) -> JSONResponse:
    """Model readiness (OIP v2): as ``/v2/health/ready`` for this model; 404 for another name."""
    state.check_name(name)
    return JSONResponse({"name": name, "ready": state.serving}, status_code=200 if state.serving else 503)


@router.get("/v2/models/{name}/config", responses=_GET_ERRORS)
async def model_config(name: str, state: State) -> dict[str, Any]:
    """Triton's model configuration (``tritonclient`` ``get_model_config``), read from the ONNX graph: the
    input and the network's output with their types and dims (batch dimension left out), and the
    dynamic-batching settings."""
    state.check_name(name)
    return model_config_of(state.model, state.settings)


@router.get(
    "/v2/repository/index",
    response_model=list[schemas.RepositoryEntry],
    responses={401: _ERRORS[401]},
    operation_id="repository_index_get",
)
@router.post(
    "/v2/repository/index",
    response_model=list[schemas.RepositoryEntry],
    responses={401: _ERRORS[401]},
    operation_id="repository_index_post",
)
async def repository_index(state: State) -> list[dict[str, str]]:
    """Triton's model-repository index (``get_model_repository_index``): every bundle version of the repository
    folder (``repository=``, default the served bundle's parent), ``READY`` for the one served, with its
    ``policy_version``."""
    return await asyncio.get_running_loop().run_in_executor(None, repository.repository_entries, state)


@router.post(
    "/v2/repository/models/{name}/load",
    response_model=schemas.RepositoryEntry,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": schemas.RepositoryLoad.model_json_schema()}},
        }
    },
)
async def repository_load(name: str, request: Request, state: State) -> dict[str, str]:
    """Triton's ``load_model``: serve the version ``{"parameters": {"version": "..."}}`` (no body: the newest
    version folder, as Triton's ``latest`` policy) from the next batch on,
    without a restart and without failing a request (read and checked like start-up: ``require_signature``
    applies; a version whose classes or preprocessing differ is refused with 400). Answers its index entry."""
    state.check_name(name)
    params = _load_parameters(await request.body())
    extra = sorted(set(params) - {"version"})
    if extra:
        raise RequestError(
            400,
            f"load parameters {extra[:5]} are not supported: versions are folders of the repository; send "
            '{"parameters": {"version": NAME}} or no body (the newest version).',
        )
    return await repository.load_version(state, params.get("version", repository.NEWEST))


def _load_parameters(body: bytes) -> dict[str, Any]:
    """A load request's ``parameters``, whatever its content type (tritonclient sends ``{}`` without one)."""
    if not body.strip():
        return {}
    try:
        req = json.loads(body)
    except (ValueError, RecursionError):
        raise RequestError(
            400, 'the body is not JSON; send {"parameters": {"version": NAME}} or none.'
        ) from None
    params = req.get("parameters", {}) if isinstance(req, dict) else None
    if not isinstance(params, dict) or (isinstance(req, dict) and set(req) - {"parameters"}):
        raise RequestError(400, 'send {"parameters": {"version": NAME}}, or no body for the newest version.')
    return params


@router.post("/v2/repository/models/{name}/unload", responses=_ERRORS)
async def repository_unload(name: str, state: State) -> dict[str, str]:
    """Triton's ``unload_model``: stop serving (readiness and inference 503) until a version is loaded."""
    state.check_name(name)
    repository.unload(state)
    return {"name": name, "state": "UNAVAILABLE"}


@router.get("/v2/models/{name}/stats", responses=_GET_ERRORS)
async def model_stats(name: str, state: State) -> dict[str, Any]:
    """Triton's inference statistics (``get_inference_statistics``): counts and cumulative nanoseconds of
    successful and failed requests, queue wait, and batches (warm-up excluded)."""
    state.check_name(name)
    return {"model_stats": [state.stats.triton(state.model.name)]}


# ----------------------------------------------------------------------------------------------- inference


@router.post(
    "/v2/models/{name}/infer",
    response_model=schemas.InferResponse,
    responses=_ERRORS,
    openapi_extra=_INFER_BODY,
)
async def infer(name: str, request: Request, state: State) -> Any:
    """Inference (OIP v2): ``{"inputs": [{"name": "input", "datatype": "FP32", "shape": [N, 3, S, S],
    "data": [...]}]}``, already preprocessed → outputs ``logits``, ``probabilities``, ``label``,
    ``prediction_set``, ``abstain``. Runs the last cascade stage only. 400 on a wrong shape or datatype,
    non-finite values (after the cast to FP32), or values that drive the model to inf/NaN.
    Triton's binary-tensor extension: with an ``Inference-Header-Content-Length`` header the body is that many
    bytes of JSON followed by the raw little-endian tensor (``parameters.binary_data_size`` on the input);
    outputs asked for with ``parameters.binary_data`` (or ``parameters.binary_data_output`` on the request)
    come back the same way."""
    state.check_name(name)
    model = state.model
    body = body_of(request.scope)  # the gate's buffer: a 60 MB body is not copied again
    if body is None:
        body = bytearray(await request.body())
    parse = functools.partial(
        v2.parse_request,
        body,
        request.headers.get("inference-header-content-length"),
        model.size,
        state.settings.max_queue,
        model.input_bound,
    )
    x, meta, req = await state.parse(parse, len(body))
    wanted = v2.requested_outputs(req)
    rows = await state.predict(request, x, meta, admit=True)
    outputs = v2.infer_outputs(rows, model.bundle.classes)
    if wanted:
        outputs = [o for o in outputs if o["name"] in wanted]
    resp: dict[str, Any] = {"model_name": model.name, "model_version": "1", "outputs": outputs}
    resp["parameters"] = await _stamp_v2(state, rows, meta)
    if "id" in req:
        resp["id"] = req["id"]
    return v2.binary_response(resp, req)


async def _stamp_v2(state: ServerState, rows: list[Any], meta: dict[str, list[str]]) -> dict[str, Any]:
    """A v2 answer's ids (one per image), the policy_version it was decided under and the audit flags, stored in
    the field store like /v1's: the response's ``parameters``, so feedback works for Triton clients too. OIP
    parameter values are scalars, so the per-image ones are comma-separated strings, in image order."""
    records = [dict(r.record) for r in rows]
    if state.stamper is not None:
        state.stamper.stamp(records)
    if state.field is not None:
        per_image = [{k: str(v[i]) for k, v in meta.items()} for i in range(len(records))]
        await state.field.record(records, [r.probs for r in rows], per_image)
    params: dict[str, Any] = {
        "ids": ",".join(r["id"] for r in records),
        "policy_version": records[0]["policy_version"] if records else "",
    }
    if records and "audit" in records[0]:
        params["audit"] = ",".join("true" if r["audit"] else "false" for r in records)
    return params


@router.post(
    "/v1/classify",
    response_model=schemas.ClassifyResponse,
    response_model_exclude_unset=True,  # a field the policy does not produce (score, stage) is absent, not null
    responses=_ERRORS | {415: {"model": schemas.ErrorBody, "description": "unsupported content type"}},
    openapi_extra=_CLASSIFY_BODY,
)
async def classify(request: Request) -> Response:  # documented here; POSTs are served by fast_routes
    """Classify images: a raw body (``image/jpeg``, ``image/png`` …), ``multipart/form-data`` with one or more
    files, or JSON ``{"image": base64}`` / ``{"images": [...]}`` with optional ``"metadata"`` (slice values).
    Returns ``{"predictions": [{label, probability, prediction_set, abstain, score, stage}]}``: the bundle's
    whole policy and cascade. 400 corrupt image or bomb, 413 body too large, 415 other content types."""
    return await _classify(request, server_state(request))


def fast_routes(state: ServerState) -> dict[str, Callable[..., Awaitable[None]]]:
    """The hot path as plain ASGI endpoints the gate calls directly (``/v1/classify``), past FastAPI's routing,
    middleware stack, dependency solving and response re-validation; the same code, errors and JSON."""

    async def classify_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        try:
            response = await _classify(request, state)
        except RequestError as e:
            response = request_error_response(e)
        except (
            StarletteHTTPException
        ) as e:  # Starlette's own 4xx (a malformed multipart body, too many parts)
            response = JSONResponse(
                {"error": f"{str(e.detail).rstrip('.')}; send a well-formed body (see /docs)."},
                status_code=e.status_code,
            )
        except Exception as e:  # the last resort: still JSON, logged like the app's handler
            log.exception("classify failed")
            response = server_error_response(e)
        await response(scope, receive, send)

    return {"/v1/classify": classify_asgi}


def request_error_response(e: RequestError) -> JSONResponse:
    """Our 4xx/503 as JSON ``{"error": ...}`` (503 with ``Retry-After``)."""
    retry = e.retry_after if isinstance(e, Shed) else 1
    headers = {"Retry-After": str(retry)} if e.status == 503 else None
    return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)


def server_error_response(e: Exception) -> JSONResponse:
    """A server fault as a JSON 500 that names the exception's type only (details go to the log)."""
    return JSONResponse(
        {"error": f"internal error ({type(e).__name__}); the server log has the details."}, status_code=500
    )


async def _classify(request: Request, state: ServerState) -> Response:
    model = state.model
    blobs, per_image, query_meta = await _classify_images(request, state)
    loop = asyncio.get_running_loop()
    # one trip to the decode pool: count the pixels (503 over the budget), then decode and preprocess
    pixels, x = await loop.run_in_executor(state.decode_pool, model.reserve_and_preprocess, blobs)
    try:
        meta = {
            col: [str(pi.get(col, query_meta.get(col, ""))) for pi in per_image]
            for col in model.slice_columns
        }
        rows = await state.predict(request, x, meta)
        records = [r.record for r in rows]
    finally:
        model.release_pixels(pixels)
    if state.stamper is not None:  # each answer's id and policy_version (and audit flag)
        state.stamper.stamp(records)
    plain_meta = {k: v for k, v in query_meta.items() if isinstance(v, str)}
    if state.pred_log is not None:
        state.pred_log.add(records, [dict(request.query_params) | plain_meta | pi for pi in per_image])
    if state.field is not None:  # stored (committed) before the ids are sent: feedback can always find them
        await state.field.record(records, [r.probs for r in rows], [plain_meta | pi for pi in per_image])
    if state.capture is not None:  # log_images: what labellers will be sent (audit sample, abstained)
        keep = [(r["id"], b) for r, b in zip(records, blobs, strict=True) if r.get("audit") or r["abstain"]]
        if keep:
            await loop.run_in_executor(state.decode_pool, state.capture.add, keep)
    return Response(
        content=json.dumps({"model": model.name, "predictions": records}).encode(),
        media_type="application/json",
    )


async def _classify_images(
    request: Request, state: ServerState
) -> tuple[list[bytes], list[dict[str, Any]], dict[str, Any]]:
    """A ``/v1/classify`` body's images, per-image metadata and query/form slice values; 415 for other content
    types, 413 over ``max_images``."""
    model, settings = state.model, state.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    query_meta: dict[str, Any] = {k: v for k, v in request.query_params.items() if k in model.slice_columns}
    if ctype == "application/json":
        # json.loads and base64 of a large body hold the GIL: parsed in the parsing process then
        blobs, per_image = await state.parse(
            functools.partial(v2.json_images, body, settings.max_images), len(body)
        )
    elif ctype == "multipart/form-data":
        form = await request.form(max_files=settings.max_images, max_fields=64)
        blobs = [await f.read() for _, f in form.multi_items() if hasattr(f, "read")]
        query_meta |= {k: v for k, v in form.multi_items() if isinstance(v, str) and k in model.slice_columns}
        if not blobs:
            raise RequestError(400, "the multipart body has no files; send the images as file fields.")
        per_image = [{} for _ in blobs]
    elif ctype in IMAGE_TYPES or (ctype == "" and body):
        blobs, per_image = [body], [{}]
    else:
        raise RequestError(
            415,
            f"content type {ctype!r} is not accepted; send image/jpeg|png|webp|bmp|tiff|gif (raw body), "
            'multipart/form-data (files), or application/json {"image": base64}.',
        )
    if len(blobs) > settings.max_images:
        raise RequestError(413, f"{len(blobs)} images in one request; the limit is {settings.max_images}.")
    return blobs, per_image, query_meta


@router.post(
    "/v1/feedback",
    response_model=schemas.FeedbackResponse,
    responses=_ERRORS
    | {404: {"model": schemas.ErrorBody, "description": "feedback is off (no feedback_db)"}},
)
async def feedback(body: schemas.FeedbackRequest, state: State) -> dict[str, Any]:
    """Labels for answers this server (or another replica on the same store) gave: ``{"labels": [{"id": ...,
    "label": "roadwork"}, ...]}`` (a class name or index; up to 1,000). Idempotent per id: the first label is
    kept, a repeat is listed in ``duplicates``; ids the store does not hold are listed in ``unknown``. Stored
    (committed) before the answer. Needs ``feedback_db``."""
    if state.field is None:
        raise RequestError(
            404, "feedback is off on this server: start it with feedback_db=PATH (or a postgresql:// URL)."
        )
    classes = state.model.bundle.classes
    labels = []
    for i, item in enumerate(body.labels):
        y = item.label
        if isinstance(y, int) and not isinstance(y, bool) and 0 <= y < len(classes):
            labels.append((item.id, y))
        elif isinstance(y, str) and y in classes:
            labels.append((item.id, classes.index(y)))
        else:
            raise RequestError(
                400,
                f"labels[{i}].label={json.dumps(y)[:60]} is not a class of this model: use one of {classes} or "
                f"an integer index 0..{len(classes) - 1}.",
            )
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(None, state.field.feedback, labels)
    state.apply_online()  # conformal_online=aci: the next answers use the moved threshold
    state.field_dirty = True  # the next scrape recomputes the field gauges
    return {"accepted": result.accepted, "unknown": result.unknown, "duplicates": result.duplicates}


@router.get("/metrics", response_class=Response)
async def prometheus(state: State) -> Response:
    """Prometheus metrics: requests, latency, queue wait, batch size, predictions, abstentions, cascade stages,
    confidence and set-size histograms, and the calibration split's reference values (warm-up excluded)."""
    m = state.metrics
    await state.refresh_field_metrics()  # the field figures as of this scrape (at most every 2 s)
    m.queue_depth.set(state.batcher.waiting)
    m.latency_budget.set(state.admission.budget_s())
    m.admission_limit.set(state.admission.limit() or state.settings.max_queue)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
