"""The field store on SQLite and on a real PostgreSQL server: the same tests, the same answers."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from roadwork.errors import InputError
from roadwork.field import StoredPrediction, open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        return str(tmp_path / "field.db")
    url = request.getfixturevalue("postgres_url")
    import psycopg

    with psycopg.connect(url) as conn:  # a clean store for each test
        conn.execute("DROP TABLE IF EXISTS predictions")
        conn.execute("DROP TABLE IF EXISTS labels")
    return url


def _pred(i: int, ts: float = 1000.0, audit: bool = False, weather: str = "clear") -> StoredPrediction:
    return StoredPrediction(
        id=f"p{i}",
        ts=ts + i,
        policy_version="v1",
        label="roadwork" if i % 2 else "no_roadwork",
        probs=[0.3, 0.7] if i % 2 else [0.8, 0.2],
        pred_set=["roadwork"] if i % 2 else ["no_roadwork"],
        abstain=i % 3 == 0,
        stage="model",
        meta={"weather": weather},
        audit=audit,
    )


def test_feedback_is_idempotent_and_names_unknown_ids_and_duplicates(where):
    store = open_store(where)
    store.add_predictions([_pred(i) for i in range(5)])
    r = store.add_labels([("p0", 0), ("p1", 1), ("nope", 1), ("p1", 0)])
    assert (r.accepted, r.unknown, r.duplicates) == (2, ["nope"], ["p1"])
    again = store.add_labels([("p0", 1), ("p2", 0)])  # the first label of p0 is kept
    assert (again.accepted, again.unknown, again.duplicates) == (1, [], ["p0"])
    rows = store.labelled()
    assert [(p.id, y) for p, y in rows] == [("p0", 0), ("p1", 1), ("p2", 0)]
    assert rows[1][0] == _pred(1)  # what was served comes back as it was stored
    assert store.counts() == {"predictions": 5, "audit": 0, "labels": 3}
    store.close()


def test_two_connections_share_one_store_as_replicas_do(where):
    a, b = open_store(where), open_store(where)
    a.add_predictions([_pred(i) for i in range(4)])
    assert b.add_labels([("p3", 1)]).accepted == 1
    assert a.add_labels([("p3", 0), ("p2", 1)]).duplicates == ["p3"]
    assert [p.id for p, _ in a.labelled()] == [p.id for p, _ in b.labelled()] == ["p3", "p2"]
    a.close()
    b.close()


def test_retention_drops_old_rows_then_the_oldest_beyond_the_cap(where):
    store = open_store(where)
    now = 10 * 86400.0
    store.add_predictions([_pred(i, ts=now - 3 * 86400) for i in range(3)])  # three days old
    store.add_predictions([_pred(i, ts=now) for i in range(3, 10)])
    store.add_labels([("p0", 0), ("p5", 1)])
    assert store.prune(retention_days=2, max_rows=5, now=now + 20) == 5  # 3 too old, then the 2 oldest
    assert store.counts() == {"predictions": 5, "audit": 0, "labels": 1}  # p0 went with its prediction
    store.close()


def test_an_acknowledged_label_survives_kill_9(where, tmp_path):
    store = open_store(where)
    store.add_predictions([_pred(i) for i in range(3)])
    store.close()
    code = (
        "import os, signal, sys\n"
        "from roadwork.field import open_store\n"
        f"r = open_store({where!r}).add_labels([('p1', 1), ('p2', 0)])\n"
        "print(r.accepted, flush=True)\n"  # the acknowledgement
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == -9 and out.stdout.strip() == "2"
    again = open_store(where)
    assert [(p.id, y) for p, y in again.labelled()] == [("p1", 1), ("p2", 0)]
    again.close()


def test_a_bad_location_is_our_error(tmp_path):
    with pytest.raises(InputError, match="does not exist; create it first"):
        open_store(tmp_path / "missing" / "field.db")
    with pytest.raises(InputError, match=r"cannot connect to PostgreSQL.*"):
        pytest.importorskip("psycopg")
        open_store("postgresql://u:secret@/nodb?host=/nonexistent&connect_timeout=2")
    try:
        open_store("postgresql://u:secret@/nodb?host=/nonexistent&connect_timeout=2")
    except InputError as e:
        assert "secret" not in str(e)  # the password never reaches a log


def test_audit_rows_are_selected_by_the_flag_stored_when_served(where):
    store = open_store(where)
    store.add_predictions([_pred(i, audit=i < 2) for i in range(6)])
    store.add_labels([(f"p{i}", i % 2) for i in range(6)])
    assert [p.id for p, _ in store.labelled(audit_only=True)] == ["p0", "p1"]
    assert len(store.labelled(since=time.time() + 60)) == 0
    store.close()


def test_shared_state_updates_from_two_replicas_are_applied_one_after_the_other(where):
    import threading

    a, b = open_store(where), open_store(where)

    def bump(store, n):  # type: ignore[no-untyped-def]
        for _ in range(n):
            store.update_state("counter", lambda old: {"n": (old or {"n": 0})["n"] + 1})

    threads = [threading.Thread(target=bump, args=(s, 40)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.state("counter") == b.state("counter") == {"n": 80}
    assert a.state("nothing") is None
    a.close()
    b.close()
