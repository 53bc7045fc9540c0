"""Real photos and encoders for the image tests: scikit-image's bundled pictures, no network.

The data folder is found without importing `skimage` (its import is slow); only Pillow reads it.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image

__all__ = ["encode", "jpeg_with_orientation", "photo", "resized"]


@functools.cache
def _data_dir() -> Path:
    if folder := os.environ.get("CROSSVIT_TEST_PHOTOS"):  # the same photos, copied (bench/gpu/fetch.py)
        return Path(folder)
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the image tests need scikit-image's bundled photos: pip install scikit-image")
    return Path(spec.submodule_search_locations[0]) / "data"


@functools.cache
def _load(name: str) -> Image.Image:
    matches = sorted(_data_dir().glob(f"{name}.*"))
    paths = [p for p in matches if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    if not paths:
        raise FileNotFoundError(f"no photo named {name!r} in {_data_dir()}")
    with Image.open(paths[0]) as image:
        return image.convert("L" if image.mode == "L" else "RGB")


def photo(name: str = "chelsea") -> Image.Image:
    """A real photo (chelsea is a cat, 451x300): RGB, or mode "L" for grayscale ones like camera."""
    return _load(name).copy()  # a copy: callers may draw on it


def encode(image: Image.Image, fmt: str, **save_kwargs: Any) -> bytes:
    """The file bytes of `image` in a PIL format ("JPEG", "PNG", "WEBP", ...)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def jpeg_with_orientation(image: Image.Image, orientation: int, **save_kwargs: Any) -> bytes:
    """A JPEG whose EXIF Orientation tag is `orientation`; pixels stored un-rotated, as cameras do."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encode(image, "JPEG", exif=exif, **{"quality": 95, **save_kwargs})


def resized(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` resampled (bicubic) to width x height, e.g. 640x480 or a 4000x3000 'camera' photo."""
    return image.resize((width, height), Image.Resampling.BICUBIC)
