"""Branch agreement: whether CrossViT's 240 px and 224 px branches tell the same story.

Each branch has its own classifier head; the served answer is the mean of their logits. When
the branches disagree (different top-1, or very different probability vectors) the mean is less
trustworthy, which makes these two numbers a cheap signal for routing an image to review.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Agreement", "branch_agreement"]


@dataclass(frozen=True)
class Agreement:
    top1_agree: bool  # the branches' own top-1 classes are the same
    js_divergence: float  # Jensen-Shannon divergence of their softmax distributions, base 2: [0, 1]


def branch_agreement(logits: torch.Tensor) -> list[Agreement]:
    """Per image, from per-branch logits of shape (n, 2, C).

    JSD(P, Q) = (KL(P || M) + KL(Q || M)) / 2 with M = (P + Q) / 2; in bits it lies in [0, 1]:
    0 for identical distributions, 1 for distributions with disjoint support. Computed from
    log-softmax so that classes whose probability underflows contribute 0, not NaN.
    """
    log_p = logits.float().log_softmax(dim=-1)  # (n, 2, C)
    log_m = torch.logsumexp(log_p, dim=1, keepdim=True) - math.log(2)  # (n, 1, C): log of the mixture
    kl = (log_p.exp() * (log_p - log_m)).sum(dim=-1)  # (n, 2): KL(branch || mixture), nats
    js = (kl.mean(dim=1) / math.log(2)).clamp(0.0, 1.0)  # (n,): bits; clamp rounding just outside
    top1 = logits.argmax(dim=-1)  # (n, 2)
    agree = top1[:, 0] == top1[:, 1]
    return [Agreement(bool(a), float(d)) for a, d in zip(agree.tolist(), js.tolist(), strict=True)]
