"""The server under hostile traffic, on loopback: the acceptance tables of issue 16, measured in one run.

    pip install -e '.[serve]'
    python benchmarks/serve_chaos.py --bundle runs/demo/export/bundle [--quick]

Every server runs with default settings (only ``port`` set, and ``drain_delay_s`` shortened for the SIGTERM
test); every load loop is bounded in time and count and talks to 127.0.0.1 only. Client and server share the
machine's cores. Tables:

1. unloaded: closed-loop clients (1, 2, 4, 8, 16) on ``/v1/classify`` (JSON base64 JPEG): req/s and p99;
2. overload: 64 and 128 closed-loop clients that re-send at once after a 503: status codes, goodput as a share
   of the best unloaded throughput, accepted p99 as a multiple of the single-client p99;
3. poison: 8 good v2 clients + 1 client sending finite FP32 tensors that overflow the network, every 20 ms;
4. slow clients: 64 connections trickling a body one byte every 2 s (reopened when closed), with prediction
   probes beside them; how soon the server closes them;
5. bad requests: >= 2000 generated malformed requests of every kind; statuses, JSON bodies, RSS growth; then a
   burst of 16 concurrent 6000x6000 PNGs (small files, 36 M pixels each) and the peak RSS;
6. SIGTERM under load: readiness, resets, answered requests, exit code;
7-11. the second ring (``benchmarks/_chaos_ring2.py``): a signed-bundle swap race and manifest names outside the
   folder, a stall, pressure before a request (huge header, silent connections, bodies to open paths, huge JSON),
   open-loop load at 0.8x and 3x capacity and 1080p JPEGs, odd file names and manifest cells.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from _machine import bundle_or_exit

HOST = "127.0.0.1"


# ------------------------------------------------------------------------------------------------ plumbing


def _port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _lscpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    keep = [ln for ln in out.splitlines() if ln.split(":")[0].strip() in ("Model name", "CPU(s)", "Flags")]
    return "\n".join(keep)


EXTRA_SETTINGS: list[str] = []  # --server: appended to every server's settings


class Server:
    def __init__(self, bundle: Path, *settings: str, preexec: Any = None) -> None:
        settings = (*settings, *EXTRA_SETTINGS)
        self.port = _port()
        self.log = Path(tempfile.gettempdir()) / f"roadwork-chaos-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "roadwork.cli", "serve", str(bundle), f"port={self.port}", *settings],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=preexec,  # e.g. a lower open-file limit for the server alone
        )
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError):
                status, _h, _b = asyncio.run(_once("GET", "/v2/health/ready", port=self.port))
                if status == 200:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start; see {self.log}")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


class Conn:
    """One keep-alive HTTP/1.1 connection with a tiny client (little CPU per request: the load generator shares
    the cores with the server). A connection the server closed while idle is reopened once, as clients do."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def close(self) -> None:
        if self.rw is not None:
            self.rw[1].close()
            self.rw = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        reused = self.rw is not None
        try:
            return await self._request(method, path, body, headers or {})
        except (OSError, asyncio.IncompleteReadError, _Stale):
            self.close()
            if not reused:
                raise
        return await self._request(method, path, body, headers or {})

    async def _request(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        if self.rw is None:
            self.rw = await asyncio.open_connection(HOST, self.port)
        reader, writer = self.rw
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise _Stale
        hdrs: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            hdrs[name.strip().lower()] = value.strip()
        data = await reader.readexactly(int(hdrs.get("content-length", "0")))
        if "close" in hdrs.get("connection", "").lower():
            self.close()
        return int(status_line.split()[1]), hdrs, data


class _Stale(Exception):
    pass


async def _once(method: str, path: str, body: bytes = b"", *, port: int, **headers: str) -> Any:
    c = Conn(port)
    try:
        return await asyncio.wait_for(c.request(method, path, body, headers), 10)
    finally:
        c.close()


def _jpeg_bodies(n: int, size: int = 96) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(json.dumps({"image": base64.b64encode(buf.getvalue()).decode()}).encode())
    return out


JSON = {"content-type": "application/json"}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")


def _table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ the tests


async def _closed_loop(
    port: int, bodies: list[bytes], seconds: float, clients: int, backoff: bool = False
) -> dict[str, Any]:
    """``clients`` loops, each sending the next request as soon as the last one is answered; after a 503 at once
    too, or (``backoff``) after the ``Retry-After`` seconds, as the header asks."""
    codes: dict[str, int] = {}
    lat: list[float] = []
    retry_after_missing = 0
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal retry_after_missing
        c, k = Conn(port), i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                status, hdrs, _ = await c.request("POST", "/v1/classify", bodies[k % len(bodies)], JSON)
            except (OSError, asyncio.IncompleteReadError, _Stale) as e:
                codes[type(e).__name__] = codes.get(type(e).__name__, 0) + 1
                c.close()
                continue
            codes[str(status)] = codes.get(str(status), 0) + 1
            if status == 200:
                lat.append(time.perf_counter() - t0)
            elif status == 503 and "retry-after" not in hdrs:
                retry_after_missing += 1
            elif status == 503 and backoff:
                await asyncio.sleep(min(float(hdrs["retry-after"]), max(stop - time.perf_counter(), 0)))
            k += clients
        c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "rps": len(lat) / wall,
        "p50": _pct(lat, 50),
        "p99": _pct(lat, 99),
        "codes": codes,
        "no_retry_after": retry_after_missing,
    }


