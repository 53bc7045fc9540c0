"""Supervision of the worker processes: the watchdog, retry once, restart backoff, start-up,
deadlines and Retry-After, the accuracy guard's fallback and the lending of idle cores.

Workers are held with SIGSTOP, so every test knows where its batch is; the servers run the
PyTorch backend (nothing to convert: the quickest start) and fp32 unless a test says otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from model.variants import create_model
from service.inference import pool
from service.inference.pool import shared_threads
from service.inference.watchdog import InferenceTimes, WatchdogConfig
from service.worker.backends import GUARD_COSINE, Probe
from service.worker.backends.pytorch_runtime import build_torch, reference_probe
from tests.conftest import TEST_VARIANT, Reference, engine_of, pids_of, run_server, until, wait_ready
from tests.service.serving import batches, classify, metric, ready_status, stopped

measured = logging.getLogger("tests.measured")  # the numbers a report quotes (pytest -rP shows them)
HOLD_S = 600.0  # a watchdog floor no test reaches: the test, not the watchdog, decides what happens


@contextmanager
def _server(reference: Reference, **overrides: Any) -> Iterator[str]:
    settings: dict[str, Any] = {"weights": str(reference.checkpoint), "backend": "torch", "precision": "fp32",
                                "threads_per_worker": 1, "max_batch_size": 4, "watchdog_floor_s": HOLD_S,
                                "request_timeout_s": 300}
    with run_server(**{**settings, **overrides}) as url:
        yield url


def _pids(url: str) -> list[int]:
    return list(pids_of(engine_of(url)).values())


def _holder(url: str) -> int:
    """The pid of the one worker that has a batch in flight."""
    engine = engine_of(url)
    holding = [w["id"] for w in engine.describe()["workers"] if w["batches_in_flight"]]
    assert len(holding) == 1, engine.describe()["workers"]
    return pids_of(engine)[holding[0]]


def _all_ready(url: str) -> list[int]:
    """The pids, once every worker is ready (readiness needs only one)."""
    until(lambda: all(w["state"] == "ready" for w in engine_of(url).describe()["workers"]), 90, "every worker ready")
    return _pids(url)


def _until_all_restarted(url: str, old: list[int]) -> None:
    def restarted() -> bool:
        pids, workers = _pids(url), engine_of(url).describe()["workers"]
        return len(pids) == len(workers) and not set(pids) & set(old) and all(w["state"] == "ready" for w in workers)

    until(restarted, 90, f"every worker of {old} replaced by a ready one")


# -- the watchdog ------------------------------------------------------------------------------

def test_sigstopped_workers_turn_readyz_503_within_the_watchdog_time_and_recover(
    reference: Reference, caplog: pytest.LogCaptureFixture
) -> None:
    floor_s = 1.0
    with _server(reference, workers=2, watchdog_floor_s=floor_s, watchdog_multiplier=2) as url, \
            caplog.at_level(logging.INFO, logger="service.inference.pool"), ThreadPoolExecutor(1) as pool:
        # idle workers: the pings go unanswered
        first = _all_ready(url)
        with stopped(first):
            begun = time.monotonic()
            until(lambda: ready_status(url) == 503, 30, "readiness to drop")
            idle_s = time.monotonic() - begun
        _until_all_restarted(url, first)
        assert classify(url).status_code == 200
        # busy workers: a batch inside one stopped worker, the other stopped too
        second = _all_ready(url)
        with stopped(second):
            dispatched = batches(url)
            request = pool.submit(classify, url, 2)
            until(lambda: batches(url) == dispatched + 1, 30, "the batch to reach a worker")
            begun = time.monotonic()
            until(lambda: ready_status(url) == 503, 30, "readiness to drop")
            busy_s = time.monotonic() - begun
            response = request.result()
        # its one retry went to a restarted worker, or to the other hung one (then: worker_failed)
        assert response.status_code == 200 or response.json()["error"]["code"] == "worker_failed", response.text
        _until_all_restarted(url, second)
        # a batch inside the one hung worker: retried on the other, the request never notices
        third = _all_ready(url)
        with stopped(third):
            dispatched = batches(url)
            request = pool.submit(classify, url, 2)
            until(lambda: batches(url) == dispatched + 1, 30, "the batch to reach a worker")
            holder = _holder(url)
            os.kill(next(pid for pid in third if pid != holder), signal.SIGCONT)
            response = request.result()
        assert response.status_code == 200, response.text
        _until_all_restarted(url, [holder])
        assert classify(url).status_code == 200
    # ping sent after floor_s of silence, unanswered for floor_s, seen at the next scan
    assert idle_s < 2 * floor_s + 2.0, idle_s
    assert busy_s < 15, busy_s
    reasons = [str(getattr(r, "reason", "")) for r in caplog.records if r.getMessage() == "worker hung; killing it"]
    assert sum("ping" in r for r in reasons) >= 2 and any("a batch of 2 image(s)" in r for r in reasons), reasons
    measured.warning(f"watchdog: idle workers out of readiness after {idle_s:.2f} s, a held batch after {busy_s:.2f} s")


def test_the_watchdog_limit_follows_the_measured_times() -> None:
    config = WatchdogConfig(floor_s=1.0, multiplier=10)
    times = InferenceTimes()
    assert times.limit_s(8, config) == 1.0  # nothing measured: the floor
    times.record_warm_up(8, 2.0)  # the start-up bound until real batches are known
    assert times.limit_s(8, config) == 20.0
    for _ in range(100):
        times.record(4, 0.2)
    assert times.limit_s(4, config) == pytest.approx(2.0)  # p99 x 10
    assert times.limit_s(8, config) == pytest.approx(4.0)  # a larger batch scales up
    assert times.limit_s(1, config) == pytest.approx(2.0)  # a smaller one is not taken to be cheaper
    times.record(4, 5.0)  # one slow batch is not the p99
    assert times.limit_s(4, config) == pytest.approx(2.0)


# -- retries and restarts ----------------------------------------------------------------------

def test_a_batch_whose_worker_dies_twice_fails_with_503_worker_failed(reference: Reference) -> None:
    with _server(reference, workers=2) as url, ThreadPoolExecutor(1) as pool:
        with stopped(_all_ready(url)):
            dispatched = batches(url)
            request = pool.submit(classify, url, 1)
            until(lambda: batches(url) == dispatched + 1, 30, "the batch to reach a worker")
            first = _holder(url)
            os.kill(first, signal.SIGKILL)
            until(lambda: batches(url) == dispatched + 2, 30, "the retry to reach the other worker")
            second = _holder(url)
            assert second != first
            os.kill(second, signal.SIGKILL)
            response = request.result()
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "worker_failed"
        assert response.headers["Retry-After"] == "1"
        wait_ready(url, 60)
        assert classify(url).status_code == 200


def test_consecutive_crashes_space_the_restarts_by_a_growing_delay(
    reference: Reference, caplog: pytest.LogCaptureFixture
) -> None:
    with _server(reference, workers=1) as url, caplog.at_level(logging.INFO, logger="service.inference.pool"):
        engine = engine_of(url)
        for _ in range(4):  # killed again as soon as it is respawned: four crashes in a row
            pid = pids_of(engine)[0]
            os.kill(pid, signal.SIGKILL)
            until(lambda: pids_of(engine).get(0) not in (None, pid), 60, "the restart")  # noqa: B023
        records = [r for r in caplog.records if r.getMessage() in ("worker died; restarting", "worker starting")]
    died = [r for r in records if r.getMessage() == "worker died; restarting"]
    assert [getattr(r, "restart_in_s", None) for r in died] == [0.5, 1.0, 2.0, 4.0]
    gaps = []
    for death in died:
        respawn = next(r for r in records if r.getMessage() == "worker starting" and r.created > death.created)
        gaps.append(respawn.created - death.created)
    for gap, delay in zip(gaps, [0.5, 1.0, 2.0, 4.0], strict=True):
        assert delay <= gap < delay + 2.0, gaps
    measured.warning(f"restart gaps after consecutive crashes: {[round(g, 2) for g in gaps]} s")


def test_a_crash_loop_long_after_the_last_ready_still_backs_off(
    reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker up past STABLE_AFTER_S, whose every later start fails (its weights file replaced): the delay
    doubles from one failed start to the next, instead of starting over from the old ready time each death."""
    monkeypatch.setattr(pool, "STABLE_AFTER_S", 1.0)  # "long ago" without waiting a minute
    weights = tmp_path / reference.checkpoint.name
    shutil.copy(reference.checkpoint, weights)
    with _server(reference, workers=1, weights=str(weights)) as url, \
            caplog.at_level(logging.INFO, logger="service.inference.pool"):
        engine = engine_of(url)
        threading.Event().wait(1.5)  # a successful start, up longer than STABLE_AFTER_S
        weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # every restart refuses the new file
        os.kill(pids_of(engine)[0], signal.SIGKILL)
        died = lambda: [r for r in caplog.records if r.getMessage() == "worker died; restarting"]  # noqa: E731
        until(lambda: len(died()) >= 4, 90, "four deaths")
        worker = engine.describe()["workers"][0]
    assert [getattr(r, "restart_in_s", None) for r in died()[:4]] == [0.5, 1.0, 2.0, 4.0]
    assert "hashes to sha256" in (worker["last_error"] or ""), worker


