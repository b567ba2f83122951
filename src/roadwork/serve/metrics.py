"""Prometheus metrics of one server (own registry, so tests can build many apps in one process)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["InferenceStats", "ServerMetrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """The Prometheus metrics of one server, in their own registry (``/metrics``)."""

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
            "roadwork_rejected",
            "Requests refused with 503: the latency budget, the queue bound or the pixel budget",
            registry=r,
        )
        self.latency_budget = Gauge(
            "roadwork_latency_budget_seconds", "The in-server latency budget admission keeps to", registry=r
        )
        self.admission_limit = Gauge(
            "roadwork_admission_limit",
            "Prediction requests admitted at once now (latency budget x measured throughput, or max_queue)",
            registry=r,
        )
        self.body_timeouts = Counter(
            "roadwork_body_timeouts",
            "Requests whose body did not arrive within body_timeout_s (408, connection closed)",
            registry=r,
        )
        self._add_guards(r)
        self._add_field(r)
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

    def _add_field(self, r: CollectorRegistry) -> None:
        """The field loop (feedback_db): rates on the labelled audit sample, with exact 95 % intervals."""
        self.field_rate = Gauge(
            "roadwork_field_rate",
            "Field rate on the labelled audit sample (coverage, accuracy, selective_risk, miss_rate): the point "
            "estimate and the exact 95 % interval's bounds, overall and per slice value",
            ["rate", "slice", "bound"],
            registry=r,
        )
        self.field_target = Gauge(
            "roadwork_field_target",
            "What the certified policy promises for each field rate (coverage: 1 - alpha; selective_risk: the "
            "certified target): alert when the field interval excludes it",
            ["rate"],
            registry=r,
        )
        self.field_rows = Gauge(
            "roadwork_field_rows", "Rows in the field store: predictions, audit, labels", ["kind"], registry=r
        )
        self.online_offset = Gauge(
            "roadwork_online_offset",
            "conformal_online=aci: what online control adds to each certified threshold (sets, abstain, miss), "
            "per group; replicas on one store show the same values",
            ["kind", "group"],
            registry=r,
        )
        self.online_labels = Gauge(
            "roadwork_online_labels",
            "conformal_online=aci: labels each online threshold has learned from (under this policy_version)",
            ["kind", "group"],
            registry=r,
        )

    def set_online(self, offsets: dict[str, dict[str, float]], updates: dict[str, dict[str, int]]) -> None:
        """Publish the online offsets and how many labels moved each (a new policy version starts afresh)."""
        self.online_offset.clear()
        self.online_labels.clear()
        for kind, row in offsets.items():
            for group, v in row.items():
                self.online_offset.labels(kind, group).set(v)
                self.online_labels.labels(kind, group).set(updates.get(kind, {}).get(group, 0))

    def set_field(self, estimates: dict[str, Any], counts: dict[str, int]) -> None:
        """Publish :func:`roadwork.field.estimates.field_estimates` and the store's row counts."""
        for kind, n in counts.items():
            self.field_rows.labels(kind).set(n)
        for slice_name, rates in [("all", estimates["overall"]), *estimates["slices"].items()]:
            for rate, r in rates.items():
                for bound, key in (("point", "rate"), ("low", "low"), ("high", "high")):
                    if r[key] is not None:
                        self.field_rate.labels(rate, slice_name, bound).set(r[key])

    def _add_guards(self, r: CollectorRegistry) -> None:
        """What the server refuses before a request exists (serve/protocol.py) or before its body is read."""
        self.connections_evicted = Counter(
            "roadwork_connections_closed_idle",
            "Connections closed before a complete request head: header_timeout_s, or the oldest idle one "
            "when the server holds max_connections",
            registry=r,
        )
        self.bodies_refused = Counter(
            "roadwork_bodies_refused",
            "Request bodies refused before being read: over max_inflight_body_mb in flight, or sent to a path "
            "that takes none",
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


class InferenceStats:
    """Triton's per-model statistics (``/v2/models/{name}/stats``): counts and cumulative nanoseconds."""

    def __init__(self) -> None:
        self.success_count = self.success_ns = self.fail_count = self.fail_ns = 0
        self.queue_ns = 0
        self.inference_count = self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, int] = {}

    def success(self, images: int, seconds: float) -> None:
        self.success_count += 1
        self.success_ns += int(seconds * 1e9)
        self.inference_count += images
        self.last_inference_ms = int(time.time() * 1000)

    def fail(self, seconds: float) -> None:
        self.fail_count += 1
        self.fail_ns += int(seconds * 1e9)

    def batch(self, n: int) -> None:
        self.execution_count += 1
        self.batches[n] = self.batches.get(n, 0) + 1

    def triton(self, name: str) -> dict[str, Any]:
        def d(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}

        return {
            "name": name,
            "version": "1",
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": d(self.success_count, self.success_ns),
                "fail": d(self.fail_count, self.fail_ns),
                "queue": d(self.success_count, self.queue_ns),
                "compute_input": d(0, 0),
                "compute_infer": d(0, 0),
                "compute_output": d(0, 0),
                "cache_hit": d(0, 0),
                "cache_miss": d(0, 0),
            },
            "batch_stats": [
                {
                    "batch_size": n,
                    "compute_input": d(c, 0),
                    "compute_infer": d(c, 0),
                    "compute_output": d(c, 0),
                }
                for n, c in sorted(self.batches.items())
            ],
        }
