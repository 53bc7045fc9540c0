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
from typing import Protocol

from .items import Pending

__all__ = ["Batcher", "ImageQueue"]


class ImageQueue:
    """FIFO of pending images (bounded by admission, see Engine); retries go to the front. `changed` is
    what the batcher waits on: set by the queue itself and, through `poke`, by the pool when a worker's
    availability changes. The engine makes the queue first and hands it to both, so neither needs the other
    to exist first."""

    def __init__(self) -> None:
        self._items: deque[Pending] = deque()
        self.changed = asyncio.Event()

    def poke(self) -> None:
        """Something the batching policy reads changed: queue contents or worker availability."""
        self.changed.set()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, items: Iterable[Pending]) -> None:
        for item in items:
            self._items.append(item)
            item.future.add_done_callback(functools.partial(self._drop_if_abandoned, item))
        self.poke()

    def put_front(self, items: list[Pending]) -> None:
        self._items.extendleft(reversed(items))
        self.poke()

    def _drop_if_abandoned(self, item: Pending, _: object = None) -> None:
        # Deadline passed or client gone: leave the queue now, not when a batch forms.
        if item.future.cancelled():
            try:
                self._items.remove(item)
            except ValueError:
                pass  # already dispatched
            self.poke()

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

    def __init__(
        self, pool: WorkerCapacity, *, max_batch_size: int, max_batch_delay_s: float, queue: ImageQueue | None = None
    ) -> None:
        self._pool = pool
        self._max = max_batch_size
        self._delay_s = max_batch_delay_s
        self.queue = queue if queue is not None else ImageQueue()

    def wake(self) -> None:
        self.queue.poke()

    def set_limits(self, max_batch_size: int, max_batch_delay_s: float) -> None:
        """New limits from the next batch on (the calibration's)."""
        self._max, self._delay_s = max_batch_size, max_batch_delay_s

    async def _until(self, predicate: Callable[[], bool], deadline: float | None = None) -> bool:
        while not predicate():
            self.queue.changed.clear()
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                return False
            try:
                await asyncio.wait_for(self.queue.changed.wait(), timeout)
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
