"""Pydantic models of the HTTP bodies: they document the API (``/docs``, ``/openapi.json``) for people and for
generated clients and fuzzers. Requests are still parsed by hand in :mod:`roadwork.serve.v2` (the binary-tensor
extension puts raw bytes after the JSON), with the same rules these models state."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ClassifyRequest",
    "ClassifyResponse",
    "ErrorBody",
    "FeedbackLabel",
    "FeedbackRequest",
    "FeedbackResponse",
    "InferInput",
    "InferOutput",
    "InferOutputRequest",
    "InferRequest",
    "InferResponse",
    "InputParameters",
    "Live",
    "ModelMetadata",
    "ModelReady",
    "OutputParameters",
    "Prediction",
    "Ready",
    "RepositoryEntry",
    "RepositoryLoad",
    "RequestParameters",
    "ServerMetadata",
    "TensorMetadata",
]

OutputName = Literal["logits", "probabilities", "label", "prediction_set", "abstain"]


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": "..."}``."""

    error: str = Field(description="what was wrong and how to fix it")


class Live(BaseModel):
    """Liveness: ``{"live": true}``."""

    live: bool


class Ready(BaseModel):
    """Readiness: false while starting or draining."""

    ready: bool


class ModelReady(BaseModel):
    """One model's readiness."""

    name: str
    ready: bool


class ServerMetadata(BaseModel):
    """Server metadata (OIP v2): name, version, extensions."""

    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    """One input or output tensor: name, datatype, shape (-1: any)."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """Model metadata (OIP v2), with classes, slice columns, variant, runtime and precision in ``parameters``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any]


class RepositoryEntry(BaseModel):
    """One version of Triton's repository index: ``READY`` for the one served."""

    name: str
    version: str
    state: str
    reason: str = ""
    policy_version: str = ""


class RepositoryLoad(BaseModel):
    """``POST /v2/repository/models/{name}/load``: ``{"parameters": {"version": "bundle-3f2a..."}}``, a version
    folder's name as ``/v2/repository/index`` lists it."""

    model_config = ConfigDict(extra="forbid")
    parameters: dict[str, Any] = Field(default_factory=dict)


class InputParameters(BaseModel):
    """An input tensor's parameters (binary-tensor extension)."""

    model_config = ConfigDict(extra="allow")
    binary_data_size: int | None = Field(
        None, ge=0, description="bytes of this tensor after the JSON header (binary-tensor extension)"
    )


class InferInput(BaseModel):
    """The one input tensor, ``input``: [N, 3, S, S] preprocessed pixels."""

    name: Literal["input"]
    shape: list[int] = Field(min_length=4, max_length=4, description="[N, 3, S, S], S the model's input size")
    datatype: Literal["FP32", "FP16", "FP64"] = Field(description="cast to FP32; values must be finite there")
    data: list[Any] | None = Field(None, description="the N*3*S*S values, flat or nested (row-major)")
    parameters: InputParameters | None = None


class OutputParameters(BaseModel):
    """An output's parameters: ``binary_data`` to get it as raw bytes after the JSON."""

    model_config = ConfigDict(extra="allow")
    binary_data: bool = False


class InferOutputRequest(BaseModel):
    """An output asked for by name."""

    name: OutputName
    parameters: OutputParameters | None = None


class RequestParameters(BaseModel):
    """Request parameters: binary outputs for all, slice values per image."""

    model_config = ConfigDict(extra="allow")
    binary_data_output: bool = False
    slices: dict[str, str | list[str]] | None = Field(
        None, description="slice values per image (or one for all), e.g. {'weather': ['fog', 'rain']}"
    )


class InferRequest(BaseModel):
    """OIP v2 inference request (one input tensor named ``input``)."""

    id: str | None = None
    inputs: list[InferInput] = Field(min_length=1, max_length=1)
    outputs: list[InferOutputRequest] | None = None
    parameters: RequestParameters | None = None


class InferOutput(BaseModel):
    """One output tensor of the answer."""

    name: OutputName
    datatype: Literal["FP32", "BYTES", "BOOL"]
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    """OIP v2 inference response: the outputs asked for (all five by default)."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]
    parameters: dict[str, Any] | None = Field(
        None,
        description="ids: one per image, comma-separated, for POST /v1/feedback; policy_version: what the tensors "
        "were decided under (the model alone's policy for a cascade bundle); audit: with feedback_db and "
        "audit_rate, true/false per image, comma-separated",
    )


class ClassifyRequest(BaseModel):
    """One image (``image``) or several (``images``), base64 (a data URL is fine), with optional slice
    metadata: one object for all images or a list, one per image."""

    image: str | None = Field(None, description="base64 JPEG/PNG/WebP/BMP bytes")
    images: list[str] | None = Field(None, min_length=1, description="base64 images, at most max_images")
    metadata: dict[str, Any] | list[dict[str, Any]] | None = None


class Prediction(BaseModel):
    """One image's answer: label, calibrated probability, prediction set, abstain, answering stage. ``label`` is
    the one decision to act on, and the one the abstention certificate covers (see the docs' concepts page)."""

    model_config = ConfigDict(extra="allow")
    label: str = Field(
        description="the decision: the class with the highest calibrated probability, or, with an operating "
        "point, the operating point's decision (the positive class exactly where score >= 0.5). abstain=false "
        "certifies this label: its error rate on answered images is at most selective.target_risk (prob. >= 1-δ)"
    )
    probability: float = Field(description="the calibrated probability of label")
    prediction_set: list[str] = Field(
        description="conformal set: contains the true class for at least 1-α of images (on average)"
    )
    abstain: bool = Field(
        description="true: do not act on label (its confidence is below the certified threshold)"
    )
    score: float | None = Field(
        None,
        description="binary tasks: the positive class's calibrated probability, remapped so the operating point "
        "is 0.5; score >= 0.5 exactly when label is the positive class (with an operating point)",
    )
    positive_possible: bool | None = Field(
        None,
        description="with policy.max_miss_rate: the positive class cannot be ruled out (miss-rate control)",
    )
    stage: str | None = Field(None, description="the cascade stage that answered")
    id: str | None = Field(
        None,
        description="this answer's id (unique across the server's lifetime and replicas): send its label to "
        "POST /v1/feedback",
    )
    policy_version: str | None = Field(
        None,
        description="the certified policy this answer was decided under (sha256 prefix of its policy file)",
    )
    audit: bool | None = Field(
        None,
        description="with feedback_db: true for a uniform random share (audit_rate) of answers: ask a person to "
        "label these; the field estimates rest on them alone",
    )


class ClassifyResponse(BaseModel):
    """``/v1/classify``'s answer: the served model's name and one prediction per image."""

    model: str
    predictions: list[Prediction]


class FeedbackLabel(BaseModel):
    """One label for an answer the server gave: its ``id`` and the true class (a name, or an index)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=200, description="the answer's id, as /v1/classify returned it")
    label: Any = Field(  # checked by the route, whose 400 names the classes and the index range (missing too)
        None,
        description="the true class: one of the model's class names, or its index (an integer; not a bool or float)",
        json_schema_extra={"anyOf": [{"type": "string"}, {"type": "integer"}]},
    )


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: up to 1,000 labels."""

    model_config = ConfigDict(extra="forbid")
    labels: list[FeedbackLabel] = Field(min_length=1, max_length=1000)


class FeedbackResponse(BaseModel):
    """Labels stored now; ids this store never served (or no longer keeps); ids labelled before (the first
    label is kept: feedback is idempotent)."""

    accepted: int
    unknown: list[str]
    duplicates: list[str]
