"""CrossViT in plain PyTorch: Lucid's config API, timm's numerics and checkpoint layout."""

from .checkpoint import load_checkpoint
from .config import CrossViTConfig
from .crossvit import CrossViT
from .variants import create_model, list_variants

__all__ = ["CrossViT", "CrossViTConfig", "create_model", "load_checkpoint", "list_variants"]
