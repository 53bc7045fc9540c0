"""The async boundary the routes call: admission, preprocessing, deadlines, branch mean, top-k.

Routes hand over image bytes and a deadline and get predictions back; everything between
(thread pool, queue, batcher, worker processes) lives behind `Engine.classify`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..errors import DeadlineExceededError, NotReadyError, OverloadedError
from ..imaging.preprocess import DecodeCancelled, InputSpec, Preprocessed, preprocess
from ..metrics import Metrics
from ..worker.protocol import ReplicaSpec
from .agreement import Agreement, branch_agreement, log_softmax
from .batcher import Batcher, ImageQueue
from .calibration import Calibration, calibrate_pool
from .items import Pending
from .pool import WorkerPool
from .selftest import SelfTest
from .watchdog import WatchdogConfig

__all__ = ["Classification", "Engine", "EngineConfig", "ImageResult", "Prediction"]

logger = logging.getLogger(__name__)

RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1, 30
GOLDEN_MAX_PIXELS = 1_000_000
T = TypeVar("T")


@dataclass(frozen=True)
class Prediction:
    class_id: int
    label: str
    logit: float
    probability: float


@dataclass(frozen=True)
class ImageResult:
    index: int
    width: int
    height: int
    predictions: list[Prediction]
    branches: list[list[Prediction]] | None  # per-branch top-k when asked for
    agreement: Agreement


@dataclass(frozen=True)
class Classification:
    results: list[ImageResult]
    timing_ms: dict[str, float]
    logits: np.ndarray  # (n, 2, C) float32: each image's per-branch logits, for callers that want them raw


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs from the settings, as plain values."""

    input_spec: InputSpec
    labels: Sequence[str]
    replicas: list[ReplicaSpec]
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue: int
    max_image_pixels: int
    preprocess_threads: int
    cpu_budget: int | None  # cores CPU workers share dynamically; None: fixed threads per worker
    watchdog: WatchdogConfig  # when a worker counts as hung
    self_test: bool = True  # a started worker takes work only once the golden images come out right
    test_preprocess_fault: str | None = None  # test only: "bgr" swaps the channels after preprocessing
    calibrate_p99_ms: float | None = None  # measure the batch limits for this p99 target once workers are ready


