"""Inference backends a worker can run: PyTorch (CPU, CUDA) and OpenVINO (CPU).

The parent picks the backend (`resolve_backend`, logged with its reason); the worker builds it
(`build_backend`) and admits a compute mode only after comparing its logits with PyTorch fp32 on
the same weights. Importing this package imports no torch: the PyTorch backend and the OpenVINO
preparation (pytorch_runtime, openvino_prepare) are imported where they are used.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .base import (
    EXACT_COSINE,
    EXACT_REL_ERR,
    GUARD_COSINE,
    Agreement,
    Backend,
    Built,
    DeviceOutOfMemoryError,
    ModeGate,
    OpenGate,
    Probe,
    QuantizationRefusedError,
    int8_conflict,
    mode_key,
    openvino_conflict,
)
from .openvino_runtime import available as openvino_available
from .openvino_runtime import build_openvino
from .prepared import NotPreparedError, cache_key, is_complete

__all__ = [
    "EXACT_COSINE",
    "EXACT_REL_ERR",
    "GUARD_COSINE",
    "Agreement",
    "Backend",
    "BackendChoice",
    "Built",
    "DeviceOutOfMemoryError",
    "ModeGate",
    "NotPreparedError",
    "OpenGate",
    "Probe",
    "QuantizationRefusedError",
    "build_openvino",
    "cache_key",
    "int8_conflict",
    "is_complete",
    "mode_key",
    "openvino_conflict",
    "resolve_backend",
    "torch_available",
]


def torch_available() -> bool:
    """Whether torch is installed (without importing it): the lean CPU install has none."""
    try:
        return importlib.util.find_spec("torch") is not None
    except ImportError:  # a finder that refuses it outright
        return False


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "torch" or "openvino"
    reason: str
    fallback: bool  # may the worker fall back to torch if this backend cannot start (auto only)


def resolve_backend(setting: str, device: str, precision: str) -> BackendChoice:
    """`auto`: OpenVINO for CPU workers where the package imports, PyTorch for CUDA (and for fp16); int8: OpenVINO."""
    on_cuda = device.startswith("cuda")
    if precision == "int8":  # never a fallback to PyTorch: it would serve fp32 under an int8 setting
        if problem := int8_conflict(setting, device):
            raise ValueError(problem)
        if not openvino_available():
            raise ValueError("CROSSVIT_PRECISION=int8 runs on OpenVINO, and the openvino package is not installed")
        return BackendChoice("openvino", "int8 asked for, which only OpenVINO runs", fallback=False)
    if setting == "torch" or (setting == "auto" and (on_cuda or precision == "fp16")):
        if not torch_available():
            raise ValueError(f"{'CROSSVIT_BACKEND=torch' if setting == 'torch' else 'CUDA or fp16'} needs the "
                             "PyTorch backend, and torch is not installed (pip install 'crossvit-serve[torch]')")
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
    if not torch_available():
        return BackendChoice("openvino", "auto: CPU worker, OpenVINO installed and torch not", fallback=False)
    reason = "auto: CPU worker and OpenVINO installed (faster than PyTorch eager, bench/README.md)"
    return BackendChoice("openvino", reason, fallback=True)
