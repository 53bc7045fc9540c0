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

from ..errors import internal_error
from ..metrics import Metrics

__all__ = ["RequestContext"]

logger = logging.getLogger("service.access")
error_logger = logging.getLogger(__name__)

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

        started_response = False

        async def send_with_context(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                weights = state.get("weights")
                if weights is not None and not weights.pretrained:
                    headers["X-Model-Pretrained"] = "false"
            await send(message)

        try:
            await self.app(scope, receive, send_with_context)
        except Exception:
            # Answered here, inside the request's context (its X-Request-ID, its access line), and
            # not re-raised: Starlette's outer error middleware and uvicorn would log it twice more.
            error_logger.exception("unhandled error", extra={"request_id": request_id})
            state["error_code"] = "internal_error"
            if not started_response:
                await internal_error()(scope, receive, send_with_context)
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
