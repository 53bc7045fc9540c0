"""The batching policy in isolation: the real Batcher and ImageQueue against a scripted pool.

The pool stand-in only reports capacity and records batches; the worker processes are tested
through the real server in test_engine.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from service.inference.batcher import Batcher
from service.inference.items import Pending

PIXELS = torch.zeros(3, 4, 4)
pytestmark = pytest.mark.anyio  # anyio's pytest plugin (installed with Starlette) runs the coroutines


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ScriptedPool:
    def __init__(self, *, capacity: bool = True, idle: bool = True) -> None:
        self.capacity = capacity
        self.idle = idle
        self.batches: list[list[Pending]] = []

    def has_capacity(self) -> bool:
        return self.capacity

    def has_idle(self) -> bool:
        return self.idle

    def submit(self, batch: list[Pending]) -> None:
        self.batches.append(batch)


def _pending(n: int) -> list[Pending]:
    loop = asyncio.get_running_loop()
    return [Pending(PIXELS, loop.create_future()) for _ in range(n)]


async def test_an_idle_worker_takes_what_is_there_at_once() -> None:
    pool = ScriptedPool(idle=True)
    batcher = Batcher(pool, max_batch_size=8, max_batch_delay_s=10.0)
    items = _pending(3)
    batcher.queue.put(items)
    started = time.monotonic()
    batch = await batcher.next_batch()
    assert batch == items
    assert time.monotonic() - started < 1.0  # not the 10 s window


async def test_busy_workers_let_the_batch_fill_until_the_window_closes() -> None:
    pool = ScriptedPool(idle=False)  # a free slot, but every worker is computing
    batcher = Batcher(pool, max_batch_size=8, max_batch_delay_s=0.2)
    first = _pending(1)
    batcher.queue.put(first)
    task = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0.05)  # more arrive inside the window
    later = _pending(2)
    batcher.queue.put(later)
    batch = await task
    assert batch == first + later
    assert time.monotonic() - first[0].enqueued_at >= 0.2 - 1e-3  # the window counts from the first image


async def test_a_full_batch_leaves_without_waiting() -> None:
    pool = ScriptedPool(idle=False)
    batcher = Batcher(pool, max_batch_size=4, max_batch_delay_s=10.0)
    items = _pending(6)
    batcher.queue.put(items)
    batch = await asyncio.wait_for(batcher.next_batch(), 1.0)
    assert batch == items[:4] and len(batcher.queue) == 2


async def test_a_worker_turning_idle_closes_the_batch() -> None:
    pool = ScriptedPool(idle=False)
    batcher = Batcher(pool, max_batch_size=8, max_batch_delay_s=10.0)
    items = _pending(2)
    batcher.queue.put(items)
    task = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0.05)
    assert not task.done()
    pool.idle = True
    batcher.wake()
    assert await asyncio.wait_for(task, 1.0) == items


async def test_no_capacity_means_no_batch() -> None:
    pool = ScriptedPool(capacity=False)
    batcher = Batcher(pool, max_batch_size=8, max_batch_delay_s=0.0)
    batcher.queue.put(_pending(1))
    task = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0.05)
    assert not task.done()
    pool.capacity = True
    batcher.wake()
    assert len(await asyncio.wait_for(task, 1.0)) == 1


async def test_abandoned_images_leave_the_queue_before_batching() -> None:
    pool = ScriptedPool(capacity=False)
    batcher = Batcher(pool, max_batch_size=8, max_batch_delay_s=0.0)
    items = _pending(4)
    batcher.queue.put(items)
    items[1].future.cancel()  # deadline passed or the client left
    items[3].future.cancel()
    await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
    assert len(batcher.queue) == 2
    pool.capacity = True
    batcher.wake()
    assert await asyncio.wait_for(batcher.next_batch(), 1.0) == [items[0], items[2]]


async def test_retries_go_to_the_front_in_order() -> None:
    pool = ScriptedPool()
    batcher = Batcher(pool, max_batch_size=8, max_batch_delay_s=0.0)
    waiting = _pending(2)
    batcher.queue.put(waiting)
    retried = _pending(2)
    batcher.queue.put_front(retried)
    assert await batcher.next_batch() == retried + waiting


async def test_run_submits_batches_to_the_pool() -> None:
    pool = ScriptedPool()
    batcher = Batcher(pool, max_batch_size=2, max_batch_delay_s=0.0)
    task = asyncio.create_task(batcher.run())
    items = _pending(5)
    batcher.queue.put(items)
    for _ in range(100):
        if sum(len(b) for b in pool.batches) == 5:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [len(b) for b in pool.batches] == [2, 2, 1]
    assert [p for b in pool.batches for p in b] == items
