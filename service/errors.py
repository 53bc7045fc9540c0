"""The errors a client may see, and the only place exceptions become HTTP responses.

Every error body is `{"error": {"code": ..., "message": ..., "index": ...}}` (docs/api.md);
codes are stable snake_case and each subclass fixes its status and code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

__all__ = [
    "BadRequestError",
    "DeadlineExceededError",
    "ImageTooLargeError",
    "InvalidImageError",
    "InvalidParameterError",
    "NotReadyError",
    "OverloadedError",
    "PayloadTooLargeError",
    "ServiceError",
    "UnauthorizedError",
    "UnsupportedMediaTypeError",
    "WorkerFailedError",
    "error_body",
    "install",
    "internal_error",
]

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response


class ServiceError(Exception):
    """Base of every error a client may see; subclasses fix the status and the stable code."""

    status: ClassVar[int] = 500
    code: str = "internal_error"  # class default; an instance may narrow it

    def __init__(
        self,
        message: str,
        *,
        index: int | None = None,
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.index = index
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        if code is not None:
            self.code = code  # a more specific code within the same status

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments: rebuild explicitly so errors survive a process pool.
        return (_rebuild, (type(self), self.message, self.index, self.headers, self.code, self.extra))

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.index, **self.extra)


def _rebuild(
    cls: type[ServiceError], message: str, index: int | None, headers: dict[str, str], code: str,
    extra: dict[str, Any],
) -> ServiceError:
    return cls(message, index=index, headers=headers, code=code, extra=extra)


class BadRequestError(ServiceError):
    status, code = 400, "bad_request"


class UnauthorizedError(ServiceError):
    status, code = 401, "unauthorized"


class PayloadTooLargeError(ServiceError):
    status, code = 413, "payload_too_large"


class ImageTooLargeError(PayloadTooLargeError):
    code = "image_too_large"


def too_many_images(limit: int, count: int | None = None) -> PayloadTooLargeError:
    """The refusal of a request over `limit` images: `count` when declared up front (a /v2 shape), else
    raised by the body readers as soon as the image past the limit arrives."""
    said = f"{count}" if count is not None else f"more than {limit}"
    return PayloadTooLargeError(f"{said} images in one request; the limit is {limit}", code="too_many_images")


class UnsupportedMediaTypeError(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidParameterError(ServiceError):
    status, code = 422, "invalid_parameter"


class InvalidImageError(ServiceError):
    status, code = 422, "invalid_image"


class OverloadedError(ServiceError):
    status, code = 503, "overloaded"


class NotReadyError(ServiceError):
    status, code = 503, "not_ready"


class WorkerFailedError(ServiceError):
    """A worker died while holding the request's images, and the one retry was spent too."""

    status, code = 503, "worker_failed"


class DeadlineExceededError(ServiceError):
    status, code = 504, "deadline_exceeded"


def error_body(code: str, message: str, index: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "index": index, **extra}}


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    request.state.error_code = exc.code
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    request.state.error_code = code
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)


def validation_message(exc: RequestValidationError) -> str:
    """Every problem FastAPI found in a request's parameters, `where: what`, on one line (/v1 and /v2)."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "header", "path"))
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(problems) or "invalid parameters"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    request.state.error_code = InvalidParameterError.code
    return JSONResponse(error_body(InvalidParameterError.code, validation_message(exc)), status_code=422)


async def _client_disconnect(request: Request, exc: Exception) -> Response:
    """A client that left, mid-body (Starlette raises) or while its images were queued (the route raises)."""
    request.state.error_code = "client_closed_request"
    return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; the access log and metrics do


def internal_error() -> JSONResponse:
    """The 500 for an unexpected exception; `middleware.RequestContext` logs it and sends this."""
    return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)


def install(app: FastAPI) -> None:
    """Route every exception, FastAPI's own 404/405/validation errors included, to the JSON shape."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    # Any other exception reaches `middleware.RequestContext`, which answers the 500 (a handler
    # for Exception would run in Starlette's outermost middleware, outside the request context).
