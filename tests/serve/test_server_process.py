"""The real server on 127.0.0.1: SIGTERM mid-load drains as Kubernetes expects (readiness 503 while the listener
stays open, keep-alive clients told to reconnect, in-flight requests finish, exit 0); slow uploads hold no
admission slot and are cut off after body_timeout_s."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from roadwork.export.bundle import Bundle

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(
    bundle: Path, log: Path, *settings: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "roadwork.cli", "serve", str(bundle), f"port={port}", *settings],
        stdout=log.open("wb"),  # a file: an unread pipe can fill and block the server
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # a cold first start (fresh venv, no .pyc yet) can take a while
    while True:
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"server exited early: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server not ready after 180 s")
        time.sleep(0.2)


def _inflight(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("roadwork_inflight")))


def test_sigterm_drains_in_flight_and_keep_alive_requests_and_exits_0(tiny_run, tmp_path):
    _cfg, result = tiny_run
    image = next((result.run_dir / "data" / "images").glob("*.jpg")).read_bytes()
    proc, base = _start(
        result.bundle,
        tmp_path / "server.log",
        "max_queue_delay_ms=3000",
        "max_latency_ms=20000",  # the 3 s window fits the latency budget
        "max_batch_size=64",
        "drain_delay_s=2",
        "drain_timeout_s=20",
    )
    headers = {"content-type": "image/jpeg"}
    try:
        keep = httpx.Client(base_url=base, timeout=30)  # one keep-alive connection, opened before the signal
        results: list[int | str] = []
        started = threading.Barrier(9)

        def send() -> None:
            started.wait()
            try:
                r = httpx.post(f"{base}/v1/classify", content=image, headers=headers, timeout=30)
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
            inside = _inflight(base)
            time.sleep(0.02)
        assert inside == 8
        proc.send_signal(signal.SIGTERM)
        ready = httpx.get(f"{base}/v2/health/ready", timeout=5)  # the listener is still open...
        assert ready.status_code == 503 and ready.json() == {"ready": False}  # ...and says: stop sending
        r = keep.post("/v1/classify", content=image, headers=headers)  # a keep-alive client is still served,
        assert r.status_code == 200 and r.headers["connection"] == "close"  # and told to reconnect elsewhere
        for t in threads:
            t.join(30)
        code = proc.wait(30)
        keep.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert results == [200] * 8, results
    assert code == 0


def _slow_upload(port: int, declared: int, sent: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {declared}\r\n\r\n".encode()
        + sent
    )
    return s


def _read_all(s: socket.socket) -> bytes:
    s.settimeout(60)  # a safety net for a broken server, not a measurement
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_slow_uploads_hold_no_slot_and_get_408_json(tiny_run, tmp_path):
    _cfg, result = tiny_run
    image = next((result.run_dir / "data" / "images").glob("*.jpg")).read_bytes()
    proc, base = _start(result.bundle, tmp_path / "server.log", "body_timeout_s=3", "max_queue=2")
    port = int(base.rsplit(":", 1)[1])
    statement, warn = Bundle.load(result.bundle).answers_statement()
    assert ("warning: " if warn else "roadwork serve: ") + statement in (tmp_path / "server.log").read_text()
    try:
        slow = [_slow_upload(port, len(image), image[:10]) for _ in range(6)]  # 3x max_queue, all stuck
        time.sleep(0.5)
        assert _inflight(base) == 0  # reading a body takes no admission slot
        for _ in range(3):
            r = httpx.post(f"{base}/v1/classify", content=image, headers={"content-type": "image/jpeg"})
            assert r.status_code == 200
        answers = [_read_all(s) for s in slow]  # the server answers, then closes
        text = httpx.get(f"{base}/metrics", timeout=5).text
    finally:
        proc.kill()
        proc.wait(30)
    for a in answers:
        head, _, body = a.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        assert "body_timeout_s=3" in json.loads(body)["error"]
    assert "roadwork_body_timeouts_total 6.0" in text


def test_a_busy_port_is_our_error_naming_the_port_before_the_bundle_loads(tmp_path):
    """uvicorn alone prints ``[Errno 98]`` after the bundle has loaded; roadwork says which setting and the fix."""
    from roadwork.errors import InputError
    from roadwork.serve import ServeSettings, serve

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        with pytest.raises(InputError, match=rf"port={port}: cannot listen .*pass another port=N"):
            serve(str(tmp_path / "no-bundle-needed"), ServeSettings(host="127.0.0.1", port=port))
    with pytest.raises(InputError, match=r"host='no\.such\.host\.invalid'"):
        serve(str(tmp_path), ServeSettings(host="no.such.host.invalid", port=8000))


def _raw(base: str, data: bytes, wait: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or ``wait`` passes)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        with contextlib.suppress(OSError):  # the server may close while we still send: its answer counts
            s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def test_what_arrives_before_a_request_is_bounded(tiny_run, tmp_path):
    """Heads over max_header_kb or max_headers get a JSON 431; a silent connection is closed after
    header_timeout_s; beyond max_connections the oldest silent one is closed so a probe still gets in; a body
    sent to an open path is refused unread; two Authorization headers are a 400; malformed HTTP is a JSON 400."""
    _cfg, result = tiny_run
    proc, base = _start(
        result.bundle,
        tmp_path / "server.log",
        "max_header_kb=8",
        "max_headers=20",
        "header_timeout_s=1.5",
        "max_connections=40",
        "max_body_mb=2",
        env={"ROADWORK_API_KEY": "k"},
    )
    try:
        big = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
        answer = _raw(base, big)
        assert answer.startswith(b"HTTP/1.1 431") and b'{"error": "the request head is over' in answer
        whole = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n"  # one read
        assert _raw(base, whole).startswith(b"HTTP/1.1 431")
        many = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(
            b"X-%d: 1\r\n" % i for i in range(30)
        )
        assert _raw(base, many + b"\r\n").startswith(b"HTTP/1.1 431")
        t0 = time.monotonic()
        silent = _raw(base, b"", wait=10)
        assert silent.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5
        trickle = _raw(base, b"GET /v2/health/live HTTP/1.1\r\nX-A: 1\r\n", wait=10)  # never ends its head
        assert trickle.startswith(b"HTTP/1.1 408")
        held = [socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) for _ in range(80)]
        try:
            r = httpx.get(f"{base}/v2/health/ready", timeout=2)  # 80 silent sockets, 40 allowed: still in
            assert r.status_code == 200
            metrics = httpx.get(f"{base}/metrics", timeout=2).text
            evicted = next(
                ln for ln in metrics.splitlines() if ln.startswith("roadwork_connections_closed_idle_total")
            )
            assert float(evicted.split()[1]) >= 40
        finally:
            for s in held:
                s.close()
        body = b"x" * 5_000_000
        post = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        answer = _raw(base, post + body[:1000])  # refused before the body: the rest is never waited for
        assert answer.startswith(b"HTTP/1.1 405") and b"use GET" in answer
        # a client that sends its whole body before it reads (http.client, requests) gets the refusal, not a
        # TCP reset (a lingering close: serve/linger.py)
        for path, size, status in (("/metrics", 24 << 20, 405), ("/v1/classify", 3 << 20, 413)):
            conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=30)
            conn.request("POST", path, body=b"x" * size, headers={"Authorization": "Bearer k"})
            reply = conn.getresponse()
            assert reply.status == status and b'"error"' in reply.read()
            conn.close()
        two = b"GET /v2/models/tiny HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nAuthorization: Bearer x\r\n\r\n"
        assert _raw(base, two).startswith(b"HTTP/1.1 400")
        # a valid request pipelined before a malformed one keeps its answer; the 400 follows it
        piped = _raw(base, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\x01 / HTTP/1.1\r\n\r\n")
        assert piped.startswith(b"HTTP/1.1 200") and piped.count(b"HTTP/1.1 400") == 1, piped
        bad = _raw(base, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400") and b"application/json" in bad and b'"error"' in bad
        assert httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
