"""What the client raises, or returns per image from `classify_each`."""

from __future__ import annotations

import httpx

__all__ = ["APIError", "ClientError", "ImageReadError", "UnreachableError"]


class ClientError(Exception):
    """Base of every client error; `index` names the caller's image when one is to blame."""

    code = "client_error"

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index

    def __str__(self) -> str:
        return self.message if self.index is None else f"image {self.index}: {self.message}"


class APIError(ClientError):
    """The server answered with an error: its status, stable code and message."""

    def __init__(self, status: int, code: str, message: str, *, index: int | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(message, index=index)
        self.status = status
        self.code = code  # per instance: the server's code
        self.request_id = request_id

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        request_id = response.headers.get("x-request-id")
        try:
            error = response.json()["error"]
            return cls(response.status_code, str(error["code"]), str(error["message"]),
                       index=error.get("index"), request_id=request_id)
        except (ValueError, KeyError, TypeError):  # not this API's error body (a proxy, a wrong URL)
            text = response.text.strip()[:200] or response.reason_phrase
            return cls(response.status_code, "http_error", f"HTTP {response.status_code}: {text}",
                       request_id=request_id)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {super().__str__()}"


class ImageReadError(ClientError):
    """A local file could not be read; the other images are still sent."""

    code = "unreadable_file"


class UnreachableError(ClientError):
    """No answer from the server after every retry (refused, reset, timed out)."""

    code = "unreachable"
