"""Parity with timm, the reference implementation, on timm's own weights for every variant.

timm builds each variant with random init; its state_dict is saved to a real file and loaded
into ours through `load_checkpoint`, in timm's layout and in the official IBM layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.crossvit import CrossVit
from torch import Tensor, nn

from model import CrossViT, CrossViTConfig, create_model, list_variants, load_checkpoint
from model.variants import get_variant

TOLERANCE = 1e-4  # max abs diff / max(1, max |ref|)


def relative_error(ours: Tensor, ref: Tensor) -> float:
    return float((ours - ref).abs().max() / max(1.0, float(ref.abs().max())))


@dataclass
class Reference:
    name: str
    timm_model: nn.Module
    checkpoint: Path  # timm layout, safetensors
    official: Path  # official IBM layout, .pth


@pytest.fixture(scope="module", params=list_variants())
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    name: str = request.param
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    folder = tmp_path_factory.mktemp(name)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    official = {re.sub(r"^(pos_embed|cls_token)_(\d)$", r"\1.\2", k): v for k, v in state.items()}
    assert "pos_embed.0" in official and "cls_token.1" in official
    torch.save(official, folder / f"{get_variant(name).official_name}.pth")
    yield Reference(name, ref, folder / "model.safetensors", folder / f"{get_variant(name).official_name}.pth")


def _images(size: int, batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_parameter_count_equals_timm(reference: Reference) -> None:
    ours = create_model(reference.name)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.timm_model.parameters())
    assert ours.state_dict().keys() == reference.timm_model.state_dict().keys()


@torch.inference_mode()
def test_logits_match_timm_at_native_and_other_sizes(reference: Reference) -> None:
    ours = create_model(reference.name, weights=reference.checkpoint)
    native = ours.config.img_size[0]
    for x in (_images(native), _images(256, batch=1)):
        assert relative_error(ours(x), reference.timm_model(x)) < TOLERANCE, tuple(x.shape)


@torch.inference_mode()
def test_per_branch_inputs_match_timm(reference: Reference) -> None:
    ours = create_model(reference.name, weights=reference.checkpoint)
    size0, size1 = ours.config.img_size
    x = _images(size0)
    # the second branch's input as the service makes it: bicubic of the branch-0 tensor
    x1 = nn.functional.interpolate(x, size=(size1, size1), mode="bicubic", align_corners=False)
    assert relative_error(ours([x, x1]), reference.timm_model(x)) < TOLERANCE
    b0, b1 = ours.branch_logits([x, x1])
    assert relative_error((b0 + b1) / 2, reference.timm_model(x)) < TOLERANCE


@torch.inference_mode()
def test_official_layout_loads_and_agrees(reference: Reference) -> None:
    ours = create_model(reference.name)
    sha = load_checkpoint(ours, reference.official)
    assert len(sha) == 64
    x = _images(ours.config.img_size[0], batch=1)
    assert relative_error(ours(x), reference.timm_model(x)) < TOLERANCE


@torch.inference_mode()
def test_lucid_doc_example_matches_timm_class() -> None:
    """Lucid's documented config (a fusion depth of 1, qkv_bias off, LayerNorm's default eps)
    against timm's `CrossVit` class built with the same settings."""
    config = CrossViTConfig(
        img_size=(240, 224), patch_size=(12, 16), embed_dim=(192, 384), depth=((1, 3, 1),) * 3,
        num_heads=(6, 12), mlp_ratio=(2.0, 2.0, 4.0),
    )
    torch.manual_seed(0)
    ref = CrossVit(
        img_size=240, img_scale=(1.0, 224 / 240), patch_size=(12, 16), embed_dim=(192, 384),
        depth=((1, 3, 1),) * 3, num_heads=(6, 12), mlp_ratio=(2.0, 2.0, 4.0), qkv_bias=False,
        norm_layer=nn.LayerNorm,
    ).eval()
    ours = CrossViT(config).eval()
    assert "blocks.0.fusion.0.0.norm1.weight" in ours.state_dict()  # fusion depth 1: a Sequential
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    for x in (_images(240), _images(224, batch=1)):
        assert relative_error(ours(x), ref(x)) < TOLERANCE
