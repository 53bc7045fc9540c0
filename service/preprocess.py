"""Image bytes -> checked image -> per-branch tensors, numerically identical to timm's eval transform.

`preprocess` is the one entry point; the service calls it from a thread pool, so it is a pure
function of its arguments and changes no global state (PIL's settings and warning filters included).

1. Header (``Image.open`` is lazy and reads only the header): an image PIL cannot identify is 422
   ``invalid_image`` (SVG, sniffed, is 415 ``unsupported_image_format``); a format outside
   ALLOWED_FORMATS is 415; more than ``max_pixels`` pixels is 413 ``image_too_large``, before any
   pixel is decoded. PIL's own check inside ``Image.open`` (``Image.MAX_IMAGE_PIXELS`` = 89.5 MP: a
   DecompressionBombWarning past it, an error past twice it) is caught and answered 413 as well; keep
   ``max_pixels`` below 89.5 MP (the default 40 MP is) so PIL's warning never fires first.
2. Decode: the first frame (GIF, animated WebP, multi-page TIFF); large JPEGs at a reduced DCT scale
   (draft mode, see DRAFT_SAFETY_FACTOR); EXIF orientation applied; then to 8-bit RGB:
   - RGB as is; L, 1, P, CMYK, YCbCr, LAB, HSV through PIL's ``convert("RGB")``, as timm does;
   - alpha (RGBA, LA, PA, P or L/RGB with a ``transparency`` key) composited over BACKGROUND;
     timm's ``convert("RGB")`` drops alpha instead, showing whatever colour transparent pixels hold;
   - 16-bit integers (I;16, I;16B, I;16L, I;16N, and I, PIL's mode for 16- and 32-bit integer data):
     clipped to [0, 65535], scaled by 255 / 65535 and rounded, so a 16-bit gradient stays a gradient
     (PIL's ``convert`` clips at 255);
   - F (float): a [0, 1] image (max <= 1.0) is scaled by 255; then clipped to [0, 255] and rounded.
3. Tensors, as timm's ``create_transform`` for the variant: shorter side to ``resize_size`` with PIL's
   bicubic (torchvision's ``Resize`` on a PIL image), centre crop to ``crop_size`` (torchvision's
   offsets), ``/ 255``, normalise -> the (3, 240, 240) input. Branch 1's 224 px input is derived from it
   by the worker (inside the model graph), exactly what the model does with a single input.
"""

from __future__ import annotations

import io
import math
import re
import struct
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from model.variants import Variant

from .errors import ImageTooLargeError, InvalidImageError, UnsupportedMediaTypeError

__all__ = [
    "ALLOWED_FORMATS",
    "BACKGROUND",
    "DRAFT_SAFETY_FACTOR",
    "InputSpec",
    "Preprocessed",
    "preprocess",
]

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})  # PIL's format names

# Transparent pixels become white, as browsers show a transparent image on a default page.
BACKGROUND = (255, 255, 255)

# Draft mode decodes a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) as long as the shorter
# side stays >= DRAFT_SAFETY_FACTOR * resize_size, so the bicubic downscale after it still dominates.
# Measured on 5 photos (bench/README.md, "Preprocessing"): at 2, a 4000x3000 JPEG decodes at 1/4 and branch 0 moves
# by max 0.053, mean 0.0055; a 1600x1200 one at 1/2, by max 0.12, mean 0.0074; logits cosine 0.999998.
# That is JPEG quality 95 vs 90 territory (mean 0.004-0.009); at 1 the mean doubles to 0.019-0.032.
# 4000x3000 goes from 122 to 21 ms.
DRAFT_SAFETY_FACTOR = 2.0
# Up to this aspect ratio the output is bit-identical to timm's resize-then-crop (_resize_crop);
# beyond it (a longer side over MAX_RESIZE_ASPECT x 274 after the resize) only the cropped region
# is resampled (_resize_region), within two 8-bit steps of it (measured in tests).
MAX_RESIZE_ASPECT = 16
_BICUBIC_SUPPORT = 2.0  # PIL's bicubic filter support, in output pixels

_PIL_ALIASES = {"MPO": "JPEG"}  # multi-picture JPEGs (many phone cameras); the first picture is a JPEG
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, ZeroDivisionError)
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)  # the warning is raised when filtered to error
_PIL_PIXELS = re.compile(r"\((\d+) pixels\)")  # the size in PIL's decompression-bomb message
# An SVG document: optional BOM, whitespace, XML declaration, comments or doctype, then the root element.
_SVG_ROOT = re.compile(
    rb"\A(?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]*>\s*)?(?:(?:<!--.*?-->|<!doctype[^>]*>)\s*)*<svg[\s>/]",
    re.IGNORECASE | re.DOTALL,
)
_SVG_TAG = re.compile(rb"<svg[\s>/]", re.IGNORECASE)
_HTML_TAG = re.compile(rb"<html[\s>]", re.IGNORECASE)
_SVG_SNIFF_BYTES = 1024


