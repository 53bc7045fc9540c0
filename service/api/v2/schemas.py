"""The protocol's bodies: pydantic models that parse requests and document responses, and the
request body's JSON Schema with this server's limits in it (the OpenAPI contract of /infer)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BRANCH_LOGITS",
    "IMAGE",
    "LOGITS",
    "PIXELS",
    "InferenceRequest",
    "InferenceResponse",
    "Live",
    "ModelMetadata",
    "ModelReady",
    "Ready",
    "RequestInput",
    "RequestOutput",
    "ServerMetadata",
    "TensorMetadata",
    "V2Error",
    "infer_request_schema",
]

IMAGE, PIXELS = "image", "pixels"  # the two ways in: encoded image files, or preprocessed tensors
LOGITS, BRANCH_LOGITS = "logits", "branch_logits"


class _Lenient(BaseModel):
    """Known fields are checked strictly (no "5" for 5); unknown ones are ignored, as the protocol lets
    clients add their own (KServe's client sends `model_name`)."""

    model_config = ConfigDict(strict=True, extra="allow")


class InputParameters(_Lenient):
    binary_data_size: int | None = Field(None, ge=0)
    content_type: str | None = None


class RequestInput(_Lenient):
    name: str
    shape: list[int]
    datatype: str
    parameters: InputParameters | None = None
    data: list[Any] | None = None


class OutputParameters(_Lenient):
    binary_data: bool | None = None
    classification: int | None = None


class RequestOutput(_Lenient):
    name: str
    parameters: OutputParameters | None = None


class RequestParameters(_Lenient):
    binary_data_output: bool | None = None


class InferenceRequest(_Lenient):
    id: str | None = None
    parameters: RequestParameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str = Field(description="FP32, or BYTES for classification results")
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size, when the data follows the JSON")
    data: list[float | str] | None = Field(None, description="row-major and flat, when sent as JSON")


class InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str = Field(description="the request's id, else its X-Request-ID")
    outputs: list[ResponseOutput]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any batch size up to the request limit")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata] = Field(description="alternatives: a request sends exactly one of them")
    outputs: list[TensorMetadata]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class V2Error(BaseModel):
    error: str


def _image_input(count: int) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name", "datatype", "shape", "data"],
        "properties": {
            "name": {"const": IMAGE},
            "datatype": {"const": "BYTES"},
            "shape": {"const": [count]},
            "parameters": {
                "type": ["object", "null"],
                "properties": {"content_type": {"enum": ["base64", None]}, "binary_data_size": False},
            },
            "data": {
                "type": "array",
                "minItems": count,
                "maxItems": count,
                "items": {"type": "string", "format": "byte", "contentMediaType": "image/*",
                          "description": "an encoded image file (JPEG, PNG, WebP, GIF, BMP, TIFF), base64"},
            },
        },
    }


def infer_request_schema(*, max_images: int, side: int, num_classes: int) -> dict[str, Any]:
    """The JSON form of an inference request, exact enough that every request it admits is served.

An optional field may also be null, meaning absent, as the parser takes it.

    The shape must equal the number of elements, which JSON Schema can only say one count at a time.
    Preprocessed `pixels` (FP32 [N, 3, side, side]) are meant for the binary form; in JSON they are
    accepted too but left out here (172,800 numbers per image are no way to send pixels).
    """
    output = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"enum": [LOGITS, BRANCH_LOGITS]},
            "parameters": {
                "type": ["object", "null"],
                "properties": {
                    "binary_data": {"type": ["boolean", "null"], "description": "send this output as binary data"},
                    "classification": {
                        "type": ["integer", "null"], "minimum": 1, "maximum": num_classes,
                        "description": "instead of the tensor, its top-k as BYTES \"<logit>:<class_id>:<label>\"",
                    },
                },
            },
        },
    }
    return {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": ["string", "null"]},
            "parameters": {
                "type": ["object", "null"], "properties": {"binary_data_output": {"type": ["boolean", "null"]}}
            },
            "inputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": {"anyOf": [_image_input(n) for n in range(1, max_images + 1)]},
                "description": f"one input: '{IMAGE}' (BYTES [N], encoded images) or, in the binary form, "
                f"'{PIXELS}' (FP32 [N, 3, {side}, {side}], normalised); N <= {max_images}",
            },
            # each output at most once (a name given twice is 400, so an answer stays bounded): none, one, or
            # both, said with `contains` alone
            "outputs": {
                "anyOf": [
                    {"type": "null"},
                    {"type": "array", "items": output, "maxItems": 1},
                    {"type": "array", "items": output, "minItems": 2, "maxItems": 2,
                     "allOf": [{"contains": {"required": ["name"], "properties": {"name": {"const": name}}}}
                               for name in (LOGITS, BRANCH_LOGITS)]},
                ],
                "description": f"default: '{LOGITS}' as JSON; '{BRANCH_LOGITS}' only when asked for; each at most once",
            },
        },
    }
