"""The 11 published CrossViT variants as data, their eval input spec, and `create_model`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ARCHITECTURE_FIELDS, CrossViTConfig

if TYPE_CHECKING:
    from .crossvit import CrossViT

__all__ = ["VARIANTS", "Variant", "create_model", "get_variant", "list_variants", "resolve_name"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_RELEASE = "https://github.com/IBM/CrossViT/releases/download/weights-0.1"


@dataclass(frozen=True)
class Variant:
    """One published model: its architecture and the eval pipeline its weights were measured with."""

    name: str  # timm's name, e.g. crossvit_18_dagger_240
    config: CrossViTConfig
    crop_pct: float  # shorter side resized to floor(input_size / crop_pct), then centre-cropped
    paper_top1: float  # ImageNet-1k top-1 reported by the authors
    timm_top1: float  # timm's own eval of the same weights (results-imagenet.csv)
    official_name: str  # the IBM release's name (_224 / _384)
    lucid_name: str | None  # Lucid's factory name; Lucid has no 408 models
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    license: str = "apache-2.0"

    @property
    def input_size(self) -> int:
        """Side of the square image the service crops to (branch 0's resolution)."""
        return self.config.img_size[0]

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop: floor(240 / 0.875) = 274, or 408 at crop_pct 1."""
        return math.floor(self.input_size / self.crop_pct)

    @property
    def hub_id(self) -> str:
        return f"timm/{self.name}.in1k"

    @property
    def official_url(self) -> str:
        return f"{OFFICIAL_RELEASE}/{self.official_name}.pth"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description for /v1/models and the weights CLI."""
        return {
            "name": self.name,
            "config": self.config.to_dict(),
            "input_size": self.input_size,
            "branch_resolutions": list(self.config.img_size),
            "resize_size": self.resize_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "hub_id": self.hub_id,
            "official_url": self.official_url,
            "license": self.license,
            "paper_top1": self.paper_top1,
            "timm_top1": self.timm_top1,
        }


def _variant(
    name: str,
    *,
    dims: tuple[int, int],
    blocks: int,
    heads: int,
    mlp: float,
    dagger: bool,
    paper: float,
    timm: float,
    size: int = 240,
    small_size: int = 224,
    crop_pct: float = 0.875,
    lucid: bool = True,
) -> Variant:
    # Shared by every preset (spec §b): patch (12, 16), qkv bias, LayerNorm eps 1e-6, 3 stages
    # of (1, blocks, 0), so exactly one cross-attention block per direction and stage.
    config = CrossViTConfig(
        img_size=(size, small_size),
        patch_size=(12, 16),
        embed_dim=dims,
        depth=((1, blocks, 0),) * 3,
        num_heads=(heads, heads),
        mlp_ratio=(mlp, mlp, 1.0),
        qkv_bias=True,
        multi_conv=dagger,
        layer_norm_eps=1e-6,
    )
    stem = name.rsplit("_", 1)[0]  # crossvit_18_dagger
    return Variant(
        name=name,
        config=config,
        crop_pct=crop_pct,
        paper_top1=paper,
        timm_top1=timm,
        official_name=f"{stem}_{small_size}",
        lucid_name=stem if lucid else None,
    )


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        _variant("crossvit_tiny_240", dims=(96, 192), blocks=4, heads=3, mlp=4.0, dagger=False,
                 paper=73.4, timm=73.352),
        _variant("crossvit_small_240", dims=(192, 384), blocks=4, heads=6, mlp=4.0, dagger=False,
                 paper=81.0, timm=81.036),
        _variant("crossvit_base_240", dims=(384, 768), blocks=4, heads=12, mlp=4.0, dagger=False,
                 paper=82.2, timm=82.212),
        _variant("crossvit_9_240", dims=(128, 256), blocks=3, heads=4, mlp=3.0, dagger=False,
                 paper=73.9, timm=73.994),
        _variant("crossvit_15_240", dims=(192, 384), blocks=5, heads=6, mlp=3.0, dagger=False,
                 paper=81.5, timm=81.522),
        _variant("crossvit_18_240", dims=(224, 448), blocks=6, heads=7, mlp=3.0, dagger=False,
                 paper=82.5, timm=82.390),
        _variant("crossvit_9_dagger_240", dims=(128, 256), blocks=3, heads=4, mlp=3.0, dagger=True,
                 paper=77.1, timm=76.990),
        _variant("crossvit_15_dagger_240", dims=(192, 384), blocks=5, heads=6, mlp=3.0, dagger=True,
                 paper=82.3, timm=82.302),
        _variant("crossvit_18_dagger_240", dims=(224, 448), blocks=6, heads=7, mlp=3.0, dagger=True,
                 paper=82.8, timm=82.494),
        # timm evaluates the 408 models at crop_pct 1.0 ("for better results", timm f8a215cf).
        _variant("crossvit_15_dagger_408", dims=(192, 384), blocks=5, heads=6, mlp=3.0, dagger=True,
                 paper=83.5, timm=83.842, size=408, small_size=384, crop_pct=1.0, lucid=False),
        _variant("crossvit_18_dagger_408", dims=(224, 448), blocks=6, heads=7, mlp=3.0, dagger=True,
                 paper=83.9, timm=84.198, size=408, small_size=384, crop_pct=1.0, lucid=False),
    )
}

# Lucid's factory names and the IBM release's names resolve to timm's.
ALIASES: dict[str, str] = {
    **{v.lucid_name: v.name for v in VARIANTS.values() if v.lucid_name},
    **{v.official_name: v.name for v in VARIANTS.values()},
}


def list_variants() -> list[str]:
    """The canonical (timm) names of the published variants."""
    return list(VARIANTS)


def resolve_name(name: str) -> str:
    """Map a timm, Lucid or IBM name (optionally with timm's `.in1k` tag) to the timm name."""
    base = name.removeprefix("timm/").removesuffix(".in1k")
    if base in VARIANTS:
        return base
    if base in ALIASES:
        return ALIASES[base]
    raise KeyError(
        f"unknown CrossViT variant {name!r}; known: {', '.join(VARIANTS)} "
        f"(aliases: {', '.join(sorted(ALIASES))})"
    )


def get_variant(name: str) -> Variant:
    return VARIANTS[resolve_name(name)]


def create_model(
    name: str,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> CrossViT:
    """Build a published variant in eval mode; only non-architectural fields may be overridden.

    `weights` is a checkpoint file loaded strictly through `load_checkpoint`.
    """
    from .checkpoint import load_checkpoint
    from .crossvit import CrossViT

    variant = get_variant(name)
    if locked := sorted(overrides.keys() & ARCHITECTURE_FIELDS):
        raise TypeError(f"{variant.name} fixes {locked}; build CrossViT(CrossViTConfig(...)) instead")
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    model = CrossViT(dataclasses.replace(variant.config, **overrides))
    if weights is not None:
        load_checkpoint(model, weights)
    return model.eval()
