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


def test_ids_are_unique_and_the_audit_share_is_the_rate(tmp_path):
    loop = FieldLoop(
        str(tmp_path / "f.db"),
        version=policy_version(b"{}"),
        classes=["no_roadwork", "roadwork"],
        audit_rate=0.1,
        retention_days=30,
        max_rows=10**6,
        seed=0,
    )
    other = FieldLoop(  # another replica on the same store
        str(tmp_path / "f.db"),
        version="x",
        classes=["a", "b"],
        audit_rate=0.1,
        retention_days=30,
        max_rows=10**6,
    )
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
    loop = FieldLoop(
        str(tmp_path / "f.db"),
        version="v",
        classes=["no_roadwork", "roadwork"],
        audit_rate=1.0,
        retention_days=30,
        max_rows=10**6,
        positive_class="roadwork",
    )

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
