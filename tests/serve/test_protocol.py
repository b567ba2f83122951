"""Admission from the protocol (serve/protocol.py, ``Gate.admit_early``): a small ``POST /v1/classify`` is held
whole, then admitted or refused once, before any ASGI work. Driven in process on uvicorn's own protocol class
with a recording transport: what it writes, in what order, and what reaches the app."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

pytest.importorskip("uvicorn")

import uvicorn
from uvicorn.server import ServerState

from roadwork.serve import ServeSettings, create_app, linger
from roadwork.serve.admission import ADMITTED, Refused
from roadwork.serve.metrics import ServerMetrics
from roadwork.serve.protocol import guarded_protocol

REQUEST = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
PROBE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out, self.closed, self.paused, self.aborted, self.eof = b"", False, False, False, False
        self.proto: Any = None

    def write(self, data: Any) -> None:
        assert not self.eof, "written after write_eof"  # as asyncio's (a RuntimeError there)
        if not self.closed:  # as asyncio's: nothing is sent after close
            self.out += bytes(data)

    @property
    def ended(self) -> bool:
        """Answered and closed, or closing: a FIN sent while the client still sends (serve/linger.py)."""
        return self.closed or self.eof

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        if not self.closed and self.proto is not None:  # as asyncio's: the protocol hears of it next
            asyncio.get_running_loop().call_soon(self.proto.connection_lost, None)
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)


class _Gate:
    """Answers every admission with ``decision``; records what the protocol asked."""

    def __init__(self, decision: bool | Refused, room: int = 1 << 20) -> None:
        self.decision, self.asked, self.refused = decision, 0, 0
        self.held, self.room = 0, room  # bytes of bodies held, and how many fit
        self.draining = lambda: False

    def admit_early(self, headers: list[tuple[bytes, bytes]], client: Any) -> bool | Refused:
        self.asked += 1
        return self.decision

    def authorised(self, headers: list[tuple[bytes, bytes]]) -> bool:
        return (b"authorization", b"Bearer wrong") not in headers

    def hold_body(self, size: int) -> bool:
        if self.held + size > self.room:
            return False
        self.held += size
        return True

    def release_body(self, size: int) -> None:
        self.held -= size

    def refuse_early(self, client: Any, refused: Refused, seconds: float) -> tuple[str, int]:
        self.refused += 1
        return f"{refused.reason}; retry after 3 s.", 3


def _connection(
    gate: Any, keep_alive_s: float = 5.0, **settings: Any
) -> tuple[Any, _Transport, list[tuple[str, Any, bytes]]]:
    seen: list[tuple[str, Any, bytes]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/early":  # answers before reading its body, as the gate's 401 and 413
            seen.append((scope["path"], None, b""))
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        if scope["path"] == "/slow":
            await asyncio.sleep(0.2)
        seen.append((scope["path"], scope.get(ADMITTED), body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    cls = guarded_protocol(ServeSettings(**settings), ServerMetrics(), early=gate)
    config = uvicorn.Config(
        app, http=cls, ws="none", lifespan="off", log_level="warning", timeout_keep_alive=keep_alive_s
    )
    config.load()
    proto = cls(config=config, server_state=ServerState(), app_state={})
    transport = _Transport()
    transport.proto = proto
    proto.connection_made(transport)
    return proto, transport, seen


def _answers(out: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", out)


def test_a_refused_request_gets_its_503_from_the_protocol_and_the_connection_serves_the_next():
    async def main() -> tuple[Any, ...]:
        gate = _Gate(Refused("the server is full", 0.0))
        proto, t, seen = _connection(gate)
        proto.data_received(REQUEST + PROBE)  # the probe pipelined behind it
        await asyncio.sleep(0.05)
        return gate, t, seen

    gate, t, seen = asyncio.run(main())
    assert _answers(t.out) == [b"503", b"200"] and not t.closed
    assert b"retry-after: 3\r\n" in t.out and b'{"error": "the server is full; retry after 3 s."}' in t.out
    assert gate.asked == 1 and gate.refused == 1
    assert seen == [("/v2/health/live", None, b"")]  # the refused request never reached the app


def test_a_connection_told_to_wait_gets_its_503_when_the_wait_is_up_and_answers_stay_in_order():
    async def main() -> tuple[Any, ...]:
        gate = _Gate(Refused("the server is full", 0.3))
        proto, t, seen = _connection(gate)
        proto.data_received(REQUEST + PROBE)
        await asyncio.sleep(0.05)
        during = (t.out, t.paused, list(seen))
        await asyncio.sleep(0.6)
        return during, t, seen

    (out_during, paused, seen_during), t, seen = asyncio.run(main())
    assert out_during == b"" and paused and seen_during == []  # held: nothing read, answered or run
    assert _answers(t.out) == [b"503", b"200"] and not t.paused  # then the 503, then the probe behind it
    assert seen == [("/v2/health/live", None, b"")]


def test_an_admitted_request_reaches_the_app_whole_and_marked_admitted():
    async def main() -> tuple[Any, ...]:
        gate = _Gate(True)
        proto, t, seen = _connection(gate)
        proto.data_received(REQUEST[:-2])  # the body arrives in two reads
        await asyncio.sleep(0.01)
        before, held_during = list(seen), gate.held
        proto.data_received(REQUEST[-2:])
        await asyncio.sleep(0.05)
        return before, t, seen, held_during, gate.held

    before, t, seen, held_during, held_after = asyncio.run(main())
    # nothing is decided before the whole body is in; what has arrived is counted (1 of 3 bytes), not what
    # the head declares: a head that declares a body and sends none holds nothing
    assert before == [] and held_during == 1
    assert held_after == 0  # given back once decided (the gate counts it again while it serves it)
    assert seen == [("/v1/classify", True, b"abc")] and _answers(t.out) == [b"200"]


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n" + b"a" * 70000, "large"),
        (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", "another path"),
        (
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "chunked",
        ),
    ],
)
def test_other_requests_are_not_held_and_go_to_the_gate(request_bytes, why):
    async def main() -> tuple[Any, ...]:
        gate = _Gate(Refused("the server is full", 0.0))
        proto, t, seen = _connection(gate)
        proto.data_received(request_bytes)
        await asyncio.sleep(0.05)
        return gate, t, seen

    gate, t, seen = asyncio.run(main())
    assert gate.asked == 0, why
    assert len(seen) == 1 and seen[0][1] is None and _answers(t.out) == [b"200"]


def test_a_connection_close_request_is_refused_and_closed_and_nothing_pipelined_behind_it_runs():
    async def main() -> tuple[_Transport, _Gate, list[tuple[str, Any, bytes]]]:
        gate = _Gate(Refused("the server is full", 0.0))
        proto, t, seen = _connection(gate)
        closing = REQUEST.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
        proto.data_received(closing + REQUEST + PROBE)
        await asyncio.sleep(0.05)
        return t, gate, seen

    t, gate, seen = asyncio.run(main())
    assert _answers(t.out) == [b"503"] and b"connection: close" in t.out and t.closed
    assert gate.asked == 1 and seen == []  # the requests behind it never ran


def test_a_body_still_arriving_behind_an_answer_is_not_cut_by_the_keep_alive_timeout():
    """uvicorn arms its keep-alive timeout after each answer when nothing is queued; a held body is not
    queued, so that timeout closed the connection under a request whose body was still on its way."""

    async def main() -> tuple[_Transport, list[tuple[str, Any, bytes]]]:
        proto, t, seen = _connection(_Gate(True), keep_alive_s=0.1)
        proto.data_received(REQUEST + REQUEST[:-2])  # one whole, the next one's body still arriving
        await asyncio.sleep(0.4)  # past the keep-alive timeout
        proto.data_received(REQUEST[-2:])
        await asyncio.sleep(0.05)
        return t, seen

    t, seen = asyncio.run(main())
    assert _answers(t.out) == [b"200", b"200"] and not t.closed
    assert [body for _path, _admitted, body in seen] == [b"abc", b"abc"]


def test_a_request_read_together_with_a_refused_one_is_not_cut_by_the_keep_alive_timeout():
    """The refusal is written mid-read, which arms uvicorn's keep-alive timeout; the request behind it in the
    same read (its body still arriving) must not be cut by it."""

    class _RefuseFirst(_Gate):
        def admit_early(self, headers: list[tuple[bytes, bytes]], client: Any) -> bool | Refused:
            self.asked += 1
            return Refused("the server is full", 0.0) if self.asked == 1 else True

    async def main() -> _Transport:
        proto, t, _seen = _connection(_RefuseFirst(True), keep_alive_s=0.1)
        proto.data_received(REQUEST + REQUEST[:-2])
        await asyncio.sleep(0.4)  # past the keep-alive timeout
        proto.data_received(REQUEST[-2:])
        await asyncio.sleep(0.05)
        return t

    t = asyncio.run(main())
    assert _answers(t.out) == [b"503", b"200"] and not t.closed


def test_a_shutdown_while_a_body_or_a_503_is_held_answers_it_then_closes():
    async def main() -> tuple[_Transport, _Transport]:
        proto, held_body, _seen = _connection(_Gate(True))
        proto.data_received(REQUEST[:-2])
        proto.shutdown()  # uvicorn's graceful shutdown closes the listener: this request is still owed
        assert not held_body.closed
        proto.data_received(REQUEST[-2:])
        await asyncio.sleep(0.05)
        refused, held_503, _s = _connection(_Gate(Refused("the server is full", 0.2)))
        refused.data_received(REQUEST)
        refused.shutdown()
        await asyncio.sleep(0.4)
        return held_body, held_503

    held_body, held_503 = asyncio.run(main())
    for t in (held_body, held_503):
        assert len(_answers(t.out)) == 1 and b"connection: close" in t.out.lower() and t.closed
    assert _answers(held_503.out) == [b"503"]


def test_a_client_that_leaves_while_its_503_is_held_is_still_counted_as_refused():
    async def main() -> _Gate:
        gate = _Gate(Refused("the server is full", 5.0))
        proto, _t, _seen = _connection(gate)
        proto.data_received(REQUEST)
        await asyncio.sleep(0.05)
        proto.connection_lost(None)
        return gate

    assert asyncio.run(main()).refused == 1


def test_a_held_body_that_never_completes_gets_a_json_408_and_held_bytes_are_given_back():
    async def main() -> tuple[_Transport, _Gate, _Gate]:
        gate = _Gate(True)
        proto, t, _seen = _connection(gate, body_timeout_s=0.2)
        proto.data_received(REQUEST[:-2])
        await asyncio.sleep(0.5)
        proto.connection_lost(None)  # what the closed transport brings
        lost = _Gate(True)
        other, _t, _s = _connection(lost)
        other.data_received(REQUEST[:-2])
        other.connection_lost(None)  # the client went away mid-body
        return t, gate, lost

    t, gate, lost = asyncio.run(main())
    assert _answers(t.out) == [b"408"] and t.closed and b"body_timeout_s=0.2" in t.out
    assert gate.held == 0 and lost.held == 0 and gate.asked == 0


def test_held_bodies_over_the_in_flight_cap_are_refused_as_they_arrive():
    async def main() -> tuple[_Gate, _Transport, list[tuple[str, Any, bytes]]]:
        gate = _Gate(Refused("the server is full", 0.0), room=2)  # a 3-byte body does not fit
        proto, t, seen = _connection(gate)
        proto.data_received(REQUEST)
        await asyncio.sleep(0.05)
        return gate, t, seen

    gate, t, seen = asyncio.run(main())
    assert gate.asked == 0 and seen == [] and gate.held == 0
    assert _answers(t.out) == [b"503"] and t.ended and b"max_inflight_body_mb" in t.out


def test_declared_bodies_that_never_arrive_keep_no_one_out():
    """1,600 heads declaring 64 KiB and sending nothing used to fill max_inflight_body_mb for body_timeout_s:
    now only arrived bytes count, and a request with a wrong key is not held at all (the gate's 401)."""

    async def main() -> tuple[_Gate, _Transport, list[tuple[str, Any, bytes]]]:
        gate = _Gate(True, room=10 * 65536)
        head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n\r\n"
        wrong = _connection(gate)[0]
        wrong.data_received(head.replace(b"Host: x", b"Host: x\r\nAuthorization: Bearer wrong"))
        assert wrong._held is None  # not held: the gate answers it before reading its body
        silent = [_connection(gate)[0] for _ in range(50)]
        for proto in silent:
            proto.data_received(head)
        proto, t, seen = _connection(gate)
        proto.data_received(REQUEST)
        await asyncio.sleep(0.05)
        return gate, t, seen

    _gate, t, seen = asyncio.run(main())
    assert seen == [("/v1/classify", True, b"abc")] and _answers(t.out) == [b"200"]


def test_the_gate_admits_early_once_and_gives_the_slot_back(bundle):
    """The real gate: the protocol's admission counts the request inside once (the gate does not ask again) and
    the slot is given back when it is answered; a wrong key or a draining server leaves the gate to decide."""
    app = create_app(bundle, ServeSettings(name="tiny", api_key="k"))
    state = app.state.roadwork
    gate = app.build_middleware_stack()
    assert gate.admit_early([(b"authorization", b"Bearer x")], None) is False  # a 401 is the gate's
    assert gate.admit_early([], None) is False
    ok = [(b"authorization", b"Bearer k")]
    assert gate.admit_early(ok, ("1.2.3.4", 1)) is True and state.admission.inside == 1
    state.admission.inside -= 1  # what the gate gives back after the answer (below, through the gate)
    state.admission.pending -= 1
    state.draining = True
    assert gate.admit_early(ok, None) is False
    state.draining = False
    adm = state.admission
    adm.inside = gate.settings.max_queue  # full: refused
    adm.refused(("1.2.3.4", 2), 5)  # this connection was told to retry in 5 s and did not wait
    held = gate.admit_early(ok, ("1.2.3.4", 2))
    assert isinstance(held, Refused) and held.wait > 0 and adm.held == 1  # one bound for every held 503
    gate.refuse_early(("1.2.3.4", 2), held, 0.1)
    assert adm.held == 0
    adm.held = gate.settings.max_queue  # as many held as max_queue: answered at once
    now = gate.admit_early(ok, ("1.2.3.4", 2))
    assert isinstance(now, Refused) and now.wait == 0 and adm.held == gate.settings.max_queue
    adm.inside = adm.held = 0
    assert gate.hold_body(gate.total_limit) and not gate.hold_body(1)  # held bodies count in the cap
    gate.release_body(gate.total_limit)
    assert gate.buffered == 0

    async def through_gate() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        assert gate.admit_early(ok, None) is True
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/classify",
            "headers": [*ok, (b"content-type", b"image/jpeg"), (b"content-length", b"3")],
            "client": None,
            "query_string": b"",
            ADMITTED: True,
        }
        messages = [{"type": "http.request", "body": b"abc", "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(m: dict[str, Any]) -> None:
            sent.append(m)

        await gate(scope, receive, send)
        return sent

    sent = asyncio.run(through_gate())
    assert sent[0]["status"] == 400  # not an image: answered, not refused
    assert state.admission.inside == 0 and state.admission.pending == 0


@pytest.mark.parametrize(
    "upgrade",
    [
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
        b"Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n",
    ],
)
@pytest.mark.parametrize("split", [False, True])
def test_an_upgrade_request_is_answered_as_plain_http_with_its_body_and_what_follows(upgrade, split):
    """This server switches to no other protocol: the Upgrade is ignored (RFC 9110 allows it; ``curl --http2``
    sends one). llhttp stops at such a head and used to lose the body (a JSON body read as empty) and every
    pipelined request; also when the body comes in a later read."""

    async def main() -> tuple[Any, ...]:
        proto, t, seen = _connection(_Gate(True))
        head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n" + upgrade + b"Content-Length: 3\r\n\r\n"
        if split:
            proto.data_received(head)
            await asyncio.sleep(0.01)
            proto.data_received(b"abc" + PROBE)
        else:
            proto.data_received(head + b"abc" + PROBE)
        await asyncio.sleep(0.05)
        return t, seen

    t, seen = asyncio.run(main())
    assert _answers(t.out) == [b"200", b"200"] and not t.closed
    assert [(path, body) for path, _, body in seen] == [("/v1/classify", b"abc"), ("/v2/health/live", b"")]
    assert b"upgrade" not in t.out.lower()  # no 101: the answer is plain HTTP/1.1


def test_connect_is_refused_with_a_json_405():
    async def main() -> tuple[Any, ...]:
        proto, t, seen = _connection(_Gate(True))
        proto.data_received(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n" + PROBE)
        await asyncio.sleep(0.05)
        return t, seen

    t, seen = asyncio.run(main())
    assert _answers(t.out) == [b"405"] and t.ended and seen == []
    assert b'"error": "CONNECT is not served' in t.out and b"content-type: application/json" in t.out.lower()


def test_bad_requests_pipelined_behind_good_ones_are_refused_after_their_answers():
    """Several Upgrade requests in one read are each answered (each round of re-parsing answers one); a CONNECT
    or an oversized head behind a good request gets its 405/431 after that request's answer, then the close."""
    up = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    connect = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    big = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (9 * 1024) + b"\r\n\r\n"

    async def main(data: bytes) -> tuple[Any, ...]:
        proto, t, seen = _connection(_Gate(True), max_header_kb=8)
        proto.data_received(data)
        await asyncio.sleep(0.05)
        return t, seen

    t, seen = asyncio.run(main(up * 300 + PROBE))  # many: a loop, not one recursion per request
    assert _answers(t.out) == [b"200"] * 301 and not t.closed and len(seen) == 301
    t, seen = asyncio.run(main(PROBE + up + connect + PROBE))
    assert _answers(t.out) == [b"200", b"200", b"405"] and t.ended and len(seen) == 2
    t, seen = asyncio.run(main(PROBE + big))
    assert _answers(t.out) == [b"200", b"431"] and t.ended and len(seen) == 1


def test_an_answer_before_the_body_leaves_the_rest_of_the_body_a_body():
    """A 401 (or 413) sent before the body arrived: the rest of the body is read and dropped, not parsed as the
    next request's head (it got a bogus 431 and the connection closed), and a pipelined request is answered."""

    async def main() -> tuple[_Transport, list[tuple[str, Any, bytes]]]:
        proto, t, seen = _connection(_Gate(True), max_header_kb=8)
        proto.data_received(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        await asyncio.sleep(0.05)
        for _ in range(10):
            proto.data_received(b"a" * 10_000)
        proto.data_received(PROBE)
        await asyncio.sleep(0.05)
        return t, seen

    t, seen = asyncio.run(main())
    assert _answers(t.out) == [b"401", b"200"] and not t.closed, t.out
    assert [p for p, _, _ in seen] == ["/early", "/v2/health/live"]


def test_a_malformed_body_gets_its_400_at_once():
    """A bad chunk inside the running request's own body: 400 now, not a 408 after body_timeout_s."""

    async def main() -> _Transport:
        proto, t, _seen = _connection(_Gate(True))
        head = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        proto.data_received(head + b"ZZ\r\nabc\r\n")
        await asyncio.sleep(0.05)
        return t

    t = asyncio.run(main())
    assert _answers(t.out) == [b"400"] and t.ended and b"malformed request body" in t.out


def test_a_head_pipelined_behind_a_running_request_has_the_same_limits():
    """While a request runs, a pipelined head used to be parsed without a size limit (61 MB accepted) or a
    timeout: now over max_header_kb it is refused after the running request's answer, and reading stops."""

    async def main() -> tuple[_Transport, list[tuple[str, Any, bytes]]]:
        proto, t, seen = _connection(_Gate(True), max_header_kb=8)
        proto.data_received(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        proto.data_received(b"GET /v2/health/live HTTP/1.1\r\nX-A: ")
        for _ in range(5):
            proto.data_received(b"a" * 4096)
        assert t.paused and _answers(t.out) == []  # reading stopped; the running request not yet answered
        await asyncio.sleep(0.4)
        return t, seen

    t, seen = asyncio.run(main())
    assert _answers(t.out) == [b"200", b"431"] and t.ended and seen == [("/slow", None, b"abc")]


def test_a_head_pipelined_behind_a_running_request_times_out():
    async def main() -> _Transport:
        proto, t, _seen = _connection(_Gate(True), header_timeout_s=0.1)
        proto.data_received(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        proto.data_received(b"GET /v2/health/live HTTP/1.1\r\nX-A: a")  # and then nothing
        await asyncio.sleep(0.5)
        return t

    t = asyncio.run(main())
    assert _answers(t.out) == [b"200", b"408"] and t.ended


def test_a_partial_head_left_after_an_answer_gets_its_408_not_a_keep_alive_close():
    """The answer is out, the next head half in, then silence: uvicorn's keep-alive timer (shorter) closed it
    without a word; now its head timeout answers 408, and the half head counts against max_header_kb whole."""

    async def main() -> _Transport:
        proto, t, _seen = _connection(_Gate(True), keep_alive_s=0.1, header_timeout_s=0.6)
        proto.data_received(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        proto.data_received(b"GET /v2/health/live HTTP/1.1\r\nX-A: a")  # and then nothing
        await asyncio.sleep(0.45)  # answered at 0.2 s; past the keep-alive timeout
        assert _answers(t.out) == [b"200"] and not t.ended
        await asyncio.sleep(0.4)
        return t

    t = asyncio.run(main())
    assert _answers(t.out) == [b"200", b"408"] and t.ended


def test_beyond_max_connections_a_connection_whose_body_never_came_is_closed():
    """No idle connection to close: the oldest one that sent a head and no body goes (it held a descriptor
    until body_timeout_s while probes were reset)."""

    async def main() -> tuple[list[_Transport], _Transport]:
        gate = _Gate(True)
        first, t1, _ = _connection(gate, max_connections=2)
        head = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
        first.data_received(head)
        second = type(first)(config=first.config, server_state=first.server_state, app_state={})
        t2 = _Transport()
        t2.proto = second
        second.connection_made(t2)
        second.data_received(head)
        third = type(first)(config=first.config, server_state=first.server_state, app_state={})
        t3 = _Transport()
        t3.proto = third
        third.connection_made(t3)  # over max_connections=2, nobody idle: the oldest body-less one goes
        third.data_received(PROBE)
        await asyncio.sleep(0.05)
        assert not t2.closed  # (before the loop ends and cancels its handler)
        return [t1, t2], t3

    (t1, _t2), t3 = asyncio.run(main())
    assert t1.closed and _answers(t1.out) == [b"503"] and b"body-less" in t1.out
    assert _answers(t3.out) == [b"200"]


def test_a_malformed_body_pipelined_behind_a_good_request_is_refused_after_its_answer():
    async def main() -> tuple[_Transport, list[tuple[str, Any, bytes]]]:
        proto, t, seen = _connection(_Gate(True))
        bad = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        proto.data_received(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" + bad)
        await asyncio.sleep(0.4)
        return t, seen

    t, seen = asyncio.run(main())
    assert _answers(t.out) == [b"200", b"400"] and t.ended and seen[0] == ("/slow", None, b"abc")


def test_a_client_that_does_not_read_its_answer_is_closed_and_goes_first_beyond_max_connections():
    """135 connections pipelining GET /metrics and never reading held their descriptors forever (probes failed
    under a 150-fd limit): now each has body_timeout_s to read, and they are evicted before body-less ones."""

    async def main() -> None:
        first, t1, _ = _connection(_Gate(True), max_connections=2, body_timeout_s=0.2)

        def another() -> tuple[Any, _Transport]:  # on the same server (its limits and connections)
            proto = type(first)(config=first.config, server_state=first.server_state, app_state={})
            t = _Transport()
            t.proto = proto
            proto.connection_made(t)
            return proto, t

        first.data_received(PROBE)
        await asyncio.sleep(0.05)
        first.pause_writing()  # what asyncio calls when the socket's buffer is full
        second, t2 = another()
        second.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        third, t3 = another()  # over max_connections: the one not reading goes, not the body-less one
        assert t1.aborted and not t2.closed
        third.data_received(PROBE)
        await asyncio.sleep(0.05)
        third.pause_writing()
        await asyncio.sleep(0.4)  # past body_timeout_s: the one not reading is closed
        assert t3.aborted and not t2.closed

    asyncio.run(main())


def test_a_body_that_times_out_gives_its_reservation_back_before_its_408_is_written(bundle):
    """The refusal is awaited (a slow client reads it slowly): meanwhile its declared bytes no longer count."""
    app = create_app(bundle, ServeSettings(name="tiny", body_timeout_s=0.05))
    gate = app.build_middleware_stack()

    class _Seen:
        status = 0

        async def refuse(self, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
            self.status, self.buffered = status, gate.buffered

    async def main() -> _Seen:
        never = asyncio.Event()

        async def silent() -> dict[str, Any]:
            await never.wait()
            return {"type": "http.disconnect"}

        seen = _Seen()
        scope = {"headers": [(b"content-length", b"500000")]}
        assert await gate._body(scope, silent, seen) is None
        return seen

    seen = asyncio.run(main())
    assert seen.status == 408 and seen.buffered == 0 and gate.buffered == 0


def test_a_connection_refused_while_its_body_arrives_lingers_then_closes(monkeypatch):
    """A close with unread bytes is a TCP reset that can beat the answer to the client (a 60 MiB POST to
    /metrics saw ConnectionResetError, not its 405): the answer and a FIN go out, what still arrives is read and
    dropped, and the connection closes after LINGER_IDLE_S of silence or body_timeout_s in all."""
    monkeypatch.setattr(linger, "LINGER_IDLE_S", 0.1)

    async def main() -> None:
        proto, t, seen = _connection(_Gate(True), body_timeout_s=0.5)
        head = b"POST /early HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1000000\r\n\r\n"
        proto.data_received(head + b"x" * 1000)
        await asyncio.sleep(0.02)
        assert _answers(t.out) == [b"401"] and t.eof and not t.closed  # answered, FIN sent, still reading
        assert proto.limits.lingering and proto.transport.is_closing()
        proto.data_received(PROBE)  # the rest of the body, whatever it looks like: dropped, never parsed
        await asyncio.sleep(0.05)
        assert not t.closed and _answers(t.out) == [b"401"] and seen == [("/early", None, b"")]
        await asyncio.sleep(0.2)  # then silence beyond LINGER_IDLE_S: closed
        assert t.closed and not t.aborted
        await asyncio.sleep(0.01)
        assert not proto.limits.lingering  # forgotten once lost

        proto, t, _ = _connection(_Gate(True), body_timeout_s=0.3)
        proto.data_received(head)
        for _ in range(10):  # a client that keeps sending: closed when body_timeout_s is up
            await asyncio.sleep(0.05)
            proto.data_received(b"x" * 100)
        assert t.closed and t.eof

    asyncio.run(main())


def test_a_connection_with_nothing_more_to_send_closes_at_once():
    async def main() -> None:
        proto, t, _ = _connection(_Gate(True))
        proto.data_received(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await asyncio.sleep(0.05)
        assert _answers(t.out) == [b"200"] and t.closed and not t.eof
        proto, t, _ = _connection(_Gate(True), header_timeout_s=0.05)
        await asyncio.sleep(0.1)  # a silent connection's 408: nothing was being sent
        assert _answers(t.out) == [b"408"] and t.closed and not t.eof

    asyncio.run(main())


def test_beyond_max_connections_a_lingering_connection_goes_first():
    async def main() -> None:
        first, t1, _ = _connection(_Gate(True), max_connections=2)
        first.data_received(
            b"POST /early HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 99\r\n\r\n"
        )
        await asyncio.sleep(0.02)
        assert t1.eof and not t1.closed

        def another() -> tuple[Any, _Transport]:
            proto = type(first)(config=first.config, server_state=first.server_state, app_state={})
            t = _Transport()
            t.proto = proto
            proto.connection_made(t)
            return proto, t

        _second, t2 = another()  # idle
        _third, t3 = another()  # over max_connections: the lingering one goes, not the idle one
        assert t1.closed and not t2.closed and not t3.closed

    asyncio.run(main())


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate,chunked", b"identity, chunked"])
def test_a_transfer_coding_other_than_chunked_is_a_json_501(coding):
    async def main() -> tuple[_Transport, list[tuple[str, Any, bytes]]]:
        proto, t, seen = _connection(_Gate(True))
        head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: %s\r\n\r\n" % coding
        proto.data_received(head + b"3\r\nabc\r\n0\r\n\r\n")
        await asyncio.sleep(0.05)
        return t, seen

    t, seen = asyncio.run(main())
    assert _answers(t.out) == [b"501"] and b"is not supported" in t.out and t.ended and seen == []


def test_plain_chunked_bodies_still_arrive():
    async def main() -> list[tuple[str, Any, bytes]]:
        proto, _t, seen = _connection(_Gate(True))
        head = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n"
        proto.data_received(head + b"3\r\nabc\r\n0\r\n\r\n")
        await asyncio.sleep(0.05)
        return seen

    assert asyncio.run(main()) == [("/x", None, b"abc")]


def test_a_shutdown_ends_a_lingering_connection_and_nothing_lingers_after_it():
    """A client trickling its refused body held SIGTERM's exit up to drain_timeout_s."""

    async def main() -> None:
        proto, t, _ = _connection(_Gate(True))
        proto.data_received(
            b"POST /early HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 99\r\n\r\n"
        )
        await asyncio.sleep(0.02)
        assert t.eof and not t.closed  # lingering
        proto.shutdown()
        assert t.closed
        proto, t, _ = _connection(_Gate(True))
        proto.data_received(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n")
        proto.shutdown()  # in a shutdown the answer closes the connection, without lingering
        await asyncio.sleep(0.02)
        assert _answers(t.out) == [b"401"] and t.closed and not t.eof

    asyncio.run(main())


def test_the_connections_an_event_loop_accepts_at_once_are_kept_free_below_the_fd_limit():
    from roadwork.serve.protocol import raise_fd_limit

    limit = raise_fd_limit()
    plain = guarded_protocol(ServeSettings(), ServerMetrics())
    batched = guarded_protocol(ServeSettings(), ServerMetrics(), accept_batch=128)
    assert plain.limits.max_connections - batched.limits.max_connections == 128  # type: ignore[attr-defined]
    assert plain.limits.max_connections == max(limit - 64, 16)  # type: ignore[attr-defined]
