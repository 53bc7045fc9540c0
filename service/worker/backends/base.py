"""What an inference backend gives the worker process, and the accuracy checks that admit a mode.

Every backend takes the (n, 3, H, W) branch-0 input and returns both branches' fp32 logits as
(n, 2, C); branch 1's smaller input is derived inside (the model's own bicubic resize). A mode
is only served after it has been compared with PyTorch fp32 on the same weights (`Probe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from ...golden import GoldenRecord

__all__ = [
    "EXACT_COSINE",
    "EXACT_REL_ERR",
    "GUARD_COSINE",
    "Agreement",
    "Backend",
    "Built",
    "DeviceOutOfMemoryError",
    "ModeGate",
    "OpenGate",
    "Probe",
    "QuantizationRefusedError",
    "int8_conflict",
    "mode_key",
    "openvino_conflict",
]

GUARD_COSINE = 0.9999  # worst per-image logit cosine to fp32 a reduced precision must keep
# What "exact" means for another runtime's fp32 (OpenVINO f32): fp32 summation order only.
EXACT_COSINE = 0.99999
EXACT_REL_ERR = 1e-4
PROBE_IMAGES = 4
PROBE_SEED = 0  # of torch's generator: the noise every mode of every worker is checked on


class QuantizationRefusedError(RuntimeError):
    """INT8 asked for, and its guard refused the quantisation (the verdict is cached with it): no start serves it."""


class DeviceOutOfMemoryError(RuntimeError):
    """A batch did not fit the device's memory (CUDA); the worker answers it failed and lives on."""


class Backend(Protocol):
    """One model replica, ready to run in the mode it was admitted in."""

    agreement: Agreement  # the served mode's logits against PyTorch fp32 on the probe

    @property
    def name(self) -> str:
        """"torch" or "openvino"."""
        ...

    @property
    def mode(self) -> str:
        """The compute mode admitted, e.g. "fp32", "bf16", "bf16-autocast"."""
        ...

    def __call__(self, x: np.ndarray, threads: int) -> np.ndarray:
        """(n, 3, H, W) float32 -> (n, 2, C) float32 logits, computed on `threads` CPU threads."""
        ...

    def warm_up(self, x: np.ndarray) -> None:
        """Run what makes the first requests as fast as later ones, up to a full batch `x`, at every
        thread count the parent may ask for."""
        ...


def openvino_conflict(device: str, precision: str) -> str | None:
    """Why the OpenVINO backend cannot run this device or precision, or None: the one rule, checked on the
    settings and again on each worker's placement (`device=auto` may place a worker on a GPU)."""
    if device.startswith("cuda"):
        return "backend openvino runs CPU workers only; use torch (or auto) with a CUDA device"
    if precision == "fp16":
        return "backend openvino runs fp32 or bf16; fp16 needs the torch backend"
    return None


def int8_conflict(backend: str, device: str) -> str | None:
    """Why INT8 cannot run with this backend setting or device, or None: only OpenVINO's CPU workers run it."""
    if backend == "torch":
        return "precision int8 runs on the OpenVINO backend only; use backend auto or openvino"
    if device.startswith("cuda"):
        return "precision int8 runs on CPU workers only (OpenVINO); use device cpu"
    return None


def mode_key(backend: str, mode: str) -> str:
    """How a compute mode is named across processes, logs and /v1/models: "openvino/bf16", "torch/fp32"."""
    return f"{backend}/{mode}"


class ModeGate(Protocol):
    """What a backend asks before it compiles or runs a mode: a mode that once killed a worker while
    starting (a native crash in its kernels, on some CPU) is skipped, and the parent is told which
    mode is being tried, so that a death names its cause; and what it says before a long one-off step
    (a conversion, a quantisation), so that the parent's start limit does not take it for a hang."""

    def allowed(self, key: str) -> bool: ...

    def trying(self, key: str) -> None: ...

    def preparing(self, what: str, budget_s: float | None = None) -> None: ...


class OpenGate:
    """Every mode allowed, nobody told: one-process use (`--prepare-only`, tests, benchmarks)."""

    def allowed(self, key: str) -> bool:
        return True

    def trying(self, key: str) -> None:
        pass

    def preparing(self, what: str, budget_s: float | None = None) -> None:
        pass


@dataclass(frozen=True)
class Agreement:
    """How closely a candidate's logits follow PyTorch fp32's on the probe batch."""

    cosine: float  # worst per-image cosine of the branch-mean logits
    rel_err: float  # max |candidate - reference| / max |reference|, over both branches

    def is_exact(self) -> bool:
        return self.cosine >= EXACT_COSINE and self.rel_err <= EXACT_REL_ERR

    def passes_guard(self) -> bool:
        return self.cosine >= GUARD_COSINE


@dataclass(frozen=True)
class Probe:
    """A fixed batch of noise images and PyTorch fp32's logits for it: the yardstick of every mode.

    Made where torch is (a torch worker, or the preparation, which stores it beside the OpenVINO
    model), so a worker without torch checks its mode against the same yardstick."""

    x: np.ndarray  # (PROBE_IMAGES, 3, H, W)
    reference: np.ndarray  # (PROBE_IMAGES, 2, C)

    def compare(self, candidate: np.ndarray) -> Agreement:
        candidate = candidate.astype(np.float64)
        reference = self.reference.astype(np.float64)
        a, b = reference.mean(axis=1), candidate.mean(axis=1)
        norms = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
        cosine = ((a * b).sum(axis=-1) / norms).min()
        rel_err = np.abs(candidate - reference).max() / max(np.abs(reference).max(), 1e-12)
        return Agreement(cosine=float(cosine), rel_err=float(rel_err))


@dataclass
class Built:
    """A backend admitted in its mode, what mode was asked for, and the modes refused on the way."""

    backend: Backend
    requested: str
    rejected: list[tuple[str, Agreement]] = field(default_factory=list)
    golden: GoldenRecord | None = None  # the reference answers recorded with the prepared model, if any
