"""The page at `/` in a real headless Chromium (Debian's), driven by Playwright, against the real server."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, ViewportSize, sync_playwright

from tests.client.helpers import photo_jpeg
from tests.conftest import LIMITED_API_KEY

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium")
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
NOT_AN_IMAGE = b"these are notes, not pixels\n"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        message = "needs Debian's chromium (apt-get install chromium) or CHROMIUM_PATH"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs it")
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)  # never Playwright's own download
        yield browser
        browser.close()


def _api(url: str, data: bytes, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/classify", params={"top_k": 5, "branches": "true"}, headers=headers,
                      files={"images": ("x.jpg", data)}, timeout=60)


def _open(browser: Browser, url: str, viewport: ViewportSize) -> Page:
    page = browser.new_page(viewport=viewport)
    page.set_default_timeout(60_000)  # shared 2-core CI machines: a slow start is not a failure
    page.goto(url)
    return page


def _card(page: Page, name: str) -> Any:
    card = page.locator(".card", has=page.locator(".name", has_text=name))
    card.and_(page.locator('[aria-busy="false"]')).wait_for(timeout=60_000)
    return card


def _percent(p: float) -> str:
    return f"{p * 100:.{1 if p >= 0.1 else 2}f}%"


def _check_result(card: Any, expected: dict[str, Any]) -> None:
    """The card shows what the API says about the same file."""
    assert card.locator(".top5 .label").all_inner_texts() == [p["label"] for p in expected["predictions"]]
    assert card.locator(".top5 .pct").all_inner_texts() == [_percent(p["probability"]) for p in expected["predictions"]]
    agreement = card.locator(".agreement").inner_text()
    verdict = "Branches agree" if expected["agreement"]["top1_agree"] else "Branches disagree"
    assert verdict in agreement and f"{expected['agreement']['js_divergence']:.3f}" in agreement
    for branch in expected["branches"]:
        column = card.locator(f'.branch[data-branch="{branch["branch"]}"]')
        assert column.locator("h3").inner_text().lower() == f"branch {branch['branch']} · {branch['resolution']} px"
        assert column.locator(".label").all_inner_texts() == [p["label"] for p in branch["predictions"][:3]]
    assert card.locator(".timing dt").all_inner_texts() == ["decode", "queue", "inference", "total"]


def test_page_and_assets_are_served_from_the_package(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]  # nothing from elsewhere
    for asset, media_type in [("page.js", "text/javascript"), ("page.css", "text/css"), ("icon.svg", "image/svg+xml")]:
        assert f"/static/{asset}" in page.text
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
    assert client.get("/static/app.py").json()["error"]["code"] == "not_found"
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_page_classifies_a_photo_from_the_keyboard_picker(server: str, browser: Browser, tmp_path: Path) -> None:
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(photo_jpeg("chelsea"))
    notes = tmp_path / "notes.jpg"
    notes.write_bytes(NOT_AN_IMAGE)
    expected = _api(server, photo.read_bytes()).json()["results"][0]
    refused = _api(server, NOT_AN_IMAGE).json()["error"]

    page = _open(browser, server, DESKTOP)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "files"  # the first stop is the file picker
    # a native file input, so Space or Enter opens the system's chooser; the chooser itself is not
    # driven: headless Chromium's "filechooser" event is unreliable (it timed out once in CI), and
    # set_input_files fires the same change event a chosen file does
    assert page.evaluate("[document.activeElement.tagName, document.activeElement.type]") == ["INPUT", "file"]
    page.set_input_files("#files", photo)
    _check_result(_card(page, "chelsea.jpg"), expected)

    page.set_input_files("#files", notes)
    assert _card(page, "notes.jpg").locator(".error").inner_text() == f"{refused['message']} ({refused['code']})"
    assert page.locator("#key-form").is_hidden()  # no keys on this server
    page.screenshot(path=tmp_path / "page-desktop.png", full_page=True)


def test_page_is_readable_at_phone_width(server: str, browser: Browser, tmp_path: Path) -> None:
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(photo_jpeg("astronaut"))
    page = _open(browser, server, PHONE)
    page.set_input_files("#files", photo)
    _check_result(_card(page, "astronaut.jpg"), _api(server, photo.read_bytes()).json()["results"][0])
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing wider than the screen
    page.screenshot(path=tmp_path / "page-phone.png", full_page=True)


def test_page_asks_for_a_key_when_the_server_needs_one(limited: str, browser: Browser, tmp_path: Path) -> None:
    assert httpx.get(limited).status_code == 200  # the page itself stays open
    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(photo_jpeg("coffee"))
    page = _open(browser, limited, DESKTOP)
    page.locator("#key-form").wait_for()
    assert page.evaluate("document.activeElement.id") == "api-key"

    page.set_input_files("#files", photo)
    assert "API key" in _card(page, "coffee.jpg").locator(".error").inner_text()  # the 401's own message
    page.keyboard.type("wrong-key")
    page.keyboard.press("Enter")
    page.locator("#key-message", has_text="API key").wait_for()
    page.fill("#api-key", LIMITED_API_KEY)
    page.keyboard.press("Enter")
    page.locator("#key-form").wait_for(state="hidden")
    card = _card(page, "coffee.jpg")  # the refused image is sent again with the key
    card.locator(".answer").wait_for()
    _check_result(card, _api(limited, photo.read_bytes(), LIMITED_API_KEY).json()["results"][0])
    page.screenshot(path=tmp_path / "page-key.png", full_page=True)
