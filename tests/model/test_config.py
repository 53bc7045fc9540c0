"""CrossViTConfig: Lucid's fields, validation that names the field, and a JSON round trip."""

from __future__ import annotations

import json

import pytest

from model import CrossViTConfig
from model.config import ConfigError


def test_defaults_follow_lucid() -> None:
    c = CrossViTConfig()
    assert c.img_size == (224, 224)
    assert c.patch_size == (12, 16)
    assert c.depth == ((1, 3, 1),) * 3
    assert c.mlp_ratio == (2.0, 2.0, 4.0)
    assert c.qkv_bias is False and c.qk_scale is None and c.multi_conv is False
    assert c.layer_norm_eps == 1e-5  # nn.LayerNorm's default, as Lucid's norm_layer


def test_lists_become_tuples_and_round_trip_through_json() -> None:
    c = CrossViTConfig(img_size=[240, 224], depth=[[1, 4, 0], [1, 4, 0], [1, 4, 0]], mlp_ratio=[4, 4, 1],
                       embed_dim=[96, 192], num_heads=[3, 3], qk_scale=0.1)
    assert c.img_size == (240, 224) and c.depth == ((1, 4, 0),) * 3 and c.mlp_ratio == (4.0, 4.0, 1.0)
    data = json.loads(json.dumps(c.to_dict()))
    assert CrossViTConfig.from_dict(data) == c
    assert hash(CrossViTConfig.from_dict(data)) == hash(c)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"img_size": (240,)}, "img_size must hold exactly 2"),
        ({"patch_size": (12, 0)}, "patch_size must hold exactly 2 positive"),
        ({"embed_dim": (192.0, 384)}, "embed_dim must hold exactly 2"),
        ({"num_heads": (5, 12)}, "embed_dim[0]=192 must be divisible by num_heads[0]=5"),
        ({"in_channels": 0}, "in_channels must be > 0"),
        ({"num_classes": -1}, "num_classes must be >= 0"),
        ({"mlp_ratio": (2.0, 2.0)}, "mlp_ratio must hold 3 positive"),
        ({"mlp_ratio": (2.0, -1.0, 4.0)}, "mlp_ratio must hold 3 positive"),
        ({"depth": ()}, "depth must be a non-empty"),
        ({"depth": ((1, 0, 1),)}, "depth[0] must be (positive int, positive int, non-negative int)"),
        ({"depth": ((1, 3, 1), (1, 3))}, "depth[1]"),
        ({"drop_rate": 1.0}, "drop_rate must be a number in [0, 1)"),
        ({"attn_drop_rate": -0.1}, "attn_drop_rate"),
        ({"drop_path_rate": "0.1"}, "drop_path_rate"),
        ({"multi_conv": True, "patch_size": (8, 16)}, "multi_conv needs patch_size in (12, 16)"),
        ({"img_size": (240, 8)}, "img_size[1]=8 must be at least patch_size[1]=16"),
        ({"qk_scale": 0}, "qk_scale must be None or a positive number"),
        ({"qkv_bias": 1}, "qkv_bias must be a bool"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
    ],
)
def test_invalid_fields_are_named(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        CrossViTConfig(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(err.value)


def test_config_error_is_a_value_error_and_unknown_keys_are_refused() -> None:
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match="unknown CrossViTConfig fields \\['embed_dims'\\]"):
        CrossViTConfig.from_dict({"embed_dims": (96, 192)})


def test_config_is_frozen() -> None:
    c = CrossViTConfig()
    with pytest.raises(AttributeError):
        c.num_classes = 10  # type: ignore[misc]
