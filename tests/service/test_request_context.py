"""What the request context promises: an answer with its X-Request-ID even for an unexpected error,
one traceback per error, and access lines a client cannot forge."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.logs import TextFormatter
from tests.conftest import Reference, serve_app, server_settings, start_cli, until, wait_ready
from tests.service.test_errors import assert_error

# torch fp32 on one thread: no conversion, no bf16 guard; starts in seconds on a busy machine
FAST_START = {"backend": "torch", "precision": "fp32", "threads_per_worker": 1}
_LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +[\w.]+: ")



def test_control_characters_in_the_path_cannot_forge_a_text_log_line(tmp_path: Path, reference: Reference) -> None:
    forged = "2026-01-01 00:00:00,000 INFO    service.access: request path=/v1/classify status=200"
    with start_cli(tmp_path, weights=reference.checkpoint, workers=1, **FAST_START,
                   log_format="text") as server:
        path = "/v1/nothing%0A" + forged.replace(" ", "%20") + "%0D%1B[2J"
        response = httpx.get(server.url + path)
        assert response.status_code == 404
        request_id = response.headers["X-Request-ID"]
        until(lambda: request_id in server.log(), 10, "the access line")  # written just after the answer
    lines = server.log().splitlines()
    assert not any(line.startswith(forged[:20]) for line in lines), server.log()
    access = [line for line in lines if request_id in line]
    assert len(access) == 1, server.log()
    assert "\\n2026-01-01" in access[0] and "\\r\\u001b[2J" in access[0]  # escaped as JSON strings are
    assert 'path="/v1/nothing' in access[0]  # quoted: its spaces cannot fake a status=200 field either
    assert all(_LINE_START.match(line) for line in lines if "service.access" in line)


@pytest.fixture(scope="module")
def failing_app_url(reference: Reference) -> Iterator[str]:
    """The real app plus one test-only route that raises what no handler expects."""
    app = create_app(server_settings(weights=str(reference.checkpoint), workers=1, threads_per_worker=1,
                                     backend="torch", precision="fp32"))

    @app.get("/test-only/boom")
    def boom() -> None:
        raise RuntimeError("boom: an unexpected failure")

    url, stop = serve_app(app)
    try:
        wait_ready(url)
        yield url
    finally:
        stop()


def test_an_unexpected_error_is_a_500_with_its_request_id_logged_once(
    failing_app_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        response = httpx.get(f"{failing_app_url}/test-only/boom", headers={"X-Request-ID": "trace-me-500"})
        assert_error(response, 500, "internal_error")
        assert response.headers["X-Request-ID"] == "trace-me-500"
        assert httpx.get(f"{failing_app_url}/readyz").status_code == 200  # the server carries on
    tracebacks = [r for r in caplog.records if r.exc_info and "boom" in str(r.exc_info[1])]
    assert len(tracebacks) == 1, [(r.name, r.getMessage()) for r in tracebacks]
    assert getattr(tracebacks[0], "request_id", None) == "trace-me-500"
    access = [r for r in caplog.records
              if r.getMessage() == "request" and getattr(r, "request_id", "") == "trace-me-500"]
    assert len(access) == 1 and getattr(access[0], "status", None) == 500
    assert getattr(access[0], "error_code", None) == "internal_error"


def test_an_exception_message_cannot_forge_a_text_log_line() -> None:
    """The 500 path logs the traceback; its last line carries the exception's message, maybe client text."""
    record = logging.LogRecord("service.app", logging.ERROR, __file__, 1, "unexpected error", None, None)
    try:
        raise ValueError("x\n2026-01-01 00:00:00,000 INFO    service.access: request status=200")
    except ValueError:
        record.exc_info = sys.exc_info()
    lines = TextFormatter().format(record).splitlines()
    assert [line for line in lines if _LINE_START.match(line)] == lines[:1]
