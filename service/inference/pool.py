"""The worker pool, parent side: spawn replicas, dispatch batches into their slots, supervise.

A worker that dies (segfault, OOM kill, CUDA error) is noticed at once through its process
sentinel on the event loop; images it held are retried once elsewhere or failed with a
retryable 503, and it is restarted with exponential backoff. A worker that hangs instead (a
batch running far past its measured time, or an idle worker not answering a ping) is marked
hung by the watchdog and killed, which takes the same path. Readiness reads `ready_count`.
A worker that dies while starting a compute mode (it sent `Trying(mode)` and never got ready)
was killed by that mode, not by bad luck: every later start, of any worker, skips it (bf16, then
fp32 OpenVINO, then PyTorch), so a crash that depends on the CPU cannot keep the service unready.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ..errors import WorkerFailedError
from ..metrics import Metrics
from ..worker import main as worker_main
from ..worker.protocol import Done, Failed, Fatal, Ping, Pong, Ready, ReplicaSpec, Run, Slots, Stop, ToParent, Trying
from .items import Pending, WorkerOutput
from .watchdog import InferenceTimes, WatchdogConfig

__all__ = ["WorkerPool", "WorkerState", "shared_threads"]

logger = logging.getLogger(__name__)

SLOTS_PER_WORKER = 2  # one batch computing while the next is already staged
MAX_ATTEMPTS = 2  # a crash allows one retry on another worker
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 30.0
STABLE_AFTER_S = 60.0  # a worker up this long counts as a successful start: the backoff starts over
# Work waits for a worker that was ready and is restarting for its backoff plus this many times its
# last start (at least RESTART_GRACE_MIN_S); past that, classify answers 503 not_ready at once.
RESTART_GRACE_FACTOR, RESTART_GRACE_MIN_S = 2.0, 5.0


def shared_threads(threads: int, cpu_budget: int | None, busy: int) -> int:
    """Threads for a CPU batch when `busy` CPU workers compute: the idle workers' cores are lent."""
    if cpu_budget is None:
        return threads
    return max(threads, cpu_budget // max(1, busy))


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    HUNG = "hung"  # the watchdog killed it; its death is being handled
    DEAD = "dead"
    STOPPED = "stopped"


@dataclass(eq=False)
class _Batch:
    id: int
    slot: int
    items: list[Pending]
    dispatched_at: float


@dataclass(eq=False)
class _Worker:
    spec: ReplicaSpec
    slots: Slots
    process: BaseProcess | None = None
    conn: Connection | None = None
    state: WorkerState = WorkerState.STARTING
    free_slots: list[int] = field(default_factory=list)
    in_flight: dict[int, _Batch] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    crashes_in_row: int = 0  # deaths since its last successful start (up STABLE_AFTER_S): the backoff's exponent
    spawned_at: float = 0.0
    up_since: float | None = None  # ready and alive since; None while starting or dead
    last_start_s: float | None = None  # how long its last successful start took
    back_by: float | None = None  # while restarting: when it should be ready again, by its last start
    last_error: str | None = None
    restart: asyncio.TimerHandle | None = None
    busy_since: float | None = None  # when its oldest in-flight batch started computing
    last_heard: float = 0.0  # its last message
    ping_sent_at: float | None = None  # an unanswered ping to the idle worker
    trying: str | None = None  # the compute mode it is starting ("openvino/bf16"), until ready or fatal


class WorkerPool:
    def __init__(
        self,
        specs: list[ReplicaSpec],
        *,
        input_size: int,
        num_classes: int,
        metrics: Metrics,
        wake: Callable[[], None],
        requeue: Callable[[list[Pending]], None],
        on_done: Callable[[int], None],
        cpu_budget: int | None = None,
        watchdog: WatchdogConfig,
    ) -> None:
        self._ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or threads
        # A worker's numpy (the OpenVINO heads) would start a BLAS thread per core beside the threads it
        # is given; spawned workers inherit this (set before their numpy loads).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        self._workers = [
            _Worker(spec, Slots.allocate(SLOTS_PER_WORKER, spec.max_batch_size, input_size, num_classes))
            for spec in specs
        ]
        self._metrics = metrics
        self._wake = wake
        self._requeue = requeue
        self._on_done = on_done
        self._batch_ids = itertools.count()
        # With a budget, CPU workers share the cores: a worker computing alone gets them all
        # (batch-1 latency), busy ones split them (no oversubscription at full load).
        self._cpu_budget = cpu_budget
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog = watchdog
        self._times: dict[str, InferenceTimes] = {}  # per device: a GPU's batches say nothing of a CPU's
        self._watch_task: asyncio.Task[None] | None = None
        self._crashed_modes: dict[str, str] = {}  # mode -> how it killed a starting worker; skipped from then on

    # -- what the batcher and readiness read -------------------------------------------------
    @property
    def ready_count(self) -> int:
        return sum(w.state is WorkerState.READY for w in self._workers)

    def serving_soon(self) -> bool:
        """A worker is ready, or one that was ready is restarting and not yet later than its last start
        predicts: work queued now will run. A restart that overruns (hung, crashing again) does not count."""
        now = time.monotonic()
        return any(
            w.state is WorkerState.READY
            or (w.state in (WorkerState.STARTING, WorkerState.DEAD) and w.back_by is not None and now < w.back_by)
            for w in self._workers
        )

    def has_capacity(self) -> bool:
        return any(w.state is WorkerState.READY and w.free_slots for w in self._workers)

    def has_idle(self) -> bool:
        return any(w.state is WorkerState.READY and not w.in_flight for w in self._workers)

    def skipped_modes(self) -> list[dict[str, str]]:
        """Modes that killed a worker while it started them, skipped by every later start."""
        return [{"mode": mode, "reason": reason} for mode, reason in self._crashed_modes.items()]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "id": w.spec.worker_id,
                "device": w.spec.device,
                "state": w.state.value,
                "threads": w.spec.threads,
                "batches_in_flight": len(w.in_flight),
                "restarts": w.restarts,
                "last_error": w.last_error,
                **{k: w.info[k] for k in ("backend", "mode", "guard_cosine", "rel_err", "startup_s") if k in w.info},
            }
            for w in self._workers
        ]

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for worker in self._workers:
            self._spawn(worker)
        self._watch_task = self._loop.create_task(self._watch(), name="worker-watchdog")

    async def stop(self, timeout_s: float) -> None:
        """Ask every worker to exit; terminate the ones that don't within the timeout."""
        self._stopping = True
        if self._watch_task is not None:
            self._watch_task.cancel()
        for worker in self._workers:
            if worker.restart is not None:
                worker.restart.cancel()
        live = [w for w in self._workers if w.process is not None and w.process.is_alive()]
        for worker in live:
            try:
                assert worker.conn is not None
                worker.conn.send(Stop())
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout_s
        for worker in live:
            assert worker.process is not None
            await asyncio.to_thread(worker.process.join, max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                logger.warning("worker did not stop in time; terminating", extra={"worker": worker.spec.worker_id})
                worker.process.kill()
                await asyncio.to_thread(worker.process.join, 5)
        for worker in self._workers:
            self._detach(worker)
            worker.state = WorkerState.STOPPED
            worker.slots.release()

    def _spawn(self, worker: _Worker) -> None:
        assert self._loop is not None
        if tuple(self._crashed_modes) != worker.spec.skip_modes:
            worker.spec = dataclasses.replace(worker.spec, skip_modes=tuple(self._crashed_modes))
        worker.trying = None
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(
            target=worker_main.main,
            args=(worker.spec, child_conn, worker.slots),
            name=f"crossvit-worker-{worker.spec.worker_id}",
            daemon=True,  # never outlive the server
        )
        process.start()
        child_conn.close()
        worker.process, worker.conn = process, parent_conn
        worker.state, worker.spawned_at = WorkerState.STARTING, time.monotonic()
        worker.free_slots = list(range(worker.slots.count))
        worker.in_flight = {}
        worker.busy_since = worker.ping_sent_at = None
        self._loop.add_reader(parent_conn.fileno(), self._on_readable, worker)
        self._loop.add_reader(process.sentinel, self._on_exit, worker)
        logger.info("worker starting", extra={"worker": worker.spec.worker_id, "pid": process.pid,
                                               "device": worker.spec.device})

    def _detach(self, worker: _Worker) -> None:
        if self._loop is None or worker.conn is None or worker.process is None:
            return
        self._loop.remove_reader(worker.conn.fileno())
        self._loop.remove_reader(worker.process.sentinel)
        worker.conn.close()
        worker.conn = None

    # -- dispatch -----------------------------------------------------------------------------
    def submit(self, batch: list[Pending]) -> None:
        """Copy the batch into a free slot of the least busy ready worker and start it."""
        candidates = [w for w in self._workers if w.state is WorkerState.READY and w.free_slots]
        if not candidates:
            self._requeue(batch)
            return
        worker = min(candidates, key=lambda w: len(w.in_flight))
        slot = worker.free_slots.pop()
        now = time.monotonic()
        for i, item in enumerate(batch):
            worker.slots.x[slot, i] = item.pixels
            item.attempts += 1
            self._metrics.queue_wait.observe(now - item.enqueued_at)
        record = _Batch(next(self._batch_ids), slot, batch, now)
        if not worker.in_flight:
            worker.busy_since = now  # an idle worker starts it at once; a busy one after its current batch
        worker.in_flight[record.id] = record
        self._metrics.batch_size.observe(len(batch))
        try:
            assert worker.conn is not None
            worker.conn.send(Run(record.id, slot, len(batch), self._threads_for(worker)))
        except (OSError, ValueError):
            pass  # the worker is dying; its sentinel fires next and retries these images

    def _threads_for(self, worker: _Worker) -> int:
        if worker.spec.device != "cpu":
            return worker.spec.threads
        busy = sum(1 for w in self._workers if w.spec.device == "cpu" and w.in_flight)
        return shared_threads(worker.spec.threads, self._cpu_budget, busy)

    # -- messages and deaths ------------------------------------------------------------------
    def _on_readable(self, worker: _Worker) -> None:
        conn = worker.conn
        try:
            while conn is not None and conn.poll():
                self._handle(worker, conn.recv())
        except (EOFError, OSError):
            pass  # the sentinel reports the death

    def _handle(self, worker: _Worker, message: ToParent) -> None:
        worker.last_heard = time.monotonic()
        match message:
            case Ready(info):
                worker.state, worker.info, worker.last_error, worker.trying = WorkerState.READY, info, None, None
                worker.up_since, worker.back_by = worker.last_heard, None
                worker.last_start_s = worker.last_heard - worker.spawned_at
                if "warm_up_s" in info:
                    self._times_of(worker).record_warm_up(worker.spec.max_batch_size, info["warm_up_s"])
            case Pong():
                worker.ping_sent_at = None
            case Trying(mode):
                worker.trying = mode
            case Done(batch_id, slot, seconds):
                batch = self._finished(worker, batch_id, slot)
                self._times_of(worker).record(len(batch.items), seconds)
                logits = worker.slots.logits[slot, : len(batch.items)].copy()
                for i, item in enumerate(batch.items):
                    if not item.future.done():
                        item.future.set_result(WorkerOutput(
                            logits[i], queue_s=batch.dispatched_at - item.enqueued_at, inference_s=seconds,
                            batch_size=len(batch.items),
                        ))
                self._metrics.inference.observe(seconds)
                self._on_done(len(batch.items))
            case Failed(batch_id, slot, reason):
                batch = self._finished(worker, batch_id, slot)
                logger.error("batch failed on a worker", extra={"worker": worker.spec.worker_id, "reason": reason})
                self._fail(batch.items, f"inference failed: {reason}")
            case Fatal(error):
                worker.last_error, worker.trying = error, None  # an error it reported, not a mode's crash
        self._wake()

    def _finished(self, worker: _Worker, batch_id: int, slot: int) -> _Batch:
        batch = worker.in_flight.pop(batch_id)
        worker.free_slots.append(slot)
        # the worker reads its next staged batch as soon as it answers this one
        worker.busy_since = worker.last_heard if worker.in_flight else None
        return batch

    def _times_of(self, worker: _Worker) -> InferenceTimes:
        return self._times.setdefault(worker.spec.device, InferenceTimes())

    def _fail(self, items: list[Pending], message: str) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(WorkerFailedError(message, headers={"Retry-After": "1"}))

    def _on_exit(self, worker: _Worker) -> None:
        self._on_readable(worker)  # a result sent just before dying still counts
        assert worker.process is not None
        worker.process.join(timeout=1)
        exitcode = worker.process.exitcode
        self._detach(worker)
        now = time.monotonic()
        was_ready, up_since, worker.up_since = worker.up_since is not None, worker.up_since, None
        worker.state = WorkerState.STOPPED if self._stopping else WorkerState.DEAD
        if self._stopping:
            return
        retry: list[Pending] = []
        for batch in worker.in_flight.values():
            for item in batch.items:
                if item.future.done():
                    continue
                if item.attempts < MAX_ATTEMPTS:
                    retry.append(item)
                else:
                    self._fail([item], "the worker processing this image died twice; retry the request")
        worker.in_flight.clear()
        worker.free_slots = []
        if worker.last_error is None:
            worker.last_error = f"exited with code {exitcode}"
        if worker.trying is not None and not was_ready:
            self._skip_crashed_mode(worker, worker.trying, exitcode)
        if up_since is not None and now - up_since > STABLE_AFTER_S:
            worker.crashes_in_row = 0  # it had started successfully: this is a first failure again
        worker.crashes_in_row += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (worker.crashes_in_row - 1))
        if was_ready and worker.last_start_s is not None:  # work may wait for this restart, this long
            worker.back_by = now + delay + max(RESTART_GRACE_MIN_S, RESTART_GRACE_FACTOR * worker.last_start_s)
        logger.warning(
            "worker died; restarting",
            extra={"worker": worker.spec.worker_id, "exitcode": exitcode, "was_ready": was_ready,
                   "retrying_images": len(retry), "restart_in_s": delay, "error": worker.last_error},
        )
        if retry:
            self._requeue(retry)
        assert self._loop is not None
        worker.restart = self._loop.call_later(delay, self._restart, worker)
        self._wake()

    def _skip_crashed_mode(self, worker: _Worker, mode: str, exitcode: int | None) -> None:
        reason = f"worker {worker.spec.worker_id} died (exit code {exitcode}) while starting this mode"
        self._crashed_modes.setdefault(mode, reason)
        worker.last_error = f"{mode} crashed the worker while starting (exit code {exitcode}); skipped from now on"
        logger.error("a compute mode crashed a worker while it started; every later start skips it",
                     extra={"worker": worker.spec.worker_id, "mode": mode, "exitcode": exitcode,
                            "skipped_modes": ",".join(self._crashed_modes)})

    def _restart(self, worker: _Worker) -> None:
        if self._stopping:
            return
        worker.restarts += 1
        self._metrics.worker_restarts.inc()
        self._spawn(worker)

    # -- the watchdog ---------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Look at every ready or starting worker a few times per floor period; kill the ones that hang."""
        while True:
            await asyncio.sleep(self._watchdog.scan_interval_s)
            for worker in self._workers:
                try:
                    self._check(worker)
                except Exception:  # one bad check must not end the watchdog for good
                    logger.exception("watchdog check failed", extra={"worker": worker.spec.worker_id})

    def _check(self, worker: _Worker) -> None:
        now = time.monotonic()
        if worker.state is WorkerState.STARTING and worker.conn is not None:
            started = now - worker.spawned_at
            if started > self._watchdog.start_timeout_s:
                self._kill_hung(worker, f"its start ran {started:.1f} s (limit {self._watchdog.start_timeout_s:g} s)")
            return
        if worker.state is not WorkerState.READY or worker.conn is None:
            return
        if not worker.in_flight and worker.ping_sent_at is None and now - worker.last_heard > self._watchdog.floor_s:
            worker.ping_sent_at = now  # idle and silent for a while: is it still there?
            try:
                worker.conn.send(Ping())
            except (OSError, ValueError):
                pass  # dying: the sentinel reports it
            return
        if self._overdue(worker, now) is None:
            return
        self._on_readable(worker)  # an answer already in the pipe still counts
        reason = self._overdue(worker, time.monotonic())
        if reason is not None and worker.state is WorkerState.READY:
            self._kill_hung(worker, reason)

    def _overdue(self, worker: _Worker, now: float) -> str | None:
        """Why the worker counts as hung, or None."""
        if worker.in_flight and worker.busy_since is not None:
            images = len(next(iter(worker.in_flight.values())).items)  # the oldest batch is the one computing
            limit = self._times_of(worker).limit_s(images, self._watchdog)
            if now - worker.busy_since > limit:
                return f"a batch of {images} image(s) ran {now - worker.busy_since:.1f} s (limit {limit:.1f} s)"
        elif worker.ping_sent_at is not None and now - worker.ping_sent_at > self._watchdog.floor_s:
            return f"no answer to a ping for {now - worker.ping_sent_at:.1f} s"
        return None

    def _kill_hung(self, worker: _Worker, reason: str) -> None:
        """Out of readiness at once; SIGKILL (a stopped or deadlocked process ignores anything
        gentler); its sentinel then retries the images and restarts it with backoff."""
        worker.state = WorkerState.HUNG
        worker.last_error = f"watchdog: {reason}"
        assert worker.process is not None
        logger.error("worker hung; killing it", extra={"worker": worker.spec.worker_id, "pid": worker.process.pid,
                                                        "reason": reason})
        worker.process.kill()
        self._wake()
