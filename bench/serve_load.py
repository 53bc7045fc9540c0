"""Served throughput and latency under load, beside model-only and a naive server, in one run.

    python bench/serve_load.py [--variant crossvit_9_dagger_240] [--concurrency 1 8 32]
                               [--duration 15] [--precisions fp32 bf16]

Needs `wrk` (Debian: apt-get install wrk). Loopback only; every load run is bounded by
--duration. Steps: (1) in-process references: preprocessing ms per 640x480 JPEG and model-only
img/s (one process, every core) at batch 1 and at the service's max batch size; (2) the service
(`crossvit-serve`, its defaults apart from model, weights and precision) under wrk at each
concurrency; (3) bench/naive_server.py (one forward per request in a threadpool) likewise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import create_model  # noqa: E402
from model.runtime import Mode, prepare  # noqa: E402
from model.variants import get_variant  # noqa: E402
from service.preprocess import InputSpec, preprocess  # noqa: E402
from tests.photos import encode, photo, resized  # noqa: E402

MAX_BATCH = 8  # the service's default max_batch_size
MODES = {"fp32": Mode.FP32, "bf16": Mode.BF16_AUTOCAST}


@dataclass
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    non_200: int


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(url: str, image: Path, connections: int, duration_s: int) -> LoadResult:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "60s", "--latency",
         "-s", str(ROOT / "bench" / "classify.lua"), f"{url}/v1/classify"],
        env={**os.environ, "IMAGE": str(image)}, capture_output=True, text=True, check=True,
    ).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))  # wrk pads some values
    try:
        result = LoadResult(
            rps=float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)),  # type: ignore[union-attr]
            p50_ms=_ms(latency["50"]), p99_ms=_ms(latency["99"]),
            non_200=int(re.search(r"NON200 (\d+)", out).group(1)),  # type: ignore[union-attr]
        )
    except (KeyError, AttributeError) as exc:
        raise RuntimeError(f"unexpected wrk output:\n{out}") from exc
    print(f"  {url} c={connections}: {result}", file=sys.stderr, flush=True)
    return result


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def measure_server(command: list[str], env: dict[str, str], image: Path, args: argparse.Namespace,
                   port: int) -> dict[int, LoadResult]:
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    try:
        wait_ready(url, process)
        run_wrk(url, image, 8, 3)  # warm-up, discarded
        return {c: run_wrk(url, image, c, args.duration) for c in args.concurrency}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def model_only(
    variant: str, weights: Path | None, mode: Mode, batch: int, repeats: int = 15, min_seconds: float = 0.0
) -> float:
    """img/s of the bare model, per-branch inputs ready, at this process's torch threads: the median
    of at least `repeats` timed calls, and of as many as `min_seconds` holds, after two warm-up calls.
    No weights: random init (same cost)."""
    runner = prepare(create_model(variant, weights=weights), mode)
    sizes = runner.model.config.img_size
    x = [torch.randn(batch, 3, s, s) for s in sizes]
    runner(x)
    runner(x)
    times = []
    end = time.monotonic() + min_seconds
    while len(times) < repeats or time.monotonic() < end:
        start = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def sample_model_only(samples: dict[int, list[float]], variant: str, weights: Path, mode: Mode) -> None:
    """One more model-only sample per batch size: taken before, between and after the servers' runs,
    whose median stands beside them, because shared cores drift over the minutes a run takes."""
    for batch, values in samples.items():
        values.append(model_only(variant, weights, mode, batch))


def preprocess_ms(variant: str, data: bytes, repeats: int = 50) -> float:
    spec = InputSpec.from_variant(get_variant(variant))
    torch.set_num_threads(1)
    try:
        preprocess(data, spec, max_pixels=40_000_000)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            preprocess(data, spec, max_pixels=40_000_000)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="crossvit_9_dagger_240")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--duration", type=int, default=15, help="seconds per load run")
    parser.add_argument("--precisions", nargs="+", choices=sorted(MODES), default=["fp32", "bf16"])
    parser.add_argument("--port", type=int, default=8390)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("this benchmark needs wrk: apt-get install wrk")

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "photo-640x480.jpg"
        image.write_bytes(encode(resized(photo("chelsea"), 640, 480), "JPEG", quality=90))
        weights = Path(tmp) / f"{args.variant}.safetensors"
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in create_model(args.variant).state_dict().items()}, weights)

        pre_ms = preprocess_ms(args.variant, image.read_bytes())
        print(f"# {args.variant}, torch {torch.__version__}, {threads} threads; wrk -t1, {args.duration} s per run")
        print(f"preprocessing one 640x480 JPEG: {pre_ms:.2f} ms (median, one thread)\n")
        rows = []
        for precision in args.precisions:
            mode = MODES[precision]
            samples: dict[int, list[float]] = {1: [], MAX_BATCH: []}
            sample_model_only(samples, args.variant, weights, mode)
            served = measure_server(
                [sys.executable, "-m", "service.cli"],
                {"CROSSVIT_MODEL": args.variant, "CROSSVIT_WEIGHTS": str(weights), "CROSSVIT_PRECISION": precision,
                 "CROSSVIT_PORT": str(args.port), "CROSSVIT_LOG_LEVEL": "warning"},
                image, args, args.port,
            )
            sample_model_only(samples, args.variant, weights, mode)
            naive = measure_server(
                [sys.executable, str(ROOT / "bench" / "naive_server.py"), "--variant", args.variant,
                 "--weights", str(weights), "--precision", precision, "--port", str(args.port + 1)],
                {}, image, args, args.port + 1,
            )
            sample_model_only(samples, args.variant, weights, mode)
            print(f"  model-only img/s samples: {samples}", file=sys.stderr, flush=True)
            only = {b: statistics.median(values) for b, values in samples.items()}
            forward_b1_ms = 1000 / only[1]
            rows.append((precision, only, forward_b1_ms, served, naive))

        print("| precision | c | served img/s | p50 ms | p99 ms | non-200 | model-only img/s (batch) "
              "| served / model-only | naive img/s | naive p50 ms | served / naive |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for precision, only, _, served, naive in rows:
            for c in args.concurrency:
                s, n = served[c], naive[c]
                batch = 1 if c == 1 else MAX_BATCH
                print(f"| {precision} | {c} | {s.rps:.1f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} | {s.non_200} "
                      f"| {only[batch]:.1f} (b={batch}) | {s.rps / only[batch]:.2f} | {n.rps:.1f} | {n.p50_ms:.1f} "
                      f"| {s.rps / n.rps:.2f} |")
        print()
        for precision, only, forward_b1_ms, served, naive in rows:
            top = max(args.concurrency)
            budget = pre_ms + forward_b1_ms + 5
            print(f"{precision}: served/model-only at c={top}: {served[top].rps / only[MAX_BATCH]:.3f} (goal >= 0.92); "
                  f"served/naive at c={top}: {served[top].rps / naive[top].rps:.2f} (goal >= 1.5); "
                  f"p50 at c=1: {served[1].p50_ms:.1f} ms vs preprocessing {pre_ms:.1f} + forward(b=1) "
                  f"{forward_b1_ms:.1f} + 5 = {budget:.1f} ms ({'met' if served[1].p50_ms <= budget else 'missed'})")


if __name__ == "__main__":
    main()
