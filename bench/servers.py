"""What the benchmarks share about the servers they start: a free loopback port, and waiting until one is ready."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any

import httpx

__all__ = ["free_port", "ready_workers", "wait_ready"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    """Poll `url`/readyz until 200; fail at once if the server exits, or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def ready_workers(url: str, timeout_s: float = 300) -> list[dict[str, Any]]:
    """Our service's workers from /v1/models once every one is ready (readiness needs only one), or at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers: list[dict[str, Any]] = httpx.get(f"{url}/v1/models", timeout=10).json()["workers"]
        if all(w["state"] == "ready" for w in workers) or time.monotonic() > deadline:
            return workers
        time.sleep(0.5)
