"""API keys: /v1/* needs a Bearer key when keys are configured; probes and metrics stay open."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Reference, run_server
from tests.photos import encode, photo
from tests.service.test_errors import assert_error

KEYS = ("first-key-0123456789", "second-key-9876543210")
JPEG = encode(photo("chelsea"), "JPEG", quality=90)


@pytest.fixture(scope="module")
def secured(reference: Reference) -> Iterator[str]:
    with run_server(weights=str(reference.checkpoint), workers=1, api_keys=",".join(KEYS)) as url:
        yield url


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong-key", f"Basic {KEYS[0]}", f"Bearer {KEYS[0]}x", KEYS[0]],
    ids=["missing", "empty", "no-token", "wrong", "basic-scheme", "suffix", "no-scheme"],
)
def test_missing_or_wrong_key_is_401(secured: str, authorization: str | None) -> None:
    headers = {"Content-Type": "image/jpeg"}
    if authorization is not None:
        headers["Authorization"] = authorization
    response = httpx.post(f"{secured}/v1/classify", content=JPEG, headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert_error(httpx.get(f"{secured}/v1/models"), 401, "unauthorized")


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_works(secured: str, key: str) -> None:
    response = httpx.post(f"{secured}/v1/classify", content=JPEG,
                          headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    assert httpx.get(f"{secured}/v1/models", headers={"Authorization": f"bearer {key}"}).status_code == 200


def test_probes_and_metrics_stay_open(secured: str) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{secured}{path}").status_code == 200, path
