"""HTTP routes: /v1/classify, /v1/models, and the operational /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, TypedDict, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from .bodies import Body, BodyTimeouts, UploadBudget, bounded_body
from .engine import Engine
from .errors import InvalidParameterError, UnauthorizedError, error_body
from .inputs import MULTIPART_FIELD, RAW_IMAGE_TYPES, read_images
from .loading import LoadedWeights
from .metrics import Metrics
from .schemas import ClassifyJSON, ClassifyResponse, ErrorResponse, Health, ModelCard, Readiness
from .settings import Settings

__all__ = [
    "AppState", "BodyDep", "EngineDep", "SettingsDep", "deadline", "require_api_key", "router", "until_client_leaves"
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


# Dependencies are `async def` though nothing in them waits: FastAPI runs a plain `def` dependency
# in a worker thread, three thread hops per request for what are attribute reads (measured with
# py-spy under load: the API process's top cost after the event loop's own I/O).
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


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_errors(401))

_BINARY = {"schema": {"type": "string", "format": "binary", "minLength": 1}}  # maxLength: service.openapi
_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "description": "One or more images; the Content-Type decides how the body is read.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {MULTIPART_FIELD: {
                        "type": "array", "minItems": 1, "items": {"type": "string", "format": "binary", "minLength": 1}
                    }},  # maxItems: service.openapi
                    "required": [MULTIPART_FIELD],
                }
            },
            "application/json": {"schema": ClassifyJSON.model_json_schema()},
            **{media: _BINARY for media in sorted(RAW_IMAGE_TYPES)},
        },
    }
}


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


@v1.post(
    "/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    responses=_errors(400, 408, 413, 415, 422, 503, 504),
    openapi_extra=_CLASSIFY_BODY,
    summary="Classify one or more images",
)
async def classify(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    body: BodyDep,
    top_k: Annotated[int, Query(ge=1, description="predictions per image, 1..num_classes")] = 5,
    branches: Annotated[bool, Query(description="also return each branch's own top-k")] = False,
    x_request_timeout_ms: Annotated[
        int | None, Header(ge=1, description="client deadline; never waited past, nor past the server's limit")
    ] = None,
) -> dict[str, Any]:
    started = time.monotonic()
    card = request.state.model_card
    if top_k > card["labels"]:
        raise InvalidParameterError(f"top_k must be between 1 and {card['labels']}, got {top_k}")
    uploads = await read_images(request, body, max_images=settings.max_images_per_request)
    request.state.images = len(uploads)
    answer_by = deadline(started, settings, x_request_timeout_ms)
    result = await until_client_leaves(
        request, engine.classify([u.data for u in uploads], top_k=top_k, branches=branches, deadline=answer_by)
    )
    request.state.timing_ms = result.timing_ms
    resolutions = card["input"]["resolutions"]
    return {
        "model": card["name"],
        "results": [
            {
                "index": r.index,
                "filename": uploads[r.index].filename,
                "width": r.width,
                "height": r.height,
                "predictions": r.predictions,
                "branches": None if r.branches is None else [
                    {"branch": b, "resolution": resolutions[b], "predictions": preds}
                    for b, preds in enumerate(r.branches)
                ],
                "agreement": r.agreement,
            }
            for r in result.results
        ],
        "timing_ms": result.timing_ms,
    }


@v1.get("/models", response_model=ModelCard, summary="The loaded model and how it is served")
async def models(request: Request, engine: EngineDep) -> dict[str, Any]:
    serving = engine.describe()
    ready_modes = [w["mode"] for w in serving["workers"] if w["state"] == "ready" and "mode" in w]
    return {
        **request.state.model_card,
        "devices": serving["devices"],
        "precision": ready_modes,
        "worker_count": len(serving["workers"]),
        "workers": serving["workers"],
        "skipped_modes": serving["skipped_modes"],
        "batching": serving["batching"],
    }


@router.get("/healthz", response_model=Health, summary="Liveness: the process can answer")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=Readiness, responses=_errors(503),
    summary="Readiness: weights loaded, a worker warmed up and free to take work, not draining",
)
async def readyz(engine: EngineDep) -> Any:
    ready, reason = engine.readiness()
    if not ready:
        return JSONResponse(error_body("not_ready", reason), status_code=503, headers={"Retry-After": "1"})
    return {"ready": True, "reason": reason}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


router.include_router(v1)
