"""The v2 REST endpoints: health, server and model metadata, readiness, and inference.

Same engine, limits, deadlines, backpressure and auth as /v1: the health probes are open, the rest
needs the API key when keys are configured. The model's name is the variant's; its one version is "1".
"""

# No `from __future__ import annotations` here: the path parameters' annotations name the configured
# model, a closure variable that FastAPI could not resolve from a string annotation.
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi import Path as PathParam
from fastapi.routing import APIRoute
from starlette.responses import Response

from model.variants import get_variant
from weights.labels import imagenet_labels

from ... import __version__
from ...settings import Settings
from ..deps import BodyDep, EngineDep, SettingsDep, deadline, require_api_key, until_client_leaves
from .codec import HEADER_LENGTH, encode_response
from .errors import ModelNotFoundError, V2Route, error_response
from .schemas import (
    BRANCH_LOGITS,
    IMAGE,
    LOGITS,
    PIXELS,
    InferenceResponse,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
    V2Error,
    infer_request_schema,
)
from .tensors import Limits, build_outputs, decode

__all__ = ["EXTENSIONS", "MODEL_VERSION", "router"]

MODEL_VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "classification"]  # Triton's names for the two extensions served here
_BINARY_FORM = (
    "The binary tensor data extension: the JSON request (the application/json schema, where an input may "
    f"carry parameters.binary_data_size instead of data), then each such input's bytes; the header {HEADER_LENGTH} "
    "gives the JSON's length. BYTES elements are a 4-byte little-endian length and the bytes; FP32 is "
    f"little-endian. '{PIXELS}' (FP32 [N, 3, S, S], normalised as the model's card says) is sent this way."
)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": V2Error} for status in statuses}


def router(settings: Settings) -> APIRouter:
    """The /v2 routes for the configured model; its limits are part of the published schema."""
    variant = get_variant(settings.model)
    name, side, num_classes = variant.name, variant.input_size, len(imagenet_labels())
    limits = Limits(max_images=settings.max_images_per_request, side=side, num_classes=num_classes)
    metadata = {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": "pytorch",
        "inputs": [
            {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS, "datatype": "FP32", "shape": [-1, 3, side, side]},
        ],
        "outputs": [
            {"name": LOGITS, "datatype": "FP32", "shape": [-1, num_classes]},
            {"name": BRANCH_LOGITS, "datatype": "FP32", "shape": [-1, 2, num_classes]},
        ],
    }

    def _model(model_name: str, model_version: str | None) -> None:
        if model_name != name:
            raise ModelNotFoundError(f"no model '{model_name}' here; this server serves '{name}'")
        if model_version not in (None, MODEL_VERSION):
            raise ModelNotFoundError(f"model '{name}' has no version '{model_version}'; versions: ['{MODEL_VERSION}']")

    async def served(model_name: Annotated[str, PathParam(json_schema_extra={"enum": [name]})]) -> None:
        _model(model_name, None)

    async def served_version(
        model_name: Annotated[str, PathParam(json_schema_extra={"enum": [name]})],
        model_version: Annotated[str, PathParam(json_schema_extra={"enum": [MODEL_VERSION]})],
    ) -> None:
        _model(model_name, model_version)

    async def model_metadata() -> dict[str, Any]:
        return metadata

    async def model_ready(engine: EngineDep) -> dict[str, Any]:
        engine.require_ready()
        return {"name": name, "ready": True}

    async def infer(
        request: Request,
        engine: EngineDep,
        settings: SettingsDep,
        body: BodyDep,  # under /v1's bounds: size, upload budget, read timeout
        x_request_timeout_ms: Annotated[
            int | None, Header(ge=1, description="client deadline; never waited past, nor past the server's limit")
        ] = None,
    ) -> Response:
        started = time.monotonic()
        data = await body.read()
        decoded = await asyncio.to_thread(decode, data, request.headers.get(HEADER_LENGTH), limits)  # off the loop
        request.state.images = decoded.count
        answer_by = deadline(started, settings, x_request_timeout_ms)
        top_k, branches = decoded.top_k, decoded.branches
        if decoded.pixels is not None:
            work = engine.classify_pixels(decoded.pixels, top_k=top_k, branches=branches, deadline=answer_by)
        else:
            work = engine.classify(decoded.images or [], top_k=top_k, branches=branches, deadline=answer_by)
        result = await until_client_leaves(request, work)
        request.state.timing_ms = result.timing_ms
        header = {"model_name": name, "model_version": MODEL_VERSION, "id": decoded.id or request.state.request_id}
        content, json_length = await asyncio.to_thread(encode_response, header, build_outputs(decoded, result))
        if json_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)})

    infer_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": infer_request_schema(max_images=limits.max_images, side=side, num_classes=num_classes)
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
            "description": _BINARY_FORM,
        }
    }
    infer_responses: dict[int | str, dict[str, Any]] = {
        200: {
            "model": InferenceResponse,
            "description": f"JSON; or, when an output is asked for as binary_data, the JSON (length in "
            f"{HEADER_LENGTH}) followed by the binary outputs in order",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "headers": {HEADER_LENGTH: {"schema": {"type": "integer"}, "description": "with binary outputs"}},
        },
        **_errors(400, 404, 408, 413, 422, 503, 504),
    }

    keyed = [Depends(require_api_key)]
    r = APIRouter(route_class=V2Route, tags=["v2: Open Inference Protocol"], responses=_errors(401))

    @r.get("/v2/health/live", response_model=Live, summary="Liveness: the process can answer")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @r.get("/v2/health/ready", response_model=Ready, responses=_errors(503),
           summary="Readiness: a worker is warmed up and free to take work")
    async def ready(engine: EngineDep) -> dict[str, bool]:
        engine.require_ready()
        return {"ready": True}

    @r.get("/v2", response_model=ServerMetadata, dependencies=keyed, summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "crossvit-serve", "version": __version__, "extensions": EXTENSIONS}

    checks: list[tuple[str, Callable[..., Awaitable[None]]]] = [
        ("/v2/models/{model_name}", served), ("/v2/models/{model_name}/versions/{model_version}", served_version)
    ]
    for path, check in checks:
        guards = [*keyed, Depends(check)]
        r.add_api_route(path, model_metadata, methods=["GET"], response_model=ModelMetadata, dependencies=guards,
                        responses=_errors(404), summary="Model metadata")
        r.add_api_route(f"{path}/ready", model_ready, methods=["GET"], response_model=ModelReady,
                        dependencies=guards, responses=_errors(404, 503), summary="Model readiness")
        r.add_api_route(f"{path}/infer", infer, methods=["POST"], response_class=Response, dependencies=guards,
                        responses=infer_responses, openapi_extra=infer_body, summary="Inference")

    @r.api_route("/v2/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unmatched(request: Request) -> Response:
        """Unknown /v2 paths and methods, answered in the protocol's error shape."""
        allowed = sorted({
            method for route in r.routes  # this router holds every /v2 route
            if isinstance(route, APIRoute) and route.endpoint is not unmatched
            and route.path_regex.fullmatch(request.url.path) for method in route.methods or ()
        })
        if allowed:
            return error_response(405, f"method {request.method} not allowed", {"Allow": ", ".join(allowed)})
        return error_response(404, f"no route {request.url.path}")

    return r
