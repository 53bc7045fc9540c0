"""Reading a request body under bounds: its size, the time it may take, and a budget shared by all uploads.

A body is never buffered past `max_bytes`, and the bytes of every body being read or held at once
stay under the upload budget: a request declaring its length reserves it when its first byte
arrives (refused at once past the budget), a chunked one reserves as it grows. Declaring is free:
a client that declares a large body and sends nothing holds no budget, and is answered 408 after
`first_byte_s`. A body whose bytes stop for `idle_s`, or that takes longer than `timeout_s` in all,
is answered 408 too, so no client holds its buffer and its share of the budget for long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import ClassVar

from starlette.requests import ClientDisconnect, Request

from ..errors import OverloadedError, PayloadTooLargeError, ServiceError

__all__ = ["Body", "BodyTimeouts", "BodyTimeoutError", "UploadBudget", "bounded_body", "declared_length"]

BUDGET_RETRY_AFTER_S = 1  # bodies drain in about a request's time; retry soon


class BodyTimeoutError(ServiceError):
    """The body did not arrive within the read timeout."""

    status: ClassVar[int] = 408
    code = "request_timeout"


@dataclass(frozen=True)
class BodyTimeouts:
    """How long a body may take: to its first byte, between two chunks, and in all (seconds)."""

    total_s: float
    first_byte_s: float
    idle_s: float

    def wait_s(self, now: float, ends_at: float, received: int) -> float:
        """How long the next chunk may take to arrive, and which limit that is."""
        return min(ends_at - now, self.idle_s if received else self.first_byte_s)


class UploadBudget:
    """Bytes of request bodies being read or held, across all requests of one app (event-loop only)."""

    def __init__(self, limit_bytes: int, on_refusal: Callable[[], object] = lambda: None) -> None:
        self.limit_bytes = limit_bytes
        self.held_bytes = 0
        self._on_refusal = on_refusal  # e.g. a metric

    def take(self, size: int) -> bool:
        if self.held_bytes + size > self.limit_bytes:
            self._on_refusal()
            return False
        self.held_bytes += size
        return True

    def give(self, size: int) -> None:
        self.held_bytes -= size


def declared_length(request: Request) -> int | None:
    """Content-Length as an int; None for a chunked body (uvicorn refuses a malformed header itself)."""
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


class Body:
    """A request body not read yet: `chunks()` yields it under the size cap, the budget and the timeout."""

    def __init__(self, request: Request, budget: UploadBudget, *, max_bytes: int, timeouts: BodyTimeouts,
                 declared: int | None = None) -> None:
        self._request = request
        self._budget = budget
        self._max_bytes = max_bytes
        self._timeouts = timeouts
        self._declared = declared or 0  # reserved whole once the first byte has come
        self.held = 0  # bytes reserved in the budget

    def reserve(self, size: int) -> None:
        """Hold `size` bytes of the budget (in all), or refuse with 503 and Retry-After."""
        if size <= self.held:
            return
        if not self._budget.take(size - self.held):
            raise OverloadedError(
                f"too many bytes are being uploaded at once (budget {self._budget.limit_bytes} bytes); retry later",
                code="overloaded", headers={"Retry-After": str(BUDGET_RETRY_AFTER_S)},
            )
        self.held = size

    def release(self) -> None:
        self._budget.give(self.held)
        self.held = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive; 413 past the cap, 503 past the budget, 408 past a timeout."""
        limits = self._timeouts
        ends_at = time.monotonic() + limits.total_s
        size = 0
        while True:
            wait_s = limits.wait_s(time.monotonic(), ends_at, size)
            try:
                if wait_s <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(self._request.receive(), wait_s)
            except asyncio.TimeoutError:
                raise BodyTimeoutError(self._late(size, ends_at)) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self._max_bytes:
                raise PayloadTooLargeError(f"the body is over the limit of {self._max_bytes} bytes")
            if chunk:
                self.reserve(max(size, self._declared))
                yield chunk
            if not message.get("more_body", False):
                return

    def _late(self, size: int, ends_at: float) -> str:
        limits = self._timeouts
        if time.monotonic() >= ends_at - 0.001:
            return f"the request body did not arrive within {limits.total_s:g} s ({size} bytes received)"
        if size == 0:
            return f"no byte of the request body arrived within {limits.first_byte_s:g} s"
        return f"the request body stopped for {limits.idle_s:g} s ({size} bytes received)"

    async def read(self) -> bytes:
        """The whole body (for the readers that need it in one piece)."""
        data = bytearray()
        async for chunk in self.chunks():
            data += chunk
        return bytes(data)


@asynccontextmanager
async def bounded_body(
    request: Request, budget: UploadBudget, *, max_bytes: int, timeouts: BodyTimeouts
) -> AsyncIterator[Body]:
    """The request's body, its declared length checked before a byte is read and reserved when the first
    byte comes; the reservation lasts until the request is answered, since the bytes are held until then."""
    declared = declared_length(request)
    if declared is not None and declared > max_bytes:
        raise PayloadTooLargeError(f"the body ({declared} bytes) is over the limit of {max_bytes} bytes")
    body = Body(request, budget, max_bytes=max_bytes, timeouts=timeouts, declared=declared)
    try:
        yield body
    finally:
        body.release()
