"""HTTP routes: /v1/classify, /v1/models, /v1/admin/self-test, and the operational /healthz, /readyz, /metrics.

What /v1 and /v2 share (the app's state, the body, the key, deadlines) is service/api/deps.py.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import InvalidParameterError
from ..schemas import ClassifyJSON, ClassifyResponse, ErrorResponse, Health, ModelCard, Readiness, SelfTestReport
from ..uploads.inputs import MULTIPART_FIELD, RAW_IMAGE_TYPES, read_images
from .deps import BodyDep, EngineDep, SettingsDep, deadline, require_api_key, until_client_leaves

__all__ = ["router"]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_errors(401))

_BINARY = {"schema": {"type": "string", "format": "binary", "minLength": 1}}  # maxLength: service.api.openapi
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
                    }},  # maxItems: service.api.openapi
                    "required": [MULTIPART_FIELD],
                }
            },
            "application/json": {"schema": ClassifyJSON.model_json_schema()},
            **{media: _BINARY for media in sorted(RAW_IMAGE_TYPES)},
        },
    }
}


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


@v1.post(
    "/admin/self-test", response_model=SelfTestReport, responses=_errors(503),
    summary="Run the start-up self-test again on every ready worker (operators: check a pod)",
)
async def self_test(engine: EngineDep) -> dict[str, Any]:
    engine.require_ready()
    workers = await engine.self_test()
    return {"passed": bool(workers) and all(w.get("passed") for w in workers), "workers": workers}


@router.get("/healthz", response_model=Health, summary="Liveness: the process can answer")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=Readiness, responses=_errors(503),
    summary="Readiness: weights loaded, a worker warmed up and free to take work, not draining",
)
async def readyz(engine: EngineDep) -> Any:
    return {"ready": True, "reason": engine.require_ready()}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


router.include_router(v1)
