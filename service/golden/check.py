"""The self-test's verdict: do a worker's served answers for the golden images reproduce the record?

Compared: every logit finite; the logits within the mode's tolerance (cosine and relative error); the
top-k classes (the same, unless the record itself has two classes closer than the tolerance allows to
tell apart: within the relative error this follows from the logits, and it names the classes in the
message); and the class names the served label list gives the record's top-k classes (a swapped or
reordered label file), which is no fault of a compute mode (`labels_differ`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .record import TOP_K, GoldenRecord, top_k

__all__ = ["EXACT", "QUANTIZED", "REDUCED", "SelfTestResult", "Tolerance", "compare", "tolerance_for"]

_SHOWN_PROBLEMS = 3


@dataclass(frozen=True)
class Tolerance:
    """How far a mode's logits may be from the record (PyTorch fp32), per image and branch."""

    name: str
    cosine: float  # the lowest logit cosine allowed
    rel_err: float  # the largest max |served - recorded| / max |recorded| allowed


# fp32 of any runtime: summation order only, as the start-up guard's exactness (backends/base.py).
EXACT = Tolerance("exact (fp32)", cosine=0.99999, rel_err=1e-4)
# bf16/fp16: 8 (11) significant bits in the matmuls. Measured on the golden images (README, "Self-test"):
# bf16 keeps a cosine above 0.9995 with relative errors up to 0.03; a broken preprocessing step (channels
# swapped) or corrupted weights fall far below.
REDUCED = Tolerance("reduced precision", cosine=0.999, rel_err=0.1)


# int8: admitted by its own guard on held-out samples (service/quantization/guard.py); here the same worst-cosine
# bound, per image and branch on the golden images (tests hold the two equal): loose enough for a sound
# quantisation (measured on crossvit_9_dagger_240: 0.9974, rel err 0.048), tight enough for a broken served
# path (channels swapped: 0.64). A quantisation calibrated on images unlike these photos may still fail here.
QUANTIZED = Tolerance("quantized (int8)", cosine=0.9, rel_err=0.5)


def tolerance_for(mode: str, device: str = "cpu") -> Tolerance:
    """fp32 on the CPU is exact; on a GPU, PyTorch's fp32 convolutions may run in TF32 (10-bit mantissa),
    so its fp32 is held to the reduced tolerance against the CPU record."""
    if mode == "int8":
        return QUANTIZED
    return EXACT if mode == "fp32" and device == "cpu" else REDUCED


@dataclass(frozen=True)
class SelfTestResult:
    passed: bool
    problems: tuple[str, ...]
    worst_cosine: float
    worst_rel_err: float
    tolerance: Tolerance
    recorded: str  # where the record came from (GoldenRecord.recorded)
    images: tuple[str, ...]
    labels_differ: bool = False  # the served class names are not the record's: no other mode would pass

    def reason(self) -> str:
        shown = "; ".join(self.problems[:_SHOWN_PROBLEMS])
        more = len(self.problems) - _SHOWN_PROBLEMS
        return shown + (f" (and {more} more)" if more > 0 else "")

    def summary(self) -> dict[str, Any]:
        """What /v1/models and the log show."""
        return {
            "passed": self.passed,
            "images": list(self.images),
            "worst_cosine": round(self.worst_cosine, 7),
            "worst_rel_err": float(f"{self.worst_rel_err:.3g}"),
            "tolerance": asdict(self.tolerance),
            "recorded": self.recorded,
            **({} if self.passed else {"reason": self.reason()}),
        }


def compare(record: GoldenRecord, served: np.ndarray, labels: Sequence[str], tolerance: Tolerance) -> SelfTestResult:
    """`served`: (n, 2, C) logits the worker answered for the golden images; `labels`: the served class names."""
    problems: list[str] = []
    if served.shape != record.logits.shape:
        problems.append(f"the answer has shape {served.shape}, the record {record.logits.shape}")
        return SelfTestResult(False, tuple(problems), 0.0, float("inf"), tolerance, record.recorded, record.images)
    if not np.isfinite(served).all():  # NaN compares False with every bound: refuse it by name
        problems.append(f"{int((~np.isfinite(served)).sum())} logits are not finite (NaN or infinite)")
        return SelfTestResult(False, tuple(problems), 0.0, float("inf"), tolerance, record.recorded, record.images)
    labels_differ = len(labels) != record.logits.shape[-1]
    if labels_differ:
        problems.append(f"the label list holds {len(labels)} names for {record.logits.shape[-1]} classes")
    reference = record.logits.astype(np.float64)
    candidate = served.astype(np.float64)
    norms = np.maximum(np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1), 1e-12)
    cosine = (reference * candidate).sum(axis=-1) / norms  # (n, 2)
    scale = np.maximum(np.abs(reference).max(axis=-1), 1e-12)
    rel_err = np.abs(candidate - reference).max(axis=-1) / scale  # (n, 2)
    recorded_top, served_top = top_k(reference), top_k(candidate)
    for i, image in enumerate(record.images):
        for branch in range(2):
            where = f"{image} branch {branch}"
            if not (cosine[i, branch] >= tolerance.cosine and rel_err[i, branch] <= tolerance.rel_err):
                problems.append(f"{where}: logit cosine {cosine[i, branch]:.6f}, relative error "
                                f"{rel_err[i, branch]:.2e} (allowed >= {tolerance.cosine}, <= {tolerance.rel_err:g})")
            # a class may change places only with one the record itself cannot tell apart within the tolerance
            margin = 2 * tolerance.rel_err * scale[i, branch]
            ref, got = reference[i, branch], candidate[i, branch]
            kth_ref, kth_got = ref[recorded_top[i, branch, -1]], got[served_top[i, branch, -1]]
            strays = [int(c) for c in served_top[i, branch] if ref[c] < kth_ref - margin]
            lost = [int(c) for c in recorded_top[i, branch] if got[c] < kth_got - margin]
            if strays or lost:
                problems.append(f"{where}: top-{TOP_K} classes {served_top[i, branch].tolist()}, recorded "
                                f"{recorded_top[i, branch].tolist()}")
            if len(labels) == reference.shape[-1]:
                for c, name in zip(recorded_top[i, branch].tolist(), record.labels[i][branch], strict=True):
                    if labels[c] != name:
                        labels_differ = True
                        problems.append(f"class {c} is named {labels[c]!r} here but {name!r} in the record (the label "
                                        "file is not the one the model was prepared with)")
    return SelfTestResult(
        passed=not problems,
        problems=tuple(dict.fromkeys(problems)),  # a label problem repeats per image and branch
        worst_cosine=float(cosine.min()),
        worst_rel_err=float(rel_err.max()),
        tolerance=tolerance,
        recorded=record.recorded,
        images=record.images,
        labels_differ=labels_differ,
    )
