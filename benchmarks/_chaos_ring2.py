"""The second ring (issue 27) for ``benchmarks/serve_chaos.py``: tables 7-11, on loopback, every loop bounded.

7. signed-bundle swap race: ``current`` → a signed bundle, flipped to a tampered copy at a random moment of
   start-up, 20 starts with ``require_signature``: what each served; manifests naming ``/proc/self/pagemap``,
   ``../x`` or an absolute path, refused by serve and predict, and how soon;
8. stall: the server paused (SIGSTOP) 6 s with a request inside, then 30 idle v2 requests;
9. pressure before a request: a 128 MiB header, 2,000 silent connections under ``ulimit -n 1024``,
   64 × 60 MiB POSTs to ``/metrics``, 3 × 63 MB v2 JSON bodies: probe latency during each and RSS growth;
10. open loop: Poisson arrivals at 0.8× and 3× the measured capacity, 30 s each; 16 closed-loop clients on
    1080p JPEGs;
11. odd inputs: a folder with a non-UTF-8 name and a manifest with an empty cell through ``roadwork predict``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from serve_chaos import HOST, JSON, Conn, Server, _jpeg_bodies, _once, _pct, _Stale, _table, _v2_body

# ------------------------------------------------------------------------------------------- 7. swap race


def _signed_pair(bundle: Path, work: Path) -> tuple[Path, Path, Path]:
    """A signed copy of ``bundle`` and a tampered copy (its policy answers everything, manifest re-hashed)."""
    from roadwork.export.signing import generate_keypair, sign_bundle

    good, evil = work / "good", work / "evil"
    shutil.copytree(bundle, good)
    pub = generate_keypair(work / "key")
    sign_bundle(good, work / "key")
    tampered_copy(good, evil)
    return good, evil, pub


def tampered_copy(signed: Path, to: Path) -> None:
    """A copy of a signed bundle whose policy answers everything, its manifest re-hashed (the signature no longer
    matches): what an attacker who can write the folder makes."""
    from roadwork.export.bundle import file_sha256

    shutil.copytree(signed, to)
    policy = json.loads((to / "policy.json").read_text())
    policy["abstention"]["threshold"] = 0.0
    (to / "policy.json").write_text(json.dumps(policy))
    manifest = json.loads((to / "manifest.json").read_text())
    manifest["files"]["policy.json"] = file_sha256(to / "policy.json")
    (to / "manifest.json").write_text(json.dumps(manifest))


def swap_race(bundle: Path, tries: int) -> None:
    from roadwork.export.bundle import Bundle

    work = Path(tempfile.mkdtemp(prefix="roadwork-swap-"))
    good, evil, pub = _signed_pair(bundle, work)
    images = sorted(Path(bundle).parent.parent.glob("data/images/*.jpg"))[:20]
    want = [r["abstain"] for r in Bundle.load(good).predict_paths(images)]
    assert want != [False] * len(images), "the signed policy answers every image: the test would not tell"
    current = work / "current"
    served = {"signed": 0, "tampered": 0, "refused": 0}
    for i in range(tries):
        with contextlib.suppress(FileNotFoundError):
            current.unlink()
        current.symlink_to(good)
        flip_at = random.Random(i).uniform(0.0, 3.0)

        def flip(flip_at: float = flip_at) -> None:
            time.sleep(flip_at)
            tmp = work / "current.tmp"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(evil)
            tmp.replace(current)  # atomic, as a deploy script flips a release link

        threading.Thread(target=flip, daemon=True).start()
        try:
            server = Server(current, "name=swap", f"require_signature={pub}")
        except RuntimeError:
            served["refused"] += 1
            continue
        try:
            got = [_abstains(server.port, im) for im in images]
        finally:
            server.stop()
        served["signed" if got == want else "tampered"] += 1
    rows = [
        [
            "swap during start-up (require_signature)",
            tries,
            served["signed"],
            served["tampered"],
            served["refused"],
        ]
    ]
    _table(
        f"Table 7a. Signed-bundle swap race: current -> signed, flipped to a tampered copy 0-3 s into start-up, "
        f"{tries} starts",
        [
            "case",
            "starts",
            "served the signed bundle",
            "served a tampered bundle",
            "refused (flip before the read)",
        ],
        rows,
    )
    outside = []
    for name in ("/proc/self/pagemap", "../x", "/etc/passwd"):
        bad = work / f"bad-{len(outside)}"
        shutil.copytree(good, bad)
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["files"][name] = "0" * 64
        (bad / "manifest.json").write_text(json.dumps(manifest))
        image = next(p for p in Path(bundle).parent.parent.glob("data/images/*.jpg"))
        for cmd, argv in (
            ("serve", ["serve", str(bad), f"port={_free_port()}"]),
            (
                "serve require_signature",
                ["serve", str(bad), f"port={_free_port()}", f"require_signature={pub}"],
            ),
            ("predict", ["predict", str(bad), str(image)]),
        ):
            t0 = time.perf_counter()
            r = subprocess.run(
                [sys.executable, "-m", "roadwork.cli", *argv], capture_output=True, text=True, timeout=120
            )
            wall = time.perf_counter() - t0
            err = (r.stderr.strip().splitlines() or [""])[-1][:90]
            outside.append([name, cmd, r.returncode, f"{wall:.1f}", err])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import roadwork.cli"], check=True)
    startup = time.perf_counter() - t0
    _table(
        f"Table 7b. Manifest names outside the folder (process wall time includes ~{startup:.1f} s of Python "
        "start-up and imports, measured alone)",
        ["listed name", "command", "exit", "wall s", "error"],
        outside,
    )
    shutil.rmtree(work, ignore_errors=True)


def _abstains(port: int, image: Path) -> bool:
    body = image.read_bytes()
    _s, _h, data = asyncio.run(
        _once("POST", "/v1/classify", body, port=port, **{"content-type": "image/jpeg"})
    )
    return bool(json.loads(data)["predictions"][0]["abstain"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------ 8. stall


def stall(bundle: Path, size: int) -> None:
    import signal

    server = Server(bundle, "name=chaos")
    body = _v2_body(np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32))
    try:
        for _ in range(5):
            asyncio.run(_once("POST", "/v2/models/chaos/infer", body, port=server.port, **JSON))

        async def held() -> Any:
            c = Conn(server.port)
            try:
                return await asyncio.wait_for(c.request("POST", "/v2/models/chaos/infer", body, JSON), 60)
            finally:
                c.close()

        async def pause_during() -> Any:
            task = asyncio.create_task(held())
            await asyncio.sleep(0.05)
            server.proc.send_signal(signal.SIGSTOP)  # the whole process paused with a request inside
            await asyncio.sleep(6)
            server.proc.send_signal(signal.SIGCONT)
            return await task

        first = asyncio.run(pause_during())[0]
        codes: dict[str, int] = {}
        for _ in range(30):
            status = asyncio.run(_once("POST", "/v2/models/chaos/infer", body, port=server.port, **JSON))[0]
            codes[str(status)] = codes.get(str(status), 0) + 1
            time.sleep(0.3)  # idle between requests
    finally:
        server.stop()
    _table(
        "Table 8. Stall: the server paused 6 s (SIGSTOP) with a v2 request inside, then 30 idle v2 requests",
        ["request", "answers", "target met"],
        [
            ["the one held through the pause", first, "-"],
            ["30 idle v2 requests after it", json.dumps(codes), "yes" if codes == {"200": 30} else "NO"],
        ],
    )


# -------------------------------------------------------------------------------------- 9. before a request


async def _probe_during(port: int, attack: Any, v2_body: bytes, seconds: float) -> dict[str, Any]:
    """Run ``attack`` while probing readiness and a small v2 infer every 100 ms on fresh connections."""
    ready: list[float] = []
    infer: list[float] = []
    statuses: dict[str, int] = {}
    failures = 0
    stop = time.perf_counter() + seconds

    async def probe() -> None:
        nonlocal failures
        while time.perf_counter() < stop:
            for path, body, out in (
                ("/v2/health/ready", b"", ready),
                ("/v2/models/chaos/infer", v2_body, infer),
            ):
                t0 = time.perf_counter()
                try:
                    status, _h, _b = await asyncio.wait_for(
                        _once("POST" if body else "GET", path, body, port=port, **JSON), 5
                    )
                    out.append(time.perf_counter() - t0)  # any answer: a quick 503 is an answer too
                    key = f"{'v2' if body else 'ready'} {status}"
                    statuses[key] = statuses.get(key, 0) + 1
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, _Stale):
                    failures += 1
                    out.append(5.0)
            await asyncio.sleep(0.1)

    result = await asyncio.gather(attack(stop), probe())
    return {
        "ready_max": max(ready) * 1000,
        "infer_max": max(infer) * 1000,
        "failures": failures,
        "statuses": statuses,
        "attack": result[0],
    }


async def _big_header(port: int, stop: float) -> str:
    r, w = await asyncio.open_connection(HOST, port)
    w.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    try:
        while sent < 128 * 2**20 and time.perf_counter() < stop:
            w.write(b"a" * 2**20)
            await w.drain()
            sent += 2**20
    except OSError:
        pass
    with contextlib.suppress(Exception):
        status = await asyncio.wait_for(r.readline(), 5)
        w.close()
        return f"{sent / 2**20:.0f} MiB sent, then {status.decode().strip() or 'closed'}"
    return f"{sent / 2**20:.0f} MiB sent, connection closed"


async def _silent(port: int, stop: float, n: int = 2000) -> str:
    conns, refused = [], 0
    for _ in range(n):
        try:
            conns.append(await asyncio.wait_for(asyncio.open_connection(HOST, port), 2))
        except (OSError, asyncio.TimeoutError):
            refused += 1
    while time.perf_counter() < stop:
        await asyncio.sleep(0.5)
    for _r, w in conns:
        w.close()
    metrics = (await _once("GET", "/metrics", port=port))[2].decode()
    closed = next(
        (
            ln.split()[1]
            for ln in metrics.splitlines()
            if ln.startswith("roadwork_connections_closed_idle_total")
        ),
        "nan",
    )
    return f"{len(conns)} opened ({refused} not); the server closed {float(closed):.0f} idle ones"


async def _metrics_posts(port: int, stop: float) -> str:
    chunk = b"x" * 2**20
    codes: dict[str, int] = {}

    async def one() -> None:
        try:
            r, w = await asyncio.open_connection(HOST, port)
            w.write(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (60 * 2**20))
            for _ in range(60):
                w.write(chunk)
                await w.drain()
            status = await asyncio.wait_for(r.readline(), 5)
            key = status.decode().split(" ")[1] if status else "closed"
            codes[key] = codes.get(key, 0) + 1
            w.close()
        except (OSError, asyncio.TimeoutError, IndexError):
            codes["closed by the server"] = codes.get("closed by the server", 0) + 1

    await asyncio.gather(*(one() for _ in range(64)))
    return json.dumps(codes)


def _big_v2(size: int, mb: float = 63) -> bytes:
    per_image = len(_v2_body(np.zeros((1, 3, size, size), np.float32) + 0.123456789))
    n = max(1, min(256, int(mb * 2**20 / per_image)))
    x = np.random.default_rng(1).normal(size=(n, 3, size, size)).astype(np.float32)
    return _v2_body(x)


async def _json_bodies(port: int, stop: float, body: bytes) -> str:
    codes: dict[str, int] = {}

    async def one() -> None:
        c = Conn(port)
        try:
            status, _h, _b = await asyncio.wait_for(
                c.request("POST", "/v2/models/chaos/infer", body, JSON), 120
            )
            codes[str(status)] = codes.get(str(status), 0) + 1
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, _Stale) as e:
            codes[type(e).__name__] = codes.get(type(e).__name__, 0) + 1
        finally:
            c.close()

    await asyncio.gather(*(one() for _ in range(3)))
    return f"{len(body) / 1e6:.0f} MB each: {json.dumps(codes)}"


def pressure(bundle: Path, size: int, seconds: float) -> None:
    small = _v2_body(np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32))
    big = _big_v2(size)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # the client needs 2,000 sockets itself
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    attacks = (
        ("one 128 MiB header", lambda port: lambda stop: _big_header(port, stop)),
        ("2,000 silent connections (server: ulimit -n 1024)", lambda port: lambda stop: _silent(port, stop)),
        ("64 x 60 MiB POSTs to /metrics", lambda port: lambda stop: _metrics_posts(port, stop)),
        ("3 x 63 MB v2 JSON at once", lambda port: lambda stop: _json_bodies(port, stop, big)),
    )
    for name, make in attacks:
        limit = "2,000 silent" in name
        server = Server(bundle, "name=chaos", preexec=_fd_limit_1024 if limit else None)
        try:
            for _ in range(3):
                asyncio.run(_once("POST", "/v2/models/chaos/infer", small, port=server.port, **JSON))
            rss0 = server.rss_mb()
            peak = [rss0]
            done = threading.Event()

            def watch(srv: Server = server, pk: list[float] = peak, d: threading.Event = done) -> None:
                while not d.is_set():
                    with contextlib.suppress(OSError, ValueError):
                        pk.append(srv.rss_mb())
                    time.sleep(0.05)

            threading.Thread(target=watch, daemon=True).start()
            r = asyncio.run(_probe_during(server.port, make(server.port), small, seconds))
            done.set()
            ok = (
                r["ready_max"] <= 1000
                and r["infer_max"] <= 1000
                and max(peak) - rss0 < 200
                and not r["failures"]
            )
            rows.append(
                [
                    name,
                    r["attack"],
                    f"{r['ready_max']:.0f}",
                    f"{r['infer_max']:.0f}",
                    json.dumps(r["statuses"]),
                    r["failures"],
                    f"{max(peak) - rss0:.0f}",
                    "yes" if ok else "NO",
                ]
            )
        finally:
            server.stop()
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    _table(
        f"Table 9. Before a request: probes (readiness, a 1-image v2 infer, fresh connections every 100 ms) during "
        f"each attack, {seconds:g} s",
        [
            "attack",
            "what the attacker got",
            "ready max ms",
            "v2 infer max ms",
            "probe answers",
            "probe failures",
            "RSS growth MB",
            "target met (<= 1 s, < 200 MB)",
        ],
        rows,
    )


def _fd_limit_1024() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


# -------------------------------------------------------------------------------------------- 10. open loop


async def _open_loop(port: int, bodies: list[bytes], rate: float, seconds: float) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` per second, each request on a free pooled connection (or a new one)."""
    rng = np.random.default_rng(int(rate * 1000))
    codes: dict[str, int] = {}
    lat: list[float] = []
    pool: list[Conn] = []
    tasks = []

    async def one(k: int) -> None:
        c = pool.pop() if pool else Conn(port)
        t0 = time.perf_counter()
        try:
            status, _h, _b = await asyncio.wait_for(
                c.request("POST", "/v1/classify", bodies[k % len(bodies)], JSON), 30
            )
            codes[str(status)] = codes.get(str(status), 0) + 1
            if status == 200:
                lat.append(time.perf_counter() - t0)
            pool.append(c)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, _Stale) as e:
            codes[type(e).__name__] = codes.get(type(e).__name__, 0) + 1
            c.close()

    start = time.perf_counter()
    t, k = 0.0, 0
    while t < seconds:
        t += rng.exponential(1 / rate)
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(k)))
        k += 1
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    for c in pool:
        c.close()
    return {"sent": k, "codes": codes, "goodput": len(lat) / wall, "p99": _pct(lat, 99), "p50": _pct(lat, 50)}


