"""The INT8 guard: is a quantised model close enough to fp32 on images it was not calibrated on?

Judged on the held-out samples' branch-mean logits (what the service ranks by), against fp32's; the samples
are the held-out images as served and, for a small folder, crops of them (samples.py):

- median logit cosine >= 0.97 and worst >= 0.90. bf16 keeps 0.9999; sound INT8 quantisations of random-init
  9- and 18-dagger measured medians of 0.984-0.989 and worsts of 0.969-0.970, ones calibrated on blank
  images medians of 0.926-0.944 and worsts of 0.883-0.893, on noise 0.771-0.879 and 0.733-0.846
  (bench/int8_guard.py, bench/README.md "INT8: the guard's bounds"): the bounds sit between.
- top-1 agreement >= 0.90 on the held-out samples fp32 is confident about (top-1 probability >= 0.5). NNCF's
  own figure for crossvit_9_240 is 73.98 -> 72.79 % ImageNet top-1 (-1.2 points); such a loss comes mostly
  from images the model hesitates on, where int8 noise may swap two close classes. A confident answer that
  flips is what users would see as a wrong label: more than 1 in 10 of them refuses the quantisation. A
  random-init model is confident about nothing (its softmax is near uniform), so there this check has no
  samples and says so; the cosine bounds still hold it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

__all__ = ["CONFIDENT_PROBABILITY", "MIN_CONFIDENT_AGREEMENT", "MIN_MEDIAN_COSINE", "MIN_WORST_COSINE",
           "GuardResult", "judge"]

MIN_MEDIAN_COSINE = 0.97
MIN_WORST_COSINE = 0.90
CONFIDENT_PROBABILITY = 0.5
MIN_CONFIDENT_AGREEMENT = 0.90


@dataclass(frozen=True)
class GuardResult:
    """The guard's figures. The verdict is derived from them with the bounds above whenever it is read, so a
    cached quantisation is judged by the bounds of the code that serves it, not of the one that made it."""

    images: int  # held-out samples compared (crops of the held-out images, when the folder is small)
    median_cosine: float
    worst_cosine: float
    max_rel_err: float  # max |int8 - fp32| / max |fp32| over every logit of both branches
    top1_agreement: float  # over every held-out sample (reported; judged only on the confident ones)
    confident_images: int
    confident_agreement: float | None  # None: fp32 is confident about no held-out sample
    nonfinite: int = 0  # int8 logits that came out NaN or infinite

    @property
    def problems(self) -> tuple[str, ...]:
        found = []
        if self.nonfinite:
            found.append(f"{self.nonfinite} logits are not finite")
        if self.median_cosine < MIN_MEDIAN_COSINE:
            found.append(f"median logit cosine {self.median_cosine:.4f} < {MIN_MEDIAN_COSINE}")
        if self.worst_cosine < MIN_WORST_COSINE:
            found.append(f"worst logit cosine {self.worst_cosine:.4f} < {MIN_WORST_COSINE}")
        if self.confident_agreement is not None and self.confident_agreement < MIN_CONFIDENT_AGREEMENT:
            found.append(f"top-1 agrees with fp32 on {self.confident_agreement:.1%} of the {self.confident_images} "
                         f"held-out samples fp32 is confident about (< {MIN_CONFIDENT_AGREEMENT:.0%})")
        return tuple(found)

    @property
    def passed(self) -> bool:
        return not self.problems

    def reason(self) -> str:
        return "; ".join(self.problems)

    def to_dict(self) -> dict[str, Any]:
        """The figures, and (for a reader of the file) the verdict and bounds they were written with."""
        return {**asdict(self), "passed": self.passed, "problems": list(self.problems), "thresholds": {
            "median_cosine": MIN_MEDIAN_COSINE, "worst_cosine": MIN_WORST_COSINE,
            "confident_probability": CONFIDENT_PROBABILITY, "confident_agreement": MIN_CONFIDENT_AGREEMENT}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuardResult:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def judge(reference: np.ndarray, candidate: np.ndarray) -> GuardResult:
    """`reference` (fp32) and `candidate` (int8): (n, 2, C) logits of the same held-out samples."""
    a, b = reference.astype(np.float64).mean(axis=1), candidate.astype(np.float64).mean(axis=1)
    nonfinite = int((~np.isfinite(candidate)).sum())
    b = np.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    cosine = (a * b).sum(axis=-1) / norms
    finite = np.nan_to_num(candidate.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    rel_err = float(np.abs(finite - reference).max() / max(np.abs(reference).max(), 1e-12))
    agree = a.argmax(axis=-1) == b.argmax(axis=-1)
    top1_probability = 1.0 / np.exp(a - a.max(axis=-1, keepdims=True)).sum(axis=-1)  # softmax at the argmax
    confident = top1_probability >= CONFIDENT_PROBABILITY
    return GuardResult(
        images=len(a), median_cosine=float(np.median(cosine)), worst_cosine=float(cosine.min()), max_rel_err=rel_err,
        top1_agreement=float(agree.mean()), confident_images=int(confident.sum()),
        confident_agreement=float(agree[confident].mean()) if confident.any() else None, nonfinite=nonfinite,
    )
