"""Where replicas run: usable CPU cores, visible GPUs, and the worker layout derived from them."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..worker.backends import torch_available

__all__ = ["WorkerPlacement", "cuda_device_count", "plan_workers", "usable_cpus"]

logger = logging.getLogger(__name__)

# On CPU, one single-threaded process per core beats one process using all cores at full load
# (shared/docs/performance.md: 2 x 1 thread vs 1 x 2 threads, +8..50 % img/s); past a few
# cores each replica gets a small thread team instead, to bound memory and batch latency.
# With threads_per_worker=auto the pool also lends idle workers' cores to a busy one
# (WorkerPool's cpu_budget), so a lone request still runs on every core.
_CPU_WORKERS_CAP = 4


def cuda_device_count(dev: Path = Path("/dev")) -> int:
    """Visible CUDA devices. Without NVIDIA device nodes (or torch) there are none, and torch, with its
    seconds of import and hundreds of MB, is not imported only to say so."""
    if not torch_available() or not (dev / "nvidiactl").exists():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the cgroup quota (containers) or the affinity mask.

    `os.cpu_count()` reports the host's cores inside a container, which oversubscribes.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class WorkerPlacement:
    device: str  # "cpu" or "cuda:N"
    threads: int  # torch intra-op threads of this worker


def plan_workers(device: str, workers: int | str, threads_per_worker: int | str) -> list[WorkerPlacement]:
    """One worker set per visible GPU for auto/cuda, otherwise CPU workers sharing the cores."""
    cpus = usable_cpus()
    count = cuda_device_count() if device != "cpu" else 0
    if device == "auto":
        device = "cuda" if count else "cpu"
    if device.startswith("cuda"):
        if not count:
            raise RuntimeError(f"CROSSVIT_DEVICE={device} but no CUDA device is visible"
                               + ("" if torch_available() else " (and torch, which runs CUDA, is not installed)"))
        if device == "cuda":
            gpus = list(range(count))
        else:
            index = int(device.split(":", 1)[1])
            if index >= count:
                raise RuntimeError(f"CROSSVIT_DEVICE={device} but only {count} CUDA device(s) are visible")
            gpus = [index]
        per_gpu = 1 if workers == "auto" else int(workers)
        # GPU workers need a core or two each to launch kernels and copy inputs.
        threads = int(threads_per_worker) if threads_per_worker != "auto" else max(
            1, min(2, cpus // max(1, per_gpu * len(gpus)))
        )
        return [WorkerPlacement(f"cuda:{g}", threads) for g in gpus for _ in range(per_gpu)]
    count = min(cpus, _CPU_WORKERS_CAP) if workers == "auto" else int(workers)
    threads = int(threads_per_worker) if threads_per_worker != "auto" else max(1, cpus // count)
    if count * threads > cpus:
        logger.warning(
            "workers x threads exceeds the usable CPUs; expect oversubscription",
            extra={"workers": count, "threads_per_worker": threads, "cpus": cpus},
        )
    return [WorkerPlacement("cpu", threads) for _ in range(count)]
