"""What the start-up self-test costs: launch to ready with CROSSVIT_SELF_TEST on and off, alternating.

    python bench/selftest_cost.py [--variants crossvit_9_dagger_240 crossvit_18_dagger_240] [--repeats 2]

Random-init weights (seeded), the model prepared first (`--prepare-only`), then the server started
`--repeats` times in each setting, alternating; each line: launch to /readyz 200, and the seconds each
worker's self-test took (/v1/models). Loopback only.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_line  # noqa: E402  (bench/, this script's folder)
from servers import free_port, ready_workers, wait_ready  # noqa: E402

from model import create_model  # noqa: E402


def start_once(env: dict[str, str]) -> tuple[float, list[float]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "service.cli"], env={**env, "CROSSVIT_PORT": str(port)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_ready(url, process)
        ready_s = time.monotonic() - started
        workers = ready_workers(url)
        return ready_s, [w["self_test"]["seconds"] for w in workers if "self_test" in w]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["crossvit_9_dagger_240", "crossvit_18_dagger_240"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"# {cpu_line()}")
    print("| variant | self-test | launch to ready, s (each start) | self-test per worker, s |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            weights = Path(tmp) / f"{variant}.safetensors"
            torch.manual_seed(0)
            save_file({k: v.contiguous() for k, v in create_model(variant).state_dict().items()}, weights)
            env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSVIT_")}
            env.update({"CROSSVIT_MODEL": variant, "CROSSVIT_WEIGHTS": str(weights), "CROSSVIT_LOG_LEVEL": "warning",
                        "CROSSVIT_CACHE_DIR": str(Path(tmp) / "cache"), "CROSSVIT_PROBE_PORT": "0"})
            subprocess.run([sys.executable, "-m", "service.cli", "--prepare-only"], env=env, cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs: dict[str, list[tuple[float, list[float]]]] = {"true": [], "false": []}
            for _ in range(args.repeats):
                for setting in ("true", "false"):
                    runs[setting].append(start_once({**env, "CROSSVIT_SELF_TEST": setting}))
            for setting, results in runs.items():
                starts = ", ".join(f"{ready:.2f}" for ready, _ in results)
                checks = [s for _, seconds in results for s in seconds]
                per_worker = f"{statistics.median(checks):.3f} (median of {len(checks)})" if checks else "-"
                print(f"| {variant} | {'on' if setting == 'true' else 'off'} | {starts} | {per_worker} |")


if __name__ == "__main__":
    main()
