"""The Python client against the real server: typed results, limits, per-image errors, retries, keys."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from client import (
    APIError,
    AsyncClient,
    Client,
    ImageReadError,
    ImageResultModel,
    RetryEvent,
    RetryPolicy,
)
from client.batching import Limits, plan_batches
from tests.client.helpers import counted, photo_jpeg, requests_by_status, write_photos
from tests.conftest import LIMITED_API_KEY, LIMITED_MAX_IMAGES, LIMITED_MAX_UPLOAD_BYTES, Reference, start_cli

CORRUPT = photo_jpeg("coffee")[:3000]  # a real JPEG cut short
NOT_AN_IMAGE = b"these are notes, not pixels\n"


def _top1(url: str, image: bytes, key: str | None = None) -> int:
    """The class the server gives this image on its own, asked without the client."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{url}/v1/classify", files={"images": ("x.jpg", image)}, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return int(response.json()["results"][0]["predictions"][0]["class_id"])


def test_importing_the_client_pulls_no_torch() -> None:
    code = "import sys, client; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'fastapi', 'numpy'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sync_classify_returns_typed_results_in_order(server: str, tmp_path: Path) -> None:
    paths = write_photos(tmp_path, 3)
    raw = photo_jpeg("rocket", mirrored=True)
    with Client(server) as client:
        assert client.models().name == "crossvit_tiny_240"
        results = client.classify([*paths, raw], top_k=3, branches=True)
    assert all(isinstance(r, ImageResultModel) for r in results)
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.filename for r in results] == [p.name for p in paths] + [None]  # bytes have no name
    for result, image in zip(results, [p.read_bytes() for p in paths] + [raw], strict=True):
        assert len(result.predictions) == 3 and result.branches is not None and len(result.branches) == 2
        assert result.predictions[0].class_id == _top1(server, image)
        assert 0 <= result.agreement.js_divergence <= 1


def test_async_classify_each_gives_every_image_its_own_outcome(limited: str, tmp_path: Path) -> None:
    """Bad images anywhere in a request: each gets its own error, every other image its result."""
    photos = write_photos(tmp_path / "photos")
    oversize = photo_jpeg("hubble_deep_field")  # alone it is over the body limit
    assert len(oversize) > LIMITED_MAX_UPLOAD_BYTES
    images: list[str | Path | bytes] = [photos[0], CORRUPT, photos[1], photos[2], NOT_AN_IMAGE, photos[3],
                                        oversize, str(tmp_path / "missing.jpg"), photos[4], photos[5]]

    async def run() -> list[ImageResultModel | Exception]:
        async with AsyncClient(limited, api_key=LIMITED_API_KEY) as client:
            return list(await client.classify_each(images))

    outcomes = asyncio.run(run())
    errors = {i: o for i, o in enumerate(outcomes) if not isinstance(o, ImageResultModel)}
    assert sorted(errors) == [1, 4, 6, 7]
    for i in (1, 4):
        assert isinstance(errors[i], APIError) and (errors[i].status, errors[i].code) == (422, "invalid_image")
    assert isinstance(errors[6], APIError) and (errors[6].status, errors[6].code) == (413, "payload_too_large")
    assert isinstance(errors[7], ImageReadError) and "missing.jpg" in errors[7].message
    assert all(e.index == i for i, e in errors.items())  # the caller's index, not the request's
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, ImageResultModel):
            assert outcome.index == i
            assert outcome.predictions[0].class_id == _top1(limited, Path(str(images[i])).read_bytes(), LIMITED_API_KEY)


def test_requests_fit_the_limits_the_server_reports(limited: str, tmp_path: Path) -> None:
    paths = write_photos(tmp_path)
    before = requests_by_status(limited)
    with Client(limited, api_key=LIMITED_API_KEY) as client:
        assert client.limits() == Limits(LIMITED_MAX_IMAGES, LIMITED_MAX_UPLOAD_BYTES)
        results = client.classify(paths)
    after = requests_by_status(limited)
    assert len(results) == len(paths)
    planned = plan_batches([(p.name, p.stat().st_size) for p in paths], client.limits())
    assert after.get("200", 0) - before.get("200", 0) == len(planned)
    assert len(planned) > math.ceil(len(paths) / LIMITED_MAX_IMAGES)  # the byte limit split a request too
    assert after.get("413", 0) == before.get("413", 0)  # the size estimate is an upper bound


def test_classify_raises_the_first_error_naming_the_callers_image(limited: str, tmp_path: Path) -> None:
    paths = write_photos(tmp_path, 4)
    events: list[RetryEvent] = []
    before = requests_by_status(limited).get("422", 0)
    with Client(limited, api_key=LIMITED_API_KEY, on_retry=events.append) as client, pytest.raises(APIError) as caught:
        client.classify([paths[0], paths[1], paths[2], CORRUPT, paths[3]])
    assert (caught.value.status, caught.value.code, caught.value.index) == (422, "invalid_image", 3)
    assert events == [] and requests_by_status(limited).get("422", 0) == before + 1  # a 4xx is never retried


def test_api_keys(limited: str) -> None:
    image = photo_jpeg("chelsea")
    for key in (None, "wrong-key"):
        events: list[RetryEvent] = []
        with Client(limited, api_key=key, on_retry=events.append) as client, pytest.raises(APIError) as caught:
            client.classify([image])
        assert (caught.value.status, caught.value.code) == (401, "unauthorized") and events == []
    with Client(limited, api_key=LIMITED_API_KEY) as client:
        assert client.classify([image])[0].predictions[0].class_id == _top1(limited, image, LIMITED_API_KEY)


def test_retries_a_server_that_is_not_up_then_not_ready_until_it_answers(tmp_path: Path, reference: Reference) -> None:
    """The real `crossvit-serve` just started: connection refused while it loads, then 503 `not_ready`
    with Retry-After while its worker warms up, then 200. No stub: this is what a restart looks like."""
    events: list[RetryEvent] = []
    policy = RetryPolicy(retries=600, backoff_s=0.05, backoff_max_s=0.2)  # Retry-After is honoured as sent
    image = photo_jpeg("chelsea")
    with start_cli(tmp_path, wait=False, weights=reference.checkpoint, workers=1, max_batch_size=1) as server:
        with Client(server.url, retry=policy, on_retry=events.append) as client:
            results = client.classify([image])
        refused = [e for e in events if e.reason.startswith("ConnectError")]
        not_ready = [e for e in events if e.reason.startswith("503 not_ready")]
        assert refused and not_ready, [e.reason for e in events]
        assert all(e.delay_s == 1.0 for e in not_ready)  # the server's Retry-After: 1
        assert results[0].predictions[0].class_id == _top1(server.url, image)
        statuses = requests_by_status(server.url)
        assert statuses.get("503", 0) == len(not_ready) and statuses.get("200", 0) == 2
        assert counted(server.url, "crossvit_rejected_requests_total", "reason", "not_ready")[""] == len(not_ready)
