"""The wire models of crossvit-serve's /v1 API: what a response holds, as the client reads it.

They live in the client's distribution because the client must stand alone (httpx, pydantic and
tqdm; no torch, no server); the server builds its responses and its OpenAPI document from these same
classes (service/schemas.py imports them), so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AgreementModel",
    "BranchPredictions",
    "ClassifyResponse",
    "ErrorDetail",
    "ErrorResponse",
    "ImageResultModel",
    "ModelCard",
    "PredictionModel",
    "Timing",
]


class PredictionModel(BaseModel):
    class_id: int = Field(description="ImageNet-1k class index")
    label: str
    logit: float = Field(description="mean of the two branches' logits (the model's output)")
    probability: float = Field(description="softmax of the averaged logits over all classes")


class BranchPredictions(BaseModel):
    branch: int = Field(description="0: the 240 px / patch 12 branch, 1: the 224 px / patch 16 branch")
    resolution: int
    predictions: list[PredictionModel] = Field(description="top-k of this branch's own logits")


class AgreementModel(BaseModel):
    top1_agree: bool = Field(description="the two branches' own top-1 classes are the same")
    js_divergence: float = Field(
        ge=0, le=1,
        description="Jensen-Shannon divergence (base 2) between the branches' softmax distributions: "
        "0 identical, 1 disjoint; high values flag an image for review",
    )


class ImageResultModel(BaseModel):
    index: int = Field(description="position of the image in the request")
    filename: str | None = Field(None, description="the multipart part's filename, when there was one")
    width: int = Field(description="width after EXIF orientation")
    height: int
    predictions: list[PredictionModel] = Field(description="top-k, sorted by logit, descending")
    branches: list[BranchPredictions] | None = Field(None, description="only with ?branches=true")
    agreement: AgreementModel = Field(description="how far the two branches agree on this image")


class Timing(BaseModel):
    decode: float = Field(description="ms reading, decoding and preprocessing the images")
    queue: float = Field(description="ms the slowest image waited for a worker")
    inference: float = Field(description="ms of the forward pass of the slowest image's batch")
    total: float = Field(description="ms from the start of classification to the result")


class ClassifyResponse(BaseModel):
    model: str
    results: list[ImageResultModel]
    timing_ms: Timing


class ErrorDetail(BaseModel):
    code: str = Field(description="stable snake_case code, e.g. invalid_image, overloaded")
    message: str
    index: int | None = Field(None, description="the offending image's position, when one is to blame")
    timing_ms: dict[str, float] | None = Field(None, description="stage timings, on 504")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    """What `/v1/models` reports about the loaded model and how it is served."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    variant: dict[str, Any] = Field(description="the published variant: hub id, license, paper and timm top-1")
    config: dict[str, Any] = Field(description="CrossViTConfig as a dict")
    parameters: int
    input: dict[str, Any] = Field(description="resolutions, resize, crop, crop_pct, interpolation, mean, std")
    weights: dict[str, Any] = Field(description="source, path, sha256, pretrained")
    labels: int
    devices: list[str]
    precision: list[str] = Field(description="the compute mode of each ready worker")
    worker_count: int
    workers: list[dict[str, Any]]
    skipped_modes: list[dict[str, str]] = Field(
        default_factory=list,
        description="compute modes (e.g. openvino/bf16) that killed a worker while it started them or failed the "
                    "self-test, with the reason: every later start skips them",
    )
    batching: dict[str, Any]
    limits: dict[str, Any]
