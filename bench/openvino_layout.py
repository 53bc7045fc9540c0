"""How to spend the cores on OpenVINO: worker processes, streams in one process, or one lone batch.

    python bench/openvino_layout.py [--variant crossvit_9_dagger_240] [--batch 8] [--seconds 15]
                                    [--modes fp32 bf16]

Layouts, each in fresh processes, model-only img/s (batch / median seconds per forward, after
two warm-up calls), each child converting the model through the service's preparation code:
  - processes: one 1-thread process per core computing at the same time (the service's CPU
    workers), pinned to cores by OpenVINO or not;
  - streams: one process, NUM_STREAMS = cores, an AsyncInferQueue keeping every stream busy;
  - lone: one process, one stream on every core (a worker computing alone borrows the idle cores):
    at batch 1 this is the c=1 latency case.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_line  # noqa: E402  (bench/, this script's folder)


def _child(args: argparse.Namespace) -> None:
    import numpy as np
    import openvino as ov
    import torch

    from model import create_model
    from service.worker.backends.openvino_prepare import convert
    from service.worker.backends.openvino_runtime import compile_config

    torch.manual_seed(0)
    model = create_model(args.variant)
    # a model the service prepared (the INT8 one, say), or the random-init model converted here
    converted = ov.Core().read_model(args.model_xml) if args.model_xml else convert(model)
    compiled = ov.Core().compile_model(
        converted, "CPU", compile_config(args.modes[0], args.threads, streams=args.streams, pinning=args.pinning)
    )
    size = model.config.img_size[0]
    x = np.random.default_rng(0).standard_normal((args.batch, 3, size, size), dtype=np.float32)
    if args.streams == 1:
        request = compiled.create_infer_request()
        request.infer({0: x})
        request.infer({0: x})
        times = []
        end = time.monotonic() + args.seconds
        while time.monotonic() < end or len(times) < 5:
            start = time.perf_counter()
            request.infer({0: x})
            times.append(time.perf_counter() - start)
        print(f"{args.batch / statistics.median(times):.2f}")
        return
    queue = ov.AsyncInferQueue(compiled, args.streams)
    for _ in range(2 * args.streams):  # warm-up
        queue.start_async({0: x})
    queue.wait_all()
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        queue.start_async({0: x})  # blocks until a stream is free
        done += 1
    queue.wait_all()
    print(f"{done * args.batch / (time.perf_counter() - start):.2f}")


def spawn(variant: str, mode: str, *, threads: int, batch: int, seconds: float, streams: int = 1,
          pinning: bool = False, model_xml: Path | None = None) -> subprocess.Popen[str]:
    """One measuring child process (its img/s is the last word it prints)."""
    command = [sys.executable, __file__, "--child", "--variant", variant, "--batch", str(batch),
               "--seconds", str(seconds), "--modes", mode, "--threads", str(threads), "--streams", str(streams)]
    command += ["--pinning"] if pinning else []
    command += ["--model-xml", str(model_xml)] if model_xml else []
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def results(processes: list[subprocess.Popen[str]]) -> list[float]:
    return [float(p.communicate()[0].split()[-1]) for p in processes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="crossvit_9_dagger_240")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--pinning", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-xml", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    cores = len(os.sched_getaffinity(0))
    run = functools.partial(spawn, args.variant, seconds=args.seconds)
    print(f"# {args.variant}, batch {args.batch}, {args.seconds:.0f} s per measurement, {cores} cores")
    print(f"# {cpu_line()}")
    print(f"| mode | {cores} processes x 1 thread, unpinned (sum) | pinned (sum) | 1 process, {cores} streams "
          f"| 1 process x {cores} threads | same, batch 1 |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        apart = results([run(mode, threads=1, batch=args.batch) for _ in range(cores)])
        pinned = results([run(mode, threads=1, batch=args.batch, pinning=True) for _ in range(cores)])
        (streams,) = results([run(mode, threads=cores, batch=args.batch, streams=cores)])
        (lone,) = results([run(mode, threads=cores, batch=args.batch)])
        (lone_b1,) = results([run(mode, threads=cores, batch=1)])
        print(f"| {mode} | {' + '.join(f'{v:.1f}' for v in apart)} = {sum(apart):.1f} "
              f"| {' + '.join(f'{v:.1f}' for v in pinned)} = {sum(pinned):.1f} | {streams:.1f} | {lone:.1f} "
              f"| {lone_b1:.1f} |", flush=True)

if __name__ == "__main__":
    main()
