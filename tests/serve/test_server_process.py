"""The real server on 127.0.0.1: SIGTERM mid-load lets in-flight requests finish, then the process exits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_drains_in_flight_requests(tiny_run, tmp_path):
    _cfg, result = tiny_run
    image = next((result.run_dir / "data" / "images").glob("*.jpg")).read_bytes()
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "roadwork.cli",
            "serve",
            str(result.bundle),
            f"port={port}",
            "max_queue_delay_ms=3000",
            "max_batch_size=64",
            "drain_timeout_s=20",
        ],
        stdout=(tmp_path / "server.log").open("wb"),  # a file: an unread pipe can fill and block the server
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a cold first start (fresh venv, no .pyc yet) can take a while
        while True:
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"server exited early: {(tmp_path / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("server not ready after 180 s")
            time.sleep(0.2)
        results: list[int | str] = []
        started = threading.Barrier(9)

        def send() -> None:
            started.wait()
            try:
                r = httpx.post(
                    f"{base}/v1/classify", content=image, headers={"content-type": "image/jpeg"}, timeout=30
                )
                results.append(r.status_code)
            except httpx.TransportError as e:
                results.append(type(e).__name__)

        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        started.wait()
        inside = 0.0
        deadline = time.monotonic() + 60
        while inside < 8 and time.monotonic() < deadline:  # all eight now wait in the 3 s batching window
            text = httpx.get(f"{base}/metrics", timeout=5).text
            inside = float(
                next(ln.split()[1] for ln in text.splitlines() if ln.startswith("roadwork_inflight"))
            )
            time.sleep(0.02)
        assert inside == 8
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert results == [200] * 8, results
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
