"""Reading a request body under bounds: its size, the time it may take, and a budget shared by all uploads.

A body is never buffered past `max_bytes`, and the bytes of every body being read or held at once
stay under the upload budget: a request declaring its length reserves it before the first byte is
read (refused at once past the budget), a chunked one reserves as it grows. A client trickling
bytes is answered 408 once `timeout_s` has passed, so it cannot hold its buffer and its share of
the budget forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import ClassVar

from starlette.requests import ClientDisconnect, Request

from .errors import OverloadedError, PayloadTooLargeError, ServiceError

__all__ = ["Body", "BodyTimeoutError", "UploadBudget", "bounded_body", "declared_length"]

BUDGET_RETRY_AFTER_S = 1  # bodies drain in about a request's time; retry soon


class BodyTimeoutError(ServiceError):
    """The body did not arrive within the read timeout."""

    status: ClassVar[int] = 408
    code = "request_timeout"


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

    def __init__(self, request: Request, budget: UploadBudget, *, max_bytes: int, timeout_s: float) -> None:
        self._request = request
        self._budget = budget
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
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
        """The body's chunks as they arrive; 413 past the cap, 503 past the budget, 408 past the timeout."""
        ends_at = time.monotonic() + self._timeout_s
        size = 0
        while True:
            remaining = ends_at - time.monotonic()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(self._request.receive(), remaining)
            except asyncio.TimeoutError:
                raise BodyTimeoutError(
                    f"the request body did not arrive within {self._timeout_s:g} s ({size} bytes received)"
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self._max_bytes:
                raise PayloadTooLargeError(f"the body is over the limit of {self._max_bytes} bytes")
            self.reserve(size)
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def read(self) -> bytes:
        """The whole body (for the readers that need it in one piece)."""
        data = bytearray()
        async for chunk in self.chunks():
            data += chunk
        return bytes(data)


@asynccontextmanager
async def bounded_body(
    request: Request, budget: UploadBudget, *, max_bytes: int, timeout_s: float
) -> AsyncIterator[Body]:
    """The request's body, its declared length checked and reserved before a byte is read; the
    reservation lasts until the request is answered, since the bytes are held until then."""
    declared = declared_length(request)
    if declared is not None and declared > max_bytes:
        raise PayloadTooLargeError(f"the body ({declared} bytes) is over the limit of {max_bytes} bytes")
    body = Body(request, budget, max_bytes=max_bytes, timeout_s=timeout_s)
    try:
        if declared is not None:
            body.reserve(declared)
        yield body
    finally:
        body.release()