class DrainRate:
    """Images completed per second over a recent window: the basis of Retry-After."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._window_s = window_s
        self._events: deque[tuple[float, int]] = deque()

    def record(self, images: int) -> None:
        now = time.monotonic()
        self._events.append((now, images))
        while self._events and self._events[0][0] < now - self._window_s:
            self._events.popleft()

    def per_second(self) -> float | None:
        if len(self._events) < 2:
            return None
        span = max(time.monotonic() - self._events[0][0], 1e-3)
        return sum(n for _, n in self._events) / span


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def _settle(futures: list[asyncio.Future[T]], deadline: float) -> list[T] | None:
    """All results in order, or the first failure by index, or None once the deadline passes.

    Whatever happens (failure, deadline, the caller cancelled) no future is left running, so an
    abandoned image leaves the queue. asyncio.wait, unlike gather under wait_for, leaves no
    orphaned gathering future behind to log "exception was never retrieved".
    """
    try:
        await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()),
                           return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for future in futures:
            if not future.done():
                future.cancel()
    # every failure is retrieved (a batch failing as a whole fails each of its images), the first raised
    errors = [error for future in futures if not future.cancelled() and (error := future.exception()) is not None]
    if errors:
        raise errors[0]
    if any(future.cancelled() for future in futures):
        return None
    return [future.result() for future in futures]


class Engine:
    def __init__(self, config: EngineConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._labels = config.labels
        self._rate = DrainRate()
        self._reserved = 0  # admitted images still being preprocessed
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._executor = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="preprocess")
        queue = ImageQueue()  # first: the pool requeues into it and pokes it, the batcher drains it
        self._pool = WorkerPool(
            config.replicas,
            input_size=config.input_spec.crop_size,
            num_classes=len(config.labels),
            metrics=metrics,
            wake=queue.poke,
            requeue=queue.put_front,
            on_done=self._rate.record,
            cpu_budget=config.cpu_budget,
            watchdog=config.watchdog,
            # the golden images (at most 451x300) must pass however low a server sets its pixel limit
            self_test=SelfTest(lambda data: self._decode(data, max_pixels=GOLDEN_MAX_PIXELS).pixels, config.labels),
            check_on_start=config.self_test,
        )
        self._batcher = Batcher(
            self._pool, max_batch_size=config.max_batch_size, max_batch_delay_s=config.max_batch_delay_ms / 1000,
            queue=queue,
        )
        self._batcher_task: asyncio.Task[None] | None = None
        self._calibration: Calibration | None = None
        self._calibrating: asyncio.Task[None] | None = None
        metrics.queue_depth.set_function(lambda: len(self._batcher.queue))
        metrics.in_flight.set_function(lambda: self._in_flight)
        metrics.workers_ready.set_function(lambda: self._pool.ready_count)

    @classmethod
    @asynccontextmanager
    async def start(cls, config: EngineConfig, metrics: Metrics, *, stop_timeout_s: float) -> AsyncIterator[Engine]:
        """Spawn the workers (they warm up in the background) and run the batcher; stop both on exit."""
        engine = cls(config, metrics)
        engine._pool.start()
        engine._batcher_task = asyncio.create_task(engine._batcher.run(), name="batcher")
        if config.calibrate_p99_ms is not None:
            engine._calibrating = asyncio.create_task(engine._calibrate(config.calibrate_p99_ms), name="calibration")
        try:
            yield engine
        finally:
            await engine._close(stop_timeout_s)

    async def _calibrate(self, target_ms: float) -> None:
        try:
            result = await calibrate_pool(self._pool, self._config.input_spec, self._config.max_batch_size, target_ms,
                                          workers=len(self._config.replicas),
                                          start_timeout_s=self._config.watchdog.start_timeout_s)
        except Exception:  # the hand-set limits stay; the service must not stay unready over it
            logger.exception("calibration failed; keeping the configured batch limits")
            result = None
        if result is not None:
            self._batcher.set_limits(result.max_batch_size, result.max_batch_delay_ms / 1000)
            self._calibration = result
        self._calibrating = None  # ready from here on

    async def _close(self, timeout_s: float) -> None:
        if self._calibrating is not None:
            self._calibrating.cancel()
        if self._batcher_task is not None:
            self._batcher_task.cancel()
            try:
                await self._batcher_task
            except asyncio.CancelledError:
                pass
        await self._pool.stop(timeout_s)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- state ---------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        if self._draining:
            return False, "draining: the server is shutting down"
        if self._calibrating is not None:
            return False, f"calibrating the batch limits for p99 <= {self._config.calibrate_p99_ms:g} ms"
        ready = self._pool.ready_count  # a worker the watchdog found hung is not ready
        if ready == 0:
            states = [w["state"] + (f": {w['last_error']}" if w["last_error"] else "") for w in self._pool.describe()]
            skipped = "".join(f"; {s['mode']} skipped: {s['reason']}" for s in self._pool.skipped_modes())
            return False, f"no worker can take work yet ({', '.join(states)}){skipped}"
        return True, f"{ready} worker(s) ready"

    def require_ready(self) -> str:
        """The readiness reason, or NotReadyError (503, Retry-After: 1): every readiness route's one rule."""
        ready, reason = self.readiness()
        if not ready:
            raise NotReadyError(reason, headers={"Retry-After": "1"})
        return reason

    def describe(self) -> dict[str, Any]:
        workers, calibrated = self._pool.describe(), self._calibration
        return {
            "workers": workers,
            "skipped_modes": self._pool.skipped_modes(),
            "devices": sorted({w["device"] for w in workers}),
            "batching": {
                "max_batch_size": calibrated.max_batch_size if calibrated else self._config.max_batch_size,
                "max_batch_delay_ms": calibrated.max_batch_delay_ms if calibrated else self._config.max_batch_delay_ms,
                "calibration": calibrated.summary() if calibrated else None,
                "max_queue_images": self._config.max_queue,
                "queued_images": len(self._batcher.queue),
            },
        }

    async def self_test(self) -> list[dict[str, Any]]:
        """The start-up self-test again, now, on every ready worker (POST /v1/admin/self-test)."""
        return await self._pool.self_test_ready()

    def begin_drain(self) -> None:
        """Refuse new work from now on; what was accepted still completes."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    # -- classify ------------------------------------------------------------------------------
    def _retry_after(self, images: int) -> str:
        rate = self._rate.per_second()
        waiting = len(self._batcher.queue) + self._reserved + images
        seconds = math.ceil(waiting / rate) if rate else RETRY_AFTER_MIN_S
        return str(min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, seconds)))

    def check_admission(self, images: int) -> None:
        """Refuse now what `_admitted` would refuse for `images` more images, admitting nothing: routes
        call it before reading a body (with the fewest images it can hold; `_admitted` checks again)."""
        if self._draining:
            self._metrics.rejected.labels("draining").inc()
            raise NotReadyError("the server is shutting down", code="shutting_down", headers={"Retry-After": "1"})
        if not self._pool.serving_soon():  # still starting; a crashed worker's restart does not count
            self._metrics.rejected.labels("not_ready").inc()
            raise NotReadyError("no worker is ready yet", headers={"Retry-After": self._retry_after(images)})
        if len(self._batcher.queue) + self._reserved + images > self._config.max_queue:
            self._metrics.rejected.labels("overloaded").inc()
            raise OverloadedError(
                f"the queue is full ({self._config.max_queue} images); retry later",
                headers={"Retry-After": self._retry_after(images)},
            )

    @contextmanager
    def _admitted(self, images: int) -> Iterator[None]:
        self.check_admission(images)
        self._reserved += images
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def classify(
        self, images: Sequence[bytes], *, top_k: int, branches: bool, deadline: float
    ) -> Classification:
        """Classify every image or fail as a whole, naming the first bad image."""
        return await self._classify(
            len(images), lambda: self._preprocess(images, deadline), top_k=top_k, branches=branches, deadline=deadline
        )

    async def classify_pixels(
        self, pixels: np.ndarray, *, top_k: int, branches: bool, deadline: float
    ) -> Classification:
        """Classify already preprocessed inputs (n, 3, S, S), admitted, queued and batched as `classify`'s."""
        side = pixels.shape[-1]

        async def prepared() -> list[Preprocessed]:
            return [Preprocessed(x, width=side, height=side, format="tensor") for x in pixels]

        return await self._classify(len(pixels), prepared, top_k=top_k, branches=branches, deadline=deadline)

    async def _classify(
        self, count: int, prepare: Callable[[], Awaitable[list[Preprocessed] | None]], *, top_k: int,
        branches: bool, deadline: float,
    ) -> Classification:
        started = time.monotonic()
        timing: dict[str, float] = {}

        def expired(stage: str) -> DeadlineExceededError:
            self._metrics.rejected.labels("deadline").inc()
            timing["total"] = _ms(time.monotonic() - started)
            return DeadlineExceededError(
                f"the request deadline passed during {stage}", extra={"timing_ms": dict(timing)}
            )

        with self._admitted(count):
            reserved = count
            try:
                try:
                    prepared = await prepare()
                finally:
                    timing["decode"] = _ms(time.monotonic() - started)
                if prepared is None:
                    raise expired("preprocessing")
                loop = asyncio.get_running_loop()
                pending = [Pending(p.pixels, loop.create_future()) for p in prepared]
                self._reserved -= reserved
                reserved = 0
                self._batcher.queue.put(pending)
                outputs = await _settle([p.future for p in pending], deadline)
                if outputs is None:
                    raise expired("queueing or inference")
            finally:
                self._reserved -= reserved
        timing["queue"] = _ms(max(o.queue_s for o in outputs))
        timing["inference"] = _ms(max(o.inference_s for o in outputs))
        logits = np.stack([o.logits for o in outputs])  # (n, 2, C)
        results = self._results(prepared, logits, top_k, branches)
        self._metrics.images.inc(count)
        timing["total"] = _ms(time.monotonic() - started)
        return Classification(results, timing, logits)

    async def _preprocess(self, images: Sequence[bytes], deadline: float) -> list[Preprocessed] | None:
        """Decode every image in the thread pool; once the request is gone (deadline, a failed image,
        a disconnect) its decodes stop at their next checkpoint and queued ones never start."""
        loop = asyncio.get_running_loop()
        gone = threading.Event()

        def run(index: int, data: bytes) -> Preprocessed:
            begun = time.perf_counter()
            finished = True
            try:
                return self._decode(data, index=index, cancelled=gone)
            except DecodeCancelled:
                finished = False
                raise
            finally:
                if finished:  # a stopped decode's time says nothing about decoding
                    self._metrics.preprocess.observe(time.perf_counter() - begun)

        jobs = [loop.run_in_executor(self._executor, functools.partial(run, i, data))
                for i, data in enumerate(images)]
        try:
            return await _settle(jobs, deadline)
        finally:
            gone.set()  # harmless once every job is done

    def _decode(self, data: bytes, *, index: int | None = None, cancelled: threading.Event | None = None,
                max_pixels: int | None = None) -> Preprocessed:
        """The served path's preprocessing, which the self-test checks too."""
        limit = self._config.max_image_pixels if max_pixels is None else max_pixels
        decoded = preprocess(data, self._config.input_spec, max_pixels=limit, index=index, cancelled=cancelled)
        if self._config.test_preprocess_fault == "bgr":
            return dataclasses.replace(decoded, pixels=np.ascontiguousarray(decoded.pixels[::-1]))
        return decoded

    def _top(self, logits: np.ndarray, top_k: int) -> list[list[Prediction]]:
        probabilities = np.exp(log_softmax(logits))
        # sorted by logit, descending; a stable sort keeps the lower class id first on a tie, as torch.topk
        indices = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
        return [
            [
                Prediction(int(c), self._labels[int(c)], float(logits[row, c]), float(probabilities[row, c]))
                for c in indices[row].tolist()
            ]
            for row in range(logits.shape[0])
        ]

    def _results(
        self, prepared: list[Preprocessed], logits: np.ndarray, top_k: int, branches: bool
    ) -> list[ImageResult]:
        mean = self._top(logits.mean(axis=1), top_k)  # the model's output: mean over branches
        per_branch = [self._top(logits[:, b], top_k) for b in range(2)] if branches else None
        agreement = branch_agreement(logits)
        return [
            ImageResult(
                index=i,
                width=p.width,
                height=p.height,
                predictions=mean[i],
                branches=[per_branch[0][i], per_branch[1][i]] if per_branch else None,
                agreement=agreement[i],
            )
            for i, p in enumerate(prepared)
        ]

