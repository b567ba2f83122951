"""Open Inference Protocol v2 on the wire: the JSON and binary-tensor request parts, the validated input tensor,
the outputs asked for, and the response (JSON or Triton's binary-tensor extension); and ``/v1/classify``'s JSON
image bodies. Pure functions of bytes and dicts: every malformed request is a :class:`RequestError` (400/413)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from fastapi.responses import Response

from roadwork.export.onnx import INPUT_NAME
from roadwork.serve.decode import RequestError, decode_b64
from roadwork.serve.model import Row

__all__ = [
    "OUTPUT_NAMES",
    "binary_response",
    "infer_outputs",
    "json_images",
    "parse_input",
    "parse_json",
    "parse_request",
    "requested_outputs",
    "split_binary",
]

OUTPUT_NAMES = ("logits", "probabilities", "label", "prediction_set", "abstain")
"""The model's v2 outputs, in answer order."""


def parse_json(body: bytes | bytearray) -> Any:
    """The body as JSON; 400 (not 500) for invalid or too deeply nested JSON."""
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError(400, "the JSON body is nested too deeply; send at most a few levels.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e}).") from None


def json_images(body: bytes | bytearray, max_images: int) -> tuple[list[bytes], list[dict[str, Any]]]:
    """A ``/v1/classify`` JSON body, ``{"image": b64, "metadata": {...}}`` or ``{"images": [b64, ...],
    "metadata": [{...}, ...] | {...}}`` → the image bytes and per-image metadata. Pure, so that a large body is
    parsed and base64-decoded in the parsing process (:meth:`~roadwork.serve.state.ServerState.parse`)."""
    req = parse_json(body)
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
    if "image" in req:
        return [decode_b64(items[0], "image")], per_image
    return [decode_b64(b, f"images[{i}]") for i, b in enumerate(items)], per_image


_V2_TYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}


def split_binary(body: bytes | bytearray, header_length: str | None) -> tuple[Any, bytes | bytearray]:
    """The JSON part and the binary part of a request (Triton's binary-tensor extension)."""
    if header_length is None:
        return parse_json(body), b""
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
    return parse_json(body[:n]), body[n:]


def parse_request(
    body: bytes | bytearray, header_length: str | None, size: int, max_n: int, bound: float
) -> tuple[np.ndarray, dict[str, list[str]], dict[str, Any]]:
    """A whole infer request, bytes to validated tensor: ``(x, slices, request)``, the request without its input
    values (what is left to answer it: id, outputs asked for, parameters). Pure, so that a large body can be
    parsed in another process while the event loop keeps answering probes (``json.loads`` holds the GIL)."""
    req, blob = split_binary(body, header_length)
    if isinstance(req, dict) and "id" in req and not isinstance(req["id"], str):  # OIP's id: a string, echoed
        raise RequestError(
            400, f"id must be a string (the request id echoed back); got {type(req['id']).__name__}."
        )
    x, meta = parse_input(req, size, max_n, blob, bound=bound)
    req["inputs"][0].pop("data", None)
    return x, meta, req


def requested_outputs(req: dict[str, Any]) -> set[str]:
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
        if name not in OUTPUT_NAMES:
            raise RequestError(
                400, f'each output must be {{"name": one of {list(OUTPUT_NAMES)}}}; got {str(o)[:80]}.'
            )
        if "parameters" in o and not isinstance(o["parameters"], dict):
            raise RequestError(400, f"outputs[{name!r}].parameters must be an object.")
        names.add(name)
    return names


def binary_response(resp: dict[str, Any], req: Any) -> Any:
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
    if not every and not asked:  # rendered here: the schema is documented, not re-validated per request
        return Response(content=json.dumps(resp).encode(), media_type="application/json")
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


def parse_input(
    req: Any, size: int, max_n: int, blob: bytes | bytearray = b"", *, bound: float = math.inf
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
    x = _values(t, dtype, shape, count, blob)
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
            "parameters.preprocess of /v2/models/{name} describes (resize, crop, /255, mean/std).",
        )
    return x32, _slices(req, shape[0])


def _values(
    t: dict[str, Any], dtype: str, shape: list[int], count: int, blob: bytes | bytearray
) -> np.ndarray:
    """The input's values as sent: ``data`` (JSON numbers) or, with the binary-tensor extension, ``blob``."""
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
    return x


def _slices(req: dict[str, Any], n: int) -> dict[str, list[str]]:
    """``parameters.slices``: one value per image (or one for all) of each slice column, as strings."""
    params = req.get("parameters", {})
    slices = params.get("slices", {}) if isinstance(params, dict) else {}
    meta: dict[str, list[str]] = {}
    if isinstance(slices, dict):
        for k, v in slices.items():
            vals = v if isinstance(v, list) else [v] * n
            if len(vals) != n:
                raise RequestError(
                    400, f"parameters.slices.{str(k)[:40]} has {len(vals)} values for {n} images."
                )
            meta[str(k)] = [str(s)[:256] for s in vals]
    return meta


def infer_outputs(rows: list[Row], classes: list[str]) -> list[dict[str, Any]]:
    """The five v2 outputs of a batch of rows, in :data:`OUTPUT_NAMES` order."""
    n, k = len(rows), len(classes)

    def out(name: str, dtype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
        return {"name": name, "datatype": dtype, "shape": shape, "data": data}

    def flat(arrays: list[np.ndarray]) -> list[Any]:
        return np.concatenate(arrays).tolist() if arrays else []

    return [
        out("logits", "FP32", [n, k], flat([r.logits for r in rows])),
        out("probabilities", "FP32", [n, k], flat([r.probs for r in rows])),
        out("label", "BYTES", [n], [r.record["label"] for r in rows]),
        out("prediction_set", "BOOL", [n, k], [bool(b) for r in rows for b in r.pset]),
        out("abstain", "BOOL", [n], [r.record["abstain"] for r in rows]),
    ]