def test_a_hung_restart_is_killed_and_classify_is_refused_at_once_meanwhile(
    reference: Reference, caplog: pytest.LogCaptureFixture
) -> None:
    """The replacement of a killed worker stops while starting: past what its last start predicts, classify
    answers 503 not_ready at once (not after its whole deadline), and the start watchdog kills it."""
    start_timeout_s = 10.0
    with _server(reference, workers=1, worker_start_timeout_s=start_timeout_s, request_timeout_s=30) as url, \
            caplog.at_level(logging.INFO, logger="service.inference.pool"):
        engine = engine_of(url)
        first = pids_of(engine)[0]
        os.kill(first, signal.SIGKILL)
        until(lambda: pids_of(engine).get(0) not in (None, first), 30, "the replacement")
        replacement = pids_of(engine)[0]
        os.kill(replacement, signal.SIGSTOP)
        killed_at = time.monotonic()
        assert engine.describe()["workers"][0]["state"] == "starting"
        # within what the last start predicts, work waits for the restart; past it, refused at once
        until(lambda: classify(url, **{"X-Request-Timeout-Ms": "300"}).status_code == 503, 30, "not_ready")
        begun = time.monotonic()
        response = classify(url)
        refused_in_s = time.monotonic() - begun
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready", response.text
        assert int(response.headers["Retry-After"]) >= 1
        wait_ready(url, 60)
        back_after_s = time.monotonic() - killed_at
        assert replacement not in pids_of(engine).values()
        assert classify(url).status_code == 200
    reasons = [str(getattr(r, "reason", "")) for r in caplog.records if r.getMessage() == "worker hung; killing it"]
    assert any(r.startswith("its start ran") for r in reasons), reasons
    assert refused_in_s < 1.0, refused_in_s
    assert start_timeout_s < back_after_s < start_timeout_s + 30, back_after_s
    measured.warning(f"hung start: refused in {refused_in_s * 1000:.0f} ms, ready again after {back_after_s:.1f} s")


