"""The field loop: what a deployed bundle answered, the labels that come back, and what the policy delivers.

``serve/`` calls into this package; it depends on ``trust/``, never the other way (DESIGN.md, third round).
Built so far: the store (:mod:`roadwork.field.store`: SQLite by default, PostgreSQL for replicas) and the
audit-sample field estimates (:mod:`roadwork.field.estimates`).
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
