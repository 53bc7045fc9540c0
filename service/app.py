"""`create_app(settings)`: the FastAPI app, its lifespan, and the wiring of its parts."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from model.variants import Variant, get_variant
from weights.labels import imagenet_labels

from . import __version__, errors
from .api import openapi, page, v1, v2
from .api.deps import AppState
from .api.middleware import RequestContext
from .api.probes import Heartbeat
from .inference.assembly import engine_config
from .inference.engine import Engine
from .inference.loading import LoadedWeights, WeightsError, load_weights
from .metrics import Metrics
from .settings import Settings
from .uploads.bodies import UploadBudget

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

WORKER_STOP_TIMEOUT_S = 5.0


def model_card(settings: Settings, variant: Variant, weights: LoadedWeights, labels: int) -> dict[str, Any]:
    """The static part of /v1/models; the serving part is read from the engine per request."""
    data = variant.to_dict()
    return {
        "name": variant.name,
        "variant": {k: data[k] for k in ("name", "hub_id", "official_url", "license", "paper_top1", "timm_top1")},
        "config": variant.config.to_dict(),
        "parameters": weights.parameters,
        "input": {
            "resolutions": list(variant.config.img_size),
            "resize": variant.resize_size,
            "crop": variant.input_size,
            "crop_pct": variant.crop_pct,
            "interpolation": variant.interpolation,
            "mean": list(variant.mean),
            "std": list(variant.std),
        },
        "weights": {
            "source": weights.source,
            "file": weights.file,  # not the absolute path: /v1/models may be open to anyone
            "sha256": weights.sha256,
            "pretrained": weights.pretrained,
        },
        "labels": labels,
        "limits": {
            "max_upload_bytes": settings.max_upload_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_images_per_request": settings.max_images_per_request,
            "request_timeout_s": settings.request_timeout_s,
        },
    }


def log_auth(settings: Settings) -> None:
    """Once per start: whether the API is protected, and by how many keys (never the keys)."""
    if settings.api_keys:
        logger.info("authentication on: the API needs a bearer key", extra={"api_keys": len(settings.api_keys)})
    else:
        logger.info("authentication off: the API is open to anyone who reaches the port (CROSSVIT_API_KEYS unset)")


def create_app(settings: Settings) -> FastAPI:
    """Wire the app; nothing heavy runs until the lifespan starts the engine."""
    metrics = Metrics(max_batch_size=settings.max_batch_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[AppState]:
        log_auth(settings)
        variant = get_variant(settings.model)
        with tempfile.TemporaryDirectory(prefix="crossvit-") as scratch:
            try:  # may download (first run) and hashes the file: off the event loop
                weights = await asyncio.to_thread(load_weights, settings, Path(scratch))
            except WeightsError as exc:
                logger.error("cannot start: %s", exc)
                raise
            try:
                config = engine_config(settings, variant, weights)
            except (RuntimeError, ValueError) as exc:  # no such device, backend not installed
                logger.error("cannot start: %s", exc)
                raise
            card = model_card(settings, variant, weights, len(config.labels))
            uploads = UploadBudget(settings.upload_budget_bytes, metrics.rejected.labels("upload_budget").inc)
            stop_timeout_s = WORKER_STOP_TIMEOUT_S
            heartbeat = Heartbeat()
            beating = asyncio.get_running_loop().create_task(heartbeat.run(), name="heartbeat")
            app.state.heartbeat = heartbeat  # the probe listener's view of this loop (service/api/probes.py)
            try:
                async with Engine.start(config, metrics, stop_timeout_s=stop_timeout_s) as engine:
                    app.state.engine = engine  # for the CLI's SIGTERM drain and the probe listener
                    yield {"settings": settings, "engine": engine, "weights": weights, "metrics": metrics,
                           "model_card": card, "uploads": uploads}
            finally:
                beating.cancel()

    app = FastAPI(
        title="crossvit-serve",
        version=__version__,
        summary="CrossViT image classification (ImageNet-1k) over HTTP",
        lifespan=lifespan,
    )
    app.include_router(v1.router)
    app.include_router(v2.router(settings))
    app.include_router(page.router())
    errors.install(app)
    openapi.install(app, settings, len(imagenet_labels()))
    app.add_middleware(RequestContext, metrics=metrics)
    app.state.metrics = metrics  # the probe listener serves them too
    return app
