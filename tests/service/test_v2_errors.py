"""Bad v2 requests: each a clear 4xx in the protocol's shape, `{"error": "..."}`, with /v1's status codes,
while a good request in flight at the same time is answered as if alone. Then auth and backpressure."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import TEST_VARIANT, Reference, run_server
from tests.photos import encode, photo, resized

MODEL = TEST_VARIANT
INFER = f"/v2/models/{MODEL}/infer"
JPEG = encode(resized(photo("chelsea"), 640, 480), "JPEG", quality=90)
B64 = base64.b64encode(JPEG).decode()


def _image(shape: list[int] | None = None, data: list[Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {"name": "image", "datatype": "BYTES", "shape": shape or [1], "data": data or [B64], **fields}


def _json(*inputs: dict[str, Any], **fields: Any) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": list(inputs), **fields}).encode(), {"Content-Type": "application/json"}


def _binary(header: dict[str, Any], tail: bytes, length: str | None = None) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + tail, {"Inference-Header-Content-Length": length or str(len(text))}


def _bytes_input(elements: list[bytes], size: int | None = None) -> tuple[dict[str, Any], bytes]:
    """A binary BYTES input as tritonclient frames it: per element a 4-byte little-endian length, then the bytes."""
    wire = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(elements)],
                        "parameters": {"binary_data_size": len(wire) if size is None else size}}]}, wire


PIXELS = np.zeros((1, 3, 240, 240), dtype=np.float32)

# (id, path, body, headers, status, words the message must contain)
CASES: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("wrong-datatype", INFER, *_json(_image(datatype="FP32")), 400, "must be BYTES"),
    ("wrong-shape", INFER, *_json(_image(shape=[1, 1])), 400, "shape [N]"),
    ("shape-data-mismatch", INFER, *_json(_image(shape=[2])), 400, "holds 1 element(s); its shape gives 2"),
    ("pixels-wrong-side", INFER, *_json({"name": "pixels", "datatype": "FP32", "shape": [1, 3, 224, 224],
                                         "data": [0.0]}), 400, "[N, 3, 240, 240]"),
    ("pixels-wrong-datatype", INFER, *_json({"name": "pixels", "datatype": "FP64", "shape": [1, 3, 240, 240],
                                             "data": [0.0]}), 400, "must be FP32"),
    ("unknown-input", INFER, *_json({"name": "input0", "datatype": "BYTES", "shape": [1], "data": [B64]}), 400,
     "unknown input 'input0'"),
    ("two-inputs", INFER, *_json(_image(), _image()), 400, "exactly one input"),
    ("unknown-output", INFER, *_json(_image(), outputs=[{"name": "probabilities"}]), 400,
     "unknown output 'probabilities'"),
    ("duplicate-output", INFER, *_json(_image(), outputs=[{"name": "logits"}, {"name": "branch_logits"},
                                                           {"name": "logits"}]), 400,
     "output 'logits' is asked for more than once"),
    # more numbers than any request served here holds (16 images of pixels as JSON): refused before parsing
    ("too-many-values", INFER, b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 240, 240], '
     b'"data": [' + b"0," * 2_800_000 + b'0]}]}', {"Content-Type": "application/json"}, 413,
     "no request this server serves has more than"),
    ("classification-0", INFER, *_json(_image(), outputs=[{"name": "logits", "parameters": {"classification": 0}}]),
     422, "between 1 and 1000"),
    ("classification-string", INFER,
     *_json(_image(), outputs=[{"name": "logits", "parameters": {"classification": "5"}}]), 400,
     "valid integer"),
    ("unknown-model", "/v2/models/resnet50/infer", *_json(_image()), 404, "no model 'resnet50'"),
    ("unknown-version", f"/v2/models/{MODEL}/versions/2/infer", *_json(_image()), 404, "no version '2'"),
    ("not-json", INFER, b"{inputs: [", {}, 400, "not valid JSON"),
    ("deeply-nested-json", INFER, b"[" * 100_000 + b"]" * 100_000, {}, 400, "not valid JSON"),
    ("no-inputs-field", INFER, b'{"outputs": []}', {}, 400, "inputs: Field required"),
    ("bad-base64", INFER, *_json(_image(data=["not base64!"])), 400, "not valid standard base64"),
    ("nested-image-data", INFER, *_json(_image(data=[[B64]])), 400, "must be a base64 string"),
    ("not-an-image", INFER, *_json(_image(data=[base64.b64encode(b"just some text").decode()])), 422,
     "not a readable image"),
    ("too-many-elements", INFER, *_json(_image(shape=[17], data=[B64] * 17)), 413, "limit is 16"),
    ("no-elements", INFER, *_json(_image(shape=[0], data=[])), 400, "holds no images"),
    ("non-finite-pixels", INFER, *_binary({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 240, 240],
                                                       "parameters": {"binary_data_size": PIXELS.nbytes}}]},
                                          np.full_like(PIXELS, np.nan).tobytes()), 422, "finite"),
    ("pixels-short-binary", INFER, *_binary({"inputs": [{"name": "pixels", "datatype": "FP32",
                                                         "shape": [1, 3, 240, 240],
                                                         "parameters": {"binary_data_size": 64}}]}, b"\0" * 64),
     400, "needs 691200"),
    ("header-length-not-a-number", INFER, *_binary(*_bytes_input([JPEG]), length="12x"), 400,
     "Inference-Header-Content-Length must be"),
    ("header-length-past-body", INFER, *_binary(*_bytes_input([JPEG]), length="99999999"), 400,
     "the body has only"),
    ("binary-size-mismatch", INFER, *_binary(*_bytes_input([JPEG], size=10)), 400, "add up to 10 bytes"),
    ("element-length-overruns", INFER, *_binary({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                             "parameters": {"binary_data_size": 8}}]},
                                                struct.pack("<I", 1000) + b"abcd"), 400,
     "declares 1000 bytes but 4 remain"),
    ("binary-element-not-an-image", INFER, *_binary(*_bytes_input([b"\x89PNG but not really"])), 422,
     "not a readable image"),
    ("data-and-binary", INFER, *_binary({"inputs": [{**_image(), "parameters": {"binary_data_size": 4}}]},
                                        b"abcd"), 400, "both JSON data and binary_data_size"),
    ("timeout-header-zero", INFER, _json(_image())[0], {"X-Request-Timeout-Ms": "0"}, 422,
     "x-request-timeout-ms"),
]


def _good(server: str) -> np.ndarray:
    body = {"inputs": [_image()], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    response = httpx.post(f"{server}{INFER}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    return np.frombuffer(response.content[length:], dtype="<f4")


def _assert_v2_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert words in body["error"], body


def test_bad_requests_are_clear_4xx_and_leave_good_ones_alone(server: str) -> None:
    alone = _good(server)

    def send(case: tuple[str, str, bytes, dict[str, str], int, str]) -> tuple[str, httpx.Response]:
        name, path, body, headers, _, _ = case
        return name, httpx.post(f"{server}{path}", content=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        good = [pool.submit(_good, server) for _ in range(3)]
        answers = dict(pool.map(send, CASES))
        for future in good:  # batched with each other now: OpenVINO's sums may differ in the last bits
            np.testing.assert_allclose(future.result(), alone, rtol=0, atol=1e-6)
    for name, _, _, _, status, words in CASES:
        _assert_v2_error(answers[name], status, words)
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200


KEY = "v2-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(reference: Reference) -> Iterator[str]:
    """An API key, one worker, a queue of 4 images and at most 3 images a request."""
    with run_server(weights=str(reference.checkpoint), workers=1, api_keys=KEY, max_queue=4, max_batch_size=2,
                    max_images_per_request=3) as url:
        yield url


def test_probes_open_the_rest_behind_the_key(keyed: str) -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert httpx.get(f"{keyed}{path}").status_code == 200, path
    for path in ("/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/versions/1"):
        refused = httpx.get(f"{keyed}{path}")
        _assert_v2_error(refused, 401, "API key")
        assert refused.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{keyed}{path}", headers=AUTH).status_code == 200, path
    body, headers = _json(_image())
    _assert_v2_error(httpx.post(f"{keyed}{INFER}", content=body, headers=headers), 401, "API key")
    assert httpx.post(f"{keyed}{INFER}", content=body, headers={**headers, **AUTH}, timeout=120).status_code == 200


def test_backpressure_and_limits_as_v1(keyed: str) -> None:
    body, headers = _json(_image(shape=[3], data=[B64] * 3))
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(
            lambda _: httpx.post(f"{keyed}{INFER}", content=body, headers={**headers, **AUTH}, timeout=120), range(24)
        ))
    assert {r.status_code for r in responses} == {200, 503}, [r.text for r in responses if r.status_code != 200]
    for full in (r for r in responses if r.status_code == 503):
        _assert_v2_error(full, 503, "queue is full")
        assert 1 <= int(full.headers["retry-after"]) <= 30
    body, headers = _json(_image(shape=[4], data=[B64] * 4))
    _assert_v2_error(httpx.post(f"{keyed}{INFER}", content=body, headers={**headers, **AUTH}), 413, "limit is 3")
