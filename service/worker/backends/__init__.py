"""Inference backends a worker can run: PyTorch (CPU, CUDA) and OpenVINO (CPU).

The parent picks the backend (`resolve_backend`, logged with its reason); the worker builds it
(`build_backend`) from the loaded model and admits a compute mode only after comparing its logits
with PyTorch fp32 on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...settings import openvino_conflict
from .base import (
    EXACT_COSINE,
    EXACT_REL_ERR,
    GUARD_COSINE,
    Agreement,
    Backend,
    Built,
    ModeGate,
    OpenGate,
    Probe,
    mode_key,
)
from .openvino_runtime import available as openvino_available
from .openvino_runtime import build_openvino, cache_key
from .pytorch_runtime import build_torch

__all__ = [
    "EXACT_COSINE",
    "EXACT_REL_ERR",
    "GUARD_COSINE",
    "Agreement",
    "Backend",
    "BackendChoice",
    "Built",
    "ModeGate",
    "OpenGate",
    "Probe",
    "build_openvino",
    "build_torch",
    "cache_key",
    "mode_key",
    "resolve_backend",
]


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "torch" or "openvino"
    reason: str
    fallback: bool  # may the worker fall back to torch if this backend cannot start (auto only)


def resolve_backend(setting: str, device: str, precision: str) -> BackendChoice:
    """`auto`: OpenVINO for CPU workers where the package imports, PyTorch for CUDA (and for fp16)."""
    on_cuda = device.startswith("cuda")
    if setting == "torch":
        return BackendChoice("torch", "CROSSVIT_BACKEND=torch", fallback=False)
    if setting == "openvino":
        if problem := openvino_conflict(device, precision):
            raise ValueError(f"CROSSVIT_BACKEND=openvino: {problem}")
        if not openvino_available():
            raise ValueError("CROSSVIT_BACKEND=openvino but the openvino package is not installed")
        return BackendChoice("openvino", "CROSSVIT_BACKEND=openvino", fallback=False)
    if on_cuda:
        return BackendChoice("torch", "auto: CUDA device, PyTorch runs it", fallback=False)
    if precision == "fp16":
        return BackendChoice("torch", "auto: fp16 asked for, which only PyTorch runs", fallback=False)
    if not openvino_available():
        return BackendChoice("torch", "auto: the openvino package is not installed", fallback=False)
    reason = "auto: CPU worker and OpenVINO installed (faster than PyTorch eager, bench/README.md)"
    return BackendChoice("openvino", reason, fallback=True)
