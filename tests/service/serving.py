"""Helpers of the engine, supervision, self-test and INT8 tests: metrics, polling, requests, holding workers.

Holding a batch deterministically: SIGSTOP a worker, send the request, wait until the batch was
dispatched to it (the `crossvit_batch_size` count), then kill, continue or let the client leave.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tests.conftest import until
from tests.photos import encode, photo, resized

JPEG = encode(resized(photo("chelsea"), 640, 480), "JPEG", quality=90)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def batches(url: str) -> float:
    """Batches dispatched to a worker so far (counted when the parent hands the batch over)."""
    return metric(url, "crossvit_batch_size_count")


def classify(url: str, images: int = 1, timeout_s: float = 120, **headers: str) -> httpx.Response:
    files = [("images", (f"{i}.jpg", JPEG, "image/jpeg")) for i in range(images)]
    return httpx.post(f"{url}/v1/classify", files=files, headers=headers, timeout=timeout_s)



def ready_status(url: str) -> int:
    return httpx.get(f"{url}/readyz").status_code


@contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """The processes stopped (SIGSTOP) for the block, continued after whatever happens to them."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # killed in the block


def stays_unready(url: str, *expected: str) -> str:
    """Wait for /readyz to name one of `expected` in its reason; it stays 503. Returns the reason."""
    reason = ""

    def says() -> bool:
        nonlocal reason
        response = httpx.get(f"{url}/readyz", timeout=10)
        assert response.status_code == 503, "a faulty server must never report ready"
        reason = response.json()["error"]["message"]
        return any(text in reason for text in expected)

    until(says, 120, f"/readyz to say one of {expected!r}")
    return reason
