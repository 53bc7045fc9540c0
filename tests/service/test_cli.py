"""`crossvit-serve` as users run it: settings checked at start, weights policy, logs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Reference, cli_env, cli_worker_pids, start_cli, until
from tests.photos import encode, photo

# torch fp32 on one thread: no conversion, no bf16 guard; starts in seconds on a busy machine
FAST_START = {"backend": "torch", "precision": "fp32", "threads_per_worker": 1}
JPEG = encode(photo("chelsea"), "JPEG", quality=90)


def _run(tmp_path: Path, **settings: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli"], env=cli_env(tmp_path, **settings),
                          capture_output=True, text=True, timeout=120)


def test_invalid_settings_refuse_to_start_naming_the_setting(tmp_path: Path) -> None:
    result = _run(tmp_path, max_batch_size=0, device="tpu", log_format="yaml")
    assert result.returncode == 2
    for name in ("CROSSVIT_MAX_BATCH_SIZE", "CROSSVIT_DEVICE", "CROSSVIT_LOG_FORMAT"):
        assert name in result.stderr, result.stderr


def test_unknown_model_is_named(tmp_path: Path) -> None:
    result = _run(tmp_path, model="crossvit_huge")
    assert result.returncode == 2
    assert "CROSSVIT_MODEL" in result.stderr and "crossvit_18_dagger_240" in result.stderr


def test_no_weights_without_random_fallback_exits_with_a_message(tmp_path: Path) -> None:
    result = _run(tmp_path, allow_random_weights="false")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "no weights for crossvit_tiny_240" in output
    assert "CROSSVIT_WEIGHTS" in output and "CROSSVIT_ALLOW_RANDOM_WEIGHTS" in output


def test_missing_configured_weights_file_exits(tmp_path: Path) -> None:
    result = _run(tmp_path, weights=str(tmp_path / "nope.safetensors"), allow_random_weights="true")
    assert result.returncode != 0
    assert "nope.safetensors" in result.stdout + result.stderr


def test_broken_weights_file_exits_naming_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\x00" * 64)
    result = _run(tmp_path, weights=str(bad))
    assert result.returncode != 0
    assert "broken.safetensors" in result.stdout + result.stderr


@pytest.mark.parametrize("value", ["", ",", " ", " , ,"], ids=["empty", "comma", "space", "commas"])
def test_blank_api_keys_refuse_to_start(tmp_path: Path, value: str) -> None:
    """Set but holding no key must not mean "auth off": that is what leaving it unset says."""
    result = _run(tmp_path, api_keys=value, allow_random_weights="true")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CROSSVIT_API_KEYS" in result.stderr and "holds no key" in result.stderr


def test_random_weights_are_loud_and_flagged(tmp_path: Path) -> None:
    with start_cli(tmp_path, allow_random_weights="true", workers=1, log_format="json") as server:
        response = httpx.post(f"{server.url}/v1/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200
        assert response.headers["X-Model-Pretrained"] == "false"
        card = httpx.get(f"{server.url}/v1/models").json()
        assert card["weights"]["pretrained"] is False and card["weights"]["source"] == "random"
        again = httpx.get(f"{server.url}/v1/models").json()
        assert again["weights"]["sha256"] == card["weights"]["sha256"]  # seeded: every replica alike
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    warnings = [r for r in lines if r["level"] == "warning" and "RANDOMLY INITIALISED" in r["message"]]
    assert warnings, server.log()
    access = [r for r in lines if r["message"] == "request" and r.get("path") == "/v1/classify"]
    assert access and access[0]["status"] == 200 and access[0]["images"] == 1
    assert {"request_id", "duration_ms", "timing_ms"} <= set(access[0])
    auth = [r for r in lines if r["message"].startswith("authentication")]
    assert [r["message"].split(":")[0] for r in auth] == ["authentication off"]  # said once


def test_pretrained_weights_have_no_random_flag(tmp_path: Path, reference: Reference) -> None:
    with start_cli(tmp_path, weights=str(reference.checkpoint), workers=1, api_keys="sekret-key-123") as server:
        response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sekret-key-123"})
        assert response.status_code == 200
        assert "X-Model-Pretrained" not in response.headers
        assert response.json()["weights"]["pretrained"] is True
    assert "sekret-key-123" not in server.log()  # keys never reach the logs
    auth = [line for line in server.log().splitlines() if "authentication" in line]
    assert len(auth) == 1 and "authentication on" in auth[0] and "api_keys=1" in auth[0], server.log()


def test_a_second_sigterm_exits_at_once(tmp_path: Path, reference: Reference) -> None:
    """The first SIGTERM drains (up to the shutdown budget); a second means now, request in flight or not."""
    with start_cli(tmp_path, weights=str(reference.checkpoint), workers=1, **FAST_START,
                   shutdown_timeout_s=30) as server:
        workers = cli_worker_pids(server)
        assert workers
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)  # the request below stays in flight
        try:
            with ThreadPoolExecutor(1) as pool:
                held = pool.submit(httpx.post, f"{server.url}/v1/classify", content=JPEG,
                                   headers={"Content-Type": "image/jpeg"}, timeout=60)
                until(lambda: _in_flight(server.url) >= 1, 20, "the request to be in flight")
                server.process.send_signal(signal.SIGTERM)
                until(lambda: httpx.get(f"{server.url}/readyz").status_code == 503, 10, "the drain to begin")
                started = time.monotonic()
                server.process.send_signal(signal.SIGTERM)
                code = server.process.wait(timeout=20)
                elapsed = time.monotonic() - started
                with pytest.raises(httpx.TransportError):
                    held.result()
            # killed by the server itself (this test's clean-up below is only a safety net)
            until(lambda: all(_gone(pid) for pid in workers), 5, "the stopped worker to be killed")
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert elapsed < 2, (elapsed, server.log())
    assert code == 128 + signal.SIGTERM, server.log()
    assert "second shutdown signal" in server.log()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped by init
    except psutil.NoSuchProcess:
        return True


def _in_flight(url: str) -> float:
    match = re.search(r"^crossvit_in_flight_requests ([0-9.e+-]+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0



def test_prepare_only_fills_the_model_cache_that_serving_then_loads(tmp_path: Path, reference: Reference) -> None:
    cache = tmp_path / "model-cache"
    settings = {"weights": str(reference.checkpoint), "cache_dir": str(cache), "backend": "openvino",
                "log_format": "json"}
    result = subprocess.run([sys.executable, "-m", "service.cli", "--prepare-only"],
                            env=cli_env(tmp_path, **settings), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in cache.glob("crossvit_tiny_240-*") if p.is_dir()], list(cache.iterdir())
    assert not (cache / "compiled").exists()  # OpenVINO's blobs for this CPU are not left for an image to bake
    with start_cli(tmp_path, workers=1, **settings) as server:
        assert httpx.post(f"{server.url}/v1/classify", content=JPEG,
                          headers={"Content-Type": "image/jpeg"}).status_code == 200
    ready = [json.loads(line) for line in server.log().splitlines() if '"worker ready"' in line]
    assert ready and ready[0]["model_source"] == "prepared earlier" and ready[0]["backend"] == "openvino", server.log()
