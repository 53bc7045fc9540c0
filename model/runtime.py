"""One model replica ready to infer in a chosen precision, and the accuracy guard for it.

Shared by the service's workers and the benchmarks, so that what is measured is what is served.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .crossvit import CrossViT

__all__ = ["Mode", "Runner", "bf16_is_fast", "logit_cosine", "prepare"]


class Mode(str, enum.Enum):
    """How a replica computes. `autocast` keeps fp32 weights, norms and residuals and runs
    matmuls in the low dtype; `weights` casts the whole model (faster, less exact)."""

    FP32 = "fp32"
    BF16_AUTOCAST = "bf16-autocast"
    BF16_WEIGHTS = "bf16-weights"
    FP16_AUTOCAST = "fp16-autocast"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16-autocast": torch.float16}.get(self.value, torch.bfloat16)


def bf16_is_fast() -> bool:
    """Whether this CPU has native bf16 matmuls (AVX-512 BF16 / AMX); without them bf16 is slower."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


@dataclass
class Runner:
    """Callable replica: fp32 images in (one batch, or one per branch), fp32 branch logits out."""

    model: CrossViT
    mode: Mode
    device: torch.device

    def _context(self) -> contextlib.AbstractContextManager[object]:
        if self.mode in (Mode.BF16_AUTOCAST, Mode.FP16_AUTOCAST):
            return torch.autocast(self.device.type, dtype=self.mode.dtype)
        return contextlib.nullcontext()

    def __call__(self, x: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        dtype = self.mode.dtype if self.mode is Mode.BF16_WEIGHTS else torch.float32
        non_blocking = self.device.type == "cuda"  # host tensors are pinned on the CUDA path
        with torch.inference_mode():
            on_device = (
                x.to(self.device, non_blocking=non_blocking) if isinstance(x, Tensor)
                else [t.to(self.device, non_blocking=non_blocking) for t in x]
            )
            # any branch resize runs in fp32, before the cast
            branches = [t.to(dtype) for t in self.model.branch_inputs(on_device)]
            with self._context():
                features = self.model.forward_features(branches)
            # The heads run outside autocast, in fp32: a bf16 matmul output would round every logit
            # to 8 significant bits (0.796875 for 0.7971) and costs the guard's cosine margin, for
            # a (B, D) x (D, 1000) product that is a rounding error of the forward's time.
            b0, b1 = (head(f.to(dtype)) for head, f in zip(self.model.head, features, strict=True))
        return b0.float(), b1.float()


def prepare(model: CrossViT, mode: Mode, device: torch.device | str = "cpu") -> Runner:
    """Move `model` to `device` in eval mode with the weights `mode` needs (in place)."""
    device = torch.device(device)
    model = model.eval().to(device)
    if mode is Mode.BF16_WEIGHTS:
        model = model.to(torch.bfloat16)
    return Runner(model, mode, device)


def logit_cosine(reference: Tensor, candidate: Tensor) -> float:
    """Worst per-image cosine between two (B, C) logit batches: the precision guard's measure."""
    return float(F.cosine_similarity(reference.float(), candidate.float(), dim=-1).min())