@dataclass(frozen=True)
class InputSpec:
    """What the model expects, read from its variant: small, frozen and picklable for the worker pool."""

    crop_size: int  # branch 0's side: 240 (or 408)
    resize_size: int  # shorter side before the centre crop: floor(crop_size / crop_pct)
    branch_sizes: tuple[int, int]  # (240, 224) or (408, 384)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if not 0 < self.crop_size <= self.resize_size:
            raise ValueError(f"crop_size={self.crop_size} must be in 1..resize_size={self.resize_size}")
        if self.branch_sizes[0] != self.crop_size:
            raise ValueError(f"branch_sizes[0]={self.branch_sizes[0]} must equal crop_size={self.crop_size}")

    @classmethod
    def from_variant(cls, variant: Variant) -> InputSpec:
        img_size = variant.config.img_size
        return cls(
            crop_size=variant.input_size,
            resize_size=variant.resize_size,
            branch_sizes=(img_size[0], img_size[1]),
            mean=variant.mean,
            std=variant.std,
        )


@dataclass(frozen=True)
class Preprocessed:
    """One image ready for the model, and its size as the client sees it (after EXIF orientation)."""

    pixels: torch.Tensor  # (3, 240, 240) float32, normalised: branch 0's input; branch 1's is derived from it
    width: int
    height: int
    format: str  # one of ALLOWED_FORMATS


def preprocess(
    data: bytes, spec: InputSpec, *, max_pixels: int, index: int | None = None, draft: bool = True
) -> Preprocessed:
    """Check, decode and convert one uploaded image; every error names `index`, the image's place in the request.

    Args:
        draft: let large JPEGs decode at a reduced scale (see DRAFT_SAFETY_FACTOR); off for exact parity.
    """
    with _open_checked(data, max_pixels=max_pixels, index=index) as image:  # closing frees the pixels
        fmt = _PIL_ALIASES.get(str(image.format), str(image.format))
        width, height = image.size
        rgb, swapped = _decode_rgb(image, spec, draft=draft, index=index)
        x = _branch0(rgb, spec)  # (3, 240, 240)
    if swapped:
        width, height = height, width
    return Preprocessed(pixels=x, width=width, height=height, format=fmt)


def _open_checked(data: bytes, *, max_pixels: int, index: int | None) -> ImageFile.ImageFile:
    """Identify the image from its header and refuse it before decoding when it is not wanted."""
    try:
        image = Image.open(io.BytesIO(data))
    except _BOMB as exc:
        match = _PIL_PIXELS.search(str(exc))
        size = f"{int(match.group(1))} pixels" if match else "too many pixels"
        raise ImageTooLargeError(f"image has {size}; the limit is {max_pixels} pixels", index=index) from None
    except UnidentifiedImageError:
        if _looks_like_svg(data):
            raise UnsupportedMediaTypeError(
                "SVG images are not supported; send a raster image (JPEG, PNG, WebP, GIF, BMP or TIFF)",
                index=index, code="unsupported_image_format",
            ) from None
        raise InvalidImageError(
            f"not a readable image ({len(data)} bytes); send JPEG, PNG, WebP, GIF, BMP or TIFF", index=index
        ) from None
    except _DECODE_ERRORS:
        raise InvalidImageError("not a readable image: its header is corrupt", index=index) from None

    fmt = _PIL_ALIASES.get(str(image.format), str(image.format))
    width, height = image.size
    if fmt not in ALLOWED_FORMATS:
        image.close()
        raise UnsupportedMediaTypeError(
            f"{image.format} images are not supported; send one of {', '.join(sorted(ALLOWED_FORMATS))}",
            index=index, code="unsupported_image_format",
        )
    if width * height > max_pixels:
        image.close()
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels", index=index
        )
    if width * height == 0:
        image.close()
        raise InvalidImageError(f"image is {width}x{height}: it has no pixels", index=index)
    return image


def _looks_like_svg(data: bytes) -> bool:
    """An SVG document, or text with an <svg> element near its start that is not an HTML page."""
    if _SVG_ROOT.match(data[: 8 * _SVG_SNIFF_BYTES]):
        return True
    head = data[:_SVG_SNIFF_BYTES]
    svg = _SVG_TAG.search(head)
    html = _HTML_TAG.search(head)
    return svg is not None and (html is None or html.start() > svg.start())


def _decode_rgb(
    image: ImageFile.ImageFile, spec: InputSpec, *, draft: bool, index: int | None
) -> tuple[Image.Image, bool]:
    """Decode the first frame upright as 8-bit RGB; also whether the EXIF orientation swapped its sides."""
    if draft and image.format in ("JPEG", "MPO"):
        # Pillow picks the smallest 1/2^k scale whose sides are >= the requested size.
        side = math.ceil(DRAFT_SAFETY_FACTOR * spec.resize_size)
        image.draft(image.mode, (side, side))
    try:
        image.load()
        stored_size = image.size
        ImageOps.exif_transpose(image, in_place=True)  # no copy, and none when upright
    except _BOMB:
        raise ImageTooLargeError("image has too many pixels to decode", index=index) from None
    except _DECODE_ERRORS:
        raise InvalidImageError("image data is truncated or corrupt: cannot decode its pixels", index=index) from None
    swapped = image.size != stored_size
    try:
        return _to_rgb(image), swapped
    except ValueError:  # a mode PIL cannot convert
        raise UnsupportedMediaTypeError(
            f"{image.format} images with pixel mode {image.mode} are not supported",
            index=index, code="unsupported_image_format",
        ) from None


