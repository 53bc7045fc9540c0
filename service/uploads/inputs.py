"""Reading classify bodies (multipart, raw image, base64 JSON) under the byte and count caps.

Each body streams through a reader that knows its shape (service.uploads.formparts, service.uploads.jsonimages),
so the image count is checked as the body arrives and nothing is parsed twice; the CPU work
(JSON string decoding, base64) runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass

from starlette.requests import Request

from ..errors import BadRequestError, UnsupportedMediaTypeError
from .bodies import Body
from .formparts import FIELD as MULTIPART_FIELD
from .formparts import FormImages
from .jsonimages import JsonImagesScanner

__all__ = ["MULTIPART_FIELD", "RAW_IMAGE_TYPES", "Upload", "read_images"]

RAW_IMAGE_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff", "application/octet-stream"}
)
_DATA_URI = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


async def _multipart(request: Request, body: Body, max_images: int) -> list[Upload]:
    form = FormImages(request.headers.get("content-type", ""), max_images)
    async for chunk in body.chunks():
        form.feed(chunk)
    parts = form.finish()
    uploads = [Upload(part.filename, bytes(part.data)) for part in parts]
    parts.clear()
    return uploads


def decode_base64_image(text: str, *, name: str, index: int, data_uri: bool = True) -> bytes:
    """One image sent as standard base64 (/v1 JSON; /v2 BYTES elements, strict: `data_uri=False`);
    `data_uri` also takes a `data:image/...;base64,` prefix and whitespace. 400 invalid_base64 names it."""
    encoded = "".join(_DATA_URI.sub("", text.strip(), count=1).split()) if data_uri else text
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{name} is not valid standard base64", code="invalid_base64", index=index) from None


def _decode_base64(strings: list[str]) -> list[Upload]:
    return [Upload(None, decode_base64_image(text, name=f"images[{i}]", index=i)) for i, text in enumerate(strings)]


async def _json(body: Body, max_images: int) -> list[Upload]:
    scanner = JsonImagesScanner(max_images)
    async for chunk in body.chunks():
        scanner.feed(chunk)  # bounded work per chunk; refuses the image past the limit at once
    return await asyncio.to_thread(lambda: _decode_base64(scanner.strings()))  # one hop off the loop


async def read_images(request: Request, body: Body, *, max_images: int) -> list[Upload]:
    """Images of a classify request, by Content-Type; the type is checked before the body is read."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        uploads = await _multipart(request, body, max_images)
    elif media_type in RAW_IMAGE_TYPES:
        data = await body.read()
        if not data:
            raise BadRequestError("the request body is empty", code="no_images")
        uploads = [Upload(None, data)]
    elif media_type == "application/json":
        uploads = await _json(body, max_images)
    else:
        shown = media_type or "none"
        raise UnsupportedMediaTypeError(
            f"Content-Type {shown} is not accepted; send multipart/form-data (field '{MULTIPART_FIELD}'), "
            f"application/json, or one of {', '.join(sorted(RAW_IMAGE_TYPES))}"
        )
    if not uploads:
        raise BadRequestError("the request holds no images", code="no_images")
    return uploads  # an empty part or string is an undecodable image: preprocessing names it
