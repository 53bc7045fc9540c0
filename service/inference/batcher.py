"""The bounded image queue and the dynamic batcher that drains it into worker slots.

Policy, in order: a batch leaves when it holds `max_batch_size` images, at once when a worker
sits idle, or when `max_batch_delay_ms` have passed since its oldest image was queued (the
window starts at the first image, not when a worker asks). Images whose request expired or
went away are gone from the queue before they take device time.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

__all__ = ["Batcher", "ImageQueue", "Pending", "WorkerOutput"]


@dataclass(frozen=True)
class WorkerOutput:
    """What a worker produced for one image."""

    logits: Tensor  # (2, C): branch 0 and branch 1
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass(eq=False)
class Pending:
    """One image waiting for a worker; its request awaits `future`. Compared by identity, and its
    repr leaves the pixels out: a queue looks items up (deque.remove), and a failed lookup formats
    its item into the error (a 3x240x240 tensor repr, milliseconds of the event loop)."""

    pixels: Tensor = field(repr=False)  # (3, H, W): branch 0's input; the worker derives branch 1's
    future: asyncio.Future[WorkerOutput]
    enqueued_at: float = field(default_factory=time.monotonic)
    attempts: int = 0  # dispatches so far; a worker crash allows one retry


class ImageQueue:
    """FIFO of pending images (bounded by admission, see Engine); retries go to the front."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._items: deque[Pending] = deque()
        self._on_change = on_change

    def __len__(self) -> int:
        return len(self._items)

    def put(self, items: Iterable[Pending]) -> None:
        for item in items:
            self._items.append(item)
            item.future.add_done_callback(functools.partial(self._drop_if_abandoned, item))
        self._on_change()

    def put_front(self, items: list[Pending]) -> None:
        self._items.extendleft(reversed(items))
        self._on_change()

    def _drop_if_abandoned(self, item: Pending, _: object = None) -> None:
        # Deadline passed or client gone: leave the queue now, not when a batch forms.
        if item.future.cancelled():
            try:
                self._items.remove(item)
            except ValueError:
                pass  # already dispatched
            self._on_change()

    def oldest_enqueued_at(self) -> float:
        return self._items[0].enqueued_at

    def take(self, limit: int) -> list[Pending]:
        batch: list[Pending] = []
        while self._items and len(batch) < limit:
            item = self._items.popleft()
            if not item.future.done():
                batch.append(item)
        return batch


class WorkerCapacity(Protocol):
    def has_capacity(self) -> bool: ...

    def has_idle(self) -> bool: ...

    def submit(self, batch: list[Pending]) -> None: ...


class Batcher:
    """Forms batches from the queue and hands them to the worker pool, forever."""

    def __init__(self, pool: WorkerCapacity, *, max_batch_size: int, max_batch_delay_s: float) -> None:
        self._pool = pool
        self._max = max_batch_size
        self._delay_s = max_batch_delay_s
        self._changed = asyncio.Event()
        self.queue = ImageQueue(on_change=self.wake)

    def wake(self) -> None:
        """Something the policy reads changed: queue contents or worker availability."""
        self._changed.set()

    async def _until(self, predicate: Callable[[], bool], deadline: float | None = None) -> bool:
        while not predicate():
            self._changed.clear()
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:  # the builtin TimeoutError only from 3.11
                return predicate()
        return True

    async def next_batch(self) -> list[Pending]:
        """Wait for work and a free worker slot, then fill until full, idle worker, or window end."""
        await self._until(lambda: len(self.queue) > 0 and self._pool.has_capacity())
        closes_at = self.queue.oldest_enqueued_at() + self._delay_s
        await self._until(lambda: len(self.queue) >= self._max or self._pool.has_idle(), deadline=closes_at)
        return self.queue.take(self._max)

    async def run(self) -> None:
        while True:
            batch = await self.next_batch()
            if batch:
                self._pool.submit(batch)
