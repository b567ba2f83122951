"""Two `roadwork serve` processes on one PostgreSQL store, as replicas run: feedback sent to either gives both the
same online state, and kill -9 of one right after an acknowledged label loses nothing."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.filterwarnings("ignore::roadwork.errors.RoadworkWarning")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    def __init__(self, bundle: Path, db: str, log: Path) -> None:
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "roadwork.cli",
                "serve",
                str(bundle),
                f"port={self.port}",
                "name=tiny",
                f"feedback_db={db}",
                "conformal_online=aci",
                "online_eta=0.1",
                "audit_rate=1",
            ],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.3)
        raise AssertionError("the server did not start: " + log.read_text()[-3000:])

    def classify(self, images: list[bytes]) -> list[dict]:  # type: ignore[type-arg]
        files = [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(images)]
        r = httpx.post(f"{self.url}/v1/classify", files=files, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["predictions"]  # type: ignore[no-any-return]

    def feedback(self, labels: list[dict]) -> dict:  # type: ignore[type-arg]
        r = httpx.post(f"{self.url}/v1/feedback", json={"labels": labels}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def offsets(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            f"{m[2]}/{m[1]}": float(m[3])
            for m in re.finditer(r'roadwork_online_offset\{group="([^"]*)",kind="([^"]*)"\} (\S+)', text)
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def database(postgres_url):
    """A database of its own on the test server (other tests share the default one)."""
    import psycopg

    name = f"replicas_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_url.replace("@/postgres?", f"@/{name}?")


def _wrong(preds: list[dict], classes: list[str]) -> list[dict]:  # type: ignore[type-arg]
    """A label outside each served set: every one moves the sets' offset up."""
    return [
        {"id": p["id"], "label": next((c for c in classes if c not in p["prediction_set"]), classes[0])}
        for p in preds
    ]


def test_two_servers_on_one_postgres_store_share_the_online_state_and_kill_9_loses_nothing(
    tiny_run, database, tmp_path
):
    from roadwork.export.bundle import Bundle

    bundle = tiny_run[1].bundle
    classes, alpha = Bundle.load(bundle).classes, Bundle.load(bundle).policy.conformal.alpha
    images = [p.read_bytes() for p in sorted((tiny_run[1].run_dir / "data" / "images").glob("*.jpg"))[:8]]
    log = tmp_path / "servers.log"
    a, b = _Server(bundle, database, log), _Server(bundle, database, log)
    try:
        from_a, from_b = a.classify(images[:4]), b.classify(images[4:])
        # cross over: each replica gets the labels of the other's answers
        assert b.feedback(_wrong(from_a, classes))["accepted"] == 4
        assert a.feedback(_wrong(from_b, classes))["accepted"] == 4
        deadline = time.monotonic() + 15  # each replica re-reads the shared state every 2 s
        while time.monotonic() < deadline and (not a.offsets() or a.offsets() != b.offsets()):
            time.sleep(0.5)
        shared = a.offsets()
        assert shared and shared == b.offsets()
        assert shared["sets/all"] > 0
        # an acknowledged label, then kill -9 at once
        last = a.classify(images[:1])
        assert a.feedback(_wrong(last, classes))["accepted"] == 1
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        a = _Server(bundle, database, log)
        again = a.feedback(_wrong(last, classes))
        assert again == {"accepted": 0, "unknown": [], "duplicates": [last[0]["id"]]}  # stored before the 200
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and a.offsets() != b.offsets():
            time.sleep(0.5)
        # the acknowledged label's update survived the kill too: it moved the shared offset by one step
        outside = (
            last[0]["prediction_set"] != classes
        )  # a label outside the set: up by η(1 - α), else down by ηα
        step = 0.1 * ((1 - alpha) if outside else -alpha)
        assert a.offsets() == b.offsets()
        assert a.offsets()["sets/all"] == pytest.approx(shared["sets/all"] + step)
    finally:
        a.stop()
        b.stop()
