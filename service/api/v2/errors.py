"""Errors in the protocol's shape, `{"error": "<message>"}`, with the status codes /v1 uses.

`V2Route` is the one place where an exception raised in a /v2 route (auth, header validation,
a bad tensor, the engine's 503/504) becomes that body; /v1 keeps its own shape (service/errors.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ...errors import InvalidParameterError, ServiceError, validation_message

__all__ = ["ModelNotFoundError", "V2Route", "error_response"]

logger = logging.getLogger(__name__)


class ModelNotFoundError(ServiceError):
    """A model name or version this server does not serve."""

    status, code = 404, "model_not_found"


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


class V2Route(APIRoute):
    """An APIRoute whose errors, dependencies' included, answer in the protocol's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                request.state.error_code = exc.code
                return error_response(exc.status, exc.message, exc.headers)
            except RequestValidationError as exc:  # a header or path parameter out of range: 422 as in /v1
                request.state.error_code = InvalidParameterError.code
                return error_response(422, validation_message(exc))
            except StarletteHTTPException as exc:
                request.state.error_code = "http_error"
                detail = exc.detail if isinstance(exc.detail, str) else "request failed"
                return error_response(exc.status_code, detail, exc.headers)
            except ClientDisconnect:
                raise  # answered 499 by service.errors, like /v1
            except Exception:
                logger.exception("unhandled error", extra={"request_id": getattr(request.state, "request_id", None)})
                request.state.error_code = "internal_error"
                return error_response(500, "internal server error")

        return handle
