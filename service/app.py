"""`create_app(settings)`: the FastAPI app, its lifespan, and the wiring of its parts."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI

from model.variants import Variant, get_variant
from weights.labels import imagenet_labels

from . import __version__, errors, openapi, page, routes, v2
from .backends import BackendChoice, resolve_backend
from .bodies import UploadBudget
from .deps import AppState
from .devices import plan_workers, usable_cpus
from .engine import Engine, EngineConfig
from .loading import LoadedWeights, WeightsError, load_weights
from .metrics import Metrics
from .middleware import RequestContext
from .preprocess import InputSpec
from .probes import Heartbeat
from .protocol import ReplicaSpec
from .replica import build_backend
from .settings import Settings
from .watchdog import WatchdogConfig
from .workers import shared_threads

__all__ = ["create_app", "prepare"]

logger = logging.getLogger(__name__)

WORKER_STOP_TIMEOUT_S = 5.0


def engine_config(settings: Settings, variant: Variant, weights: LoadedWeights) -> EngineConfig:
    placements = plan_workers(settings.device, settings.workers, settings.threads_per_worker)
    cpu_budget = usable_cpus() if settings.threads_per_worker == "auto" else None
    cpu_workers = sum(p.device == "cpu" for p in placements)
    replicas: list[tuple[ReplicaSpec, BackendChoice]] = []
    for i, p in enumerate(placements):
        choice = resolve_backend(settings.backend, p.device, settings.precision)
        if i == 0 or choice != replicas[-1][1]:
            logger.info("backend chosen", extra={"backend": choice.name, "device": p.device, "reason": choice.reason})
        options = (p.threads,) if p.device != "cpu" else tuple(sorted(
            {shared_threads(p.threads, cpu_budget, busy) for busy in range(1, cpu_workers + 1)}
        ))
        spec = ReplicaSpec(
            worker_id=i, variant=variant.name, weights=str(weights.path), weights_sha256=weights.sha256,
            device=p.device, backend=choice.name, backend_fallback=choice.fallback, precision=settings.precision,
            threads=p.threads, thread_options=options, max_batch_size=settings.max_batch_size,
            cache_dir=str(model_cache_dir(settings)) if choice.name == "openvino" else None,
            log_level=settings.log_level, log_format=settings.log_format,
            abort_modes=tuple(settings.test_abort_modes),
        )
        replicas.append((spec, choice))
    threads = settings.preprocess_threads
    return EngineConfig(
        input_spec=InputSpec.from_variant(variant),
        labels=imagenet_labels(),
        replicas=[spec for spec, _ in replicas],
        max_batch_size=settings.max_batch_size,
        max_batch_delay_ms=settings.max_batch_delay_ms,
        max_queue=settings.max_queue,
        max_image_pixels=settings.max_image_pixels,
        preprocess_threads=usable_cpus() if threads == "auto" else int(threads),
        cpu_budget=cpu_budget,
        watchdog=WatchdogConfig(settings.watchdog_floor_s, settings.watchdog_multiplier,
                                settings.worker_start_timeout_s),
    )


def model_cache_dir(settings: Settings) -> Path:
    """Converted models: CROSSVIT_CACHE_DIR, else a hidden folder beside the weights."""
    return settings.cache_dir if settings.cache_dir is not None else settings.weights_dir / ".cache" / "models"


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
            "file": weights.path.name,  # not the absolute path: /v1/models may be open to anyone
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


def prepare(settings: Settings) -> int:
    """Everything a start would do before serving, once, in this process: resolve and verify the
    weights, convert the model into CACHE_DIR and check its mode. Exit status for the CLI."""
    variant = get_variant(settings.model)
    with tempfile.TemporaryDirectory(prefix="crossvit-") as scratch:
        try:
            weights = load_weights(settings, Path(scratch))
        except WeightsError as exc:
            logger.error("cannot prepare: %s", exc)
            return 2
        on_cuda = settings.device.startswith("cuda") or (settings.device == "auto" and torch.cuda.is_available())
        try:
            choice = resolve_backend(settings.backend, "cuda" if on_cuda else "cpu", settings.precision)
        except ValueError as exc:  # openvino asked for but not installed
            logger.error("cannot prepare: %s", exc)
            return 2
        if choice.name == "torch":  # PyTorch loads the checkpoint as it is: nothing to convert
            logger.info("prepared: weights verified; the torch backend converts nothing",
                        extra={"sha256": weights.sha256})
            return 0
        spec = engine_config(settings, variant, weights).replicas[0]
        built, details = build_backend(spec, torch.device(spec.device))
    logger.info("prepared", extra={"backend": built.backend.name, "mode": built.backend.mode,
                                   "cache_dir": spec.cache_dir, **details})
    return 0


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
            app.state.heartbeat = heartbeat  # the probe listener's view of this loop (service/probes.py)
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
    app.include_router(routes.router)
    app.include_router(v2.router(settings))
    app.include_router(page.router())
    errors.install(app)
    openapi.install(app, settings, len(imagenet_labels()))
    app.add_middleware(RequestContext, metrics=metrics)
    app.state.metrics = metrics  # the probe listener serves them too
    return app
