"""One client's sockets must not take the pod out: the probe listener, the connection cap, request-head
deadlines and size caps (service/api/connections.py, service/api/probes.py), against the real CLI server.

Before: 1024 idle connections filled uvicorn's limit, and /healthz and /readyz answered 503 (plain text)
at once, for as long as the client kept its sockets; a 64 MiB header value was buffered whole.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from service.api.probes import STALL_AFTER_S, Heartbeat, ProbeServer
from service.metrics import Metrics
from tests.conftest import CliServer, Reference, start_cli
from tests.service.test_bodies import connect, read_reply, send_head

CONNECTIONS = 32
HEAD_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def cli(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    tmp = tmp_path_factory.mktemp("connections")
    with start_cli(tmp, weights=reference.checkpoint, backend="torch", precision="fp32", workers=1,
                   threads_per_worker=1, limit_concurrency=CONNECTIONS, head_timeout_s=HEAD_TIMEOUT_S,
                   log_level="warning") as server:
        yield server


def _closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the server answered and/or closed the connection within `timeout_s`."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_flood_of_idle_connections_leaves_the_probes_alone_and_times_out(cli: CliServer) -> None:
    assert cli.probe_url is not None
    idle = [connect(cli.url) for _ in range(2 * CONNECTIONS)]
    try:
        opened = time.monotonic()
        with httpx.Client(timeout=5) as client:
            probes = []
            for path in ("/healthz", "/readyz", "/metrics"):
                begun = time.monotonic()
                status = client.get(f"{cli.probe_url}{path}").status_code
                probes.append((path, status, time.monotonic() - begun))
        # a new data-plane connection past the cap: a clean JSON 503, at once
        with connect(cli.url) as sock:
            send_head(sock, "/healthz", {})
            refused = read_reply(sock, 5)
        # every idle socket is answered and closed once the head deadline has passed
        closed = sum(_closed_by_server(sock, HEAD_TIMEOUT_S + 5 - (time.monotonic() - opened)) for sock in idle)
        closed_after_s = time.monotonic() - opened
    finally:
        for sock in idle:
            sock.close()
    assert all(status == 200 and took < 1.0 for _, status, took in probes), probes
    assert refused.status == 503 and refused.error()["code"] == "too_many_connections", refused
    assert refused.headers.get("retry-after") == "1"
    assert closed == len(idle)
    assert closed_after_s < HEAD_TIMEOUT_S + 3, closed_after_s
    assert httpx.get(f"{cli.url}/readyz", timeout=10).status_code == 200  # the data plane serves again


def test_an_idle_connection_gets_a_408_json_after_the_head_deadline(cli: CliServer) -> None:
    with connect(cli.url) as sock:
        begun = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t")  # a head started, never finished
        reply = read_reply(sock, HEAD_TIMEOUT_S + 5)
        elapsed = time.monotonic() - begun
    assert reply.status == 408 and reply.error()["code"] == "request_head_timeout", reply
    assert HEAD_TIMEOUT_S - 0.1 <= elapsed < HEAD_TIMEOUT_S + 2, elapsed


def test_a_huge_header_is_refused_431_before_it_is_buffered(cli: CliServer) -> None:
    """A 64 MiB header value, sent in 64 KiB pieces: 431 after the first few tens of KiB."""
    sent = 0
    with connect(cli.url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: ")
        piece = b"a" * 65536
        while sent < 64 * 1024 * 1024 and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        reply = read_reply(sock, 10)
    assert reply.status == 431 and reply.error()["code"] == "request_header_too_large", reply
    assert sent < 4 * 1024 * 1024, sent
    with httpx.Client(timeout=5) as client:
        assert client.get(f"{cli.url}/healthz").status_code == 200


def test_keep_alive_requests_are_not_cut_by_the_head_deadline(cli: CliServer) -> None:
    """Requests on one kept-alive connection, spread over more than the head deadline, are all served."""
    with httpx.Client(base_url=cli.url, timeout=10) as client:
        statuses = []
        for _ in range(3):
            statuses.append(client.get("/healthz").status_code)
            threading.Event().wait(HEAD_TIMEOUT_S * 0.8)
    assert statuses == [200, 200, 200]


def test_probe_liveness_follows_the_main_loops_heartbeat(tmp_path: Path) -> None:
    """A main loop that stops beating is not alive, whatever the probe thread can still answer."""
    app = FastAPI()
    probes = ProbeServer(app, Metrics(max_batch_size=1), "127.0.0.1", 0)
    probes.start()
    try:
        url = f"http://127.0.0.1:{probes.port}"
        with httpx.Client(timeout=5) as client:
            assert client.get(f"{url}/healthz").status_code == 200  # starting: alive, not ready
            assert client.get(f"{url}/readyz").json()["error"]["code"] == "not_ready"
            app.state.heartbeat = Heartbeat()
            assert client.get(f"{url}/healthz").status_code == 200
            app.state.heartbeat.last -= STALL_AFTER_S + 1
            stalled = client.get(f"{url}/healthz")
        assert stalled.status_code == 503 and stalled.json()["error"]["code"] == "event_loop_stalled", stalled.text
    finally:
        probes.stop()
