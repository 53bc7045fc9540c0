"""Calibrated batch limits against hand-set ones, under the same load, in one run.

    python bench/calibration.py [--variant crossvit_9_dagger_240] [--targets 250 1000] [--concurrency 32]
                                [--duration 15] [--batches 1 2 4 8]

The service (defaults apart from model, weights, port and the batch settings) under wrk, for each
p99 target with CROSSVIT_CALIBRATE_P99_MS (what it chose is read from /v1/models), then for each
hand-set MAX_BATCH_SIZE (5 ms delay, the default); same random-init weights and 640x480 JPEG as
bench/serve_load.py, whose wrk runner this reuses. Loopback only, every run bounded by --duration.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_line  # noqa: E402
from serve_load import ROOT, Served, load_inputs, measure_server  # noqa: E402


def _limits(url: str) -> str:
    """The batch limits the server runs with, and what the calibration measured (to stderr)."""
    batching = httpx.get(f"{url}/v1/models", timeout=10).json()["batching"]
    if calibration := batching.get("calibration"):
        print(f"  calibration: {calibration['seconds']} s; per batch (ms): "
              + ", ".join(f"{t['batch']}: {t['round_ms']}" for t in calibration["timings"])
              + f"; predicted {calibration['predicted_ms']} ms at {calibration['images_per_s']} img/s",
              file=sys.stderr, flush=True)
    return f"batch {batching['max_batch_size']}, delay {batching['max_batch_delay_ms']} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="crossvit_9_dagger_240")
    parser.add_argument("--targets", nargs="+", type=float, default=[250, 1000])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[32])
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--port", type=int, default=8390)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("this benchmark needs wrk: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        image, weights = load_inputs(Path(tmp), args.variant)
        base = {"CROSSVIT_MODEL": args.variant, "CROSSVIT_WEIGHTS": str(weights), "CROSSVIT_PORT": str(args.port),
                "CROSSVIT_LOG_LEVEL": "warning", "CROSSVIT_CACHE_DIR": str(Path(tmp) / "cache"),
                "CROSSVIT_MAX_BATCH_SIZE": str(max(args.batches))}
        subprocess.run([sys.executable, "-m", "service.cli", "--prepare-only"], env={**os.environ, **base}, cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        settings = [(f"calibrated p99 <= {t:g} ms", {"CROSSVIT_CALIBRATE_P99_MS": str(t)}) for t in args.targets]
        settings += [(f"hand-set batch {b}", {"CROSSVIT_MAX_BATCH_SIZE": str(b)}) for b in args.batches]
        rows: list[tuple[str, str, Served]] = []
        for label, extra in settings:
            chosen: list[str] = []
            served = measure_server(label, [sys.executable, "-m", "service.cli"], {**base, **extra}, image, args,
                                    args.port, cwd=ROOT, on_ready=lambda url, into=chosen: into.append(_limits(url)))
            rows.append((label, chosen[0] if chosen else "?", served))
    print(f"# {args.variant}, {args.duration} s per run, wrk -t1; {cpu_line()}")
    print("| setting | limits | c | img/s | p50 ms | p99 ms | non-200 |")
    print("|---|---|---|---|---|---|---|")
    for label, limits, served in rows:
        for c, r in served.runs.items():
            print(f"| {label} | {limits} | {c} | {r.rps:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.non_200} |")


if __name__ == "__main__":
    main()
