"""The inference engine under real load: batching, backpressure, deadlines, crashes, drain.

Everything runs for real: uvicorn, the batcher, spawned worker processes, the tiny model. Where
a test needs a batch to be inside a worker at a given moment, the worker is stopped (SIGSTOP)
and the test waits until the batch was dispatched to it: no race with the server.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from model.variants import get_variant
from service.inference.assembly import engine_config
from service.inference.engine import Classification, Engine
from service.inference.loading import load_weights
from service.metrics import Metrics
from tests.conftest import (
    BACKENDS,
    Reference,
    child_worker_pids,
    engine_of,
    pids_of,
    run_server,
    server_settings,
    start_cli,
    until,
)
from tests.photos import encode, photo
from tests.service.serving import JPEG, batches, classify, metric, ready_status, stopped

HOLD = {"watchdog_floor_s": 600, "request_timeout_s": 300}  # held workers: neither watchdog nor deadline steps in


def _accepted(url: str) -> float:
    """Classify requests in flight plus those already answered 200."""
    text = httpx.get(f"{url}/metrics").text
    done = re.search(r'^crossvit_requests_total\{route="/v1/classify",status="200"\} ([0-9.e+-]+)$', text, re.M)
    return metric(url, "crossvit_in_flight_requests") + (float(done.group(1)) if done else 0.0)


@pytest.fixture(scope="module")
def one_worker(reference: Reference) -> Iterator[str]:
    """One worker, so batching and a crash are visible; a queue small enough to overflow."""
    with run_server(weights=str(reference.checkpoint), workers=1, threads_per_worker=1, precision="fp32",
                    max_batch_size=8, max_batch_delay_ms=20, max_queue=16, max_images_per_request=4,
                    **HOLD) as url:
        yield url


@pytest.fixture(scope="module", params=BACKENDS)
def batching_server(request: pytest.FixtureRequest, reference: Reference) -> Iterator[str]:
    with run_server(weights=str(reference.checkpoint), workers=1, threads_per_worker=1, precision="fp32",
                    max_batch_size=8, max_batch_delay_ms=20, backend=request.param) as url:
        yield url


def _distinct_jpegs(count: int) -> list[bytes]:
    """`count` different pictures: four photos, each cropped at shifting offsets."""
    names = ["chelsea", "astronaut", "coffee", "rocket"]
    return [
        encode(photo(names[i % 4]).crop((10 * (i // 4), 0, 10 * (i // 4) + 280, 280)), "JPEG", quality=90)
        for i in range(count)
    ]


def _top(response: httpx.Response) -> list[tuple[int, float]]:
    assert response.status_code == 200, response.text
    return [(p["class_id"], p["logit"]) for p in response.json()["results"][0]["predictions"]]


def _post_one(url: str, jpeg: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", content=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=120)


def _close(a: list[tuple[int, float]], b: list[tuple[int, float]], tol: float) -> bool:
    same_classes = [c for c, _ in a] == [c for c, _ in b]
    return same_classes and all(abs(x - y) <= tol for (_, x), (_, y) in zip(a, b, strict=True))


def test_concurrent_clients_are_batched_and_each_gets_its_own_result(batching_server: str) -> None:
    url, tol = batching_server, 1e-4
    jpegs = _distinct_jpegs(48)
    alone = [_top(_post_one(url, j)) for j in jpegs]  # each image's answer in a batch of its own
    # the pictures are told apart by their answers: a swapped result could not pass as the right one
    for i in range(48):
        assert not any(_close(alone[i], alone[j], 10 * tol) for j in range(48) if j != i), i
    before_sum, before_count = metric(url, "crossvit_batch_size_sum"), batches(url)
    with ThreadPoolExecutor(16) as pool:
        together = [_top(r) for r in pool.map(lambda j: _post_one(url, j), jpegs)]
    images = metric(url, "crossvit_batch_size_sum") - before_sum
    count = batches(url) - before_count
    assert images == 48
    assert images / count > 1, f"mean batch size {images / count:.2f}"
    wrong = [i for i in range(48) if not _close(together[i], alone[i], tol)]
    assert not wrong, f"requests {wrong} got another image's result or a different answer in a batch"


def test_overload_gives_only_200_and_503_with_retry_after(one_worker: str) -> None:
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda _: classify(one_worker, images=4), range(64)))
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 503}, statuses
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, "64 concurrent requests of 4 images never overflowed a 16-image queue"
    assert any(r.status_code == 200 for r in responses)
    for r in rejected:
        assert r.json()["error"]["code"] == "overloaded"
        assert 1 <= int(r.headers["Retry-After"]) <= 30  # its computation: test_supervision
    assert ready_status(one_worker) == 200


def test_a_1ms_deadline_gives_504_with_timings(one_worker: str) -> None:
    response = classify(one_worker, **{"X-Request-Timeout-Ms": "1"})
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "deadline_exceeded"
    assert "total" in error["timing_ms"]
    assert classify(one_worker).status_code == 200  # nothing left behind


def test_a_worker_killed_with_a_batch_inside_is_restarted_and_the_batch_retried(one_worker: str) -> None:
    restarts = metric(one_worker, "crossvit_worker_restarts_total")
    [pid] = pids_of(engine_of(one_worker)).values()
    with ThreadPoolExecutor(1) as pool, stopped([pid]):
        dispatched = batches(one_worker)
        request = pool.submit(classify, one_worker, 4)
        until(lambda: batches(one_worker) == dispatched + 1, 30, "the batch to reach the worker")
        os.kill(pid, signal.SIGKILL)  # with the batch in its slot, unanswered
        until(lambda: ready_status(one_worker) == 503, 10, "readiness to drop")
        until(lambda: ready_status(one_worker) == 200, 60, "readiness to return")
        response = request.result()
    # the images the dead worker held were retried on the restarted one
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 4
    assert batches(one_worker) == dispatched + 2
    assert classify(one_worker).status_code == 200
    card = httpx.get(f"{one_worker}/v1/models").json()
    assert pids_of(engine_of(one_worker))[0] != pid and card["workers"][0]["restarts"] >= 1
    assert metric(one_worker, "crossvit_worker_restarts_total") == restarts + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path: Path, reference: Reference, backend: str) -> None:
    with start_cli(tmp_path, weights=reference.checkpoint, workers=1, precision="fp32", max_batch_size=4,
                   shutdown_timeout_s=25, backend=backend, **HOLD) as server:
        pids = child_worker_pids(server.process.pid)
        assert len(pids) == 1, pids
        with ThreadPoolExecutor(8) as pool:
            with stopped(pids):  # every request is still in flight when the signal comes
                futures = [pool.submit(classify, server.url, 4) for _ in range(8)]
                until(lambda: metric(server.url, "crossvit_in_flight_requests") == 8, 30, "all requests accepted")
                server.process.send_signal(signal.SIGTERM)
                until(lambda: ready_status(server.url) == 503, 10, "readiness to drop")
                ready = httpx.get(f"{server.url}/readyz")  # the listener stays open while draining
                late = classify(server.url)
                held = metric(server.url, "crossvit_in_flight_requests")
                assert server.process.poll() is None, server.log()
            results = [f.result() for f in futures]
        assert server.process.wait(timeout=40) == 0, server.log()
    assert held == 8
    assert ready.json()["error"]["code"] == "not_ready"
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert [r.status_code for r in results] == [200] * 8, [r.text[:200] for r in results]


def test_a_client_that_leaves_is_dropped_quietly(one_worker: str, caplog: pytest.LogCaptureFixture) -> None:
    """Leaving mid-body, and leaving while its batch is inside a (stopped) worker: no error, no 500."""
    host, port = one_worker.removeprefix("http://").split(":")
    files = [("images", (f"{i}.jpg", JPEG, "image/jpeg")) for i in range(4)]
    request = httpx.Request("POST", f"{one_worker}/v1/classify", files=files)
    body = request.read()
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    raw = f"POST /v1/classify HTTP/1.1\r\n{head}\r\n".encode()
    with caplog.at_level(logging.WARNING):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(raw + body[: len(body) // 2])  # and leave mid-body
        with stopped(list(pids_of(engine_of(one_worker)).values())):
            dispatched = batches(one_worker)
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(raw + body)
                until(lambda: batches(one_worker) == dispatched + 1, 30, "the batch to reach the worker")
            # the worker is stopped: only the disconnect can end the request
            until(lambda: metric(one_worker, "crossvit_in_flight_requests") == 0, 30, "the abandoned request to end")
        assert classify(one_worker).status_code == 200
        gc.collect()  # an orphaned future logs "exception was never retrieved" when collected
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not problems, [r.getMessage() for r in problems]
    text = httpx.get(f"{one_worker}/metrics").text
    assert 'status="500"' not in text
    assert re.search(r'^crossvit_requests_total\{route="/v1/classify",status="499"\} 2\.0$', text, re.M), text


def test_the_engine_starts_and_classifies_without_http(reference: Reference, tmp_path: Path) -> None:
    """The engine is assembled from settings alone (service/inference/assembly.py): no app, no HTTP, real workers."""
    settings = server_settings(weights=str(reference.checkpoint), backend="torch", precision="fp32", workers=1,
                               threads_per_worker=1)
    weights = load_weights(settings, tmp_path)
    config = engine_config(settings, get_variant(settings.model), weights)
    assert [spec.device for spec in config.replicas] == ["cpu"] and config.replicas[0].backend == "torch"

    async def run() -> Classification:
        metrics = Metrics(max_batch_size=settings.max_batch_size)
        async with Engine.start(config, metrics, stop_timeout_s=5) as engine:
            while not engine.readiness()[0]:
                await asyncio.sleep(0.1)
            return await engine.classify([JPEG], top_k=3, branches=True, deadline=time.monotonic() + 60)

    result = asyncio.run(asyncio.wait_for(run(), 180))
    (image,) = result.results
    assert len(image.predictions) == 3 and image.branches is not None and len(image.branches) == 2
    assert tuple(result.logits.shape) == (1, 2, 1000)
    assert image.predictions[0].class_id == int(result.logits[0].mean(0).argmax())
