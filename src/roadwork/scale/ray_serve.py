"""The bundle as a Ray Serve deployment, for teams whose cluster is Ray rather than Kubernetes.

    from ray import serve
    from roadwork.scale.ray_serve import app
    serve.run(app("runs/demo/export/bundle", max_replicas=4), route_prefix="/roadwork")

or, with Ray's CLI: ``serve run roadwork.scale.ray_serve:build_app bundle=runs/demo/export/bundle``.

``POST`` an image (raw bytes) to the route; the answer is the same JSON record ``roadwork predict`` prints
(label, probability, prediction set, abstain, stage[, score]). Requests are batched with ``@serve.batch``
(``max_batch_size``, ``batch_wait_timeout_s``) and replicas autoscale between ``min_replicas`` and
``max_replicas`` on ongoing requests. A bad image is a 400 with a JSON ``{"error": ...}``; it never fails the
batch it would have joined, because images are decoded before batching.
"""

from __future__ import annotations

from typing import Any

from roadwork._deps import require

__all__ = ["app", "build_app"]


def app(
    bundle_dir: str,
    *,
    min_replicas: int = 1,
    max_replicas: int = 2,
    target_ongoing_requests: float = 16,
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.005,
    num_cpus: float = 1,
    max_pixels: int | None = None,
    variant: str = "auto",
) -> Any:
    """A Ray Serve application (``serve.run`` it) serving ``bundle_dir``; ``variant``: the bundle's model variant
    (``auto``: the runtime × precision ``roadwork bench BUNDLE select=true`` recorded, fp32 without one)."""
    serve = require("ray.serve")
    from pathlib import Path

    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from roadwork.serve.settings import ServeSettings

    bundle_dir = str(Path(bundle_dir).resolve())
    pixel_limit = max_pixels or ServeSettings().max_pixels  # the HTTP server's limit (decompression bombs)

    @serve.deployment(
        autoscaling_config={
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests,
        },
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=4 * max_batch_size,
    )
    class RoadworkDeployment:
        def __init__(self, path: str) -> None:
            from roadwork.export.bundle import Bundle

            self.bundle = Bundle.load(path, variant=variant)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def predict(self, images: list[Any]) -> list[dict[str, Any]]:
            return self.bundle.predict_images(images).records(self.bundle.classes)

        async def __call__(self, request: Request) -> Any:
            from roadwork.serve.decode import RequestError, decode_image

            try:
                image = decode_image(
                    await request.body(),
                    max_pixels=pixel_limit,
                    what="image",
                    min_side=self.bundle.decode_side,  # the run's decode side: the certified logits
                )
            except RequestError as e:
                return JSONResponse({"error": e.message}, status_code=e.status)
            return await self.predict(image)

    return RoadworkDeployment.bind(bundle_dir)  # type: ignore[attr-defined]


def build_app(args: dict[str, str]) -> Any:
    """For ``serve run roadwork.scale.ray_serve:build_app bundle=PATH [variant=auto] [max_replicas=4 ...]``."""
    if "bundle" not in args:
        from roadwork.errors import ConfigError

        raise ConfigError(
            "serve run roadwork.scale.ray_serve:build_app needs bundle=PATH (a roadwork bundle folder)."
        )
    numbers = {k: float(v) if "." in v else int(v) for k, v in args.items() if k not in ("bundle", "variant")}
    return app(args["bundle"], variant=args.get("variant", "auto"), **numbers)  # type: ignore[arg-type]
