"""Model-only img/s for the two ways to spend the cores: one process using all of them, or one
single-threaded process per core running at the same time (the service's CPU worker layout).

    python bench/pool_layout.py [--variant crossvit_9_dagger_240] [--batch 8] [--seconds 20]
                                [--modes fp32 bf16-autocast]

Each measurement runs in fresh processes (torch's thread count is per process); the figure is
batch / median seconds per forward over --seconds of back-to-back calls after two warm-up calls.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _spawn(threads: int, args: argparse.Namespace, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "POOL_LAYOUT_CHILD": "1"}
    command = [sys.executable, __file__, "--variant", args.variant, "--batch", str(args.batch),
               "--seconds", str(args.seconds), "--modes", mode]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _results(processes: list[subprocess.Popen[str]]) -> list[float]:
    outputs = [p.communicate()[0] for p in processes]
    return [float(out.split()[-1]) for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="crossvit_9_dagger_240")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16-autocast"])
    args = parser.parse_args()
    if os.environ.get("POOL_LAYOUT_CHILD"):
        import torch
        from serve_load import Mode, model_only  # bench/ is on sys.path (this script's folder)

        torch.manual_seed(0)
        print(f"{model_only(args.variant, None, Mode(args.modes[0]), args.batch, 1, args.seconds):.2f}")
        return

    cores = len(os.sched_getaffinity(0))
    print(f"# {args.variant}, batch {args.batch}, {args.seconds:.0f} s per measurement, {cores} cores")
    print(f"| mode | 1 process x {cores} threads | {cores} processes x 1 thread (sum) | ratio |")
    print("|---|---|---|---|")
    for mode in args.modes:
        (together,) = _results([_spawn(cores, args, mode)])
        apart = _results([_spawn(1, args, mode) for _ in range(cores)])
        parts = " + ".join(f"{v:.1f}" for v in apart)
        print(f"| {mode} | {together:.1f} img/s | {parts} = {sum(apart):.1f} img/s | {sum(apart) / together:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
