"""`CrossViTConfig`: the architecture of one CrossViT, with Lucid's field names."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ARCHITECTURE_FIELDS", "ConfigError", "CrossViTConfig"]


class ConfigError(ValueError):
    """A config field breaks a rule; the message names the field and the rule."""


# Fields that decide tensor shapes; a published variant fixes them (dropouts etc. stay free).
ARCHITECTURE_FIELDS = frozenset(
    {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
     "multi_conv", "layer_norm_eps"}
)

# The three-conv ("dagger") patch embedding exists for these patch sizes only (spec §c2).
MULTI_CONV_PATCH_SIZES = (12, 16)


def _int_pair(name: str, value: Any) -> tuple[int, int]:
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise ConfigError(f"{name} must hold exactly 2 positive ints (one per branch), got {value!r}")
    return (items[0], items[1])


def _rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CrossViTConfig:
    """Architecture of one CrossViT; variants, checkpoints and /v1/models all derive from it.

    Field names and defaults follow Lucid's `CrossViTConfig`; `layer_norm_eps` replaces its
    `norm_layer` with plain data (Lucid's default is `nn.LayerNorm`'s 1e-5, presets use 1e-6).
    """

    img_size: tuple[int, int] = (224, 224)  # absolute square side per branch; presets use (240, 224)
    patch_size: tuple[int, int] = (12, 16)
    in_channels: int = 3
    num_classes: int = 1000  # 0: Identity heads, for feature extraction
    embed_dim: tuple[int, int] = (192, 384)
    depth: tuple[tuple[int, int, int], ...] = ((1, 3, 1),) * 3  # (blocks b0, blocks b1, fusion blocks)
    num_heads: tuple[int, int] = (6, 12)
    mlp_ratio: tuple[float, float, float] = (2.0, 2.0, 4.0)  # only [0] and [1] are read, as in timm
    qkv_bias: bool = False
    qk_scale: float | None = None  # overrides head_dim**-0.5 in cross-attention only (Lucid/IBM)
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    multi_conv: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise lists to tuples in place, once
        for name in ("img_size", "patch_size", "embed_dim", "num_heads"):
            set_(self, name, _int_pair(name, getattr(self, name)))
        for name in ("in_channels", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int, got {value!r}")
        if self.in_channels <= 0:
            raise ConfigError(f"in_channels must be > 0, got {self.in_channels}")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0 (0 gives feature outputs), got {self.num_classes}")

        ratios = tuple(self.mlp_ratio) if isinstance(self.mlp_ratio, (list, tuple)) else ()
        if len(ratios) != 3 or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 and math.isfinite(r) for r in ratios
        ):
            raise ConfigError(f"mlp_ratio must hold 3 positive numbers, got {self.mlp_ratio!r}")
        set_(self, "mlp_ratio", tuple(float(r) for r in ratios))

        raw_depth = self.depth if isinstance(self.depth, (list, tuple)) else ()
        depth = tuple(tuple(d) if isinstance(d, (list, tuple)) else (d,) for d in raw_depth)
        if not depth:
            raise ConfigError(f"depth must be a non-empty sequence of (b0, b1, fusion) triples, got {self.depth!r}")
        for k, triple in enumerate(depth):
            ints = all(isinstance(v, int) and not isinstance(v, bool) for v in triple)
            if len(triple) != 3 or not ints or triple[0] <= 0 or triple[1] <= 0 or triple[2] < 0:
                raise ConfigError(
                    f"depth[{k}] must be (positive int, positive int, non-negative int), got {triple!r}"
                )
        set_(self, "depth", depth)

        for i, (dim, heads) in enumerate(zip(self.embed_dim, self.num_heads, strict=True)):
            if dim % heads:
                raise ConfigError(f"embed_dim[{i}]={dim} must be divisible by num_heads[{i}]={heads}")
        for i, (size, patch) in enumerate(zip(self.img_size, self.patch_size, strict=True)):
            if size < patch:  # a remainder is cropped by the stride, as in Lucid and timm
                raise ConfigError(f"img_size[{i}]={size} must be at least patch_size[{i}]={patch}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            set_(self, name, _rate(name, getattr(self, name)))
        if self.qk_scale is not None and (
            isinstance(self.qk_scale, bool) or not isinstance(self.qk_scale, (int, float)) or self.qk_scale <= 0
        ):
            raise ConfigError(f"qk_scale must be None or a positive number, got {self.qk_scale!r}")
        for name in ("qkv_bias", "multi_conv"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.multi_conv and any(p not in MULTI_CONV_PATCH_SIZES for p in self.patch_size):
            raise ConfigError(
                f"multi_conv needs patch_size in {MULTI_CONV_PATCH_SIZES} for both branches, got {self.patch_size}"
            )
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"layer_norm_eps must be a number in (0, 1), got {eps!r}")
        set_(self, "layer_norm_eps", float(eps))

    @property
    def num_patches(self) -> tuple[int, int]:
        """Patch tokens per branch, without the CLS token: 400 and 196 for (240, 224)."""
        return (
            (self.img_size[0] // self.patch_size[0]) ** 2,
            (self.img_size[1] // self.patch_size[1]) ** 2,
        )

    @property
    def num_features(self) -> int:
        """Width of the concatenated CLS features (`num_classes=0` output)."""
        return self.embed_dim[0] + self.embed_dim[1]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists) that `from_dict` turns back into an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "depth":
                value = [list(triple) for triple in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CrossViTConfig:
        """Inverse of `to_dict`; unknown keys raise so that typos are not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ConfigError(f"unknown CrossViTConfig fields {unknown}; known: {sorted(known)}")
        return cls(**dict(data))
