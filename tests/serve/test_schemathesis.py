"""A bounded schemathesis run (fixed seed, few examples per operation) against the real server on 127.0.0.1:
bodies generated from the OpenAPI schema get no 5xx, and every answer conforms to the schema (status codes,
content types, bodies)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from roadwork.serve import ServeSettings, create_app

schemathesis = pytest.importorskip("schemathesis")
uvicorn = pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)


@pytest.fixture(scope="module")
def api_schema(tiny_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(tiny_run[1].bundle, ServeSettings(name="tiny", max_queue_delay_ms=1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
    server.should_exit = True
    thread.join(30)


def test_generated_requests_get_no_5xx_and_conform_to_the_schema(api_schema):
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    ran = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=10,
            derandomize=True,  # a fixed seed: the same requests every run
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        def run(case):  # type: ignore[no-untyped-def]
            case.call_and_validate(checks=checks, timeout=30)

        run()
        ran.append(f"{operation.method.upper()} {operation.path}")
    assert {"POST /v2/models/{name}/infer", "POST /v1/classify", "GET /v2/models/{name}/config"} <= set(ran)