# -- start-up, deadlines, Retry-After ----------------------------------------------------------

def test_classify_during_start_up_is_503_not_ready_with_retry_after(reference: Reference) -> None:
    """Also: a start-up (model load, warm-up) is not a batch; the watchdog leaves a slow one alone."""
    with _server(reference, workers=1, wait=False, watchdog_floor_s=0.5) as url:
        pids = _pids(url)
        with stopped(pids):
            states = [w["state"] for w in engine_of(url).describe()["workers"]]
            assert states == ["starting"], f"the worker was ready before it could be held: {states}"
            response = classify(url, timeout_s=20)  # refused at once, not queued behind the start-up
            ready = httpx.get(f"{url}/readyz")
            threading.Event().wait(4 * 0.5)  # a start-up far past the watchdog's floor
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        assert int(response.headers["Retry-After"]) >= 1
        assert ready.status_code == 503
        wait_ready(url, 60)
        assert _pids(url) == pids, "the watchdog killed a worker that was still starting"
        assert classify(url).status_code == 200


def test_the_deadline_header_is_capped_by_the_server_limit(reference: Reference) -> None:
    with _server(reference, workers=1, request_timeout_s=2) as url, stopped(_pids(url)):
        begun = time.monotonic()
        response = classify(url, timeout_s=60, **{"X-Request-Timeout-Ms": "30000"})
        took = time.monotonic() - begun
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert 2.0 <= took < 8.0, took  # the server's 2 s, not the client's 30 s


