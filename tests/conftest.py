"""Shared fixtures: a timm-made checkpoint and the real server (uvicorn on a free loopback port)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import timm
import torch
import uvicorn
from fastapi import FastAPI
from safetensors.torch import save_file
from torch import nn

from service.app import create_app
from service.inference.engine import Engine
from service.settings import Settings

TEST_VARIANT = "crossvit_tiny_240"  # the cheapest published variant: fast tests, real architecture


@dataclass(frozen=True)
class Reference:
    """A timm model with random init and the same weights saved as a real checkpoint file."""

    timm_model: nn.Module
    checkpoint: Path


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    torch.manual_seed(0)
    model = timm.create_model(TEST_VARIANT, pretrained=False).eval()
    path = tmp_path_factory.mktemp("weights") / f"{TEST_VARIANT}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return Reference(model, path)


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Poll /readyz until 200 (workers spawn and warm up in the background)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5) as client:
        while True:
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout_s} s")
            threading.Event().wait(0.1)  # a short poll interval, not a sleep-to-synchronise


_ENGINES: dict[str, Engine] = {}  # url -> engine of each in-process server, for the supervision tests


def serve_app(app: FastAPI) -> tuple[str, Callable[[], None]]:
    """Run `app` under uvicorn in a thread on a socket that listens before uvicorn starts; (url, stop)."""
    url, stop, _ = _serve(app)
    return url, stop


def _serve(app: FastAPI) -> tuple[str, Callable[[], None], uvicorn.Server]:
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop, server


def server_settings(**overrides: Any) -> Settings:
    """Test settings: the test variant, no fetching, and the CPU unless a test asks for a device (the
    CPU assertions must hold on a CUDA host too)."""
    return Settings(**{"model": TEST_VARIANT, "fetch_weights": False, "log_level": "warning", "device": "cpu",
                       **overrides})


@contextmanager
def run_server(*, wait: bool = True, **overrides: Any) -> Iterator[str]:
    """The real app under uvicorn in a thread. `wait=False` yields as soon as the lifespan has
    started the workers, before they are ready."""
    app = create_app(server_settings(**overrides))
    url, stop, server = _serve(app)
    try:
        if wait:
            wait_ready(url)
        else:
            until(lambda: server.started, 120, "the server to start")
        _ENGINES[url] = app.state.engine
        yield url
    finally:
        _ENGINES.pop(url, None)
        stop()


def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `predicate` until true; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        threading.Event().wait(0.02)


def engine_of(url: str) -> Engine:
    """The engine behind an in-process test server (`run_server`): worker pids and states."""
    return _ENGINES[url]


def pids_of(engine: Engine) -> dict[int, int]:
    """Worker id -> pid of its live process. Pids are kept out of every response and every production
    interface (issue 14), so this one test helper looks inside the pool."""
    workers = engine._pool._workers  # noqa: SLF001
    return {w.spec.worker_id: w.process.pid for w in workers
            if w.process is not None and w.process.pid is not None and w.conn is not None}


def worker_pids(url: str) -> list[int]:
    """The worker processes of an in-process test server, by worker id."""
    return [pid for _, pid in sorted(pids_of(engine_of(url)).items())]


def child_worker_pids(pid: int) -> list[int]:
    """The worker processes of the server process `pid` (a `start_cli` server), from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())


def cli_worker_pids(server: CliServer) -> list[int]:
    return child_worker_pids(server.process.pid)


BACKENDS = ["openvino", "torch"]


def _main_server(reference: Reference, backend: str) -> Iterator[str]:
    """fp32, so that served logits can be compared with timm's; two workers."""
    with run_server(weights=str(reference.checkpoint), precision="fp32", workers=2, threads_per_worker=1,
                    max_batch_size=4, backend=backend) as url:
        # every worker, not only the first: tests read both workers' cards and spread batches over both
        workers = lambda: httpx.get(f"{url}/v1/models", timeout=5).json()["workers"]  # noqa: E731
        until(lambda: all(w["state"] == "ready" for w in workers()), 300, "both workers to be ready")
        yield url


@pytest.fixture(scope="session")
def server(reference: Reference) -> Iterator[str]:
    """The main test server, on the default CPU backend (OpenVINO)."""
    yield from _main_server(reference, "openvino")


@pytest.fixture(scope="session")
def torch_server(reference: Reference) -> Iterator[str]:
    """The same server on the PyTorch backend, for the tests that must hold on both."""
    yield from _main_server(reference, "torch")


LIMITED_API_KEY = "limited-test-key-0123456789"
LIMITED_MAX_IMAGES = 3  # per request
LIMITED_MAX_UPLOAD_BYTES = 160_000  # chelsea + astronaut + coffee as JPEG fit; a 198 kB JPEG does not


@pytest.fixture(scope="session")
def limited(reference: Reference) -> Iterator[str]:
    """A server with an API key and tight request limits, for the client, CLI and page tests."""
    with run_server(weights=str(reference.checkpoint), workers=1, max_batch_size=2, api_keys=LIMITED_API_KEY,
                    max_images_per_request=LIMITED_MAX_IMAGES, max_upload_bytes=LIMITED_MAX_UPLOAD_BYTES) as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(params=BACKENDS)
def backend_client(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    """A client of the main server on each backend in turn (numerics, batching)."""
    url = request.getfixturevalue("server" if request.param == "openvino" else "torch_server")
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


ServerFactory = Callable[..., Any]


@pytest.fixture(scope="session")
def server_factory() -> ServerFactory:
    return run_server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class CliServer:
    """`crossvit-serve` in a subprocess (the real entry point, signals included)."""

    process: subprocess.Popen[str]
    url: str
    log_path: Path
    probe_url: str | None = None  # the probe listener (/healthz, /readyz, /metrics)

    def log(self) -> str:
        return self.log_path.read_text()


def cli_env(tmp_path: Path, **settings: object) -> dict[str, str]:
    """A clean environment: only the settings given here, plus what Python needs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSVIT_")}
    env.update({"CROSSVIT_MODEL": TEST_VARIANT, "CROSSVIT_FETCH_WEIGHTS": "false", "CROSSVIT_DEVICE": "cpu",
                "CROSSVIT_WEIGHTS_DIR": str(tmp_path / "no-weights-here"), "PYTHONUNBUFFERED": "1",
                "CROSSVIT_PROBE_PORT": str(free_port())})  # not the default port: servers may overlap
    env.update({f"CROSSVIT_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@contextmanager
def start_cli(
    tmp_path: Path, *, wait: bool = True, extra_env: dict[str, str] | None = None, **settings: object
) -> Iterator[CliServer]:
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    env = {**cli_env(tmp_path, port=port, **settings), **(extra_env or {})}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "service.cli"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, text=True)
    probe_port = int(env["CROSSVIT_PROBE_PORT"])
    server = CliServer(process, f"http://127.0.0.1:{port}", log_path,
                       f"http://127.0.0.1:{probe_port}" if probe_port else None)
    try:
        if wait:
            wait_ready(server.url)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
