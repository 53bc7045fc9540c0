"""Branch agreement: whether CrossViT's 240 px and 224 px branches tell the same story.

Each branch has its own classifier head; the served answer is the mean of their logits. When
the branches disagree (different top-1, or very different probability vectors) the mean is less
trustworthy, which makes these two numbers a cheap signal for routing an image to review.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Agreement", "branch_agreement", "log_softmax"]


@dataclass(frozen=True)
class Agreement:
    top1_agree: bool  # the branches' own top-1 classes are the same
    js_divergence: float  # Jensen-Shannon divergence of their softmax distributions, base 2: [0, 1]


def branch_agreement(logits: np.ndarray) -> list[Agreement]:
    """Per image, from per-branch logits of shape (n, 2, C).

    JSD(P, Q) = (KL(P || M) + KL(Q || M)) / 2 with M = (P + Q) / 2; in bits it lies in [0, 1]:
    0 for identical distributions, 1 for distributions with disjoint support. Computed from
    log-softmax so that classes whose probability underflows contribute 0, not NaN.
    """
    log_p = log_softmax(logits.astype(np.float64))  # (n, 2, C); float64: JSD sums 1000 small differences
    log_m = np.logaddexp(log_p[:, 0], log_p[:, 1])[:, None] - math.log(2)  # (n, 1, C): log of the mixture
    kl = (np.exp(log_p) * (log_p - log_m)).sum(axis=-1)  # (n, 2): KL(branch || mixture), nats
    js = np.clip(kl.mean(axis=1) / math.log(2), 0.0, 1.0)  # (n,): bits; clip rounding just outside
    top1 = logits.argmax(axis=-1)  # (n, 2)
    agree = top1[:, 0] == top1[:, 1]
    return [Agreement(bool(a), float(d)) for a, d in zip(agree.tolist(), js.tolist(), strict=True)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, shifted by the maximum so that no exp overflows."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
