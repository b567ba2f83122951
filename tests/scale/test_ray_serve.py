"""The bundle as a Ray Serve deployment, locally: same answers as the bundle, 400 on a bad image."""

from __future__ import annotations

import pytest

serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")


def test_ray_serve_deployment_answers_like_the_bundle(tiny_run):
    import socket

    import ray

    from roadwork.export.bundle import Bundle
    from roadwork.scale.ray_serve import app, build_app

    _, result = tiny_run
    images = sorted((result.run_dir / "data" / "images").glob("*.jpg"))[:4]
    want = [
        {k: v for k, v in r.items() if k != "path"} for r in Bundle.load(result.bundle).predict_paths(images)
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(str(result.bundle), max_replicas=1, max_batch_size=4), route_prefix="/roadwork")
        with httpx.Client(timeout=60) as c:
            got = [c.post(f"http://127.0.0.1:{port}/roadwork", content=p.read_bytes()).json() for p in images]
            bad = c.post(f"http://127.0.0.1:{port}/roadwork", content=b"not an image")
        assert got == want
        assert bad.status_code == 400 and "error" in bad.json()
        assert build_app({"bundle": str(result.bundle), "max_replicas": "1"}) is not None
    finally:
        serve.shutdown()
        ray.shutdown()