def unloaded_and_overload(bundle: Path, seconds: float) -> None:
    bodies = _jpeg_bodies(32)
    server = Server(bundle)
    try:
        asyncio.run(_closed_loop(server.port, bodies, 3, 4))  # warm: allocator, caches, the capacity estimate
        rows, base = [], {}
        for c in (1, 2, 4, 8, 16):
            r = asyncio.run(_closed_loop(server.port, bodies, seconds, c))
            base[c] = r
            rows.append([c, r["rps"], r["p50"], r["p99"], json.dumps(r["codes"])])
        _table(
            "Table 1. Unloaded: closed-loop clients, default settings",
            ["clients", "req/s (200)", "p50 ms", "p99 ms", "codes"],
            rows,
        )
        best = max(r["rps"] for r in base.values())
        p99_1 = base[1]["p99"]
        rows = []
        for c, backoff in ((64, False), (128, False), (64, True), (128, True)):
            r = asyncio.run(_closed_loop(server.port, bodies, seconds, c, backoff))
            only = set(r["codes"]) <= {"200", "503"}
            rows.append(
                [
                    c,
                    "after Retry-After" if backoff else "at once",
                    json.dumps(r["codes"]),
                    "yes" if only and not r["no_retry_after"] else "NO",
                    r["rps"],
                    f"{100 * r['rps'] / best:.0f} %",
                    r["p99"],
                    f"{r['p99'] / p99_1:.2f}x",
                ]
            )
        _table(
            f"Table 2. Overload, default settings (best unloaded {best:.1f} req/s; single-client p99 "
            f"{p99_1:.1f} ms; targets: only 200/503, goodput >= 80 %, p99 <= 3x)",
            [
                "clients",
                "re-send after 503",
                "codes",
                "only 200/503 + Retry-After",
                "goodput req/s",
                "of best",
                "p99 ms",
                "p99 / unloaded",
            ],
            rows,
        )
    finally:
        server.stop()


def _v2_body(x: np.ndarray) -> bytes:
    inp = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [inp]}).encode()


