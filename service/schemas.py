"""Pydantic models of every request and response body: the OpenAPI contract (docs/api.md).

The response models the Python client shares live in `client.wire` (the client's own distribution
must not need the server); they are imported here, so that the server answers with the very classes
the client parses.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from client.wire import (
    AgreementModel,
    BranchPredictions,
    ClassifyResponse,
    ErrorDetail,
    ErrorResponse,
    ImageResultModel,
    ModelCard,
    PredictionModel,
    Timing,
)

__all__ = [
    "AgreementModel",
    "BranchPredictions",
    "ClassifyJSON",
    "ClassifyResponse",
    "ErrorDetail",
    "ErrorResponse",
    "Health",
    "ImageResultModel",
    "ModelCard",
    "PredictionModel",
    "Readiness",
    "SelfTestReport",
    "Timing",
]


class ClassifyJSON(BaseModel):
    """The `application/json` request body."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(
        description="standard base64 images, each optionally prefixed with data:image/...;base64,",
        json_schema_extra={"minItems": 1, "items": {"type": "string", "format": "byte"}},  # maxItems: api/openapi.py
    )


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    reason: str


class SelfTestReport(BaseModel):
    """POST /v1/admin/self-test: the golden images through the served path, on every ready worker."""

    passed: bool = Field(description="every ready worker reproduced the golden record within its mode's tolerance")
    workers: list[dict[str, Any]] = Field(
        description="per worker: id, mode, passed, worst_cosine, worst_rel_err, tolerance, recorded (where the "
                    "reference came from), seconds, and the reason when it failed (that worker then restarts "
                    "without the mode, as at start-up)",
    )
