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

from . import __version__, errors, page, routes
from .devices import plan_workers, usable_cpus
from .engine import Engine, EngineConfig
from .loading import LoadedWeights, WeightsError, load_weights
from .metrics import Metrics
from .middleware import RequestContext
from .preprocess import InputSpec
from .replica import ReplicaSpec
from .routes import AppState
from .settings import Settings

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

WORKER_STOP_TIMEOUT_S = 5.0


def engine_config(settings: Settings, variant: Variant, weights: LoadedWeights) -> EngineConfig:
    placements = plan_workers(settings.device, settings.workers, settings.threads_per_worker)
    replicas = [
        ReplicaSpec(
            worker_id=i, variant=variant.name, weights=str(weights.path), device=p.device,
            precision=settings.precision, threads=p.threads, max_batch_size=settings.max_batch_size,
            log_level=settings.log_level, log_format=settings.log_format,
        )
        for i, p in enumerate(placements)
    ]
    threads = settings.preprocess_threads
    return EngineConfig(
        input_spec=InputSpec.from_variant(variant),
        labels=imagenet_labels(),
        replicas=replicas,
        max_batch_size=settings.max_batch_size,
        max_batch_delay_ms=settings.max_batch_delay_ms,
        max_queue=settings.max_queue,
        max_image_pixels=settings.max_image_pixels,
        preprocess_threads=usable_cpus() if threads == "auto" else int(threads),
        cpu_budget=usable_cpus() if settings.threads_per_worker == "auto" else None,
    )


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
            "path": str(weights.path),
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


def create_app(settings: Settings) -> FastAPI:
    """Wire the app; nothing heavy runs until the lifespan starts the engine."""
    metrics = Metrics(max_batch_size=settings.max_batch_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[AppState]:
        variant = get_variant(settings.model)
        with tempfile.TemporaryDirectory(prefix="crossvit-") as scratch:
            try:  # may download (first run) and hashes the file: off the event loop
                weights = await asyncio.to_thread(load_weights, settings, Path(scratch))
            except WeightsError as exc:
                logger.error("cannot start: %s", exc)
                raise
            config = engine_config(settings, variant, weights)
            card = model_card(settings, variant, weights, len(config.labels))
            stop_timeout_s = WORKER_STOP_TIMEOUT_S
            async with Engine.start(config, metrics, stop_timeout_s=stop_timeout_s) as engine:
                app.state.engine = engine  # for the CLI's SIGTERM drain, which runs outside requests
                yield {"settings": settings, "engine": engine, "weights": weights, "metrics": metrics,
                       "model_card": card}

    app = FastAPI(
        title="crossvit-serve",
        version=__version__,
        summary="CrossViT image classification (ImageNet-1k) over HTTP",
        lifespan=lifespan,
    )
    app.include_router(routes.router)
    app.include_router(page.router())
    errors.install(app)
    app.add_middleware(RequestContext, metrics=metrics)
    return app
