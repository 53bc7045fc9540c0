"""What the pool (parent) and a worker process say to each other: the one module both sides import.

A worker is spawned with its `ReplicaSpec` and its `Slots` (shared memory); after that only these
small messages cross its pipe. Pixels and logits never do: the parent writes a batch's branch-0
inputs into a slot and sends `Run`; the worker writes both branches' logits into the same slot
and answers `Done`. While starting, the worker says `Trying` before each compute mode it compiles
and checks, so that a death then names the mode (workers.py skips it from then on), and `Ready`
(or `Fatal`) when done. An idle worker answers `Ping` with `Pong`: the watchdog's sign of life.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Done", "Failed", "Fatal", "Ping", "Pong", "Ready", "ReplicaSpec", "Run", "Slots", "Stop", "ToParent",
    "ToWorker", "Trying",
]


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


# -- parent -> worker ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """Compute slot `slot`'s first `n` images on `threads` CPU threads (the parent shares the cores)."""

    batch_id: int
    slot: int
    n: int
    threads: int


@dataclass(frozen=True)
class Ping:
    """Are you there? (sent to an idle worker that has been silent for a while)"""


@dataclass(frozen=True)
class Stop:
    """Exit now (the parent is shutting down)."""


ToWorker = Run | Ping | Stop


# -- worker -> parent ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trying:
    """About to compile and check `mode` ("openvino/bf16"); in force until Ready or Fatal."""

    mode: str


@dataclass(frozen=True)
class Ready:
    """Started: `info` is what /v1/models and the log show (backend, mode, guard figures, timings)."""

    info: dict[str, Any]


@dataclass(frozen=True)
class Fatal:
    """Could not start (an exception it caught, not a crash); the worker exits next."""

    error: str


@dataclass(frozen=True)
class Done:
    batch_id: int
    slot: int
    seconds: float  # the compute time, as the worker measured it


@dataclass(frozen=True)
class Failed:
    """The batch could not be computed (out of device memory); the worker lives on."""

    batch_id: int
    slot: int
    reason: str


@dataclass(frozen=True)
class Pong:
    pass


ToParent = Trying | Ready | Fatal | Done | Failed | Pong
