"""The field store: what the server answered for each prediction id, and the labels that come back for them.

SQLite (WAL, ``synchronous=FULL``: an acknowledged write survives a crash of the process) by default, from a
path; PostgreSQL from a ``postgresql://`` URL (``psycopg``), so that several replicas share one store. Both run the
same SQL. Two tables:

- ``predictions``: ``id`` (primary key), ``ts``, ``policy_version``, ``label`` (the decision served),
  ``probs`` (the calibrated probabilities, JSON), ``pred_set`` (JSON), ``abstain``, ``stage``, ``meta`` (the
  request's slice values, JSON), ``audit`` (1: a uniform random share, for unbiased field estimates),
  ``flagged`` (policies with ``risk_control``: the served ``positive_possible``; else NULL);
- ``labels``: ``id`` (primary key: a label per prediction, the first one kept), ``label`` (class index), ``ts``.

Retention is bounded: :meth:`FieldStore.prune` deletes rows older than ``retention_days`` and keeps at most
``max_rows`` predictions (the oldest go first).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roadwork.errors import InputError

__all__ = ["FeedbackResult", "FieldStore", "StoredPrediction", "open_store"]

_COLUMNS = "id, ts, policy_version, label, probs, pred_set, abstain, stage, meta, audit, flagged"
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS predictions (
        id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, policy_version TEXT NOT NULL, label TEXT NOT NULL,
        probs TEXT NOT NULL, pred_set TEXT NOT NULL, abstain INTEGER NOT NULL, stage TEXT NOT NULL,
        meta TEXT NOT NULL, audit INTEGER NOT NULL, flagged INTEGER)""",
    """CREATE TABLE IF NOT EXISTS labels (
        id TEXT PRIMARY KEY, label INTEGER NOT NULL, ts DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)",
    "CREATE TABLE IF NOT EXISTS online_state (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


@dataclass(frozen=True)
class StoredPrediction:
    """One served prediction, as the store keeps it."""

    id: str
    ts: float
    policy_version: str
    label: str
    probs: list[float]
    pred_set: list[str]
    abstain: bool
    stage: str
    meta: dict[str, str]
    audit: bool
    flagged: bool | None = None  # the served positive_possible (policies with risk_control)


@dataclass(frozen=True)
class FeedbackResult:
    """What ``POST /v1/feedback`` answers: labels stored now, ids never served, ids already labelled."""

    accepted_ids: tuple[str, ...]  # the ids whose label was stored now, in the order sent
    unknown: list[str]
    duplicates: list[str]

    @property
    def accepted(self) -> int:
        """How many labels were stored now."""
        return len(self.accepted_ids)


class FieldStore:
    """A connection to the field store (thread-safe: one connection, one lock; writes are short)."""

    def __init__(self, conn: Any, placeholder: str, where: str) -> None:
        self._conn = conn
        self._p = placeholder
        self._postgres = placeholder == "%s"
        self.where = where
        self._lock = threading.Lock()
        with self._lock:
            cur = self._conn.cursor()
            for stmt in _SCHEMA:
                cur.execute(stmt)
            self._conn.commit()

    def _sql(self, text: str) -> str:
        return text.replace("?", self._p)

    def add_predictions(self, rows: Sequence[StoredPrediction]) -> None:
        """Store served predictions (committed before this returns)."""
        if not rows:
            return
        sql = self._sql(f"INSERT INTO predictions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        values = [
            (
                r.id,
                r.ts,
                r.policy_version,
                r.label,
                json.dumps(r.probs),
                json.dumps(r.pred_set),
                int(r.abstain),
                r.stage,
                json.dumps(r.meta),
                int(r.audit),
                None if r.flagged is None else int(r.flagged),
            )
            for r in rows
        ]
        with self._lock:
            cur = self._conn.cursor()
            cur.executemany(sql, values)
            self._conn.commit()

    def add_labels(self, labels: Sequence[tuple[str, int]]) -> FeedbackResult:
        """Store labels (class indices) for served ids; idempotent per id (the first label is kept, a repeat is
        reported as a duplicate). Committed before this returns: an acknowledged label survives a crash."""
        ids = [i for i, _ in labels]
        now = time.time()
        with self._lock:
            cur = self._conn.cursor()
            known = self._existing(cur, "predictions", ids)
            labelled = self._existing(cur, "labels", ids)
            fresh, unknown, dup, seen = [], [], [], set()
            for i, y in labels:
                if i not in known:
                    unknown.append(i)
                elif i in labelled or i in seen:
                    dup.append(i)
                else:
                    seen.add(i)
                    fresh.append((i, int(y), now))
            if fresh:
                cur.executemany(self._sql("INSERT INTO labels (id, label, ts) VALUES (?, ?, ?)"), fresh)
            self._conn.commit()
        return FeedbackResult(tuple(i for i, _, _ in fresh), unknown, dup)

    def _existing(self, cur: Any, table: str, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for k in range(0, len(ids), 500):
            chunk = list(ids[k : k + 500])
            marks = ", ".join("?" * len(chunk))
            cur.execute(self._sql(f"SELECT id FROM {table} WHERE id IN ({marks})"), chunk)
            found.update(str(r[0]) for r in cur.fetchall())
        return found

    def labelled(
        self, *, audit_only: bool = False, since: float | None = None
    ) -> list[tuple[StoredPrediction, int]]:
        """Labelled predictions in the order their labels arrived: ``(prediction, label index)``."""
        sql = (
            f"SELECT {', '.join('p.' + c for c in _COLUMNS.split(', '))}, l.label "
            "FROM predictions p JOIN labels l ON l.id = p.id WHERE 1 = 1"
        )
        args: list[Any] = []
        if audit_only:
            sql += " AND p.audit = 1"
        if since is not None:
            sql += " AND l.ts >= ?"
            args.append(since)
        sql += " ORDER BY l.ts, l.id"
        with self._lock:
            cur = self._conn.cursor()
            cur.execute(self._sql(sql), args)
            rows = cur.fetchall()
        return [(_row(r), int(r[11])) for r in rows]

    def unlabelled(self, *, limit: int = 100_000) -> list[StoredPrediction]:
        """Stored answers with no label yet, the newest ``limit`` of them (newest first)."""
        sql = (
            f"SELECT {', '.join('p.' + c for c in _COLUMNS.split(', '))} FROM predictions p "
            "LEFT JOIN labels l ON l.id = p.id WHERE l.id IS NULL ORDER BY p.ts DESC, p.id LIMIT ?"
        )
        with self._lock:
            cur = self._conn.cursor()
            cur.execute(self._sql(sql), (int(limit),))
            rows = cur.fetchall()
            self._conn.commit()
        return [_row(r) for r in rows]

    def predictions(self, ids: Sequence[str]) -> dict[str, StoredPrediction]:
        """The stored answers of these ids (those the store holds)."""
        out: dict[str, StoredPrediction] = {}
        with self._lock:
            cur = self._conn.cursor()
            for k in range(0, len(ids), 500):
                chunk = list(ids[k : k + 500])
                marks = ", ".join("?" * len(chunk))
                cur.execute(
                    self._sql(f"SELECT {_COLUMNS} FROM predictions WHERE id IN ({marks})"),
                    chunk,
                )
                for r in cur.fetchall():
                    out[str(r[0])] = _row(r)
            self._conn.commit()
        return out

    def state(self, name: str) -> dict[str, Any] | None:
        """A shared state (JSON) by name, e.g. the online conformal offsets; ``None`` when never written."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute(self._sql("SELECT value FROM online_state WHERE name = ?"), (name,))
            row = cur.fetchone()
            self._conn.commit()
        return None if row is None else dict(json.loads(row[0]))

    def update_state(
        self, name: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]
    ) -> dict[str, Any]:
        """Read, change and write a shared state in one transaction that other replicas wait for (a row lock on
        PostgreSQL, an immediate transaction on SQLite): concurrent updates are applied one after the other."""
        with self._lock:
            cur = self._conn.cursor()
            try:
                if self._postgres:
                    cur.execute(
                        "INSERT INTO online_state (name, value) VALUES (%s, 'null') ON CONFLICT (name) DO NOTHING",
                        (name,),
                    )
                    cur.execute("SELECT value FROM online_state WHERE name = %s FOR UPDATE", (name,))
                else:
                    self._conn.commit()
                    cur.execute("BEGIN IMMEDIATE")
                    cur.execute("SELECT value FROM online_state WHERE name = ?", (name,))
                row = cur.fetchone()
                old = json.loads(row[0]) if row is not None else None
                new = change(old if isinstance(old, dict) else None)
                cur.execute(
                    self._sql(
                        "INSERT INTO online_state (name, value) VALUES (?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                    ),
                    (name, json.dumps(new)),
                )
                self._conn.commit()
            except BaseException:
                self._conn.rollback()
                raise
        return new

    def counts(self) -> dict[str, int]:
        """Rows held: predictions, of them audited, labels."""
        with self._lock:
            cur = self._conn.cursor()
            out = {}
            for key, sql in (
                ("predictions", "SELECT COUNT(*) FROM predictions"),
                ("audit", "SELECT COUNT(*) FROM predictions WHERE audit = 1"),
                ("labels", "SELECT COUNT(*) FROM labels"),
            ):
                cur.execute(sql)
                out[key] = int(cur.fetchone()[0])
        return out

    def prune(self, *, retention_days: float, max_rows: int, now: float | None = None) -> int:
        """Delete predictions (and their labels) older than ``retention_days``, then the oldest beyond
        ``max_rows``; returns how many predictions went."""
        cutoff = (time.time() if now is None else now) - retention_days * 86400
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("SELECT COUNT(*) FROM predictions")
            before = int(cur.fetchone()[0])
            cur.execute(self._sql("DELETE FROM predictions WHERE ts < ?"), (cutoff,))
            cur.execute("SELECT COUNT(*) FROM predictions")
            extra = int(cur.fetchone()[0]) - max_rows
            if extra > 0:
                cur.execute(
                    self._sql(
                        "DELETE FROM predictions WHERE id IN "
                        "(SELECT id FROM predictions ORDER BY ts, id LIMIT ?)"
                    ),
                    (extra,),
                )
            cur.execute("DELETE FROM labels WHERE id NOT IN (SELECT id FROM predictions)")
            cur.execute("SELECT COUNT(*) FROM predictions")
            after = int(cur.fetchone()[0])
            self._conn.commit()
        return before - after

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_store(where: str | Path) -> FieldStore:
    """The store at ``where``: a ``postgresql://`` URL (needs ``psycopg``), else a SQLite file path (created)."""
    text = str(where)
    if text.startswith(("postgresql://", "postgres://")):
        from roadwork._deps import require

        psycopg = require("psycopg")
        try:
            conn = psycopg.connect(text)
        except psycopg.Error as e:
            raise InputError(f"feedback_db={_redact(text)!r}: cannot connect to PostgreSQL ({e}).") from None
        return FieldStore(conn, "%s", _redact(text))
    path = Path(text)
    if path.parent and not path.parent.is_dir():
        raise InputError(
            f"feedback_db={text!r}: the folder {str(path.parent)!r} does not exist; create it first."
        )
    try:
        conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer; one file per store
        conn.execute("PRAGMA synchronous=FULL")  # a committed label survives a crash, power loss included
    except sqlite3.Error as e:
        raise InputError(f"feedback_db={text!r}: cannot open a SQLite store there ({e}).") from None
    return FieldStore(conn, "?", text)


def _redact(url: str) -> str:
    """A database URL without its password."""
    head, sep, tail = url.partition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, cred = head.partition("://")
    if ":" not in cred:  # no password to hide
        return url
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user}:***@{tail}"


def _row(r: Sequence[Any]) -> StoredPrediction:
    return StoredPrediction(
        str(r[0]),
        float(r[1]),
        str(r[2]),
        str(r[3]),
        json.loads(r[4]),
        json.loads(r[5]),
        bool(r[6]),
        str(r[7]),
        json.loads(r[8]),
        bool(r[9]),
        None if r[10] is None else bool(r[10]),
    )
