"""The server's side of the field loop: an id and a policy version on every prediction, a uniform audit sample,
the store written by one thread with group commits, and the field estimates refreshed as labels arrive.

Each request waits for the commit that holds its predictions (several requests share one commit), so an id a
client has received is in the store: feedback for it is never "unknown" after a crash.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from roadwork.field.estimates import field_estimates
from roadwork.field.online import OnlineControl, Outcome
from roadwork.field.store import FeedbackResult, FieldStore, StoredPrediction, open_store

__all__ = ["FieldLoop", "Stamper", "policy_version"]

_STOP = object()
_ONLINE = "online:"  # + the policy_version: each version's online state has its own row in the store


def policy_version(policy_bytes: bytes) -> str:
    """The version clients see: the first 12 hex digits of the sha256 of the served policy file's bytes."""
    return hashlib.sha256(policy_bytes).hexdigest()[:12]


class Stamper:
    """Every answer's ``id`` (unique per server lifetime and across replicas: a random replica prefix, a counter and
    random bits), the ``policy_version`` it was decided under, and with ``audit_rate > 0`` its ``audit`` flag (a
    uniform random share, drawn before any label exists)."""

    def __init__(self, version: str, audit_rate: float = 0.0, seed: int | None = None) -> None:
        self.version = version
        self.audit_rate = audit_rate
        self._rng = random.Random(seed)
        self._prefix = uuid.uuid4().hex[:8]
        self._count = 0
        self._lock = threading.Lock()

    def stamp(self, records: list[dict[str, Any]]) -> None:
        """Add ``id``, ``policy_version`` (and ``audit`` when auditing) to each answer, in place."""
        with self._lock:
            start, self._count = self._count, self._count + len(records)
            draws = [self._rng.random() < self.audit_rate for _ in records] if self.audit_rate else []
        bits = os.urandom(4 * len(records)).hex()  # one system call per answer, not per image
        for k, rec in enumerate(records):
            rec["id"] = f"{self._prefix}-{start + k + 1:x}-{bits[8 * k : 8 * k + 8]}"
            rec.setdefault(
                "policy_version", self.version
            )  # the model path's, when it stamped the version it used
            if draws:
                rec["audit"] = draws[k]