async def _poison(port: int, size: int, seconds: float, with_bad: bool = True) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    good = [_v2_body(rng.normal(size=(1, 3, size, size)).astype(np.float32)) for _ in range(8)]
    bad = _v2_body(np.full((1, 3, size, size), 3e38, np.float32))  # finite FP32; the network overflows
    stop = time.perf_counter() + seconds
    good_codes: dict[str, int] = {}
    bad_codes: dict[str, int] = {}
    bad_json = True

    async def good_client(i: int) -> None:
        c = Conn(port)
        while time.perf_counter() < stop:
            try:
                status, hdrs, _ = await c.request("POST", "/v2/models/chaos/infer", good[i], JSON)
                key = str(status) if status != 503 or "retry-after" in hdrs else "503 without Retry-After"
            except (OSError, asyncio.IncompleteReadError, _Stale) as e:
                key = type(e).__name__
                c.close()
            good_codes[key] = good_codes.get(key, 0) + 1
        c.close()

    async def bad_client() -> None:
        nonlocal bad_json
        c = Conn(port)
        while time.perf_counter() < stop:
            try:
                status, _h, body = await c.request("POST", "/v2/models/chaos/infer", bad, JSON)
                key = str(status)
                bad_json = bad_json and "error" in json.loads(body)
            except (OSError, asyncio.IncompleteReadError, _Stale, ValueError) as e:
                key = type(e).__name__
                c.close()
            bad_codes[key] = bad_codes.get(key, 0) + 1
            await asyncio.sleep(0.02)
        c.close()

    await asyncio.gather(*([bad_client()] if with_bad else []), *(good_client(i) for i in range(8)))
    return {"good": good_codes, "bad": bad_codes, "bad_json": bad_json}


def poison(bundle: Path, seconds: float, size: int) -> None:
    server = Server(bundle, "name=chaos")
    try:
        alone = asyncio.run(_poison(server.port, size, seconds, with_bad=False))
        r = asyncio.run(_poison(server.port, size, seconds))
    finally:
        server.stop()
    ok = set(r["good"]) <= {"200", "503"}
    _table(
        f"Table 3. Poison: 8 good v2 clients + 1 sending FP32 3e38 tensors every 20 ms, {seconds:g} s",
        ["client", "answers", "target met"],
        [
            ["8 good, without the bad one (reference)", json.dumps(alone["good"]), "-"],
            ["8 good", json.dumps(r["good"]), "yes" if ok else "NO"],
            [
                "1 bad",
                json.dumps(r["bad"]) + (" (all JSON)" if r["bad_json"] else " (NOT all JSON)"),
                "yes" if set(r["bad"]) <= {"400"} and r["bad_json"] else "NO",
            ],
        ],
    )


async def _slow(port: int, seconds: float, n: int, bodies: list[bytes]) -> dict[str, Any]:
    stop = time.perf_counter() + seconds
    closed_after: list[float] = []
    statuses: dict[str, int] = {}

    async def trickler() -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.write(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
            )
            answer, ended = b"", False
            try:
                while time.perf_counter() < stop:
                    writer.write(b"x")
                    await writer.drain()
                    try:
                        answer = await asyncio.wait_for(reader.read(65536), 2.0)
                        ended = True  # an answer, or the server closed the connection
                        break
                    except TimeoutError:
                        continue
            except OSError:
                ended = True
            if ended:
                closed_after.append(time.perf_counter() - t0)
                key = answer.split(b"\r\n", 1)[0].decode(errors="replace")[9:12] or "closed, no answer"
                statuses[key] = statuses.get(key, 0) + 1
            writer.close()

    probe_codes: dict[str, int] = {}

    async def prober() -> None:
        c, k = Conn(port), 0
        while time.perf_counter() < stop:
            try:
                status, _h, _b = await c.request("POST", "/v1/classify", bodies[k % len(bodies)], JSON)
                key = str(status)
            except (OSError, asyncio.IncompleteReadError, _Stale) as e:
                key = type(e).__name__
                c.close()
            probe_codes[key] = probe_codes.get(key, 0) + 1
            k += 1
            await asyncio.sleep(0.05)
        c.close()

    await asyncio.gather(prober(), *(trickler() for _ in range(n)))
    return {"closed_after": closed_after, "slow_statuses": statuses, "probes": probe_codes}


