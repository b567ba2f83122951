"""Server settings: ``roadwork serve BUNDLE key=value ...``; the API key only from ``ROADWORK_API_KEY``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["ServeSettings"]


class ServeSettings(BaseModel):
    """Every server setting, validated: ``roadwork serve BUNDLE key=value ...``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = Field("127.0.0.1", description="interface to bind; 0.0.0.0 in a container")
    port: int = Field(8000, ge=0, le=65535)
    name: str | None = Field(
        None,
        description="model name in the v2 API; default: the bundle manifest's name, else the bundle folder's "
        "name (the parent's when the folder is called 'bundle')",
    )
    device: Literal["cpu", "cuda", "tensorrt", "auto"] = Field(
        "cpu",
        description="ONNX Runtime execution provider: cpu, cuda (onnxruntime-gpu), tensorrt, or auto (the "
        "best one installed)",
    )
    variant: str = Field(
        "fp32",
        description="which model of the bundle: fp32 (ONNX Runtime), a variant it was exported with (int8, "
        "openvino-fp32, openvino-bf16, openvino-int8), or auto: the one roadwork bench BUNDLE select=true recorded",
    )
    trt_fp16: bool = Field(False, description="device=tensorrt: build fp16 engines")
    trt_cache_dir: str | None = Field(
        None, description="device=tensorrt: cache built engines here (the next start skips the build)"
    )
    max_batch_size: int = Field(32, ge=1, description="images per ONNX Runtime call")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill")
    adaptive_window: bool = Field(
        False,
        description="close the batching window early, as soon as no admitted request is still being read or "
        "decoded: at low load a request no longer waits max_queue_delay_ms for company that is not coming "
        "(demo bundle, one client: p50 about 2.5 ms instead of 8); under load batches form as before",
    )
    max_queue: int = Field(
        256,
        ge=1,
        description="prediction requests admitted at once (decoding, queued or running), a hard bound "
        "beside max_latency_ms; beyond it 503 + Retry-After",
    )
    max_latency_ms: float = Field(
        500.0,
        ge=0,
        description="latency budget: a request is admitted while the requests inside can be answered within it "
        "at the measured throughput (Little's law) and the images ahead of it within it at the measured batch "
        "times, else 503 + Retry-After at once. 500 ms by default: under capacity nothing is shed, in overload "
        "the server stays busy (goodput at capacity) and admitted requests wait at most about this long. 0 = "
        "relative: latency_factor times the fastest recent answer (sheds earlier, keeps latency near the "
        "unloaded one)",
    )
    latency_factor: float = Field(
        3.0,
        gt=1,
        description="max_latency_ms=0 only: the whole-request latency budget is this many times the fastest "
        "recent answer; larger keeps more requests inside (goodput) at a higher latency",
    )
    max_queue_wait_ms: float = Field(
        0.0,
        ge=0,
        description="a request still waiting for a batch after this long gets 503 instead of a late answer "
        "(Triton's queue timeout); 0 = no limit",
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a request body not received within this many seconds gets 408, connection closed",
    )
    max_inflight_pixels: int = Field(
        120_000_000,
        ge=1,
        description="decoded pixels held by all requests inside the server at once (about 3 bytes each: "
        "120 M ~ 360 MB); beyond it 503 + Retry-After; a request alone is always admitted",
    )
    max_body_mb: float = Field(64.0, gt=0, description="request body limit (413 above it), as Triton")
    max_inflight_body_mb: float = Field(
        96.0,
        gt=0,
        description="request bodies held by all requests at once (one body at max_body_mb and change: each "
        "costs about twice its size while it is parsed); a body that would go over it is refused (503 + "
        "Retry-After) before it is read",
    )
    max_header_kb: int = Field(
        64, ge=1, description="request line and headers per request (431 above it, connection closed)"
    )
    max_headers: int = Field(100, ge=1, description="headers per request (431 above it)")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection must send a complete request head within this many seconds of opening or "
        "of its last answer (408, closed): silent and trickling connections hold no file descriptor",
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="open connections; beyond it the oldest one without a complete request head is closed; "
        "0 = the open-file limit (raised to the hard limit at start) less 64",
    )
    max_pixels: int = Field(40_000_000, ge=1, description="decoded pixels per image (400 above: bombs)")
    max_images: int = Field(64, ge=1, description="images per /v1/classify request")
    ort_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = all cores")
    decode_workers: int = Field(
        0,
        ge=0,
        description="threads that decode and preprocess images; 0 = one per core (more threads than cores "
        "only contend with the model and the event loop)",
    )
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' (health is open)")
    drain_delay_s: float = Field(
        5.0,
        ge=0,
        description="SIGTERM: readiness answers 503 at once and the listener stays open this long (so load "
        "balancers stop sending) before it closes",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="SIGTERM: then seconds to finish in-flight requests"
    )
    require_signature: str | None = Field(
        None,
        description="an Ed25519 public key (PEM file): refuse a bundle without a valid signature by it "
        "(roadwork sign)",
    )
    repository: str | None = Field(
        None,
        description="the folder of bundle versions that POST /v2/repository/models/{name}/load picks from (each a "
        "sub-folder; roadwork recertify writes its versions next to the old one); default: the served bundle's "
        "parent folder",
    )
    log_dir: str | None = Field(
        None,
        description="write every /v1/classify prediction to rotating Parquet files here (roadwork monitor)",
    )
    log_rows_per_file: int = Field(10_000, ge=1, description="predictions per Parquet file of log_dir")
    feedback_db: str | None = Field(
        None,
        description="the field store: a SQLite file path, or postgresql://user@host/db for several replicas. "
        "Every /v1/classify answer is stored under its id (committed before it is sent), and POST /v1/feedback "
        "takes labels for those ids",
    )
    audit_rate: float = Field(
        0.02,
        ge=0,
        le=1,
        description="with feedback_db: this uniform random share of answers carries audit=true (ask a person to "
        "label those); field coverage, accuracy, selective risk and miss rate are estimated from them alone",
    )
    conformal_online: Literal["off", "aci"] = Field(
        "off",
        description="with feedback_db: aci moves the served thresholds with every label that comes back "
        "(conformal quantile tracking and online risk control, per group): the sets' (long-run miscoverage on the "
        "labelled stream within (B + online_eta) / (online_eta * T) of alpha, whatever the drift), the "
        "abstention's (long-run error on answered at most the target plus a bound of the same form) and the "
        "miss-rate control's; shared by replicas through the store",
    )
    online_eta: float = Field(0.05, gt=0, le=1, description="conformal_online=aci: the step, in score units")
    log_images: str | None = Field(
        None,
        description="with feedback_db: a folder where the images of audit-flagged and abstained answers are kept "
        "under their id (what roadwork label-next sends to labellers), bounded by log_images_max_mb",
    )
    log_images_max_mb: float = Field(
        1024.0, gt=0, description="log_images: the folder's size cap; the oldest images go first"
    )
    feedback_retention_days: float = Field(
        30.0,
        gt=0,
        description="with feedback_db: stored answers (and their labels) older than this are deleted",
    )
    feedback_max_rows: int = Field(
        10_000_000,
        ge=1,
        description="with feedback_db: at most this many stored answers (the oldest go first)",
    )

    @field_validator("api_key")
    @classmethod
    def _a_key_or_none(cls, v: str | None) -> str | None:
        """An empty key would silently switch authentication off: refused (leave it unset for no auth)."""
        if v is not None and not v.strip():
            raise ValueError(
                "is empty, which would switch authentication off; set a key (e.g. openssl rand -hex 32), or "
                "leave ROADWORK_API_KEY/api_key unset to serve without one"
            )
        return v

    @model_validator(mode="after")
    def _online_needs_a_store(self) -> ServeSettings:
        """Online conformal learns from labels, and captured images go with stored answers: both need a store."""
        if self.log_images and not self.feedback_db:
            raise ValueError(
                "log_images keeps the images of stored answers for labellers: set feedback_db=PATH (or a "
                "postgresql:// URL) too"
            )
        if self.conformal_online != "off" and not self.feedback_db:
            raise ValueError(
                f"conformal_online={self.conformal_online} learns from the labels sent to POST /v1/feedback: set "
                "feedback_db=PATH (or a postgresql:// URL) too"
            )
        return self

    @model_validator(mode="after")
    def _window_within_budget(self) -> ServeSettings:
        """A batching window longer than the latency budget would shed every request that waits for it."""
        if self.max_latency_ms and self.max_queue_delay_ms >= self.max_latency_ms:
            raise ValueError(
                f"max_queue_delay_ms={self.max_queue_delay_ms:g} is not below max_latency_ms={self.max_latency_ms:g}: "
                "every request waiting for a batch would be over the latency budget and refused; raise "
                "max_latency_ms, or lower max_queue_delay_ms"
            )
        return self