class FieldLoop:
    """One server's field loop over a store (``feedback_db``): ids, audit flags, durable writes, estimates."""

    def __init__(
        self,
        where: str,
        *,
        version: str,
        classes: Sequence[str],
        audit_rate: float,
        retention_days: float,
        max_rows: int,
        positive_class: str | None = None,
        slice_columns: Sequence[str] = (),
        seed: int | None = None,
        online: OnlineControl | None = None,
        online_groups: dict[str, str] | None = None,
    ) -> None:
        self.store: FieldStore = open_store(where)
        self.version = version
        self.classes = list(classes)
        self.audit_rate = audit_rate
        self.retention_days, self.max_rows = retention_days, max_rows
        self.positive_class = positive_class
        self.slice_columns = list(slice_columns)
        self.stamper = Stamper(version, audit_rate, seed)
        # online control: the shared state in the store (a replica's own copy is refreshed from it);
        # online_groups: the slice column whose value is each kind's group (sets, abstain, miss)
        self.online_groups = dict(online_groups or {})
        self.online = online
        self.refresh_online()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._writer = threading.Thread(target=self._write, name="roadwork-field", daemon=True)
        self._writer.start()
        self.store.prune(retention_days=retention_days, max_rows=max_rows)

    def stamp(self, records: list[dict[str, Any]]) -> None:
        """Give each answer its ``id``, ``policy_version`` and ``audit`` flag (in place)."""
        self.stamper.stamp(records)

    async def record(
        self, records: list[dict[str, Any]], probs: Sequence[Any], meta: list[dict[str, Any]]
    ) -> None:
        """Store what was served for these answers; returns once committed."""
        now = time.time()
        rows = [
            StoredPrediction(
                id=rec["id"],
                ts=now,
                policy_version=str(rec.get("policy_version", self.version)),
                label=rec["label"],
                probs=[round(float(v), 6) for v in p],
                pred_set=list(rec["prediction_set"]),
                abstain=bool(rec["abstain"]),
                stage=str(rec.get("stage", "model")),
                meta={str(k)[:64]: str(v)[:64] for k, v in list(m.items())[:16]},
                audit=bool(rec.get("audit", False)),
                flagged=rec.get("positive_possible"),
            )
            for rec, p, m in zip(records, probs, meta, strict=True)
        ]
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.put((rows, loop, done))
        await done

    _added = 0
    _pruned_at = 0.0

    def _maybe_prune(self, added: int, every_s: float = 60.0) -> None:
        """Retention while serving: prune after every tenth of ``max_rows`` written, and at least every minute."""
        self._added += added
        if self._added >= max(1, self.max_rows // 10) or time.monotonic() - self._pruned_at >= every_s:
            self.store.prune(retention_days=self.retention_days, max_rows=self.max_rows)
            self._added, self._pruned_at = 0, time.monotonic()

    def _write(self) -> None:
        """The writer thread: everything queued since the last commit goes in the next one (group commit)."""
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(nxt)
            error: BaseException | None = None
            try:
                written = [r for rows, _, _ in batch for r in rows]
                self._maybe_prune(len(written))  # before the write: answers about to be sent are never pruned
                self.store.add_predictions(written)
            except Exception as e:  # the requests waiting for this commit get it as their error
                error = e
            for _, loop, fut in batch:
                loop.call_soon_threadsafe(_settle, fut, error)

    def feedback(self, labels: Sequence[tuple[str, int]]) -> FeedbackResult:
        """Store labels (class indices) for served ids, then (online control) move the served thresholds by the
        labels just accepted, in arrival order (blocking: call it in a thread)."""
        result = self.store.add_labels(labels)
        if self.online is not None and result.accepted:
            stored = set(result.accepted_ids)
            fresh: dict[str, int] = {}
            for (
                i,
                y,
            ) in labels:  # one label per id: the first, as stored (a repeat in the request is a duplicate)
                if i in stored and i not in fresh:
                    fresh[i] = y
            served = self.store.predictions(list(fresh))
            outcomes = [
                self._outcome(served[i], y)
                for i, y in fresh.items()
                if i in served and served[i].policy_version == self.version
            ]
            if outcomes:
                self.online = OnlineControl.from_dict(
                    self.store.update_state(_ONLINE + self.version, self._apply(outcomes))
                )
        return result

    def _outcome(self, p: StoredPrediction, y: int) -> Outcome:
        """What the label ``y`` says about the answer ``p`` as it was served."""
        truth = self.classes[y]
        positive = self.positive_class is not None and truth == self.positive_class
        return Outcome(
            covered=truth in p.pred_set,
            answered=not p.abstain,
            wrong=p.label != truth,
            missed=(not p.flagged) if positive and p.flagged is not None else None,
            groups={kind: p.meta.get(col, "all") for kind, col in self.online_groups.items()},
        )

    def _apply(self, outcomes: list[Outcome]) -> Callable[[dict[str, Any] | None], dict[str, Any]]:
        base = self.online

        def change(old: dict[str, Any] | None) -> dict[str, Any]:
            assert base is not None
            state = (
                OnlineControl(base.alpha, base.eta, base.target_risk, base.miss_alpha, dict(base.scales))
                if old is None
                else OnlineControl.from_dict(old)
            )
            state.update(outcomes)
            return state.to_dict() | {"policy_version": self.version}

        return change

    def switch(self, version: str, online: OnlineControl | None, online_groups: dict[str, str]) -> None:
        """A new policy version is served (a load through the repository API): new answers carry it, and online
        control starts from its certificate (or from the state replicas already share for it)."""
        self.version = version  # the stamper's version is the server's to switch (ServerState.swap)
        self.online, self.online_groups = online, dict(online_groups)
        self.refresh_online()

    def refresh_online(self) -> OnlineControl | None:
        """This replica's online state, re-read from the store (other replicas' labels included). Offsets belong
        to one policy version: each version has its own state, so replicas serving two versions during a rollout
        do not reset each other's."""
        if self.online is not None:
            state = self.store.state(_ONLINE + self.version)
            if state is not None:
                self.online = OnlineControl.from_dict(state)
        return self.online

    def estimates(self) -> dict[str, Any]:
        """Field rates from the labelled audit sample of the answers decided under the served policy version (the
        targets they are compared with are its own; ``/v2`` answers of a cascade bundle have the model alone's
        version and are left out), blocking: call it in a thread."""
        rows = [(p, y) for p, y in self.store.labelled(audit_only=True) if p.policy_version == self.version]
        return field_estimates(
            rows, self.classes, positive_class=self.positive_class, slice_columns=self.slice_columns
        )

    def close(self) -> None:
        self._queue.put(_STOP)
        self._writer.join(timeout=30)
        self.store.close()


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
