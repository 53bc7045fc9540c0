"""Schemathesis hooks for the contract run (tests/service/test_contract.py; loaded by SCHEMATHESIS_HOOKS).

JSON Schema can say that a field holds bytes or base64 but not that they decode to an image, so the
image formats draw from real encoded photos; everything else is generated from the schema alone.
"""

from __future__ import annotations

import base64

import schemathesis
from hypothesis import strategies as st

from tests.photos import encode, photo, resized

_IMAGES = [
    encode(resized(photo("chelsea"), 96, 64), "JPEG", quality=85),
    encode(resized(photo("coffee"), 80, 60), "PNG"),
    encode(resized(photo("astronaut"), 64, 64), "WEBP"),
    encode(resized(photo("camera"), 50, 70), "GIF"),
    encode(resized(photo("chelsea"), 40, 30), "BMP"),
]

schemathesis.openapi.format("binary", st.sampled_from(_IMAGES))
schemathesis.openapi.format("byte", st.sampled_from([base64.b64encode(i).decode() for i in _IMAGES]))


@schemathesis.check
def no_server_error_but_a_passed_deadline(ctx: object, response: object, case: object) -> bool | None:
    """Like not_a_server_error, except the documented 504: the client's X-Request-Timeout-Ms had passed."""
    status = response.status_code  # type: ignore[attr-defined]
    if status < 500:
        return None
    deadline_ms = case.headers.get("x-request-timeout-ms") if case.headers else None  # type: ignore[attr-defined]
    elapsed_ms = response.elapsed * 1000  # type: ignore[attr-defined]
    if status == 504 and deadline_ms is not None and elapsed_ms >= int(deadline_ms):
        return None
    raise AssertionError(f"{status} with no passed deadline to explain it: {response.text[:300]}")  # type: ignore[attr-defined]


@schemathesis.hook
def filter_case(ctx: object, case: object) -> bool:
    """/infer's application/octet-stream form is the binary tensor extension: a JSON header whose length
    goes in a header, then raw tensors; no schema can say that, so it is tested with the real clients
    (tests/service/test_v2_protocol.py) instead of generated here."""
    return not (case.media_type == "application/octet-stream" and case.path.endswith("/infer"))  # type: ignore[attr-defined]
