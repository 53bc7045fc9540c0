"""The CPU every benchmark figure belongs to: its model and the flags that change the bf16 and int8 picture.

The same image runs on AMD Zen 4 (AVX-512 BF16, no AMX) and Intel Xeon (AMX): OpenVINO's and oneDNN's
fastest kernels differ between them, so a figure without its CPU cannot be compared with another.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cpu_line"]

# what decides the reduced-precision kernels (bf16, int8) and so the ratios between modes
FLAGS = ("avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_line() -> str:
    """e.g. "AMD EPYC (vendor AuthenticAMD, family 25 model 17), 2 CPUs, flags avx512f avx512_bf16 avx512_vnni"."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip() and fields:
                break  # the first processor is enough
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    present = set(fields.get("flags", "").split())
    flags = " ".join(f for f in FLAGS if f in present) or "none of " + " ".join(FLAGS)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name, vendor = fields.get("model name", "?"), fields.get("vendor_id", "?")
    family, model = fields.get("cpu family", "?"), fields.get("model", "?")
    return f"{name} (vendor {vendor}, family {family} model {model}), {cpus} CPUs, flags {flags}"
