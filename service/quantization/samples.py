"""The images an INT8 quantisation is calibrated on, and the held-out ones its guard checks it on.

A calibration folder (`CROSSVIT_CALIBRATION_DIR`, default: the golden images and the photos in images/)
is split by name order: every third image is held out, the rest calibrate. Each image goes through the
served preprocessing (decode, EXIF, resize, centre crop, normalise), so the activation ranges NNCF records
are the served ones; a small folder is stretched with random resized crops and flips (seeded, so the same
folder always gives the same samples) up to the counts below. What the samples are made of is hashed
(names, bytes, this recipe): the quantised model is cached under that hash.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..golden import golden_images

__all__ = ["CALIBRATION_SAMPLES", "HELD_OUT_SAMPLES", "CalibrationError", "CalibrationSet", "calibration_set",
           "load_samples"]

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
HOLD_OUT_EVERY = 3  # the 3rd, 6th, ... image by name is held out for the guard (the last one, of two)
# At least this many samples each (augmented when the folder has fewer images), at most MAX_SAMPLES: NNCF's
# default subset is 300 samples; 128 took 15 s for crossvit_9_dagger_240 on 2 Zen 4 cores (bench/README.md).
CALIBRATION_SAMPLES = 128
HELD_OUT_SAMPLES = 32
MAX_SAMPLES = 300
RECIPE = 2  # bump when the sampling changes in a way the constants here do not show: part of the cache key
_SCALE = (0.35, 1.0)  # random resized crop: the fraction of the side kept
# Pictures kept for cropping are shrunk to this side: a 35 % crop of it still exceeds the 274 px resize,
# and a folder of phone photos does not hold gigabytes of pixels.
_CROP_SOURCE_SIDE = 1024


class CalibrationError(ValueError):
    """The calibration folder cannot serve: too few images, or one that cannot be read or decoded."""


@dataclass(frozen=True)
class CalibrationImage:
    name: str
    data: bytes


@dataclass(frozen=True)
class CalibrationSet:
    source: str  # the folder, or "default (golden images + service/quantization/images)"
    calibration: tuple[CalibrationImage, ...]
    held_out: tuple[CalibrationImage, ...]

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of what the samples are made of (the images and how they are sampled): a quantisation's cache key."""
        recipe = (RECIPE, HOLD_OUT_EVERY, CALIBRATION_SAMPLES, HELD_OUT_SAMPLES, MAX_SAMPLES, _SCALE, _CROP_SOURCE_SIDE)
        h = hashlib.sha256(f"recipe {recipe}\n".encode())
        for part, images in (("calibration", self.calibration), ("held out", self.held_out)):
            for image in images:
                h.update(f"{part} {image.name} {len(image.data)}\n".encode())
                h.update(image.data)
        return h.hexdigest()

    def summary(self) -> dict[str, object]:
        return {"source": self.source, "calibration_images": len(self.calibration),
                "held_out_images": len(self.held_out), "digest": self.digest[:16]}


def _default_images() -> list[CalibrationImage]:
    own = resources.files(__package__).joinpath("images")
    photos = [CalibrationImage(e.name, e.read_bytes()) for e in own.iterdir() if e.name.endswith(SUFFIXES)]
    return photos + [CalibrationImage(g.name, g.data) for g in golden_images()]


def calibration_set(folder: Path | None) -> CalibrationSet:
    """The images of `folder` (not its subfolders), or the default set, split into calibration and held out.

    Raises CalibrationError for an unreadable folder, or one with fewer than two images (one to calibrate on,
    one to check with)."""
    if folder is None:
        images, source = _default_images(), "default (golden images + service/quantization/images)"
    else:
        try:
            paths = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES]
            images, source = [CalibrationImage(p.name, p.read_bytes()) for p in paths], str(folder)
        except OSError as exc:
            raise CalibrationError(f"calibration folder {folder}: {exc}") from None
    images.sort(key=lambda image: image.name)
    if len(images) < 2:
        raise CalibrationError(f"calibration folder {source} holds {len(images)} images ({', '.join(SUFFIXES)}); "
                               "at least 2 are needed, a few hundred like the served ones are best")
    held_out = [i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 for i in range(len(images))]
    if not any(held_out):
        held_out[-1] = True
    return CalibrationSet(source, tuple(im for im, out in zip(images, held_out, strict=True) if not out),
                          tuple(im for im, out in zip(images, held_out, strict=True) if out))


def load_samples(
    images: Sequence[CalibrationImage], count: int, decode: Callable[[bytes], np.ndarray], *, seed: str
) -> np.ndarray:
    """(n, 3, S, S) float32: every image as served (up to MAX_SAMPLES), then random resized crops and flips of
    them in turn until there are `count`. `decode` is the served preprocessing; `seed` keeps the crops fixed.

    Raises CalibrationError naming an image that does not decode (or none given)."""
    chosen = list(images)[:MAX_SAMPLES]
    if not chosen:
        raise CalibrationError("no images to sample")
    samples = [_decoded(decode, image.data, image.name) for image in chosen]
    rng = random.Random(seed)
    pictures = [_open(image) for image in chosen] if len(samples) < count else []
    while len(samples) < count:
        name, picture = pictures[len(samples) % len(pictures)]
        samples.append(_decoded(decode, _crop(picture, rng), name))
    return np.stack(samples)


def _decoded(decode: Callable[[bytes], np.ndarray], data: bytes, name: str) -> np.ndarray:
    try:
        return decode(data)
    except Exception as exc:  # the served decode's errors (invalid, too large, unsupported), named here
        raise CalibrationError(f"calibration image {name}: {exc}") from None


def _open(image: CalibrationImage) -> tuple[str, Image.Image]:
    """Upright RGB, shrunk to _CROP_SOURCE_SIDE (it decoded as served just before, so it is a sound image)."""
    with Image.open(io.BytesIO(image.data)) as opened:
        picture = ImageOps.exif_transpose(opened).convert("RGB")
    picture.thumbnail((_CROP_SOURCE_SIDE, _CROP_SOURCE_SIDE), Image.Resampling.BICUBIC)
    return image.name, picture


def _crop(picture: Image.Image, rng: random.Random) -> bytes:
    """A random crop keeping 35-100 % of each side, mirrored half the time, as PNG bytes for the served decode."""
    w, h = picture.size
    scale = rng.uniform(*_SCALE)
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = picture.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    crop.save(buffer, "PNG")
    return buffer.getvalue()
