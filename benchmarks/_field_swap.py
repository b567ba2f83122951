"""Recertify and hot-swap for ``benchmarks/field_drift.py``: a recertified version written from shifted images and
loaded into a running server through Triton's repository API under 16 closed-loop clients; then a tampered
version, refused with ``require_signature``. Loopback only; every loop bounded in time."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from serve_chaos import Conn, Server, _table

KEY = {"Authorization": "Bearer field-bench"}


def _versions(bundle: Path, images: list[Path], labels: list[str], work: Path) -> tuple[Path, Path, Path]:
    """The repository: ``v1`` (the bundle, signed), ``v2`` (recertified on the shifted images, signed), and
    ``v3-tampered`` (v2 with its policy changed after signing, the manifest re-hashed). Returns (repo, pub, v2)."""
    from _chaos_ring2 import tampered_copy

    from roadwork.export.signing import generate_keypair, sign_bundle
    from roadwork.field.recertify import recertify

    repo = work / "repo"
    pub = generate_keypair(work / "key")
    shutil.copytree(bundle, repo / "v1")
    sign_bundle(repo / "v1", work / "key")
    recertify(repo / "v1", [str(p) for p in images], labels, out=repo / "v2", key=work / "key")
    tampered_copy(repo / "v2", repo / "v3-tampered")
    return repo, pub, repo / "v2"


async def _swap_run(port: int, bodies: list[bytes], seconds: float, clients: int) -> dict[str, Any]:
    answers: list[tuple[float, int, str]] = []  # (sent at, status, policy_version)
    loads: list[tuple[str, float, float, int, str]] = []
    t0 = time.monotonic()

    async def client(k: int) -> None:
        conn, i = Conn(port), k
        while time.monotonic() - t0 < seconds:
            sent = time.monotonic() - t0
            try:
                status, _h, data = await asyncio.wait_for(
                    conn.request(
                        "POST", "/v1/classify", bodies[i % len(bodies)], KEY | {"Content-Type": "image/jpeg"}
                    ),
                    30,
                )
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                status, data = -1, b""
                conn.close()
            version = json.loads(data)["predictions"][0]["policy_version"] if status == 200 else ""
            answers.append((sent, status, version))
            i += clients
        conn.close()

    async def load(at: float, version: str) -> None:
        await asyncio.sleep(at)
        conn = Conn(port)
        start = time.monotonic() - t0
        body = json.dumps({"parameters": {"version": version}}).encode()
        status, _h, data = await conn.request(
            "POST", "/v2/repository/models/field/load", body, KEY | {"Content-Type": "application/json"}
        )
        loads.append((version, start, time.monotonic() - t0, status, data.decode()[:100]))
        conn.close()

    await asyncio.gather(
        *(client(k) for k in range(clients)), load(seconds * 0.25, "v2"), load(seconds * 0.6, "v3-tampered")
    )
    return {"answers": answers, "loads": loads}


def hot_swap(bundle: Path, images: list[Path], labels: list[str], seconds: float = 20.0) -> None:
    """Table: answers before, during and after the load of v2, and after the tampered load; statuses and the
    policy_version each carried."""
    work = Path(tempfile.mkdtemp(prefix="roadwork-field-swap-"))
    try:
        repo, pub, _v2 = _versions(bundle, images, labels, work)
        from roadwork.export.bundle import Bundle

        old, new = Bundle.load(repo / "v1").policy_version, Bundle.load(repo / "v2").policy_version
        os.environ["ROADWORK_API_KEY"] = "field-bench"  # the servers read the key from the environment
        try:
            server = Server(repo / "v1", "name=field", f"require_signature={pub}")
        finally:
            del os.environ["ROADWORK_API_KEY"]
        try:
            bodies = [p.read_bytes() for p in images[:64]]  # the shifted scenes, as JPEG files
            run = asyncio.run(_swap_run(server.port, bodies, seconds, 16))
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (_, l_start, l_end, l_status, _), (_, b_start, _b_end, b_status, b_text) = sorted(
        run["loads"], key=lambda r: r[1]
    )
    phases = {
        "before the load": lambda t: t < l_start,
        "while v2 loads": lambda t: l_start <= t < l_end,
        "after the load": lambda t: l_end <= t < b_start,
        "after the tampered load": lambda t: t >= b_start,
    }
    rows = []
    for name, inside in phases.items():
        got = [(s, v) for t, s, v in run["answers"] if inside(t)]
        codes = Counter(s for s, _ in got)
        versions = Counter({old: "old", new: "new"}.get(v, v or "-") for s, v in got if s == 200)
        rows.append(
            [
                name,
                len(got),
                ", ".join(f"{k}: {n}" for k, n in sorted(codes.items())),
                "yes" if set(codes) <= {200, 503} else "NO",
                ", ".join(f"{k}: {n}" for k, n in sorted(versions.items())),
            ]
        )
    _table(
        f"Hot swap under 16 closed-loop clients ({seconds:.0f} s, the shifted scenes as JPEGs, require_signature and an "
        "API key): "
        f"load v2 (recertified) {l_status} in {l_end - l_start:.2f} s; load v3-tampered {b_status} "
        f"({b_text[:70]})",
        ["phase", "answers", "statuses", "only 200/503", "policy_version of 200s (old/new)"],
        rows,
    )
