"""The field loop: what a deployed bundle answered, the labels that come back, and what the policy delivers.

``serve/`` and ``pipeline/`` call into this package; it depends on ``trust/``, ``export/`` and ``evaluation/``,
never the other way (DESIGN.md, third round). Modules: the store (:mod:`~roadwork.field.store`: SQLite by default,
PostgreSQL for replicas), the server's loop (:mod:`~roadwork.field.loop`: ids, audit flags, durable writes),
audit-sample field estimates (:mod:`~roadwork.field.estimates`), online control (:mod:`~roadwork.field.online`),
recertify (:mod:`~roadwork.field.recertify`), the label audit (:mod:`~roadwork.field.audit`), what to label next
(:mod:`~roadwork.field.queue`) and the captured images (:mod:`~roadwork.field.capture`).
"""

from __future__ import annotations

from roadwork.field.estimates import FIELD_RATES, clopper_pearson, field_estimates
from roadwork.field.store import FeedbackResult, FieldStore, StoredPrediction, open_store

__all__ = [
    "FIELD_RATES",
    "FeedbackResult",
    "FieldStore",
    "StoredPrediction",
    "clopper_pearson",
    "field_estimates",
    "open_store",
]
