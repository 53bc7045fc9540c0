"""The worker process: one model replica, fed batches through shared-memory slots.

The parent writes a batch's per-branch tensors into one of this worker's slots and sends
("run", batch_id, slot, n, threads); the replica writes both branches' logits into the same slot and
answers ("done", batch_id, slot, seconds). Only these small tuples cross the pipe.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import Tensor

from model.runtime import Mode, Runner, bf16_is_fast, logit_cosine, prepare
from model.variants import create_model, get_variant

__all__ = ["ReplicaSpec", "Slots", "choose_mode", "main", "precision_guard"]

logger = logging.getLogger(__name__)

GUARD_COSINE = 0.9999  # worst per-image logit cosine to fp32 a reduced precision must keep
GUARD_PROBE_IMAGES = 4


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a worker needs, small and picklable (the app itself never crosses)."""

    worker_id: int
    variant: str
    weights: str | None  # checkpoint file; None: random init (the parent already warned)
    device: str
    precision: str  # auto, fp32, bf16, fp16
    threads: int
    max_batch_size: int
    log_level: str = "info"
    log_format: str = "text"


@dataclass
class Slots:
    """One worker's shared-memory buffers: S slots of up to B images per branch, and logits."""

    x0: Tensor  # (S, B, 3, H0, H0)
    x1: Tensor  # (S, B, 3, H1, H1)
    logits: Tensor  # (S, B, 2, C): branch 0 and branch 1 logits

    @classmethod
    def allocate(cls, slots: int, batch: int, sizes: tuple[int, int], num_classes: int) -> Slots:
        return cls(
            x0=torch.zeros(slots, batch, 3, sizes[0], sizes[0]).share_memory_(),  # type: ignore[no-untyped-call]
            x1=torch.zeros(slots, batch, 3, sizes[1], sizes[1]).share_memory_(),  # type: ignore[no-untyped-call]
            logits=torch.zeros(slots, batch, 2, num_classes).share_memory_(),  # type: ignore[no-untyped-call]
        )

    @property
    def count(self) -> int:
        return int(self.x0.shape[0])


def choose_mode(precision: str, device: torch.device) -> Mode:
    """Map the setting to a compute mode; `auto` takes the fastest mode the benchmarks showed."""
    if precision == "fp32":
        return Mode.FP32
    if precision == "bf16":
        return Mode.BF16_AUTOCAST
    if precision == "fp16":
        return Mode.FP16_AUTOCAST
    if device.type == "cuda":
        return Mode.BF16_AUTOCAST if torch.cuda.is_bf16_supported() else Mode.FP16_AUTOCAST
    # CPU: bf16 autocast is 1.4-2x fp32 where the CPU has native bf16 (bench/README.md)
    return Mode.BF16_AUTOCAST if bf16_is_fast() else Mode.FP32


def precision_guard(runner: Runner, sizes: tuple[int, int]) -> tuple[Mode, float]:
    """Keep a reduced precision only if its logits stay within GUARD_COSINE of fp32's.

    For autocast modes (fp32 weights), so falling back costs nothing.
    """
    if runner.mode is Mode.FP32:
        return Mode.FP32, 1.0
    generator = torch.Generator().manual_seed(0)
    probe = [torch.randn(GUARD_PROBE_IMAGES, 3, s, s, generator=generator) for s in sizes]
    candidate = torch.stack(runner(probe)).mean(0)
    mode = runner.mode
    runner.mode = Mode.FP32
    reference = torch.stack(runner(probe)).mean(0)
    cosine = logit_cosine(reference, candidate)
    runner.mode = mode if cosine >= GUARD_COSINE else Mode.FP32
    return runner.mode, cosine


def _build(spec: ReplicaSpec, slots: Slots) -> tuple[Runner, dict[str, Any]]:
    started = time.perf_counter()
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = create_model(spec.variant, weights=spec.weights)
    requested = choose_mode(spec.precision, device)
    runner = prepare(model, requested, device)
    sizes = model.config.img_size
    mode, cosine = precision_guard(runner, sizes)
    if mode is not requested:
        logger.warning(
            "reduced precision failed the accuracy guard; falling back to fp32",
            extra={"worker": spec.worker_id, "mode": requested.value, "cosine": round(cosine, 6)},
        )
    if device.type == "cuda":
        _pin(slots)
    for n in range(1, spec.max_batch_size + 1):  # every batch size this worker will see
        runner((slots.x0[0, :n], slots.x1[0, :n]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info = {
        "mode": mode.value,
        "requested_mode": requested.value,
        "guard_cosine": round(cosine, 6),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "startup_s": round(time.perf_counter() - started, 3),
    }
    return runner, info


def _pin(slots: Slots) -> None:
    """Page-lock the shared input slots so host-to-device copies can be asynchronous."""
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    for t in (slots.x0, slots.x1):
        cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)


def _serve(spec: ReplicaSpec, conn: Connection, slots: Slots, runner: Runner) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone: nothing left to serve
        if message[0] == "stop":
            return
        _, batch_id, slot, n, threads = message
        if threads != torch.get_num_threads():  # the parent shares the cores among busy workers
            torch.set_num_threads(threads)
        started = time.perf_counter()
        try:
            b0, b1 = runner((slots.x0[slot, :n], slots.x1[slot, :n]))
            slots.logits[slot, :n, 0].copy_(b0)
            slots.logits[slot, :n, 1].copy_(b1)
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
        runner, info = _build(spec, slots)
    except Exception as exc:  # reported to the parent, which restarts with backoff
        logger.exception("worker failed to start", extra={"worker": spec.worker_id})
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    logger.info("worker ready", extra={"worker": spec.worker_id, **info, "variant": get_variant(spec.variant).name})
    conn.send(("ready", info))
    _serve(spec, conn, slots, runner)
