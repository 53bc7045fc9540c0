"""The ImageNet-1k class names, index-aligned with every published CrossViT checkpoint."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

__all__ = ["imagenet_labels", "imagenet_synsets", "load_labels"]


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


def load_labels(path: Path | None) -> tuple[str, ...]:
    """The class names a server answers with: ImageNet-1k's (None), or a file's, one per line in class
    order (a leading "synset<TAB>" is dropped, as in imagenet_classes.txt). Blank lines are errors: a
    name list that lost a line would shift every class after it."""
    if path is None:
        return imagenet_labels()
    lines = path.read_text(encoding="utf-8").splitlines()
    names = tuple(line.split("\t", 1)[-1].strip() for line in lines)
    if not names or any(not name for name in names):
        raise ValueError(f"{path}: every line must name a class ({len(names)} lines, some blank or none)")
    return names
