"""What travels from a request to a worker and back, on the parent's side: a queued image (`Pending`)
and what its worker produced for it (`WorkerOutput`). The engine makes them, the batcher queues them,
the pool dispatches them and settles their futures."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Pending", "WorkerOutput"]


@dataclass(frozen=True)
class WorkerOutput:
    """What a worker produced for one image."""

    logits: np.ndarray  # (2, C) float32: branch 0 and branch 1
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass(eq=False)
class Pending:
    """One image waiting for a worker; its request awaits `future`. Compared by identity, and its
    repr leaves the pixels out: a queue looks items up (deque.remove), and a failed lookup formats
    its item into the error (a 3x240x240 array repr, milliseconds of the event loop)."""

    pixels: np.ndarray = field(repr=False)  # (3, H, W): branch 0's input; the worker derives branch 1's
    future: asyncio.Future[WorkerOutput]
    enqueued_at: float = field(default_factory=time.monotonic)
    attempts: int = 0  # dispatches so far; a worker crash allows one retry
    internal: bool = False  # the self-test's: one worker's, never retried elsewhere, not counted in the metrics
