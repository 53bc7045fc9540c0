"""The images an INT8 quantisation is calibrated on, and the held-out ones its guard checks it on.

A calibration folder (`CROSSVIT_CALIBRATION_DIR`, default: the golden images and the photos in images/)
is split by name order: every third image is held out, the rest calibrate. Each image goes through the
served preprocessing (decode, EXIF, resize, centre crop, normalise), so the activation ranges NNCF records
are the served ones; a small folder is stretched with random resized crops and flips (seeded, so the same
folder always gives the same samples) up to the counts below. What the samples are made of is hashed
(names, bytes, this recipe): the quantised model is cached under that hash.
"""

from __future__ import annotations

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

__all__ = ["CALIBRATION_SAMPLES", "HELD_OUT_SAMPLES", "CalibrationSet", "calibration_set", "load_samples"]

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
HOLD_OUT_EVERY = 3  # the 3rd, 6th, ... image by name is held out for the guard
# At least this many samples each (augmented when the folder has fewer images), at most MAX_SAMPLES: NNCF's
# default subset is 300 samples; 128 took 15 s for crossvit_9_dagger_240 on 2 Zen 4 cores (bench/README.md).
CALIBRATION_SAMPLES = 128
HELD_OUT_SAMPLES = 32
MAX_SAMPLES = 300
RECIPE = 1  # bump when the sampling changes: it is part of the cache key
_SCALE = (0.35, 1.0)  # random resized crop: the fraction of the side kept


@dataclass(frozen=True)
class CalibrationImage:
    name: str
    data: bytes


@dataclass(frozen=True)
class CalibrationSet:
    source: str  # the folder, or "default (golden images + service/quantization/images)"
    calibration: tuple[CalibrationImage, ...]
    held_out: tuple[CalibrationImage, ...]

    @property
    def digest(self) -> str:
        """sha256 of what the samples are made of: the cache key of a quantisation."""
        h = hashlib.sha256(f"recipe {RECIPE}\n".encode())
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

    Raises ValueError for a folder with fewer than two images (one to calibrate on, one to check with)."""
    if folder is None:
        images, source = _default_images(), "default (golden images + service/quantization/images)"
    else:
        try:
            paths = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES]
        except OSError as exc:
            raise ValueError(f"calibration folder {folder}: {exc}") from None
        images, source = [CalibrationImage(p.name, p.read_bytes()) for p in paths], str(folder)
    images.sort(key=lambda image: image.name)
    if len(images) < 2:
        raise ValueError(f"calibration folder {source} holds {len(images)} images ({', '.join(SUFFIXES)}); "
                         "at least 2 are needed, a few hundred like the served ones are best")
    held_out = [i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 for i in range(len(images))]
    return CalibrationSet(source, tuple(im for im, out in zip(images, held_out, strict=True) if not out),
                          tuple(im for im, out in zip(images, held_out, strict=True) if out))


def load_samples(
    images: Sequence[CalibrationImage], count: int, decode: Callable[[bytes], np.ndarray], *, seed: str
) -> np.ndarray:
    """(n, 3, S, S) float32: every image as served (up to MAX_SAMPLES), then random resized crops and flips of
    them in turn until there are `count`. `decode` is the served preprocessing; `seed` keeps the crops fixed."""
    chosen = list(images)[:MAX_SAMPLES]
    samples = [decode(image.data) for image in chosen]
    rng = random.Random(seed)
    pictures = [_open(image.data) for image in chosen] if len(samples) < count else []
    while len(samples) < count:
        picture = pictures[len(samples) % len(pictures)]
        samples.append(decode(_crop(picture, rng)))
    return np.stack(samples)


def _open(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


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
