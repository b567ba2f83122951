"""Pydantic models of the HTTP bodies: they document the API (``/docs``, ``/openapi.json``) for people and for
generated clients and fuzzers. Requests are still parsed by hand in :mod:`roadwork.serve.app` (the binary-tensor
extension puts raw bytes after the JSON), with the same rules these models state."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ClassifyRequest",
    "ClassifyResponse",
    "ErrorBody",
    "InferRequest",
    "InferResponse",
    "Live",
    "ModelMetadata",
    "ModelReady",
    "Ready",
    "RepositoryEntry",
    "ServerMetadata",
]

OutputName = Literal["logits", "probabilities", "label", "prediction_set", "abstain"]


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong and how to fix it")


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any]


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: str


class InputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")
    binary_data_size: int | None = Field(
        None, ge=0, description="bytes of this tensor after the JSON header (binary-tensor extension)"
    )


class InferInput(BaseModel):
    name: Literal["input"]
    shape: list[int] = Field(min_length=4, max_length=4, description="[N, 3, S, S], S the model's input size")
    datatype: Literal["FP32", "FP16", "FP64"] = Field(description="cast to FP32; values must be finite there")
    data: list[Any] | None = Field(None, description="the N*3*S*S values, flat or nested (row-major)")
    parameters: InputParameters | None = None


class OutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")
    binary_data: bool = False


class InferOutputRequest(BaseModel):
    name: OutputName
    parameters: OutputParameters | None = None


class RequestParameters(BaseModel):
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
    name: OutputName
    datatype: Literal["FP32", "BYTES", "BOOL"]
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


class ClassifyRequest(BaseModel):
    """One image (``image``) or several (``images``), base64 (a data URL is fine), with optional slice
    metadata: one object for all images or a list, one per image."""

    image: str | None = Field(None, description="base64 JPEG/PNG/WebP/BMP bytes")
    images: list[str] | None = Field(None, min_length=1, description="base64 images, at most max_images")
    metadata: dict[str, Any] | list[dict[str, Any]] | None = None


class Prediction(BaseModel):
    model_config = ConfigDict(extra="allow")
    label: str
    probability: float
    prediction_set: list[str]
    abstain: bool
    stage: str | None = None


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[Prediction]
