"""Every error row of the contract, each with a real input, against the real server.

Afterwards the server must still be ready and still classify correctly.
"""

from __future__ import annotations

import base64
import json
import re
import select
import socket
import struct
import zlib

import httpx
import pytest

from service.settings import Settings
from tests.photos import encode, photo, resized

JPEG = encode(resized(photo("chelsea"), 640, 480), "JPEG", quality=90)
PNG = encode(resized(photo("coffee"), 320, 240), "PNG")


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a single tiny data chunk."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(
        b"IEND", b""
    )


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
HTML = b"<!DOCTYPE html><html><body><img src=cat.jpg></body></html>"


def assert_error(response: httpx.Response, status: int, code: str, index: int | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["index"] == index


RAW_CASES = [
    # (id, body, content type, status, code, index)
    ("empty-body", b"", "image/jpeg", 400, "no_images", None),
    ("random-bytes", bytes(range(256)) * 40, "image/jpeg", 422, "invalid_image", 0),
    ("text-as-image", b"hello, this is not an image\n" * 10, "image/png", 422, "invalid_image", 0),
    ("truncated-jpeg", JPEG[: len(JPEG) // 2], "image/jpeg", 422, "invalid_image", 0),
    ("truncated-png", PNG[: len(PNG) // 2], "image/png", 422, "invalid_image", 0),
    ("header-only-jpeg", JPEG[:200], "image/jpeg", 422, "invalid_image", 0),
    ("header-only-png", PNG[:33], "image/png", 422, "invalid_image", 0),
    ("png-30000x30000", _png_declaring(30000, 30000), "image/png", 413, "image_too_large", 0),
    ("svg", SVG, "image/png", 415, "unsupported_image_format", 0),
    ("html", HTML, "image/png", 422, "invalid_image", 0),
    ("ico-format", encode(resized(photo("chelsea"), 64, 64), "ICO"), "image/png", 415,
     "unsupported_image_format", 0),
    ("text-content-type", b"hello", "text/plain", 415, "unsupported_media_type", None),
    ("html-content-type", HTML, "text/html", 415, "unsupported_media_type", None),
    ("svg-content-type", SVG, "image/svg+xml", 415, "unsupported_media_type", None),
    ("invalid-json", b'{"images": [', "application/json", 400, "invalid_json", None),
    ("json-wrong-shape", b'{"image": "abc"}', "application/json", 400, "invalid_json", None),
    ("json-no-images", b'{"images": []}', "application/json", 400, "no_images", None),
    ("broken-multipart", b"--xyz\r\nContent-Disposition: form-data; name=\"images\"\r\n\r\nabc",
     "multipart/form-data; boundary=xyz", 400, "invalid_multipart", None),
    ("multipart-no-boundary", b"abc", "multipart/form-data", 400, "invalid_multipart", None),
]


@pytest.mark.parametrize(("body", "content_type", "status", "code", "index"), [c[1:] for c in RAW_CASES],
                         ids=[c[0] for c in RAW_CASES])
def test_bad_bodies(client: httpx.Client, body: bytes, content_type: str, status: int, code: str,
                    index: int | None) -> None:
    assert_error(client.post("/v1/classify", content=body, headers={"Content-Type": content_type}),
                 status, code, index)


def test_missing_content_type(client: httpx.Client) -> None:
    request = client.build_request("POST", "/v1/classify", content=JPEG)
    assert "Content-Type" not in request.headers
    assert_error(client.send(request), 415, "unsupported_media_type")


def test_invalid_base64_names_the_image(client: httpx.Client) -> None:
    good = base64.b64encode(JPEG).decode()
    response = client.post("/v1/classify", json={"images": [good, "not base64 at all!!"]})
    assert_error(response, 400, "invalid_base64", 1)


def test_multipart_without_images_field(client: httpx.Client) -> None:
    assert_error(client.post("/v1/classify", files={"image": ("a.jpg", JPEG)}), 400, "no_images")


def test_one_bad_image_among_good_ones_is_named(client: httpx.Client) -> None:
    files = [("images", ("a.jpg", JPEG)), ("images", ("b.png", PNG)), ("images", ("c.jpg", JPEG[:300])),
             ("images", ("d.jpg", JPEG))]
    assert_error(client.post("/v1/classify", files=files), 422, "invalid_image", 2)


@pytest.mark.parametrize("top_k", ["0", "1001", "-3", "five"])
def test_top_k_out_of_range(client: httpx.Client, top_k: str) -> None:
    response = client.post("/v1/classify", params={"top_k": top_k}, content=JPEG,
                           headers={"Content-Type": "image/jpeg"})
    assert_error(response, 422, "invalid_parameter")
    assert "top_k" in response.json()["error"]["message"]


def test_bad_deadline_header(client: httpx.Client) -> None:
    response = client.post("/v1/classify", content=JPEG,
                           headers={"Content-Type": "image/jpeg", "X-Request-Timeout-Ms": "soon"})
    assert_error(response, 422, "invalid_parameter")


def test_too_many_images(client: httpx.Client) -> None:
    limit = Settings.model_fields["max_images_per_request"].default
    files = [("images", (f"{i}.jpg", JPEG)) for i in range(limit + 1)]
    response = client.post("/v1/classify", files=files)
    assert_error(response, 413, "too_many_images")


def test_body_over_the_limit_is_413(client: httpx.Client) -> None:
    """The whole body is sent here; that it is refused before it is read (headers and ten bytes sent)
    is tests/service/test_bodies.py::test_declared_length_over_the_limit_is_refused_before_reading."""
    limit = Settings.model_fields["max_upload_bytes"].default
    body = b"\xff" * (limit + 1)
    assert_error(client.post("/v1/classify", content=body, headers={"Content-Type": "image/jpeg"}),
                 413, "payload_too_large")


def test_streamed_body_over_the_limit_is_answered_while_still_sending(server: str) -> None:
    """No Content-Length (chunked): the 413 arrives once the limit is passed, while the client
    still has most of an unbounded body to send, so the server never buffered it."""
    limit = Settings.model_fields["max_upload_bytes"].default
    chunk = b"\xff" * (1 << 20)
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        sent = 0
        reply = b""
        while sent < 8 * limit:  # stand-in for an endless body
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed after answering
            sent += len(chunk)
            if select.select([sock], [], [], 0)[0]:
                break
        sock.settimeout(30)
        while True:  # the whole response: headers, then Content-Length bytes of JSON
            head, _, body = reply.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: (\d+)", head)
            if length and len(body) >= int(length.group(1)):
                break
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert sent < 2 * limit, f"the server let {sent} bytes in before answering"


def test_unknown_route_and_method_use_the_error_shape(client: httpx.Client) -> None:
    assert_error(client.get("/v1/nope"), 404, "not_found")
    assert_error(client.get("/v1/classify"), 405, "method_not_allowed")


def test_server_still_ready_and_correct_after_errors(client: httpx.Client) -> None:
    assert client.get("/readyz").status_code == 200
    first = client.post("/v1/classify", content=JPEG, headers={"Content-Type": "image/jpeg"}).json()
    files = [("images", ("bad.jpg", JPEG[:100])), ("images", ("good.jpg", JPEG))]
    assert client.post("/v1/classify", files=files).status_code == 422
    again = client.post("/v1/classify", content=JPEG, headers={"Content-Type": "image/jpeg"}).json()
    assert again["results"][0]["predictions"] == first["results"][0]["predictions"]
