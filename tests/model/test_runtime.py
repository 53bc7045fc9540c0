"""`model.runtime`: the compute modes a replica runs, against fp32 on the same weights."""

from __future__ import annotations

import pytest
import torch

from model import create_model
from model.runtime import Mode, logit_cosine, prepare

VARIANT = "crossvit_tiny_240"


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_model(VARIANT).state_dict()


def _logits(mode: Mode, state: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model = create_model(VARIANT)
    model.load_state_dict(state)
    return prepare(model, mode)(x)


@pytest.mark.parametrize("mode", list(Mode))
def test_every_mode_returns_fp32_logits_close_to_fp32(mode: Mode, state: dict[str, torch.Tensor]) -> None:
    x = torch.randn(4, 3, 240, 240, generator=torch.Generator().manual_seed(1))
    reference = _logits(Mode.FP32, state, x)
    branches = _logits(mode, state, x)
    for ref, got in zip(reference, branches, strict=True):
        assert got.dtype == torch.float32 and got.shape == (4, 1000)
        assert logit_cosine(ref, got) >= (1.0 - 1e-6 if mode is Mode.FP32 else 0.999)


def test_autocast_heads_run_in_fp32(state: dict[str, torch.Tensor]) -> None:
    """bf16 logits carry 8 significant bits: ties in the top-k and numbers like 0.796875."""
    x = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(2))
    for logits in _logits(Mode.BF16_AUTOCAST, state, x):
        representable = logits.to(torch.bfloat16).float() == logits
        assert representable.float().mean().item() < 0.05  # a bf16 head output would be 1.0
        assert logits.unique().numel() == logits.numel()  # no ties