def slow_clients(bundle: Path, seconds: float) -> None:
    server = Server(bundle)
    try:
        r = asyncio.run(_slow(server.port, seconds, 64, _jpeg_bodies(8)))
    finally:
        server.stop()
    probes = r["probes"]
    share = probes.get("200", 0) / max(sum(probes.values()), 1)
    c = r["closed_after"]
    _table(
        f"Table 4. Slow clients: 64 connections trickling 1 byte / 2 s for {seconds:g} s (body_timeout_s=10, the "
        "default), prediction probes every 50 ms beside them",
        [
            "probes",
            "200 share (target >= 90 %)",
            "slow conns answered",
            "their status",
            "closed after (s) min / max",
        ],
        [
            [
                json.dumps(probes),
                f"{100 * share:.1f} %",
                len(c),
                json.dumps(r["slow_statuses"]),
                f"{min(c):.1f} / {max(c):.1f}" if c else "-",
            ]
        ],
    )


def _bad_requests(size: int, n: int) -> list[tuple[str, bytes, dict[str, str]]]:
    rng = np.random.default_rng(1)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(png, format="PNG")
    good_png = png.getvalue()
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")
    inp = {"name": "input", "shape": [1, 3, size, size], "datatype": "FP32"}
    cells = 3 * size * size
    kinds: list[tuple[str, bytes, dict[str, str]]] = [
        ("/v1/classify", good_png[: len(good_png) // 2], {"content-type": "image/png"}),  # truncated
        ("/v1/classify", b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, {"content-type": "image/png"}),  # corrupt
        ("/v1/classify", bomb.getvalue(), {"content-type": "image/png"}),  # bomb
        ("/v1/classify", b"GIF89a" + b"\x00" * 20, {"content-type": "image/gif"}),
        ("/v1/classify", b'{"image": 5}', JSON),
        ("/v1/classify", b'{"images": "x"}', JSON),
        ("/v1/classify", b'{"image": "%%%"}', JSON),
        ("/v1/classify", b"{" * 5000, JSON),
        ("/v2/models/chaos/infer", b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}", JSON),  # deep
        (
            "/v2/models/chaos/infer",
            json.dumps({"inputs": [inp | {"data": [0] * (cells - 1)}]})
            .replace("[0,", "[1" + "0" * 400 + ",", 1)
            .encode(),
            JSON,
        ),  # 10**400
        (
            "/v2/models/chaos/infer",
            json.dumps({"inputs": [inp | {"data": [0.0] * cells}], "outputs": 5}).encode(),
            JSON,
        ),
        (
            "/v2/models/chaos/infer",
            json.dumps({"inputs": [inp | {"data": [0.0] * cells}], "outputs": None})
            .encode()
            .replace(b'"outputs": null', b'"outputs": [null]'),
            JSON,
        ),
        (
            "/v2/models/chaos/infer",
            json.dumps({"inputs": [inp | {"data": [0.0] * cells}], "outputs": [{"name": ["x"]}]}).encode(),
            JSON,
        ),
        (
            "/v2/models/chaos/infer",
            json.dumps({"inputs": [inp | {"datatype": "FP64", "data": [1e300] * cells}]}).encode(),
            JSON,
        ),
        ("/v2/models/chaos/infer", json.dumps({"inputs": [inp | {"data": ["a"] * cells}]}).encode(), JSON),
        ("/v2/models/chaos/infer", json.dumps({"inputs": [inp | {"shape": [1, 3, 2]}]}).encode(), JSON),
        ("/v2/models/chaos/infer", b'{"inputs": "nope"}', JSON),
        ("/v2/models/chaos/infer", b"\xff\xfe", JSON),
        ("/v2/models/chaos/infer", b"{}", {"inference-header-content-length": "999", **JSON}),
        (
            "/v2/models/chaos/infer",
            json.dumps({"inputs": [inp | {"parameters": {"binary_data_size": 12}}]}).encode() + b"\x00" * 12,
            {
                "inference-header-content-length": str(
                    len(json.dumps({"inputs": [inp | {"parameters": {"binary_data_size": 12}}]}))
                )
            },
        ),
    ]
    out = []
    for i in range(n):
        path, body, headers = kinds[i % len(kinds)]
        if i % len(kinds) == 1:  # fresh noise each time
            body = b"\x89PNG\r\n\x1a\n" + rng.bytes(int(rng.integers(10, 3000)))
        out.append((path, body, headers))
    return out


async def _send_all(port: int, reqs: list[tuple[str, bytes, dict[str, str]]], clients: int) -> dict[str, int]:
    codes: dict[str, int] = {}
    queue = list(reversed(reqs))

    async def worker() -> None:
        c = Conn(port)
        while queue:
            path, body, headers = queue.pop()
            try:
                status, _h, data = await c.request("POST", path, body, headers)
                answer = json.loads(data)
                is_json = isinstance(answer, dict) and ("error" in answer or status == 200)
                key = f"{status}" + ("" if is_json else " (not JSON)")
            except (OSError, asyncio.IncompleteReadError, _Stale, ValueError) as e:
                key = type(e).__name__
                c.close()
            codes[key] = codes.get(key, 0) + 1
        c.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return codes


async def _png_burst(server: Server, n: int) -> tuple[dict[str, int], float]:
    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000), (120, 130, 140)).save(buf, format="PNG")
    body = buf.getvalue()
    peak = server.rss_mb()
    done = False

    async def sample() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, server.rss_mb())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    codes = await _send_all(server.port, [("/v1/classify", body, {"content-type": "image/png"})] * n, n)
    done = True
    await sampler
    return codes, peak


