"""From settings and verified weights to a running engine's configuration, without HTTP.

Where each worker goes (devices, threads), which backend and precision it tries, where converted
models are cached: decided here, in the API process, once per start. `create_app`'s lifespan uses it,
`crossvit-serve --prepare-only` too, and a test can start an `Engine` from it with no app around.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from model.variants import Variant, get_variant
from weights.labels import load_labels

from ..imaging.preprocess import InputSpec
from ..settings import Settings
from ..worker.backends import BackendChoice, NotPreparedError, QuantizationRefusedError, resolve_backend
from ..worker.main import build_backend
from ..worker.protocol import ReplicaSpec
from .engine import EngineConfig
from .loading import LoadedWeights, WeightsError, load_weights, model_cache_dir
from .placement import cuda_device_count, plan_workers, usable_cpus
from .pool import shared_threads
from .watchdog import WatchdogConfig

__all__ = ["engine_config", "model_cache_dir", "prepare"]

logger = logging.getLogger(__name__)


def engine_config(settings: Settings, variant: Variant, weights: LoadedWeights) -> EngineConfig:
    try:
        labels = load_labels(settings.labels_file)
    except OSError as exc:
        raise ValueError(f"CROSSVIT_LABELS_FILE cannot be read: {exc}") from None
    if len(labels) != variant.config.num_classes:
        raise ValueError(f"{settings.labels_file} names {len(labels)} classes; {variant.name} has "
                         f"{variant.config.num_classes}")
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
            worker_id=i, variant=variant.name, weights=None if weights.path is None else str(weights.path),
            weights_sha256=weights.sha256, weights_source=weights.source, pretrained=weights.pretrained,
            device=p.device, backend=choice.name, backend_fallback=choice.fallback, precision=settings.precision,
            threads=p.threads, thread_options=options, max_batch_size=settings.max_batch_size,
            cache_dir=str(model_cache_dir(settings)) if choice.name == "openvino" else None,
            log_level=settings.log_level, log_format=settings.log_format,
            labels_file=None if settings.labels_file is None else str(settings.labels_file),
            calibration_dir=None if settings.calibration_dir is None else str(settings.calibration_dir),
            abort_modes=tuple(settings.test_abort_modes),
        )
        replicas.append((spec, choice))
    threads = settings.preprocess_threads
    return EngineConfig(
        input_spec=InputSpec.from_variant(variant),
        labels=labels,
        replicas=[spec for spec, _ in replicas],
        max_batch_size=settings.max_batch_size,
        max_batch_delay_ms=settings.max_batch_delay_ms,
        max_queue=settings.max_queue,
        max_image_pixels=settings.max_image_pixels,
        preprocess_threads=usable_cpus() if threads == "auto" else int(threads),
        cpu_budget=cpu_budget,
        watchdog=WatchdogConfig(settings.watchdog_floor_s, settings.watchdog_multiplier,
                                settings.worker_start_timeout_s),
        self_test=settings.self_test,
        calibrate_p99_ms=settings.calibrate_p99_ms,
        test_preprocess_fault=None if settings.test_preprocess_fault == "none" else settings.test_preprocess_fault,
    )


def prepare(settings: Settings) -> int:
    """Everything a start would do before serving, once, in this process: resolve and verify the
    weights, prepare the OpenVINO model into CACHE_DIR (needs torch, unless it is there already), quantise
    it for precision int8 (needs NNCF, unless cached) and check its mode. Exit status for the CLI."""
    variant = get_variant(settings.model)
    with tempfile.TemporaryDirectory(prefix="crossvit-") as scratch:
        try:
            weights = load_weights(settings, Path(scratch))
        except WeightsError as exc:
            logger.error("cannot prepare: %s", exc)
            return 2
        on_cuda = settings.device.startswith("cuda") or (settings.device == "auto" and cuda_device_count() > 0)
        try:
            choice = resolve_backend(settings.backend, "cuda" if on_cuda else "cpu", settings.precision)
        except ValueError as exc:  # a backend asked for but not installed
            logger.error("cannot prepare: %s", exc)
            return 2
        if choice.name == "torch":  # PyTorch loads the checkpoint as it is: nothing to convert
            logger.info("prepared: weights verified; the torch backend converts nothing",
                        extra={"sha256": weights.sha256})
            return 0
        try:
            spec = engine_config(settings, variant, weights).replicas[0]
        except ValueError as exc:
            logger.error("cannot prepare: %s", exc)
            return 2
        compiled = model_cache_dir(settings) / "compiled"
        blobs_before = compiled.exists()
        try:
            built, details = build_backend(spec)
        except (NotPreparedError, QuantizationRefusedError) as exc:
            logger.error("cannot prepare: %s", exc)
            return 2
        finally:
            if not blobs_before:  # OpenVINO's compiled blobs belong to this CPU: not to bake into an image
                shutil.rmtree(compiled, ignore_errors=True)
    logger.info("prepared", extra={"backend": built.backend.name, "mode": built.backend.mode,
                                   "cache_dir": spec.cache_dir, **details})
    return 0
