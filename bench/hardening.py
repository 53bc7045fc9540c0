"""What one hostile client costs the server: the table of the hardening issue, rerun against `crossvit-serve`.

    python bench/hardening.py [--rows 1 2 3 4 5] [--connections 1024]

Starts the real CLI server (crossvit_tiny_240, random init, one worker, fp32, PyTorch) on loopback
and, one row at a time, does what the row's client does while a prober asks /healthz (on the probe
listener where the server has one, else on the API port) every 50 ms; prints what happened, the
probe's worst latency and the API process's peak RSS growth (its high-water mark, reset before each
row through /proc/PID/clear_refs, so run it as root). Loopback only, every row bounded in time.

  1  opens N TCP connections and sends nothing
  2  sends a 64 MiB header value, never finishing the head
  3  9 connections declare Content-Length: 32 MiB and send no body; then one real upload
  4  /v2 infer with one 64x64 PNG and 2,000 copies of {"name": "logits"} in outputs
  5  /v2 JSON whose data holds 8.4 M numbers (32 MiB)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import timm
import torch
from machine import cpu_line  # bench/, this script's folder
from PIL import Image
from safetensors.torch import save_file
from servers import free_port, wait_ready

VARIANT = "crossvit_tiny_240"
MiB = 1 << 20


@contextmanager
def server(tmp: Path) -> Iterator[tuple[str, str, int]]:
    """(API url, probe url, pid) of a CLI server; the probe url is the API's where there is no listener."""
    torch.manual_seed(0)
    weights = tmp / f"{VARIANT}.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(VARIANT).state_dict().items()}, weights)
    port, probe_port = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CROSSVIT_")},
           "CROSSVIT_MODEL": VARIANT, "CROSSVIT_WEIGHTS": str(weights), "CROSSVIT_FETCH_WEIGHTS": "false",
           "CROSSVIT_DEVICE": "cpu", "CROSSVIT_BACKEND": "torch", "CROSSVIT_PRECISION": "fp32",
           "CROSSVIT_WORKERS": "1", "CROSSVIT_THREADS_PER_WORKER": "1", "CROSSVIT_PORT": str(port),
           "CROSSVIT_PROBE_PORT": str(probe_port), "CROSSVIT_LOG_LEVEL": "error"}
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - open for the server's life
    process = subprocess.Popen([sys.executable, "-m", "service.cli"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, 120)
        try:
            httpx.get(f"http://127.0.0.1:{probe_port}/healthz", timeout=2)
            probe = f"http://127.0.0.1:{probe_port}"
        except httpx.TransportError:
            probe = url  # a server without a probe listener
        yield url, probe, process.pid
    finally:
        if process.poll() is not None:
            print(f"the server exited ({process.returncode}):\n{(tmp / 'server.log').read_text()[-3000:]}")
        process.kill()
        process.wait(30)
        log.close()


class Prober:
    """GET /healthz every 50 ms in a thread; the worst latency and the statuses seen."""

    def __init__(self, url: str) -> None:
        self._url, self._done = url, threading.Event()
        self.latencies: list[float] = []
        self.statuses: set[int | str] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._done.is_set():
                begun = time.monotonic()
                try:
                    self.statuses.add(client.get(f"{self._url}/healthz").status_code)
                except httpx.TransportError as exc:
                    self.statuses.add(type(exc).__name__)
                self.latencies.append(time.monotonic() - begun)
                self._done.wait(0.05)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(10)

    def summary(self) -> str:
        worst = max(self.latencies) * 1000 if self.latencies else float("nan")
        return f"/healthz worst {worst:.0f} ms, statuses {sorted(map(str, self.statuses))}"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(pid: int) -> float:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the high-water mark starts again from now
    return peak_rss_mib(pid)


def readable(sock: socket.socket, timeout_s: float = 0) -> bool:
    """poll, not select: a thousand sockets have descriptors past select's 1024."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(timeout_s * 1000))


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def reply_status(sock: socket.socket, timeout_s: float) -> str:
    sock.settimeout(timeout_s)
    try:
        data = sock.recv(4096)
    except (TimeoutError, ConnectionResetError) as exc:
        return type(exc).__name__
    return data.split(b"\r\n", 1)[0].decode(errors="replace") if data else "closed"


def row1(url: str, n: int) -> str:
    socks = [connect(url) for _ in range(n)]
    try:
        with httpx.Client(timeout=5) as client:
            try:
                api = client.get(f"{url}/healthz")
                api_said = f"{api.status_code} {api.headers.get('content-type', '')}"
            except httpx.TransportError as exc:
                api_said = type(exc).__name__
        time.sleep(40)
        still_open = sum(not readable(s) for s in socks)
    finally:
        for sock in socks:
            sock.close()
    return f"{n} idle sockets: a new API request got {api_said}; 40 s later {still_open} still open"


def row2(url: str) -> str:
    sent = 0
    with connect(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: ")
        piece = b"a" * 65536
        while sent < 64 * MiB and not readable(sock):
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        status = reply_status(sock, 10) if readable(sock, 5) else "no answer"
    return f"64 MiB header: {sent / MiB:.2f} MiB taken, answer: {status}"


def row3(url: str) -> str:
    socks = [connect(url) for _ in range(9)]
    try:
        for sock in socks:
            sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
                         f"Content-Length: {32 * MiB}\r\n\r\n".encode())
        time.sleep(0.5)
        begun = time.monotonic()
        real = httpx.post(f"{url}/v1/classify", content=_jpeg(), headers={"Content-Type": "image/jpeg"},
                          timeout=60)
        real_s = time.monotonic() - begun
        statuses = [reply_status(sock, 40) for sock in socks]
        freed_s = time.monotonic() - begun
    finally:
        for sock in socks:
            sock.close()
    return (f"9 x 32 MiB declared, no body: a real upload got {real.status_code} in {real_s:.2f} s; "
            f"the declarers got {sorted(set(statuses))} within {freed_s:.1f} s")


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (120, 30, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


def row4(url: str) -> str:
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_png()]}],
                       "outputs": [{"name": "logits"}] * 2000}).encode()
    answer = httpx.post(f"{url}/v2/models/{VARIANT}/infer", content=body,
                        headers={"Content-Type": "application/json"}, timeout=60)
    return (f"{len(body) / 1e3:.0f} kB request with 2,000 outputs: {answer.status_code}, "
            f"answer {len(answer.content) / 1e6:.3f} MB")


def row5(url: str) -> str:
    head = b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 240, 240], "data": ['
    tail = b"0]}]}"
    count = (32 * MiB - len(head) - len(tail)) // 4
    body = head + b"0.5," * count + tail
    begun = time.monotonic()
    answer = httpx.post(f"{url}/v2/models/{VARIANT}/infer", content=body,
                        headers={"Content-Type": "application/json"}, timeout=60)
    return f"{count / 1e6:.1f} M numbers in 32 MiB: {answer.status_code} after {time.monotonic() - begun:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--connections", type=int, default=1024)
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
    rows: dict[int, Callable[[str], str]] = {1: lambda u: row1(u, args.connections), 2: row2, 3: row3, 4: row4,
                                             5: row5}
    with tempfile.TemporaryDirectory() as tmp, server(Path(tmp)) as (url, probe, pid):
        where = " (the API port: no probe listener)" if probe == url else ""
        print(f"# {cpu_line()}\nserver pid {pid}; probes asked at {probe}{where}")
        for row in args.rows:
            time.sleep(1)
            base = reset_peak(pid)
            with Prober(probe) as prober:
                said = rows[row](url)
            print(f"row {row}: {said}; {prober.summary()}; API peak RSS +{peak_rss_mib(pid) - base:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
