"""The worker pool, parent side: spawn replicas, dispatch batches into their slots, supervise.

A worker that dies (segfault, OOM kill, CUDA error) is noticed at once through its process
sentinel on the event loop; images it held are retried once elsewhere or failed with a
retryable 503, and it is restarted with exponential backoff. A worker that hangs instead (a
batch running far past its measured time, or an idle worker not answering a ping) is marked
hung by the watchdog and killed, which takes the same path. Readiness reads `ready_count`.
A worker that dies while starting a compute mode (it sent `Trying(mode)` and never got ready)
was killed by that mode, not by bad luck: every later start, of any worker, skips it (bf16, then
fp32 OpenVINO, then PyTorch), so a crash that depends on the CPU cannot keep the service unready.
A started worker takes work only once the self-test (selftest.py) has run the golden images through
it and found its answers right; a mode that answers wrongly is skipped the same way.
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

import numpy as np

from ..errors import WorkerFailedError
from ..golden import GoldenRecord
from ..metrics import Metrics
from ..worker import main as worker_main
from ..worker.backends.base import mode_key
from ..worker.protocol import (
    Done,
    Failed,
    Fatal,
    Ping,
    Pong,
    Preparing,
    Ready,
    ReplicaSpec,
    Run,
    Slots,
    Stop,
    ToParent,
    Trying,
)
from .items import Pending, WorkerOutput
from .selftest import SelfTest
from .watchdog import InferenceTimes, WatchdogConfig

__all__ = ["WorkerPool", "WorkerState", "shared_threads"]

logger = logging.getLogger(__name__)
# What a worker's Ready report shows in /v1/models
_DESCRIBED = ("backend", "mode", "guard_cosine", "rel_err", "startup_s", "self_test", "quantization")

SLOTS_PER_WORKER = 2  # one batch computing while the next is already staged
MAX_ATTEMPTS = 2  # a crash allows one retry on another worker
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 30.0
STABLE_AFTER_S = 60.0  # a worker up this long counts as a successful start: the backoff starts over
# Work waits for a worker that was ready and is restarting for its backoff plus this many times its
# last start (at least RESTART_GRACE_MIN_S); past that, classify answers 503 not_ready at once.
RESTART_GRACE_FACTOR, RESTART_GRACE_MIN_S = 2.0, 5.0
ON_DEMAND_TIMEOUT_S = 30.0  # an on-demand self-test of one worker


def shared_threads(threads: int, cpu_budget: int | None, busy: int) -> int:
    """Threads for a CPU batch when `busy` CPU workers compute: the idle workers' cores are lent."""
    if cpu_budget is None:
        return threads
    return max(threads, cpu_budget // max(1, busy))


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    CHECKING = "self-test"  # started; its answers for the golden images are being checked
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
    start_clock: float = 0.0  # the start's time limit counts from here: the spawn, or its last Preparing
    start_budget_s: float | None = None  # that limit (None: WORKER_START_TIMEOUT_S)
    preparing: str | None = None  # the one-off step the start is in ("quantising to INT8"), until ready or fatal
    up_since: float | None = None  # ready and alive since; None while starting or dead
    last_start_s: float | None = None  # how long its last successful start took
    back_by: float | None = None  # while restarting: when it should be ready again, by its last start
    last_error: str | None = None
    restart: asyncio.TimerHandle | None = None
    busy_since: float | None = None  # when its oldest in-flight batch started computing
    last_heard: float = 0.0  # its last message
    ping_sent_at: float | None = None  # an unanswered ping to the idle worker
    trying: str | None = None  # the compute mode it is starting ("openvino/bf16"), until ready or fatal
    golden: GoldenRecord | None = None  # its reference answers, from its Ready
    reserved: bool = False  # an on-demand self-test waits for its next free slot: no new batches meanwhile
    checking: asyncio.Task[dict[str, Any]] | None = None  # the self-test running on it


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
        self_test: SelfTest,
        check_on_start: bool = True,
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
        self._self_test, self._check_on_start = self_test, check_on_start
        # mode -> why it is skipped from then on: it killed a starting worker, or failed the self-test
        self._skipped_modes: dict[str, str] = {}

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
            or (w.state in (WorkerState.STARTING, WorkerState.CHECKING, WorkerState.DEAD) and w.back_by is not None
                and now < w.back_by)
            for w in self._workers
        )

    def has_capacity(self) -> bool:
        return any(w.state is WorkerState.READY and w.free_slots and not w.reserved for w in self._workers)

    def has_idle(self) -> bool:
        return any(w.state is WorkerState.READY and not w.in_flight and not w.reserved for w in self._workers)

    def skipped_modes(self) -> list[dict[str, str]]:
        """Modes that killed a worker while it started them, or failed the self-test: every later start skips them."""
        return [{"mode": mode, "reason": reason} for mode, reason in self._skipped_modes.items()]

    def describe(self) -> list[dict[str, Any]]:
        """Each worker's state and, once it started, what it reported (its mode, guard, self-test, INT8 verdict)."""
        return [
            {
                "id": w.spec.worker_id,
                "device": w.spec.device,
                "state": w.state.value,
                "threads": w.spec.threads,
                "batches_in_flight": len(w.in_flight),
                "restarts": w.restarts,
                **({"preparing": w.preparing} if w.state is WorkerState.STARTING and w.preparing else {}),
                "last_error": w.last_error,
                **{k: w.info[k] for k in _DESCRIBED if k in w.info},
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
            if worker.checking is not None:
                worker.checking.cancel()
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
        if tuple(self._skipped_modes) != worker.spec.skip_modes:
            worker.spec = dataclasses.replace(worker.spec, skip_modes=tuple(self._skipped_modes))
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
        worker.start_clock, worker.start_budget_s, worker.preparing = worker.spawned_at, None, None
        worker.free_slots = list(range(worker.slots.count))
        worker.in_flight = {}
        worker.busy_since = worker.ping_sent_at = None
        self._loop.add_reader(parent_conn.fileno(), self._on_readable, worker)
        # uvloop's add_reader makes the socket non-blocking; a message over 16 kB (the golden record in Ready)
        # arrives in two writes, and a non-blocking recv between them would raise mid-message and lose it.
        # Blocking reads are safe: `_on_readable` reads only once data is there, and the rest follows at once.
        os.set_blocking(parent_conn.fileno(), True)
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
        candidates = [w for w in self._workers if w.state is WorkerState.READY and w.free_slots and not w.reserved]
        if not candidates:
            self._requeue(batch)
            return
        self._dispatch(min(candidates, key=lambda w: len(w.in_flight)), batch)

    def _dispatch(self, worker: _Worker, batch: list[Pending]) -> None:
        slot = worker.free_slots.pop()
        now = time.monotonic()
        for i, item in enumerate(batch):
            worker.slots.x[slot, i] = item.pixels
            item.attempts += 1
            if not item.internal:
                self._metrics.queue_wait.observe(now - item.enqueued_at)
        record = _Batch(next(self._batch_ids), slot, batch, now)
        if not worker.in_flight:
            worker.busy_since = now  # an idle worker starts it at once; a busy one after its current batch
        worker.in_flight[record.id] = record
        if not batch[0].internal:
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
            case Ready(info, golden):
                worker.info, worker.golden, worker.last_error, worker.trying = info, golden, None, None
                worker.preparing = None
                if "warm_up_s" in info:
                    self._times_of(worker).record_warm_up(worker.spec.max_batch_size, info["warm_up_s"])
                if self._check_on_start:
                    # a death before the check passes (a kernel that crashes on real images) names the mode
                    worker.state, worker.trying = WorkerState.CHECKING, mode_key(info["backend"], info["mode"])
                    self._start_self_test(worker)
                else:
                    self._admit(worker)
            case Pong():
                worker.ping_sent_at = None
            case Trying(mode):
                worker.trying = mode
            case Preparing(what, budget_s):
                worker.start_clock, worker.start_budget_s, worker.preparing = time.monotonic(), budget_s, what
                logger.info("a worker's start is preparing", extra={"worker": worker.spec.worker_id, "step": what,
                                                                     "budget_s": budget_s})
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
                if not batch.items[0].internal:
                    self._metrics.inference.observe(seconds)
                    self._on_done(len(batch.items))
            case Failed(batch_id, slot, reason):
                batch = self._finished(worker, batch_id, slot)
                logger.error("batch failed on a worker", extra={"worker": worker.spec.worker_id, "reason": reason})
                self._fail(batch.items, f"inference failed: {reason}")
            case Fatal(error):
                worker.last_error, worker.trying = error, None  # an error it reported, not a mode's crash
                worker.preparing = None
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
                if item.attempts < MAX_ATTEMPTS and not item.internal:
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
        self._skipped_modes.setdefault(mode, reason)
        worker.last_error = f"{mode} crashed the worker while starting (exit code {exitcode}); skipped from now on"
        logger.error("a compute mode crashed a worker while it started; every later start skips it",
                     extra={"worker": worker.spec.worker_id, "mode": mode, "exitcode": exitcode,
                            "skipped_modes": ",".join(self._skipped_modes)})

    # -- the self-test ----------------------------------------------------------------------------
    def _admit(self, worker: _Worker) -> None:
        worker.state, worker.trying = WorkerState.READY, None
        worker.up_since, worker.back_by = time.monotonic(), None
        worker.last_start_s = worker.up_since - worker.spawned_at

    def _start_self_test(self, worker: _Worker) -> None:
        assert self._loop is not None
        worker.checking = self._loop.create_task(self._run_self_test(worker), name=f"self-test-{worker.spec.worker_id}")

    async def self_test_ready(self) -> list[dict[str, Any]]:
        """The self-test on every ready worker now, one at a time (the others keep serving): each worker's
        result; a worker that fails is taken out of service as at start."""
        results = []
        for worker in [w for w in self._workers if w.state is WorkerState.READY]:
            mode = mode_key(worker.info.get("backend", "?"), worker.info.get("mode", "?"))
            try:  # its batches in flight finish first (it takes no new ones meanwhile)
                verdict = await asyncio.wait_for(self._run_self_test(worker), ON_DEMAND_TIMEOUT_S)
            except asyncio.TimeoutError:
                verdict = {"passed": False, "reason": f"no answer within {ON_DEMAND_TIMEOUT_S:g} s (stuck?)"}
            results.append({"id": worker.spec.worker_id, "mode": mode, **verdict, "state": worker.state.value})
        return results

    async def _run_self_test(self, worker: _Worker) -> dict[str, Any]:
        """Check the worker's served answers; admit it (at start), or take it out (its mode skipped by every
        later start, unless the fault is the label list, which no other mode would mend). The verdict."""
        process, record = worker.process, worker.golden
        key = mode_key(worker.info.get("backend", "?"), worker.info.get("mode", "?"))
        assert record is not None
        try:
            result, seconds = await self._self_test.run(record, worker.info.get("mode", "?"), worker.spec.device,
                                                        lambda pixels: self._infer_on(worker, process, pixels))
        except WorkerFailedError as exc:  # it died, or failed the batch (out of device memory)
            self._metrics.self_tests.labels("failed").inc()
            if worker.process is process and worker.conn is not None:  # alive: restart it, or it would stay here
                self._refuse(worker, key, f"the self-test batch failed: {exc}", skip=False)
            return {"passed": False, "reason": f"the worker failed during the self-test: {exc}"}
        except Exception as exc:  # noqa: BLE001 - any reason the check cannot run refuses the mode, said why
            self._metrics.self_tests.labels("failed").inc()
            reason = f"the self-test could not run: {type(exc).__name__}: {exc}"
            if worker.process is process:
                self._refuse(worker, key, reason)
            return {"passed": False, "reason": reason}
        verdict = {**result.summary(), "seconds": round(seconds, 3)}
        if worker.process is not process:
            return verdict
        worker.info["self_test"] = verdict
        self._metrics.self_tests.labels("passed" if result.passed else "failed").inc()
        if not result.passed:
            self._refuse(worker, key, f"self-test failed: {result.reason()}", skip=not result.labels_differ)
            return verdict
        logger.info("self-test passed", extra={"worker": worker.spec.worker_id, "mode": key,
                                               "worst_cosine": result.worst_cosine,
                                               "worst_rel_err": f"{result.worst_rel_err:.2e}",
                                               "tolerance": result.tolerance.name, "recorded": result.recorded,
                                               "self_test_s": round(seconds, 3)})
        if worker.state is WorkerState.CHECKING:
            self._admit(worker)
            self._wake()
        return verdict

    async def _infer_on(self, worker: _Worker, process: BaseProcess | None, pixels: np.ndarray) -> np.ndarray:
        """`pixels` run on this worker's `process` alone, a batch at a time, as internal items."""
        assert self._loop is not None
        outputs: list[np.ndarray] = []
        for start in range(0, len(pixels), worker.spec.max_batch_size):
            worker.reserved = True  # a serving worker's slots may both be busy: the next one to free is ours
            try:
                while not worker.free_slots and worker.process is process and worker.conn is not None:
                    await asyncio.sleep(0.002)
            finally:
                worker.reserved = False
            if (worker.process is not process or worker.conn is None
                    or worker.state not in (WorkerState.READY, WorkerState.CHECKING)):
                raise WorkerFailedError("the worker left service during the self-test")
            items = [Pending(x, self._loop.create_future(), internal=True)
                     for x in pixels[start:start + worker.spec.max_batch_size]]
            self._dispatch(worker, items)
            for item in items:
                outputs.append((await item.future).logits)
        return np.stack(outputs)

    async def run_everywhere(self, pixels: np.ndarray) -> int:
        """`pixels` as one batch on every ready worker at once (the calibration's load); how many ran it."""
        workers = [w for w in self._workers if w.state is WorkerState.READY]
        await asyncio.gather(*(self._infer_on(w, w.process, pixels) for w in workers))
        return len(workers)

    def _refuse(self, worker: _Worker, key: str, reason: str, *, skip: bool = True) -> None:
        """Out of service now, and restarted with backoff. `skip`: the mode answers wrongly on this machine, so
        no worker serves it from now on (this one restarts into the next mode; with none left, it says so)."""
        worker.last_error = f"{key}: {reason}"
        if skip:
            self._skipped_modes.setdefault(key, reason)
            logger.error("a worker's mode failed the self-test; every later start skips it",
                         extra={"worker": worker.spec.worker_id, "mode": key, "reason": reason,
                                "skipped_modes": ",".join(self._skipped_modes)})
        else:
            logger.error("a worker failed the self-test; restarting it", extra={"worker": worker.spec.worker_id,
                                                                               "mode": key, "reason": reason})
        worker.state, worker.trying = WorkerState.DEAD, None  # out of service now; its exit restarts it
        assert worker.process is not None
        worker.process.kill()
        self._wake()

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
            started = now - worker.start_clock
            limit = worker.start_budget_s or self._watchdog.start_timeout_s
            if started > limit:
                step = "its start" if worker.preparing is None else f"its start ({worker.preparing})"
                self._kill_hung(worker, f"{step} ran {started:.1f} s (limit {limit:g} s)")
            return
        if worker.state not in (WorkerState.READY, WorkerState.CHECKING) or worker.conn is None:
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
        if reason is not None and worker.state in (WorkerState.READY, WorkerState.CHECKING):
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
