"""The published OpenAPI document with this server's own limits in it.

The routes describe the shape of each body; what depends on the settings (images per request, the
upload cap, the number of classes) is filled in here once, so that the schema admits only requests
this server serves. tests/service/test_contract.py holds the server to it with schemathesis.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from ..settings import Settings
from ..uploads.inputs import MULTIPART_FIELD, RAW_IMAGE_TYPES

__all__ = ["install"]


def _limit_classify(operation: dict[str, Any], settings: Settings, num_classes: int) -> None:
    content = operation["requestBody"]["content"]
    max_images = settings.max_images_per_request
    content["multipart/form-data"]["schema"]["properties"][MULTIPART_FIELD]["maxItems"] = max_images
    content["application/json"]["schema"]["properties"]["images"]["maxItems"] = max_images
    for media in RAW_IMAGE_TYPES:
        content[media]["schema"]["maxLength"] = settings.max_upload_bytes
    for parameter in operation["parameters"]:
        if parameter["name"] == "top_k":
            parameter["schema"]["maximum"] = num_classes


def _headers_are_never_null(schema: dict[str, Any]) -> None:
    """An optional header is absent, never "null"; FastAPI documents `int | None` as anyOf [integer, null]."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                options = parameter["schema"].get("anyOf")
                if parameter["in"] != "header" or not options:
                    continue
                kept = [o for o in options if o.get("type") != "null"]
                if len(kept) == 1:
                    rest = {k: v for k, v in parameter["schema"].items() if k != "anyOf"}
                    parameter["schema"] = {**rest, **kept[0]}


def install(app: FastAPI, settings: Settings, num_classes: int) -> None:
    """Make `app.openapi()` return the document with the limits filled in (built once, then cached)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()  # FastAPI's own, which it caches in app.openapi_schema
            _limit_classify(schema["paths"]["/v1/classify"]["post"], settings, num_classes)
            _headers_are_never_null(schema)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
