"""Prometheus metrics of one server (own registry, so tests can build many apps in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ServerMetrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "roadwork_http_requests",
            "HTTP requests by handler and status code",
            ["handler", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "roadwork_http_request_duration_seconds",
            "Request latency",
            ["handler"],
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_wait = Histogram(
            "roadwork_queue_wait_seconds", "Time a request waited for its batch", buckets=_LATENCY, registry=r
        )
        self.batch_size = Histogram(
            "roadwork_batch_size", "Images per model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.predictions = Counter("roadwork_predictions", "Predictions by label", ["label"], registry=r)
        self.abstentions = Counter("roadwork_abstentions", "Predictions the policy abstained on", registry=r)
        self.stages = Counter(
            "roadwork_cascade_stage", "Predictions by the cascade stage that answered", ["stage"], registry=r
        )
        self.confidence = Histogram(
            "roadwork_confidence",
            "Calibrated top-class probability of every prediction (watch it for drift)",
            buckets=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0),
            registry=r,
        )
        self.set_size = Histogram(
            "roadwork_prediction_set_size", "Conformal set size", buckets=(0, 1, 2, 3, 5, 10), registry=r
        )
        self.queue_depth = Gauge("roadwork_queue_images", "Images waiting for a batch", registry=r)
        self.inflight = Gauge(
            "roadwork_inflight_requests",
            "Prediction requests inside the server (admission counts these)",
            registry=r,
        )
        self.rejected = Counter(
            "roadwork_rejected", "Requests refused with 503 because the queue was full", registry=r
        )
        # the calibration split through the policy (the bundle's reference.json): what drift alerts compare with
        self.ref_abstain = Gauge(
            "roadwork_reference_abstain_rate", "Abstention rate on the calibration split", registry=r
        )
        self.ref_confidence = Gauge(
            "roadwork_reference_confidence_mean",
            "Mean calibrated confidence on the calibration split",
            registry=r,
        )
        self.ref_label_share = Gauge(
            "roadwork_reference_label_share",
            "Share of each predicted label on the calibration split",
            ["label"],
            registry=r,
        )

    def set_reference(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        n = len(rows)
        self.ref_abstain.set(sum(bool(r["abstain"]) for r in rows) / n)
        self.ref_confidence.set(sum(float(r["probability"]) for r in rows) / n)
        labels: dict[str, int] = {}
        for r in rows:
            labels[r["label"]] = labels.get(r["label"], 0) + 1
        for label, count in labels.items():
            self.ref_label_share.labels(label).set(count / n)
