"""Batch limits measured on the service's own hardware for a p99 latency target (CROSSVIT_CALIBRATE_P99_MS).

Hand-set limits (8 images, 5 ms) were measured on one CPU; the best batch differs between CPUs and
again on a GPU. With a target set, the engine times every batch size from 1 to MAX_BATCH_SIZE once
its workers are ready, all workers computing at once (as under load, sharing the cores), and takes
the largest batch whose worst case still fits the target with headroom.

The latency model is the batching path's own: an image that arrives while every worker is busy waits
for the batch ahead of it, then for its own, after at most the batch delay, so delay + 2 x t(batch).
What it cannot bound is a backlog: with more images in flight than the workers finish within the
target, each waits for the ones queued ahead of it (in flight / throughput, Little's law). MAX_QUEUE
bounds that; the calibration reports the throughput to set it by.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from ..golden import golden_pixels, reference_decode
from ..imaging.preprocess import InputSpec

__all__ = ["HEADROOM", "BatchTiming", "Calibration", "calibrate", "calibrate_pool", "choose"]

logger = logging.getLogger(__name__)

HEADROOM = 0.8  # of the target the model's worst case may use: p99 sees scheduling noise the model does not
ROUNDS = 3  # timed rounds per batch size, after one untimed
WAIT_AFTER_FIRST_S = 30.0  # a worker that keeps failing to start holds the ready ones back this long, at most


class Workers(Protocol):
    """What calibrating needs of the worker pool."""

    @property
    def ready_count(self) -> int: ...

    async def run_everywhere(self, pixels: np.ndarray) -> int: ...


@dataclass(frozen=True)
class BatchTiming:
    batch: int
    round_ms: float  # median wall time of one batch on every worker at once
    images_per_s: float  # over all workers


@dataclass(frozen=True)
class Calibration:
    target_p99_ms: float
    max_batch_size: int
    max_batch_delay_ms: float
    predicted_ms: float  # the model's worst case for the chosen limits: delay + 2 x t(batch)
    images_per_s: float  # measured at the chosen batch, every worker busy
    timings: tuple[BatchTiming, ...]
    seconds: float  # what calibrating cost at start

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "timings": [asdict(t) for t in self.timings]}


def choose(timings: list[BatchTiming], target_ms: float) -> tuple[BatchTiming, float, float]:
    """The largest batch whose delay + 2 x t(batch) fits HEADROOM x target (else batch 1), the delay that
    gathers it at the measured throughput (capped by what the target leaves), and the predicted worst case."""
    budget = HEADROOM * target_ms
    fitting = [t for t in timings if 2 * t.round_ms <= budget]
    best = max(fitting, key=lambda t: t.batch) if fitting else min(timings, key=lambda t: t.batch)
    fill_ms = 1000 * (best.batch - 1) / best.images_per_s  # a full batch's images arriving at full throughput
    delay = max(0.0, min(fill_ms, budget - 2 * best.round_ms))
    return best, round(delay, 1), round(delay + 2 * best.round_ms, 1)


async def calibrate(run_everywhere: Callable[[int], Awaitable[int]], max_batch: int, target_ms: float) -> Calibration:
    """`run_everywhere(n)` runs a batch of n images on every ready worker at once and returns how many ran it."""
    started = time.perf_counter()
    timings = []
    for batch in range(1, max_batch + 1):
        await run_everywhere(batch)  # the first run of a size may carry one-off costs
        rounds, workers = [], 1
        for _ in range(ROUNDS):
            begun = time.perf_counter()
            workers = await run_everywhere(batch)
            rounds.append(time.perf_counter() - begun)
        seconds = statistics.median(rounds)
        timings.append(BatchTiming(batch, round(1000 * seconds, 2), round(workers * batch / seconds, 1)))
    best, delay, predicted = choose(timings, target_ms)
    return Calibration(target_ms, best.batch, delay, predicted, best.images_per_s, tuple(timings),
                       round(time.perf_counter() - started, 2))


async def calibrate_pool(pool: Workers, spec: InputSpec, max_batch: int, target_ms: float, *, workers: int,
                         start_timeout_s: float) -> Calibration | None:
    """Wait for the pool's `workers` (at most WAIT_AFTER_FIRST_S past the first ready one), then calibrate on
    the golden images; None (and the hand-set limits stay) when no worker came up."""
    deadline = time.monotonic() + start_timeout_s
    while pool.ready_count < workers and time.monotonic() < deadline:
        if pool.ready_count:
            deadline = min(deadline, time.monotonic() + WAIT_AFTER_FIRST_S)
        await asyncio.sleep(0.1)
    if pool.ready_count == 0:
        logger.warning("no worker ready to calibrate on; keeping the configured batch limits")
        return None
    logger.info("calibrating the batch limits", extra={"target_p99_ms": target_ms, "workers": pool.ready_count})
    golden = await asyncio.to_thread(golden_pixels, reference_decode(spec))
    pixels = np.concatenate([golden] * -(-max_batch // len(golden)))  # any pixels time the same: real ones

    async def run_everywhere(batch: int) -> int:
        return await pool.run_everywhere(pixels[:batch])

    result = await calibrate(run_everywhere, max_batch, target_ms)
    logger.info("batch limits calibrated", extra={
        "target_p99_ms": target_ms, "max_batch_size": result.max_batch_size,
        "max_batch_delay_ms": result.max_batch_delay_ms, "predicted_ms": result.predicted_ms,
        "images_per_s": result.images_per_s, "calibration_s": result.seconds,
        "batch_ms": ",".join(f"{t.batch}:{t.round_ms}" for t in result.timings)})
    if result.predicted_ms > target_ms:
        logger.warning("no batch size keeps the p99 target on this hardware; serving batches of 1",
                       extra={"target_p99_ms": target_ms, "predicted_ms": result.predicted_ms})
    return result
