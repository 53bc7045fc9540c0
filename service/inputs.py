"""Reading classify bodies (multipart, raw image, base64 JSON) under the byte and count caps."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from .schemas import ClassifyJSON

__all__ = ["RAW_IMAGE_TYPES", "Upload", "read_images"]

RAW_IMAGE_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff", "application/octet-stream"}
)
MULTIPART_FIELD = "images"
_DATA_URI = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_BOUNDARY = re.compile(r'boundary=("[^"]+"|[^;\s]+)', re.IGNORECASE)


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing at once when it is declared or grows past `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"the body ({declared} bytes) is over the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLargeError(f"the body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _replay(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def _multipart(request: Request, body: bytes) -> list[Upload]:
    parser = MultiPartParser(request.headers, _replay(body), max_part_size=len(body) + 1)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequestError(f"malformed multipart body: {exc.message}", code="invalid_multipart") from None
    boundary = _BOUNDARY.search(request.headers.get("content-type", ""))
    if boundary is None or b"--" + boundary.group(1).strip('"').encode("latin-1") + b"--" not in body:
        await form.close()  # the parser accepts a cut-off body; a complete one ends with --boundary--
        raise BadRequestError("malformed multipart body: no closing boundary", code="invalid_multipart")
    try:
        uploads: list[Upload] = []
        for value in form.getlist(MULTIPART_FIELD):
            if not isinstance(value, UploadFile):
                raise BadRequestError(
                    f"multipart field '{MULTIPART_FIELD}' must be a file part, got a text field",
                    code="invalid_multipart", index=len(uploads),
                )
            uploads.append(Upload(value.filename, await value.read()))
    finally:
        await form.close()
    if not uploads:
        fields = sorted(set(form.keys()))
        raise BadRequestError(
            f"no file parts named '{MULTIPART_FIELD}' in the multipart body (fields seen: {fields})",
            code="no_images",
        )
    return uploads


def _json(body: bytes) -> list[Upload]:
    try:
        payload = ClassifyJSON.model_validate(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BadRequestError(
            f'expected {{"images": ["<base64>", ...]}}: {problems}', code="invalid_json"
        ) from None
    uploads: list[Upload] = []
    for index, text in enumerate(payload.images):
        encoded = _WHITESPACE.sub("", _DATA_URI.sub("", text.strip(), count=1))
        try:
            uploads.append(Upload(None, base64.b64decode(encoded, validate=True)))
        except (binascii.Error, ValueError):
            raise BadRequestError(
                f"images[{index}] is not valid standard base64", code="invalid_base64", index=index
            ) from None
    return uploads


async def read_images(request: Request, *, max_bytes: int, max_images: int) -> list[Upload]:
    """Images of a classify request, by Content-Type; the type is checked before the body is read."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        uploads = await _multipart(request, await _read_body(request, max_bytes))
    elif media_type in RAW_IMAGE_TYPES:
        body = await _read_body(request, max_bytes)
        if not body:
            raise BadRequestError("the request body is empty", code="no_images")
        uploads = [Upload(None, body)]
    elif media_type == "application/json":
        uploads = _json(await _read_body(request, max_bytes))
    else:
        shown = media_type or "none"
        raise UnsupportedMediaTypeError(
            f"Content-Type {shown} is not accepted; send multipart/form-data (field '{MULTIPART_FIELD}'), "
            f"application/json, or one of {', '.join(sorted(RAW_IMAGE_TYPES))}"
        )
    if not uploads:
        raise BadRequestError("the request holds no images", code="no_images")
    if len(uploads) > max_images:
        raise PayloadTooLargeError(
            f"{len(uploads)} images in one request; the limit is {max_images}", code="too_many_images"
        )
    return uploads  # an empty part or string is an undecodable image: preprocessing names it