def _jpeg_1080p(n: int) -> list[bytes]:
    rng = np.random.default_rng(2)
    out = []
    base = np.linspace(0, 255, 1920, dtype=np.float32)
    for _ in range(n):
        img = base[None, :, None] * rng.uniform(0.5, 1, (1080, 1, 3)) + rng.normal(0, 12, (1080, 1920, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


async def _closed_raw(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    codes: dict[str, int] = {}
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        c, k = Conn(port), i
        while time.perf_counter() < stop:
            try:
                status, _h, _b = await c.request(
                    "POST", "/v1/classify", bodies[k % len(bodies)], {"content-type": "image/jpeg"}
                )
                codes[str(status)] = codes.get(str(status), 0) + 1
            except (OSError, asyncio.IncompleteReadError, _Stale) as e:
                codes[type(e).__name__] = codes.get(type(e).__name__, 0) + 1
                c.close()
            k += clients
        c.close()

    await asyncio.gather(*(worker(i) for i in range(clients)))
    return codes


def open_loop(bundle: Path, seconds: float) -> None:
    from serve_chaos import _closed_loop

    bodies = _jpeg_bodies(32)
    server = Server(bundle)
    rows = []
    try:
        asyncio.run(_closed_loop(server.port, bodies, 3, 4))  # warm
        single = asyncio.run(_closed_loop(server.port, bodies, seconds / 3, 1))
        capacity = max(asyncio.run(_closed_loop(server.port, bodies, seconds / 3, c))["rps"] for c in (8, 16))
        for factor in (0.8, 3.0):
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            r = asyncio.run(_open_loop(server.port, bodies, factor * capacity, seconds))
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            # the load generator's own share of the machine's cores (it shares them with the server)
            r["client_cpu"] = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / (
                (time.perf_counter() - t0) * (os.cpu_count() or 1)
            )
            refused = r["codes"].get("503", 0) / max(r["sent"], 1)
            other = {k: v for k, v in r["codes"].items() if k not in ("200", "503")}
            if factor < 1:
                ok = refused < 0.01 and r["p99"] <= 3 * single["p99"] and not other
                target = "< 1 % 503, p99 <= 3x unloaded"
            else:
                ok = r["goodput"] >= 0.8 * capacity and not other
                target = "goodput >= 80 % of capacity, only 200/503"
            rows.append(
                [
                    f"open loop {factor:g}x ({factor * capacity:.0f} req/s; client {100 * r['client_cpu']:.0f} % "
                    "of the cores)",
                    r["sent"],
                    json.dumps(r["codes"]),
                    f"{100 * refused:.2f}",
                    f"{r['goodput']:.1f}",
                    f"{r['p99']:.0f}",
                    target,
                    "yes" if ok else "NO",
                ]
            )
        hd = _jpeg_1080p(8)
        codes = asyncio.run(_closed_raw(server.port, hd, 16, seconds))
        total = sum(codes.values())
        refused = codes.get("503", 0) / max(total, 1)
        rows.append(
            [
                "16 closed-loop clients, 1080p JPEG",
                total,
                json.dumps(codes),
                f"{100 * refused:.2f}",
                "-",
                "-",
                "< 5 % 503",
                "yes" if refused < 0.05 and set(codes) <= {"200", "503"} else "NO",
            ]
        )
    finally:
        server.stop()
    _table(
        f"Table 10. Load: capacity {capacity:.1f} req/s (closed loop, best of 8/16 clients, 96 px JPEGs); "
        f"unloaded p99 {single['p99']:.0f} ms; {seconds:g} s each",
        ["load", "sent", "answers", "503 %", "goodput req/s", "p99 ms", "target", "met"],
        rows,
    )


# ------------------------------------------------------------------------------------------- 11. odd inputs


def odd_inputs(bundle: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="roadwork-odd-"))
    images = sorted(Path(bundle).resolve().parent.parent.glob("data/images/*.jpg"))[
        :5
    ]  # absolute: the manifest lives elsewhere
    folder = work / "in"
    folder.mkdir()
    for im in images:
        shutil.copy(im, folder / im.name)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as f:
        f.write(images[0].read_bytes())
    (work / "m.csv").write_text("path,weather\n,fog\n" + "".join(f"{p},rain\n" for p in images[:3]))
    rows = []
    for what, target in (
        ("folder with a non-UTF-8 name (5 good)", folder),
        ("manifest with an empty cell (3 good)", work / "m.csv"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "roadwork.cli", "predict", str(bundle), str(target)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        listed = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped ")]
        rows.append([what, r.returncode, len(r.stdout.splitlines()), "; ".join(listed)[:110]])
    shutil.rmtree(work, ignore_errors=True)
    _table("Table 11. Odd inputs through roadwork predict", ["input", "exit", "predicted", "listed"], rows)


def run(bundle: Path, only: set[str], size: int, quick: bool) -> None:
    """The tables of this ring that ``only`` names (swap, stall, pressure, openloop, odd)."""
    if "swap" in only:
        swap_race(bundle, 5 if quick else 20)
    if "stall" in only:
        stall(bundle, size)
    if "pressure" in only:
        pressure(bundle, size, 5 if quick else 10)
    if "openloop" in only:
        open_loop(bundle, 10 if quick else 30)
    if "odd" in only:
        odd_inputs(bundle)


__all__ = ["run"]
