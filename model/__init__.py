"""CrossViT in plain PyTorch: Lucid's config API, timm's numerics and checkpoint layout.

The config and the variant table import no torch (the lean CPU server reads them); the model, its
checkpoint loading and `create_model` import torch when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import CrossViTConfig
from .variants import list_variants

if TYPE_CHECKING:
    from .checkpoint import load_checkpoint
    from .crossvit import CrossViT
    from .variants import create_model

__all__ = ["CrossViT", "CrossViTConfig", "create_model", "load_checkpoint", "list_variants"]

_LAZY = {"CrossViT": ".crossvit", "load_checkpoint": ".checkpoint", "create_model": ".variants"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
