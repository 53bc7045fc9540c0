"""Per-request context: request id, access log line, request metrics, the pretrained flag.

A pure ASGI middleware (not BaseHTTPMiddleware), so bodies stream through untouched.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

__all__ = ["RequestContext"]

logger = logging.getLogger("service.access")

_CLIENT_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")  # echoed in headers and logs, so kept plain
_QUIET_ROUTES = {"/healthz", "/readyz", "/metrics"}  # probes and scrapes log at debug


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        headers: dict[bytes, bytes] = dict(scope["headers"])
        supplied = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = supplied if _CLIENT_ID.match(supplied) else uuid.uuid4().hex
        state["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_context(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                weights = state.get("weights")
                if weights is not None and not weights.pretrained:
                    headers["X-Model-Pretrained"] = "false"
            await send(message)

        try:
            await self.app(scope, receive, send_with_context)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.request_latency.labels(path).observe(elapsed)
            fields: dict[str, Any] = {
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
                **{k: state[k] for k in ("images", "timing_ms", "error_code") if k in state},
            }
            logger.log(logging.DEBUG if path in _QUIET_ROUTES else logging.INFO, "request", extra=fields)
