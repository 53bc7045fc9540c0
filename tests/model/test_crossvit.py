"""CrossViT's forward API, feature mode, input checks, export, and the variant registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.export import Dim, export

import model
from model import CrossViT, CrossViTConfig, create_model, list_variants
from model.variants import ALIASES, get_variant, resolve_name

TINY = CrossViTConfig(
    img_size=(48, 32), patch_size=(12, 16), embed_dim=(16, 32), depth=((1, 2, 0),) * 2, num_heads=(2, 4),
    mlp_ratio=(2.0, 2.0, 1.0), qkv_bias=True, num_classes=10, layer_norm_eps=1e-6,
)


def _x(batch: int, size: int = 48) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def test_public_names_are_exactly_the_five() -> None:
    assert sorted(model.__all__) == sorted(
        ["CrossViT", "CrossViTConfig", "create_model", "load_checkpoint", "list_variants"]
    )


@torch.inference_mode()
def test_forward_is_the_mean_of_branch_logits() -> None:
    m = CrossViT(TINY).eval()
    x = _x(3)
    b0, b1 = m.branch_logits(x)
    assert b0.shape == b1.shape == (3, 10)
    torch.testing.assert_close(m(x), (b0 + b1) / 2)
    f0, f1 = m.forward_features(x)
    assert f0.shape == (3, 16) and f1.shape == (3, 32)


@torch.inference_mode()
def test_num_classes_zero_gives_concatenated_features() -> None:
    m = CrossViT(dataclasses.replace(TINY, num_classes=0)).eval()
    x = _x(2)
    out = m(x)
    assert out.shape == (2, 16 + 32) == (2, m.num_features)
    torch.testing.assert_close(out, torch.cat(m.forward_features(x), dim=-1))


@torch.inference_mode()
def test_cross_attention_dropout_path_matches_folded_path_without_dropout() -> None:
    """The training path (explicit keys/values) and the folded inference path agree."""
    m = CrossViT(dataclasses.replace(TINY, attn_drop_rate=0.5)).eval()
    x = _x(2)
    expected = m(x)
    for module in m.modules():
        if hasattr(module, "attn_drop") and isinstance(module.attn_drop, float):
            module.train()
            module.attn_drop = 1e-12  # the explicit path, effectively without dropout
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(2, 1, 48, 48), torch.zeros(3, 48, 48), [torch.zeros(1, 3, 48, 48)],
     [torch.zeros(1, 3, 48, 48), torch.zeros(1, 3, 48, 48)]],
    ids=["channels", "ndim", "one-branch", "wrong-branch-size"],
)
def test_bad_inputs_raise_value_error(bad: object) -> None:
    with pytest.raises(ValueError):
        CrossViT(TINY)(bad)


def test_config_is_required() -> None:
    with pytest.raises(TypeError):
        CrossViT({"img_size": (48, 32)})  # type: ignore[arg-type]


@torch.inference_mode()
def test_other_input_sizes_are_rescaled_per_branch() -> None:
    m = CrossViT(TINY).eval()
    assert m(_x(1, size=64)).shape == (1, 10)
    assert m(torch.randn(1, 3, 40, 56)).shape == (1, 10)


def test_torch_export_with_dynamic_batch() -> None:
    m = CrossViT(TINY).eval()
    exported = export(m, (_x(2),), dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})
    with torch.inference_mode():
        for batch in (1, 5):
            x = _x(batch)
            torch.testing.assert_close(exported.module()(x), m(x), rtol=1e-5, atol=1e-5)


def test_registry_has_eleven_variants_with_their_input_spec() -> None:
    names = list_variants()
    assert len(names) == 11 and len(set(names)) == 11
    v = get_variant("crossvit_18_dagger_240")
    assert (v.input_size, v.resize_size, v.crop_pct, v.interpolation) == (240, 274, 0.875, "bicubic")
    assert v.config.img_size == (240, 224) and v.config.multi_conv
    assert v.hub_id == "timm/crossvit_18_dagger_240.in1k"
    assert v.official_url.endswith("/crossvit_18_dagger_224.pth")
    big = get_variant("crossvit_15_dagger_408")
    assert (big.input_size, big.resize_size, big.config.img_size) == (408, 408, (408, 384))
    assert big.lucid_name is None


@pytest.mark.parametrize(
    ("alias", "name"),
    [("crossvit_tiny", "crossvit_tiny_240"), ("crossvit_18_dagger", "crossvit_18_dagger_240"),
     ("crossvit_9_dagger_224", "crossvit_9_dagger_240"), ("crossvit_18_dagger_384", "crossvit_18_dagger_408"),
     ("timm/crossvit_base_240.in1k", "crossvit_base_240")],
)
def test_aliases_resolve(alias: str, name: str) -> None:
    assert resolve_name(alias) == name


def test_alias_table_covers_lucid_and_official_names() -> None:
    assert len([a for a in ALIASES if not a.endswith(("_224", "_384"))]) == 9  # Lucid's 9 factories
    assert len([a for a in ALIASES if a.endswith(("_224", "_384"))]) == 11


def test_unknown_variant_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="crossvit_tiny_240"):
        create_model("crossvit_huge")


def test_create_model_guards_the_architecture() -> None:
    with pytest.raises(TypeError, match=r"fixes \['embed_dim'\]"):
        create_model("crossvit_tiny_240", embed_dim=(64, 128))
    m = create_model("crossvit_tiny_240", num_classes=7, drop_rate=0.1)
    assert m.head[0].out_features == 7 and m.config.drop_rate == 0.1 and not m.training
