"""What one running server holds (:class:`ServerState`): the model, its batcher and pools, admission, metrics,
and the prediction path every endpoint shares (:meth:`ServerState.predict`)."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from roadwork.export.runtime import physical_cores
from roadwork.field.capture import ImageCapture
from roadwork.field.loop import FieldLoop, Stamper
from roadwork.field.online import OnlineControl, online_groups, shifted
from roadwork.serve.admission import Admission, Shed
from roadwork.serve.batcher import DynamicBatcher, QueueFull, QueueTimeout
from roadwork.serve.decode import RequestError
from roadwork.serve.metrics import InferenceStats, ServerMetrics
from roadwork.serve.model import Row, RowError, ServedModel
from roadwork.serve.prediction_log import PredictionLog
from roadwork.serve.settings import ServeSettings

__all__ = ["OFF_LOOP_BYTES", "ServerState", "build_state", "server_state"]

OFF_LOOP_BYTES = 1 << 20
"""Request bodies over this many bytes are parsed in a parsing process, not on the event loop."""
T = TypeVar("T")


@dataclass
class ServerState:
    """The server's parts. ``ready`` turns true after the warm-up; ``draining`` from the first SIGTERM on."""

    settings: ServeSettings
    metrics: ServerMetrics
    model: ServedModel
    batcher: DynamicBatcher
    admission: Admission
    decode_pool: ThreadPoolExecutor
    model_pool: ThreadPoolExecutor
    stats: InferenceStats = field(default_factory=InferenceStats)
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one repository load at a time
    pred_log: PredictionLog | None = None
    stamper: Stamper | None = None  # every answer's id and policy_version (set by build_state)
    field: FieldLoop | None = None  # with feedback_db: the store, the audit sample, the field estimates
    capture: ImageCapture | None = None  # log_images: the images labellers will be sent
    ready: bool = False
    draining: bool = False
    unloaded: bool = False  # the repository API's unload: not serving until a version is loaded
    repository: Any = None  # the folder of bundle versions (serve/repository.py), fixed on first use

    parse_pool: ProcessPoolExecutor | None = None  # started on the first large body (see parse)

    async def parse(self, fn: Callable[[], T], size: int) -> T:
        """``fn()`` (a pure parse of a request body): here for small bodies, in a parsing process for bodies over
        :data:`OFF_LOOP_BYTES`: ``json.loads`` of 60 MB holds the GIL for seconds, and probes must not wait."""
        if size <= OFF_LOOP_BYTES:
            return fn()
        if self.parse_pool is None:
            import multiprocessing

            self.parse_pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(self.parse_pool, fn)
        except BrokenProcessPool:  # the parsing process died (killed for memory): a fresh one next time
            self.parse_pool = None
            raise RequestError(503, "the request could not be parsed now; retry.") from None

    _field_refreshed: float = 0.0
    certified: Any = None  # a copy of the certified policy; online offsets are applied to copies of its parts

    def apply_online(self) -> None:
        """Serve the field loop's current online offsets: copies of the certified sets, abstention and miss-rate
        control with the offsets added, swapped into the served policy."""
        online = self.field.online if self.field is not None else None
        if online is None:
            return
        policy = self.model.bundle.policy
        if self.certified is None:
            self.certified = copy.copy(policy)
        for name, part in shifted(self.certified, online).items():
            setattr(policy, name, part)
        self.metrics.set_online(online.offsets, online.updates)

    async def refresh_online(self) -> None:
        """Re-read the shared online state (other replicas' labels) and serve it."""
        if self.field is None or self.field.online is None:
            return
        await asyncio.get_running_loop().run_in_executor(None, self.field.refresh_online)
        self.apply_online()

    field_dirty: bool = False  # a label arrived since the field gauges were last computed

    async def refresh_field_metrics(self, every_s: float = 2.0) -> None:
        """The field estimates (audit sample only) into the Prometheus gauges, at most every ``every_s`` unless
        labels arrived since (``field_dirty``: one recomputation per batch of labels, whoever scrapes)."""
        if self.field is None:
            return
        if not self.field_dirty and time.monotonic() - self._field_refreshed < every_s:
            return
        self._field_refreshed = time.monotonic()
        self.field_dirty = False
        est = await asyncio.get_running_loop().run_in_executor(None, self.field.estimates)
        self.metrics.set_field(est, self.field.store.counts())

    @property
    def serving(self) -> bool:
        """Ready, not draining, not unloaded: what readiness reports."""
        return self.ready and not self.draining and not self.unloaded

    def swap(self, bundle: Any) -> None:
        """Serve ``bundle`` (a loaded, warmed, compatible version) from the next batch on: the model, the
        version stamped on answers, online control restarted from its certificate, the metrics' targets."""
        self.model.swap(bundle)
        self.certified = None
        if self.stamper is not None:
            self.stamper.version = bundle.policy_version
        if self.field is not None:
            online = _online(bundle.policy, self.settings)
            self.field.switch(bundle.policy_version, online, online_groups(bundle.policy))
            self.apply_online()
        _set_targets(self.metrics, bundle.policy, self.field)
        if bundle.reference:
            self.metrics.set_reference(bundle.reference)
        self.unloaded = False

    def check_name(self, name: str) -> None:
        """404 unless ``name`` is the served model's."""
        if name != self.model.name:
            raise RequestError(404, f"unknown model {name!r}; this server serves {self.model.name!r}.")

    async def predict(
        self, request: Request, x: Any, meta: dict[str, list[str]], *, admit: bool = False
    ) -> list[Row]:
        """One request's images through the batcher → its rows. ``admit``: a v2 request, now validated, asks
        the latency budget's admission (the gate checked only ``max_queue``). 503 when shed; the first failed
        image's 4xx when any failed."""
        if self.unloaded:
            raise RequestError(
                503, "the model is unloaded; POST /v2/repository/models/{name}/load to load a version."
            )
        if admit:
            await self._admit(request)
        self._leave_pending(request)
        self.metrics.queue_depth.set(self.batcher.waiting)
        t0 = time.perf_counter()
        try:
            rows = await self.batcher.submit(x, meta, admitted=True)
        except QueueFull:
            self.metrics.rejected.inc()
            raise RequestError(503, "the request queue is full; retry after a second.") from None
        except QueueTimeout:
            self.metrics.rejected.inc()
            wait = self.settings.max_queue_wait_ms
            raise RequestError(503, f"the request waited over max_queue_wait_ms={wait:g}; retry.") from None
        except RequestError:
            raise
        except Exception as e:  # the model failed on this request alone (the batcher retried it by itself)
            self.stats.fail(time.perf_counter() - t0)
            raise RequestError(
                500, f"the model failed on this request ({type(e).__name__}: {str(e)[:200]})."
            ) from None
        failed = [i for i, r in enumerate(rows) if isinstance(r, RowError)]
        if failed:
            self.stats.fail(time.perf_counter() - t0)
            first = rows[failed[0]]
            raise RequestError(first.status, f"image(s) {failed}: {first.message}")
        self.stats.success(len(rows), time.perf_counter() - t0)
        return rows

    async def _admit(self, request: Request) -> None:
        adm = self.admission
        refusal = adm.refusal(own=1)
        if refusal is None:
            return
        self.metrics.rejected.inc()
        self._leave_pending(request)
        adm.inside -= 1  # a refused request holds no slot while it waits out its Retry-After
        try:
            msg, retry_after = await adm.shed(request.scope.get("client"), refusal)
        finally:
            adm.inside += 1
        raise Shed(msg, retry_after)

    def _leave_pending(self, request: Request) -> None:
        state = request.scope.get("state", {})
        if state.get("roadwork_pending"):
            state["roadwork_pending"] = False
            self.admission.pending -= 1