def test_retry_after_is_the_queue_over_the_measured_drain_rate(reference: Reference) -> None:
    """Two images drained, then a pause: the rate is 2 / (time since the first), so a full queue of
    16 must wait about 8 s per second of span, far from the 1..30 clamps."""
    with _server(reference, workers=1, max_batch_size=8, max_queue=16, max_images_per_request=4) as url:
        first_sent = time.monotonic()
        assert classify(url).status_code == 200 and classify(url).status_code == 200
        drained = time.monotonic()
        threading.Event().wait(1.0)
        sent: dict[int, tuple[float, float]] = {}

        def flood(i: int) -> httpx.Response:
            begun = time.monotonic()
            response = classify(url, 4)
            sent[i] = (begun, time.monotonic())
            return response

        with ThreadPoolExecutor(12) as pool:
            with stopped(_pids(url)):
                futures = [pool.submit(flood, i) for i in range(12)]
                # every request answered (refused) or admitted and held by the stopped worker
                until(lambda: sum(f.done() for f in futures) + metric(url, "crossvit_in_flight_requests") == 12,
                      60, "the flood to be admitted or refused")
                rejected = [(i, f.result()) for i, f in enumerate(futures) if f.done()]
            assert [f.result().status_code for f in futures].count(200) == 12 - len(rejected)
        assert rejected, "12 requests of 4 images never overflowed a 16-image queue"
        for i, response in rejected:
            assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded", response.text
            begun, answered = sent[i]
            # rate = 2 images / (rejection - first completion); waiting = 17..20 images
            low = math.ceil(17 * (begun - drained) / 2)
            high = math.ceil(20 * (answered - first_sent) / 2)
            value = int(response.headers["Retry-After"])
            assert max(1, min(30, low)) <= value <= min(30, high), (value, low, high)
    measured.warning(f"Retry-After values: {sorted({int(r.headers['Retry-After']) for _, r in rejected})}")


# -- precision guard, core lending -------------------------------------------------------------

def test_a_mode_failing_the_accuracy_guard_falls_back_to_fp32() -> None:
    torch.manual_seed(0)
    model = create_model(TEST_VARIANT).eval()
    torch.manual_seed(1)
    stranger = create_model(TEST_VARIANT).eval()  # a probe no reduced precision of `model` can match
    cpu = torch.device("cpu")
    failed = build_torch(model, "bf16", cpu, reference_probe(stranger))
    assert failed.requested == "bf16-autocast" and failed.backend.mode == "fp32"
    [(mode, agreement)] = failed.rejected
    assert mode == "bf16-autocast" and agreement.cosine < GUARD_COSINE
    probe = reference_probe(model)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        own = torch.stack(model.branch_logits(torch.from_numpy(probe.x)), dim=1).float().numpy()
    passed = build_torch(model, "bf16", cpu, Probe(probe.x, own))  # a yardstick bf16 itself meets
    assert passed.backend.mode == "bf16-autocast" and not passed.rejected
    assert passed.backend.agreement.passes_guard()


def test_a_lone_cpu_batch_borrows_the_idle_workers_cores() -> None:
    assert shared_threads(1, 4, busy=1) == 4  # alone: every core of the budget
    assert shared_threads(1, 4, busy=2) == 2
    assert shared_threads(1, 4, busy=4) == 1  # all busy: each its own
    assert shared_threads(2, 4, busy=4) == 2  # never fewer than its own threads
    assert shared_threads(1, None, busy=1) == 1  # fixed threads: nothing is lent
