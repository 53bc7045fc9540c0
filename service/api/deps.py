"""What every inference route shares, /v1 and /v2 alike: the app's state, the request body under its
bounds, the API key, the deadline, and cancelling work whose client left.

Dependencies are `async def` though nothing in them waits: FastAPI runs a plain `def` dependency in a
worker thread, three thread hops per request for what are attribute reads (seen with py-spy under load).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, TypedDict, TypeVar

from fastapi import Depends, Request
from starlette.requests import ClientDisconnect

from ..errors import UnauthorizedError
from ..inference.engine import Engine
from ..inference.loading import LoadedWeights
from ..metrics import Metrics
from ..settings import Settings
from ..uploads.bodies import Body, BodyTimeouts, UploadBudget, bounded_body

__all__ = [
    "AppState", "BodyDep", "EngineDep", "SettingsDep", "deadline", "require_api_key", "until_client_leaves"
]

T = TypeVar("T")


class AppState(TypedDict):
    """What the lifespan yields; Starlette hands a copy to every request as `request.state`."""

    settings: Settings
    engine: Engine
    weights: LoadedWeights
    metrics: Metrics
    model_card: dict[str, Any]  # the static part of /v1/models
    uploads: UploadBudget  # bytes of request bodies being read or held


async def _settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


async def _engine(request: Request) -> Engine:
    engine: Engine = request.state.engine
    return engine


SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[Engine, Depends(_engine)]


async def _body(request: Request, engine: EngineDep, settings: SettingsDep) -> AsyncIterator[Body]:
    """The body of an inference request, not read yet, and only once the request could be admitted:
    draining, not ready or a full queue (for its first image) is refused before a byte is buffered,
    then its declared length is held in the upload budget from its first byte until it is answered."""
    engine.check_admission(1)
    timeouts = BodyTimeouts(settings.body_timeout_s, settings.body_first_byte_timeout_s, settings.body_idle_timeout_s)
    async with bounded_body(request, request.state.uploads, max_bytes=settings.max_upload_bytes,
                            timeouts=timeouts) as body:
        yield body


BodyDep = Annotated[Body, Depends(_body)]


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With API keys configured, /v1/* needs `Authorization: Bearer <key>` (constant-time compare)."""
    if not settings.api_keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    supplied = token.strip().encode()
    matched = False
    for key in settings.api_keys:  # compare against every key: timing says nothing about which
        matched |= hmac.compare_digest(supplied, key.get_secret_value().encode())
    if scheme.lower() != "bearer" or not supplied or not matched:
        raise UnauthorizedError(
            "missing or invalid API key; send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def deadline(started: float, settings: Settings, timeout_ms: int | None) -> float:
    """When a request must be answered: the server's limit, or the client's X-Request-Timeout-Ms if sooner."""
    budget_s = settings.request_timeout_s if timeout_ms is None else min(settings.request_timeout_s, timeout_ms / 1000)
    return started + budget_s


async def until_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """The work's result; if the client disconnects first, the work is cancelled so that its images
    leave the queue before they take device time, and the request ends as a disconnect."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnect()  # answered like a client that left mid-body (service.errors)
    gone.cancel()
    return task.result()
