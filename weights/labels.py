"""The ImageNet-1k class names, index-aligned with every published CrossViT checkpoint."""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["imagenet_labels", "imagenet_synsets"]


@cache
def _rows() -> tuple[tuple[str, str], ...]:
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    rows = tuple((synset, label) for synset, label in (line.split("\t", 1) for line in text.splitlines()))
    if len(rows) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(rows)} classes, expected 1000")
    return rows


def imagenet_labels() -> tuple[str, ...]:
    """1000 human-readable names, e.g. index 281 is 'tabby, tabby cat'."""
    return tuple(label for _, label in _rows())


def imagenet_synsets() -> tuple[str, ...]:
    """1000 WordNet ids in class-index order, e.g. index 281 is 'n02123045'."""
    return tuple(synset for synset, _ in _rows())