def build_state(model: ServedModel, settings: ServeSettings, metrics: ServerMetrics) -> ServerState:
    """The batcher (whose batches feed the metrics and Triton statistics), its pools and admission."""
    decode_pool = ThreadPoolExecutor(
        settings.decode_workers or physical_cores(), thread_name_prefix="roadwork-decode"
    )
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
    if settings.adaptive_window:
        batcher.incoming = lambda: admission.pending
    pred_log = PredictionLog(settings.log_dir, settings.log_rows_per_file) if settings.log_dir else None
    bundle = model.bundle
    field_loop = None
    if settings.feedback_db:
        field_loop = FieldLoop(
            settings.feedback_db,
            version=bundle.policy_version,
            classes=bundle.classes,
            audit_rate=settings.audit_rate,
            retention_days=settings.feedback_retention_days,
            max_rows=settings.feedback_max_rows,
            positive_class=bundle.policy.positive_class,
            slice_columns=bundle.policy.slice_columns,
            online=_online(bundle.policy, settings),
            online_groups=online_groups(bundle.policy),
        )
    _set_targets(metrics, bundle.policy, field_loop)
    return ServerState(
        settings=settings,
        metrics=metrics,
        model=model,
        batcher=batcher,
        admission=admission,
        decode_pool=decode_pool,
        model_pool=model_pool,
        stats=stats,
        pred_log=pred_log,
        stamper=field_loop.stamper if field_loop is not None else Stamper(bundle.policy_version),
        field=field_loop,
        capture=ImageCapture(settings.log_images, int(settings.log_images_max_mb * 2**20))
        if settings.log_images
        else None,
    )


def _set_targets(metrics: ServerMetrics, policy: Any, field_loop: FieldLoop | None) -> None:
    """What the alert rules compare the field intervals with (with a field store)."""
    if field_loop is not None:
        metrics.field_target.labels("coverage").set(1 - float(policy.conformal.alpha))
        metrics.field_target.labels("selective_risk").set(float(policy.abstention.target_risk))


def _online(policy: Any, settings: ServeSettings) -> OnlineControl | None:
    if settings.conformal_online != "aci":
        return None
    return OnlineControl.for_policy(policy, settings.online_eta)


def server_state(request: Request) -> ServerState:
    """The :class:`ServerState` of the app serving ``request`` (a FastAPI dependency)."""
    state: ServerState = request.app.state.roadwork
    return state
