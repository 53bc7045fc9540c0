"""Finding the images under the paths given on the command line, safely.

Symlinks are followed only while they stay inside the folder they were found in (no escaping),
every folder is entered once by its real path (no loops), and a file reached twice is listed once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "find_images"]

# what the server decodes
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _walk(root: Path) -> Iterator[Path]:
    """Image files under `root` (absolute, as walked, not resolved), in sorted order per folder."""
    real_root = root.resolve()
    seen_dirs: set[Path] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        real = folder.resolve()
        if real in seen_dirs or not _inside(real, real_root):
            continue
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # unreadable folder: nothing to list
        subfolders = []
        for entry in entries:
            path = folder / entry.name
            if entry.is_dir():  # follows a link; _inside decides on the target
                subfolders.append(path)
            elif entry.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                if not entry.is_symlink() or _inside(path.resolve(), real_root):
                    yield path
        stack.extend(reversed(subfolders))


def find_images(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[Path]]:
    """(images, missing): folders walked for image files, files taken as given (whatever their name).

    Paths are absolute but not resolved, so output rows name what the user sees.
    """
    images: list[Path] = []
    missing: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(os.path.abspath(given))
        if path.is_dir():
            found: Iterator[Path] = _walk(path)
        elif path.is_file():
            found = iter([path])
        else:
            missing.append(path)
            continue
        for image in found:
            real = image.resolve()
            if real not in seen:
                seen.add(real)
                images.append(image)
    return images, missing