def _resize_crop(rgb: Image.Image, full: tuple[int, int], offset: tuple[int, int], crop: int) -> np.ndarray:
    """`rgb` resized to `full` and cropped at `offset`, bit for bit, resampling little outside the crop.

    PIL resizes in two passes, horizontal then vertical, with an 8-bit intermediate; each output
    row or column depends only on its own filter coefficients. So the horizontal pass runs only on
    the band of rows the crop's output rows read, the vertical pass only on the crop's columns,
    and every pass keeps the full resize's geometry (no box= offsets, whose float rounding would
    move about 1 value in 5000 by one step). 640x480: about a third less work; portrait photos more.
    """
    width, height = rgb.size
    (new_width, new_height), (left, top) = full, offset
    if new_height == height:
        r0, r1 = top, top + crop
    else:  # the input rows the crop's output rows read (PIL's precompute_coeffs), and a margin
        scale = height / new_height
        support = _BICUBIC_SUPPORT * max(scale, 1.0)
        r0 = max(0, math.floor((top + 0.5) * scale - support) - 2)
        r1 = min(height, math.ceil((top + crop - 0.5) * scale + support) + 2)
    band = rgb.crop((0, r0, width, r1))
    if new_width != width:
        band = band.resize((new_width, r1 - r0), Image.Resampling.BICUBIC)  # the horizontal pass only
    band = band.crop((left, 0, left + crop, r1 - r0))
    if new_height == height:
        return np.asarray(band)
    canvas = Image.new(band.mode, (crop, height))
    canvas.paste(band, (0, r0))  # rows outside the band feed only output rows outside the crop
    return np.asarray(canvas.resize((crop, new_height), Image.Resampling.BICUBIC))[top:top + crop]


def _resize_region(rgb: Image.Image, full: tuple[int, int], offset: tuple[int, int], crop: int) -> Image.Image:
    """The crop x crop region at `offset` of `rgb` resized to `full`, computing only that region.

    PIL's box resize matches resize-then-crop to within two 8-bit steps, except when the width
    is upscaled (a tall image narrower than the resize target), where it rounds its 8-bit
    intermediate differently (up to 18 levels on noise). There, two explicit one-axis passes,
    horizontal then vertical, match it again; only the rows the vertical filter reaches are read.
    """
    width, height = rgb.size
    sx, sy = width / full[0], height / full[1]
    x0, x1 = offset[0] * sx, (offset[0] + crop) * sx
    y0, y1 = offset[1] * sy, (offset[1] + crop) * sy
    if sx >= 1.0:
        return rgb.resize((crop, crop), Image.Resampling.BICUBIC, box=(x0, y0, x1, y1))
    reach = 2.0 * max(sy, 1.0) + 2  # bicubic support (2 taps each side, scaled when reducing) + margin
    r0, r1 = max(0, math.floor(y0 - reach)), min(height, math.ceil(y1 + reach))
    band = rgb.crop((0, r0, width, r1))
    band = band.resize((crop, r1 - r0), Image.Resampling.BICUBIC, box=(x0, 0, x1, r1 - r0))
    return band.resize((crop, crop), Image.Resampling.BICUBIC, box=(0, y0 - r0, crop, y1 - r0))


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB by the rules in the module docstring."""
    mode = image.mode
    if mode in ("P", "L", "RGB") and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"  # palette or colour-key transparency -> alpha
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES:
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, BACKGROUND)
        rgb.paste(rgba, mask=rgba)  # the mask is rgba's alpha band
        return rgb
    if mode == "I" or mode.startswith("I;16"):
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535), exact
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _branch0(rgb: Image.Image, spec: InputSpec) -> torch.Tensor:
    """timm's eval transform on a PIL RGB image: Resize(resize_size, BICUBIC), CenterCrop, ToTensor, Normalize."""
    width, height = rgb.size
    size = spec.resize_size
    # torchvision's Resize(int): the shorter side becomes `size`, the longer int(size * long / short).
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    crop = spec.crop_size
    top = int(round((new_height - crop) / 2.0))  # torchvision's CenterCrop offsets
    left = int(round((new_width - crop) / 2.0))
    if max(new_width, new_height) <= MAX_RESIZE_ASPECT * size:
        pixels = _resize_crop(rgb, (new_width, new_height), (left, top), crop)  # (240, 240, 3) uint8
    else:  # a 100000x1 PNG would resize to 27 gigapixels: compute only the crop
        pixels = np.asarray(_resize_region(rgb, (new_width, new_height), (left, top), crop))
    x = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)  # (3, 240, 240), a copy
    # The same float32 operations, in order, as ToTensor + Normalize (elementwise IEEE operations give
    # the same bits in numpy as in torch); numpy, because torch would start its thread pool here.
    x /= np.float32(255)
    x -= np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    x /= np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    return torch.from_numpy(x)
