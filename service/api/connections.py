"""The data plane's HTTP connections, guarded: a cap on their number, a deadline and a size cap for every
request head.

uvicorn alone times out nothing before a request head is complete (a connection that sends nothing,
or trickles its head, stays open for ever), buffers a head of any size (httptools collects a 64 MiB
header value whole), and past `limit_concurrency` answers every request, the probes included, with
a plain-text 503. Anyone who can open sockets could so take a pod out. Here, as nginx and envoy do in
front of other servers (client_header_timeout, large_client_header_buffers; Go's ReadHeaderTimeout and
MaxHeaderBytes):

- a connection past `max_connections` is answered 503 at once and closed (the probes live on their
  own listener, service/api/probes.py, and never queue behind it);
- a request head must be complete within `head_timeout_s` of the connection opening (or of its first
  byte, for the next request on a kept-alive connection), else 408 and the connection closes;
- a head over `max_head_bytes` is answered 431 and the connection closes, before more is buffered.

Idle kept-alive connections are closed by uvicorn's own keep-alive timeout. Every refusal is a JSON
error body, as everywhere else.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["ConnectionLimits", "guarded_protocol"]


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    head_timeout_s: float
    max_head_bytes: int


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above (made per app by `guarded_protocol`)."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_pending = True  # waiting for (the rest of) a request head
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "too_many_connections",
                         f"the server holds its limit of {self.limits.max_connections} connections; retry later",
                         retry_after=1)
            return
        self._arm_head_timer()  # a connection that never sends a byte is timed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # the parser may begin (on_message_begin) and end (on_headers_complete) a head
        if self._head_pending and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse(431, "request_header_too_large",
                             f"the request head is over the limit of {self.limits.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # the next request on a kept-alive connection: timed from its first byte (idle: keep-alive timeout)
        self._head_pending, self._head_bytes = True, 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._head_pending = False
        self._disarm_head_timer()
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete  # a request is being answered
        if self._head_pending and not busy and not self.transport.is_closing():
            self._refuse(408, "request_head_timeout",
                         f"the request head did not arrive within {self.limits.head_timeout_s:g} s")

    def _refuse(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
                f"content-length: {len(body)}", "connection: close"]
        if retry_after is not None:
            head.append(f"retry-after: {retry_after}")
        self._disarm_head_timer()
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (`Config(http=...)`) for these limits."""
    return type("GuardedHttpToolsProtocol", (_GuardedProtocol,), {"limits": limits})
