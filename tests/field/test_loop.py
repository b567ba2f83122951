"""The server's field loop: ids, the audit share, group commits that are durable before an answer leaves."""

from __future__ import annotations

import asyncio

import numpy as np

from roadwork.field.loop import FieldLoop, policy_version


def _records(n: int) -> list[dict]:  # type: ignore[type-arg]
    return [
        {
            "label": "roadwork",
            "probability": 0.9,
            "prediction_set": ["roadwork"],
            "abstain": False,
            "stage": "model",
        }
        for _ in range(n)
    ]


def _loop(tmp_path, **kw) -> FieldLoop:  # type: ignore[no-untyped-def]
    """A field loop on the test's store; ``kw`` overrides the defaults (a replica: another version, classes)."""
    args = {
        "version": "v",
        "classes": ["no_roadwork", "roadwork"],
        "audit_rate": 1.0,
        "retention_days": 30,
        "max_rows": 10**6,
    } | kw
    return FieldLoop(str(tmp_path / "f.db"), **args)


def test_ids_are_unique_and_the_audit_share_is_the_rate(tmp_path):
    loop = _loop(tmp_path, version=policy_version(b"{}"), audit_rate=0.1, seed=0)
    other = _loop(tmp_path, version="x", classes=["a", "b"], audit_rate=0.1)  # another replica, same store
    recs, more = _records(4000), _records(100)
    loop.stamp(recs)
    other.stamp(more)
    ids = [r["id"] for r in recs + more]
    assert len(set(ids)) == len(ids)
    share = np.mean([r["audit"] for r in recs])
    assert abs(share - 0.1) <= 4 * np.sqrt(0.1 * 0.9 / len(recs))  # binomial: four standard errors
    assert {r["policy_version"] for r in recs} == {policy_version(b"{}")} and len(policy_version(b"{}")) == 12
    loop.close()
    other.close()


def test_concurrent_requests_share_commits_and_every_answered_id_is_stored(tmp_path):
    loop = _loop(tmp_path, positive_class="roadwork")

    async def one(k: int) -> list[str]:
        recs = _records(3)
        loop.stamp(recs)
        await loop.record(recs, [[0.1, 0.9]] * 3, [{"weather": "fog" if k % 2 else "clear"}] * 3)
        return [r["id"] for r in recs]

    async def many() -> list[list[str]]:
        return await asyncio.gather(*(one(k) for k in range(50)))

    ids = [i for group in asyncio.run(many()) for i in group]
    assert loop.store.counts()["predictions"] == 150  # committed before each request returned
    result = loop.feedback([(i, 1 if n % 4 else 0) for n, i in enumerate(ids)])
    assert result.accepted == 150
    est = loop.estimates()
    assert est["n"] == 150 and est["overall"]["accuracy"]["rate"] == np.mean([n % 4 != 0 for n in range(150)])
    loop.close()


def test_retention_applies_while_serving_and_each_policy_version_keeps_its_own_online_state(tmp_path):
    """Rows beyond max_rows go as answers are written (not only at start-up); two replicas serving two versions
    during a rollout each accumulate their own online state."""
    from roadwork.field.online import OnlineControl

    a, b = (
        _loop(tmp_path, version=v, max_rows=20, online=OnlineControl(alpha=0.1, eta=0.1))
        for v in ("v1", "v2")
    )

    async def serve(loop: FieldLoop, n: int) -> list[dict]:  # type: ignore[type-arg]
        recs = _records(n)
        for r in recs:
            r.pop("policy_version", None)
        loop.stamp(recs)
        for r in recs:
            await loop.record([r], [[0.2, 0.8]], [{}])
        return recs

    for _ in range(3):
        ra, rb = asyncio.run(serve(a, 5)), asyncio.run(serve(b, 5))
        a.feedback([(r["id"], 0) for r in ra])
        b.feedback([(r["id"], 0) for r in rb])
    assert a.online is not None and b.online is not None
    assert a.online.updates["sets"]["all"] == b.online.updates["sets"]["all"] == 15  # neither reset the other
    asyncio.run(serve(a, 100))
    assert a.store.counts()["predictions"] <= 20 + 2  # pruned as it went (a tenth of the cap per round)
    a.close()
    b.close()
