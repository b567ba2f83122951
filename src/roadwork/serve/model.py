"""The bundle as the server runs it: decode and preprocess a request's images, run one batch, and turn it into
one :class:`Row` per image (the public record plus the arrays the v2 outputs need) or a :class:`RowError`."""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from roadwork.data.preprocess import decoded_size, preprocess
from roadwork.export.bundle import Bundle, StageInputs, bundle_name
from roadwork.export.onnx import onnx_logits
from roadwork.serve.decode import RequestError, decode_image
from roadwork.serve.metrics import ServerMetrics
from roadwork.serve.settings import ServeSettings

__all__ = ["Row", "RowError", "ServedModel", "model_config_of", "served_name"]


def served_name(bundle: Bundle) -> str:
    """The model's name in the v2 API: the manifest's ``name``, else the bundle folder's name, or the run's
    name for a bundle in its run folder (``runs/demo/export/bundle`` → ``demo``)."""
    return bundle_name(bundle.manifest, bundle.path)


@dataclass(frozen=True)
class Row:
    """One image's answer: ``record`` is what ``/v1/classify`` returns (label, probability, prediction_set,
    abstain, score, stage); ``logits``, ``probs`` and ``pset`` feed the v2 outputs."""

    record: dict[str, Any]
    logits: np.ndarray
    probs: np.ndarray
    pset: np.ndarray


@dataclass(frozen=True)
class RowError:
    """One image's failure inside a batch that otherwise succeeded (its request gets the 4xx)."""

    status: int
    message: str


_NOT_FINITE = RowError(
    400,
    "the model's outputs for this input are not finite (inf/NaN): its values are far outside the preprocessed "
    "range (normalised pixels, about -3..3); send preprocessed images.",
)


class ServedModel:
    """The bundle plus what the server needs around it: the pixel budget, decoding, one batch → rows."""

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
        pixels = sum(self._decoded_pixels(b) for b in blobs)
        with self._pixel_lock:
            if self._pixels and self._pixels + pixels > self.settings.max_inflight_pixels:
                raise RequestError(
                    503,
                    f"the server is decoding {self._pixels} pixels already (max_inflight_pixels="
                    f"{self.settings.max_inflight_pixels}); retry after a second, or send smaller images.",
                )
            self._pixels += pixels
        return pixels

    def _decoded_pixels(self, blob: bytes) -> int:
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode_image refuses those
            try:
                im = Image.open(io.BytesIO(blob))
                w, h = im.size
            except Exception:  # not an image: decode_image says why
                return 0
        if w * h > self.settings.max_pixels:  # decode_image refuses it without decoding
            return 0
        dw, dh = decoded_size((w, h), im.format, self.decode_side)
        return dw * dh

    def reserve_and_preprocess(self, blobs: list[bytes]) -> tuple[int, Any]:
        """:meth:`reserve_pixels` then :meth:`preprocess` (one trip to the decode pool); the pixels are given
        back if decoding fails. Release them with :meth:`release_pixels` once answered."""
        pixels = self.reserve_pixels(blobs)
        try:
            return pixels, self.preprocess(blobs)
        except BaseException:
            self.release_pixels(pixels)
            raise

    def release_pixels(self, pixels: int) -> None:
        """Give back what :meth:`reserve_pixels` counted."""
        with self._pixel_lock:
            self._pixels -= pixels

    def preprocess(self, blobs: list[bytes]) -> Any:
        """Decode and preprocess: for the model, or for a cascade every stage's input
        (:class:`~roadwork.export.bundle.StageInputs`), here in the decode threads rather than in the model
        thread, which then only runs the stages."""
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
            return self.bundle.stage_inputs(images)
        return preprocess(images, self.bundle.card.preprocess)

    def swap(self, bundle: Bundle) -> None:
        """Serve ``bundle`` from the next batch on (a version with the same classes and preprocessing: see
        :mod:`roadwork.serve.repository`). A batch already running finishes under the version it started with."""
        self.slice_columns = bundle.policy.slice_columns
        self.bundle = bundle

    def warm(self, n: int) -> None:
        """One model call of ``n`` zero images, counted nowhere (warm-up and the batch-time measurement)."""
        onnx_logits(self.bundle.session, np.zeros((n, 3, self.size, self.size), np.float32), batch_size=n)

    def run_batch(self, x: Any, meta: dict[str, list[str]]) -> list[Row | RowError]:
        """One batch (a preprocessed tensor, or a cascade's stage inputs) → one row per image; an image whose
        tensor drives the network to inf/NaN gets a :class:`RowError`, its batch-mates their rows."""
        bundle = self.bundle  # one version for the whole batch, whatever a load swaps in meanwhile
        slices = {k: v for k, v in meta.items() if k in bundle.policy.slice_columns}
        n = len(x)
        if isinstance(x, StageInputs):  # through the cascade
            out: Any = bundle.predict_inputs(x, slices or None)
            logits = np.log(np.clip(out.probs, 1e-300, None))  # the answering stage's calibrated log-probs
            good = np.arange(n)
        else:  # a preprocessed tensor goes to the model (the cascade's last stage) directly
            logits = onnx_logits(bundle.session, x, batch_size=self.settings.max_batch_size)
            good = np.flatnonzero(np.isfinite(logits).all(axis=1))
            if len(good) < n:  # finite inputs far outside the preprocessed range overflow the network
                logits = logits[good]
                slices = {k: [v[i] for i in good] for k, v in slices.items()}
            # the model alone: its own certified policy (a cascade's thresholds are the composite's)
            out = bundle.tensor_policy.apply(logits, slices or None) if len(good) else None
        rows: list[Row | RowError] = [_NOT_FINITE] * n
        if out is None:
            return rows
        last = bundle.policy.cascade.names[-1] if bundle.policy.cascade is not None else "model"
        version = bundle.policy_version if isinstance(x, StageInputs) else bundle.tensor_policy_version
        for j, rec in enumerate(out.records(bundle.classes)):
            rec.setdefault("stage", last)
            # what it was decided under (a load may follow): the bundle's policy, or the model alone's for tensors
            rec["policy_version"] = version
            self._count(rec)
            rows[int(good[j])] = Row(rec, logits[j], out.probs[j], out.sets[j])
        return rows

    def _count(self, rec: dict[str, Any]) -> None:
        m = self.metrics
        m.predictions.labels(rec["label"]).inc()
        m.stages.labels(rec["stage"]).inc()
        m.confidence.observe(rec["probability"])
        m.set_size.observe(len(rec["prediction_set"]))
        if rec["abstain"]:
            m.abstentions.inc()


def model_config_of(model: ServedModel, settings: ServeSettings) -> dict[str, Any]:
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
