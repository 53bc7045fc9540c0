"""The worker process: one model replica on its backend, fed batches through shared-memory slots.

The parent writes a batch's branch-0 inputs into one of this worker's slots and sends
("run", batch_id, slot, n, threads); the replica writes both branches' logits into the same slot
and answers ("done", batch_id, slot, seconds). Only these small tuples cross the pipe. An idle
worker answers the parent's ("ping",) with ("pong",): the watchdog's sign of life. While starting,
it says ("trying", "openvino/bf16") before each compute mode it compiles and checks: a worker that
dies then (a native crash no guard can catch) has named the mode the parent skips from then on.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.checkpoint import load_checkpoint
from model.variants import create_model, get_variant

from .backends import Backend, Built, ModeGate, Probe, build_openvino, build_torch, cache_key

__all__ = ["ReplicaSpec", "Slots", "WeightsChangedError", "build_backend", "main"]

logger = logging.getLogger(__name__)


class WeightsChangedError(RuntimeError):
    """The checkpoint no longer hashes to what the parent verified: the worker refuses to start."""


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a worker needs, small and picklable (the app itself never crosses)."""

    worker_id: int
    variant: str
    weights: str | None  # checkpoint file; None: random init (the parent already warned)
    weights_sha256: str  # of that file, as the parent verified it: checked before loading; names the cache entry
    device: str
    backend: str  # torch or openvino (resolved by the parent)
    backend_fallback: bool  # may fall back to torch when the backend cannot start (backend=auto)
    precision: str  # auto, fp32, bf16, fp16
    threads: int
    thread_options: tuple[int, ...]  # every thread count the parent may send with a batch
    max_batch_size: int
    cache_dir: str | None = None  # converted models; None: convert at every start
    log_level: str = "info"
    log_format: str = "text"
    skip_modes: tuple[str, ...] = ()  # modes ("openvino/bf16") that killed a worker while it started them
    abort_modes: tuple[str, ...] = ()  # test only: os.abort() on trying these (CROSSVIT_TEST_ABORT_MODES)


class PipeGate:
    """The worker's ModeGate: skips the spec's crashed modes and tells the parent each mode it tries."""

    def __init__(self, spec: ReplicaSpec, conn: Connection | None) -> None:
        self._spec, self._conn = spec, conn

    def allowed(self, key: str) -> bool:
        if key in self._spec.skip_modes:
            logger.warning("skipping a mode that crashed a worker while starting",
                           extra={"worker": self._spec.worker_id, "mode": key})
            return False
        return True

    def trying(self, key: str) -> None:
        if self._conn is not None:
            self._conn.send(("trying", key))
        if key in self._spec.abort_modes:
            logger.warning("test fault: aborting while trying a mode", extra={"worker": self._spec.worker_id,
                                                                           "mode": key})
            os.abort()


@dataclass
class Slots:
    """One worker's shared-memory buffers: S slots of up to B images, and both branches' logits."""

    x: Tensor  # (S, B, 3, H, H): branch 0's input
    logits: Tensor  # (S, B, 2, C): branch 0 and branch 1 logits

    @classmethod
    def allocate(cls, slots: int, batch: int, size: int, num_classes: int) -> Slots:
        return cls(
            x=torch.zeros(slots, batch, 3, size, size).share_memory_(),  # type: ignore[no-untyped-call]
            logits=torch.zeros(slots, batch, 2, num_classes).share_memory_(),  # type: ignore[no-untyped-call]
        )

    @property
    def count(self) -> int:
        return int(self.x.shape[0])