def bad_requests(bundle: Path, size: int, n: int) -> None:
    server = Server(bundle, "name=chaos")
    try:
        reqs = _bad_requests(size, n)
        asyncio.run(_send_all(server.port, reqs[:100], 4))  # warm the allocator once
        before = server.rss_mb()
        codes = asyncio.run(_send_all(server.port, reqs, 8))
        after = server.rss_mb()
        ready = asyncio.run(_once("GET", "/v2/health/ready", port=server.port))[0]
        burst_before = server.rss_mb()
        burst_codes, peak = asyncio.run(_png_burst(server, 16))
        time.sleep(1)
        burst_after = server.rss_mb()
    finally:
        server.stop()
    only4xx = all(k.isdigit() and 400 <= int(k) < 500 for k in codes)
    _table(
        f"Table 5. {n} generated bad requests (20 kinds: truncated/corrupt/bomb images, wrong types, deep JSON, "
        "10**400, bad outputs, malformed v2 and binary headers), 8 clients",
        [
            "statuses (JSON bodies unless marked)",
            "only 4xx JSON",
            "ready after",
            "RSS before -> after MB",
            "growth MB",
        ],
        [
            [
                json.dumps(codes),
                "yes" if only4xx else "NO",
                ready,
                f"{before:.0f} -> {after:.0f}",
                after - before,
            ]
        ],
    )
    _table(
        "Table 5b. 16 concurrent 6000x6000 PNGs (36 M pixels each, under max_pixels; max_inflight_pixels "
        "default 120 M caps what is decoded at once)",
        ["statuses", "RSS before MB", "peak MB", "after 1 s MB"],
        [[json.dumps(burst_codes), burst_before, peak, burst_after]],
    )