def build_backend(
    spec: ReplicaSpec, device: torch.device, gate: ModeGate | None = None
) -> tuple[Built, dict[str, Any]]:
    """Load the weights and admit the fastest mode of the spec's backend that passes its check (and the gate)."""
    model = create_model(spec.variant)
    if spec.weights is not None and (found := load_checkpoint(model, spec.weights)) != spec.weights_sha256:
        # a restarted worker must not serve a file replaced since start-up under the old sha256
        raise WeightsChangedError(
            f"{Path(spec.weights).name} now hashes to sha256 {found}, not the {spec.weights_sha256} verified at "
            "start-up; refusing to load it (restart the server to serve the new file)"
        )
    probe = Probe.of(model)  # PyTorch fp32 on the CPU: the yardstick of every mode
    if spec.backend == "openvino":
        try:
            return build_openvino(
                model, key=cache_key(get_variant(spec.variant).name, spec.weights_sha256),
                cache_dir=None if spec.cache_dir is None else Path(spec.cache_dir),
                precision=spec.precision, threads=spec.thread_options, probe=probe, gate=gate,
            )
        except Exception as exc:
            if not spec.backend_fallback:
                raise
            logger.warning("OpenVINO backend failed to start; falling back to PyTorch",
                           extra={"worker": spec.worker_id, "error": f"{type(exc).__name__}: {exc}"})
    return build_torch(model, spec.precision, device, probe, gate), {}


def _build(spec: ReplicaSpec, slots: Slots, gate: ModeGate) -> tuple[Backend, dict[str, Any]]:
    started = time.perf_counter()
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    built, details = build_backend(spec, device, gate)
    backend = built.backend
    for mode, agreement in built.rejected:
        logger.warning(
            "a faster mode failed the accuracy check; using the next one",
            extra={"worker": spec.worker_id, "backend": backend.name, "mode": mode,
                   "cosine": round(agreement.cosine, 7), "rel_err": f"{agreement.rel_err:.2e}"},
        )
    if device.type == "cuda":
        _pin(slots)
    warm_up_started = time.perf_counter()
    backend.warm_up(slots.x[0])  # every batch size (and thread count) this worker will see
    warm_up_s = time.perf_counter() - warm_up_started  # the watchdog's first bound of a full batch
    info = {
        "backend": backend.name,
        "mode": backend.mode,
        "requested_mode": built.requested,
        "guard_cosine": round(backend.agreement.cosine, 7),
        "rel_err": float(f"{backend.agreement.rel_err:.3g}"),
        "device": str(device),
        "threads": spec.threads,
        "startup_s": round(time.perf_counter() - started, 3),
        "warm_up_s": round(warm_up_s, 3),
        **details,
    }
    return backend, info


def _pin(slots: Slots) -> None:
    """Page-lock the shared input slots so host-to-device copies can be asynchronous."""
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    cudart.cudaHostRegister(slots.x.data_ptr(), slots.x.numel() * slots.x.element_size(), 0)


def _serve(spec: ReplicaSpec, conn: Connection, slots: Slots, backend: Backend) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone: nothing left to serve
        if message[0] == "stop":
            return
        if message[0] == "ping":
            conn.send(("pong",))
            continue
        _, batch_id, slot, n, threads = message  # threads: the parent shares the cores among busy workers
        started = time.perf_counter()
        try:
            slots.logits[slot, :n].copy_(backend(slots.x[slot, :n], threads))
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            conn.send(("failed", batch_id, slot, f"out of device memory: {exc}"))
            continue
        conn.send(("done", batch_id, slot, time.perf_counter() - started))


def main(spec: ReplicaSpec, conn: Connection, slots: Slots) -> None:
    """Process entry point (spawned): build, guard, warm up, report ready, then serve."""
    # Ctrl-C, or a SIGTERM sent to the whole process group, must not kill a worker mid-drain: the
    # parent stops its workers itself (a "stop" message, then SIGKILL), and a worker whose parent
    # vanished exits when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from service.logs import configure_logging

    configure_logging(spec.log_level, spec.log_format)
    torch.set_num_threads(spec.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set by an earlier torch call in this process
    try:
        backend, info = _build(spec, slots, PipeGate(spec, conn))
    except Exception as exc:  # reported to the parent, which restarts with backoff
        logger.exception("worker failed to start", extra={"worker": spec.worker_id})
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    logger.info("worker ready", extra={"worker": spec.worker_id, **info, "variant": get_variant(spec.variant).name})
    conn.send(("ready", info))
    _serve(spec, conn, slots, backend)