async def _sigterm(server: Server, bodies: list[bytes], clients: int, before_s: float) -> dict[str, Any]:
    port = server.port
    codes: dict[str, int] = {}
    resets = refused = unanswered = 0
    ready_seen: list[int] = []
    stopping = False
    signalled = asyncio.Event()
    removed = asyncio.Event()

    async def worker(i: int) -> None:
        nonlocal resets, refused, unanswered
        c, k = Conn(port), i
        while True:
            if removed.is_set() and c.rw is None:
                return  # the load balancer sends no new connection here any more
            try:
                status, _h, _b = await c.request("POST", "/v1/classify", bodies[k % len(bodies)], JSON)
                codes[str(status)] = codes.get(str(status), 0) + 1
            except ConnectionRefusedError:
                refused += 1  # the listener has closed: this client would now go to another replica
                return
            except (ConnectionResetError, asyncio.IncompleteReadError, _Stale):
                resets += 1  # a request sent and never answered
                c.close()
                if stopping:
                    return
            except OSError:
                unanswered += 1
                c.close()
                return
            k += clients

    async def probe_ready() -> None:
        # a load balancer: it probes readiness and, 1 s after the first 503 (endpoint propagation, shorter than
        # drain_delay_s), opens no new connections to this server; open ones finish their requests
        await signalled.wait()
        while server.proc.poll() is None:
            try:
                status = (await _once("GET", "/v2/health/ready", port=port))[0]
            except OSError:
                return
            ready_seen.append(status)
            if status == 503 and not removed.is_set():
                asyncio.get_running_loop().call_later(1.0, removed.set)
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(worker(i)) for i in range(clients)]
    prober = asyncio.create_task(probe_ready())
    await asyncio.sleep(before_s)
    server.proc.send_signal(signal.SIGTERM)
    signalled.set()
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    stopping = True
    await prober
    code = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 60)
    return {
        "codes": codes,
        "resets": resets,
        "refused": refused,
        "other": unanswered,
        "ready": sorted(set(ready_seen)),
        "exit": code,
        "drain_s": time.perf_counter() - t0,
    }


def sigterm(bundle: Path) -> None:
    server = Server(bundle, "drain_delay_s=3")
    r = asyncio.run(_sigterm(server, _jpeg_bodies(16), 16, 3.0))
    _table(
        "Table 6. SIGTERM under load: 16 keep-alive closed-loop clients behind a simulated load balancer (no new "
        "connections 1 s after readiness turns 503), drain_delay_s=3 (default 5)",
        ["answers", "readiness seen after SIGTERM", "resets", "refused (listener closed)", "exit code"],
        [[json.dumps(r["codes"]), r["ready"], r["resets"], r["refused"], r["exit"]]],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/demo/export/bundle")
    ap.add_argument(
        "--server", nargs="*", default=[], help="extra server settings, e.g. latency_factor=6 (default: none)"
    )
    ap.add_argument("--quick", action="store_true", help="short loops (a smoke test, not the acceptance run)")
    ap.add_argument(
        "--only",
        default="overload,poison,slow,bad,sigterm,swap,stall,pressure,openloop,odd",
        help="comma-separated subset of the tables",
    )
    args = ap.parse_args()
    EXTRA_SETTINGS.extend(args.server)
    bundle = bundle_or_exit(args.bundle)
    from roadwork.export.bundle import Bundle

    size = Bundle.load(bundle).card.preprocess.size
    q = args.quick
    only = set(args.only.split(","))
    print(_lscpu())
    print(f"\nbundle: {bundle} (input {size} px); server and clients share these cores")
    print(f"server settings beside each table's own: {' '.join(EXTRA_SETTINGS) or 'defaults'}")
    if "overload" in only:
        unloaded_and_overload(bundle, 3 if q else 10)
    if "poison" in only:
        poison(bundle, 5 if q else 15, size)
    if "slow" in only:
        slow_clients(bundle, 12 if q else 30)
    if "bad" in only:
        bad_requests(bundle, size, 400 if q else 2400)
    if "sigterm" in only:
        sigterm(bundle)
    from _chaos_ring2 import run as second_ring  # tables 7-11 (issue 27)

    second_ring(bundle, only, size, q)


if __name__ == "__main__":
    main()
