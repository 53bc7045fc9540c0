"""Image bytes -> checked image -> per-branch tensors, numerically identical to timm's eval transform.

`preprocess` is the one entry point; the service calls it from a thread pool, so it is a pure
function of its arguments and changes no global state (PIL's settings and warning filters included).

1. Header (``Image.open`` is lazy and reads only the header; it may try only the ALLOWED_FORMATS'
   parsers, so no other plugin ever parses a client's bytes): an image those parsers cannot identify
   is 415 ``unsupported_image_format`` when its signature names another format PIL knows (SVG,
   sniffed; ICO, PCX, PPM, a TGA footer, ...), else 422 ``invalid_image`` (SPIDER has no signature);
   whatever a parser raises (OverflowError, MemoryError, ...) is 422. A TIFF whose first directory
   lists more than MAX_TIFF_BLOCKS strips or tiles is 413 ``image_too_large``, read from the header
   before Pillow builds a record per block. More than ``max_pixels`` pixels is 413, before any pixel
   is decoded. PIL's own check inside ``Image.open`` (``Image.MAX_IMAGE_PIXELS`` = 89.5 MP: a
   DecompressionBombWarning past it, an error past twice it) is caught and answered 413 as well; keep
   ``max_pixels`` below 89.5 MP (the default 40 MP is) so PIL's warning never fires first. Then an
   image whose decode, conversion and resize would need more than DECODE_BYTES_PER_PIXEL x
   ``max_pixels`` bytes (``decode_bytes``, from its mode and size) is 413 too: each decoding thread
   holds at most that much.
2. Decode: the first frame (GIF, animated WebP, multi-page TIFF); large JPEGs at a reduced DCT scale
   (draft mode, see DRAFT_SAFETY_FACTOR); EXIF orientation applied; then to 8-bit RGB:
   - RGB as is; 1, P, CMYK, YCbCr, LAB, HSV through PIL's ``convert("RGB")``, as timm does;
   - alpha (RGBA, LA, PA, P or L/RGB with a ``transparency`` key) composited over BACKGROUND;
     timm's ``convert("RGB")`` drops alpha instead, showing whatever colour transparent pixels hold;
   - 16-bit integers (I;16, I;16B, I;16L, I;16N, and I, PIL's mode for 16- and 32-bit integer data):
     clipped to [0, 65535], scaled by 255 / 65535 and rounded, so a 16-bit gradient stays a gradient
     (PIL's ``convert`` clips at 255);
   - F (float): a [0, 1] image (max <= 1.0) is scaled by 255; then clipped to [0, 255] and rounded;
   - both a strip of rows at a time, to 8-bit L. L (and so these) stays L through the resize, its
     one channel then tripled: bit for bit what ``convert("RGB")`` before the resize gives (PIL
     resamples each channel alike), at a quarter of the memory.
   A decode whose request is gone stops at its next checkpoint (each read of the upload, each stage,
   each strip) with DecodeCancelled, so abandoned work frees the decode threads.
3. Tensors, as timm's ``create_transform`` for the variant: shorter side to ``resize_size`` with PIL's
   bicubic (torchvision's ``Resize`` on a PIL image), centre crop to ``crop_size`` (torchvision's
   offsets), ``/ 255``, normalise -> the (3, 240, 240) input. Branch 1's 224 px input is derived from it
   by the worker (inside the model graph), exactly what the model does with a single input.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from model.variants import Variant

from ..errors import ImageTooLargeError, InvalidImageError, UnsupportedMediaTypeError

__all__ = [
    "ALLOWED_FORMATS",
    "BACKGROUND",
    "DECODE_BYTES_PER_PIXEL",
    "DRAFT_SAFETY_FACTOR",
    "MAX_TIFF_BLOCKS",
    "DecodeCancelled",
    "InputSpec",
    "Preprocessed",
    "decode_bytes",
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

# An image may cost at most this many bytes per allowed pixel (max_pixels) to decode, convert and
# resize: what the largest allowed RGB image costs (PIL stores RGB in 4 bytes, and the resize copies
# up to as much again). So one decode thread holds at most 8 x MAX_IMAGE_PIXELS (320 MB at 40 MP).
DECODE_BYTES_PER_PIXEL = 8
# Strips or tiles in a TIFF's first directory: Pillow builds a Python record per block inside
# Image.open (a 1x4000000 TIFF with a strip per row: 13 s and 1.3 GB before any pixel). Pillow's
# own writer makes 64 kB strips (about 1800 for 40 MP RGB); a strip per row of an 8000-row photo is 8000.
MAX_TIFF_BLOCKS = 1 << 16

MAX_EXIF_BYTES = 65_535  # a JPEG's EXIF segment holds at most this; a PNG eXIf chunk or WebP EXIF could hold MBs
_PIL_ALIASES = {"MPO": "JPEG"}  # multi-picture JPEGs (many phone cameras); the first picture is a JPEG
# The plugins Image.open may try, so no other parser (SPIDER, TGA, ...) ever reads a client's bytes.
_OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG's opener also returns MPO
_FOOTERS = {b"TRUEVISION-XFILE.\x00": "TGA"}  # formats without a leading signature that end in one
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_GRAY = ("I", "F")  # besides I;16*: converted to 8-bit gray in strips of rows
_STRIP_PIXELS = 1 << 20  # pixels per strip of that conversion: a few MB of temporaries
# Whatever a decoder raises on hostile bytes (OverflowError on an infinite header field, MemoryError
# on an absurd allocation, ...) is the image's fault: 422, never a 500.
_DECODE_ERRORS = (Exception,)
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

    pixels: np.ndarray  # (3, 240, 240) float32, normalised: branch 0's input; branch 1's is derived from it
    width: int
    height: int
    format: str  # one of ALLOWED_FORMATS


class DecodeCancelled(BaseException):  # noqa: N818 - a signal like CancelledError, not an error
    """The request this decode serves is gone; raised at the next checkpoint so the thread is freed.

    A BaseException, so that no decoder's ``except Exception`` swallows it.
    """


class _Checkpoints:
    """Where a decode looks whether its request is still wanted: between stages and at every read."""

    def __init__(self, cancelled: threading.Event | None) -> None:
        self._cancelled = cancelled

    def __call__(self) -> None:
        if self._cancelled is not None and self._cancelled.is_set():
            raise DecodeCancelled


class _CheckedBytesIO(io.BytesIO):
    """The upload as a file whose reads are checkpoints: decoders read in blocks of at most 64 kB."""

    def __init__(self, data: bytes, checkpoint: _Checkpoints) -> None:
        super().__init__(data)
        self._checkpoint = checkpoint

    def read(self, size: int | None = -1, /) -> bytes:
        self._checkpoint()
        return super().read(size)


def preprocess(
    data: bytes, spec: InputSpec, *, max_pixels: int, index: int | None = None, draft: bool = True,
    cancelled: threading.Event | None = None,
) -> Preprocessed:
    """Check, decode and convert one uploaded image; every error names `index`, the image's place in the request.

    Args:
        draft: let large JPEGs decode at a reduced scale (see DRAFT_SAFETY_FACTOR); off for exact parity.
        cancelled: once set, the decode stops at its next checkpoint with DecodeCancelled.
    """
    checkpoint = _Checkpoints(cancelled)
    checkpoint()
    with _open_checked(data, max_pixels=max_pixels, index=index, checkpoint=checkpoint) as image:
        fmt = _PIL_ALIASES.get(str(image.format), str(image.format))
        width, height = image.size
        rgb, swapped = _decode_rgb(image, spec, draft=draft, index=index, max_pixels=max_pixels,
                                   checkpoint=checkpoint)
        checkpoint()
        x = _branch0(rgb, spec)  # (3, 240, 240)
    if swapped:
        width, height = height, width
    return Preprocessed(pixels=x, width=width, height=height, format=fmt)


def _open_checked(
    data: bytes, *, max_pixels: int, index: int | None, checkpoint: _Checkpoints
) -> ImageFile.ImageFile:
    """Identify the image from its header and refuse it before decoding when it is not wanted."""
    blocks = _tiff_blocks(data)
    if blocks is not None and blocks > MAX_TIFF_BLOCKS:
        raise ImageTooLargeError(
            f"TIFF image is stored in {blocks} strips or tiles; the limit is {MAX_TIFF_BLOCKS}: "
            "save it with larger strips (any image editor's default does)", index=index,
        )
    try:
        image = Image.open(_CheckedBytesIO(data, checkpoint), formats=_openers())
    except _BOMB as exc:
        match = _PIL_PIXELS.search(str(exc))
        size = f"{int(match.group(1))} pixels" if match else "too many pixels"
        raise ImageTooLargeError(f"image has {size}; the limit is {max_pixels} pixels", index=index) from None
    except UnidentifiedImageError:
        other = "SVG" if _looks_like_svg(data) else _other_format(data)
        if other is not None:
            raise UnsupportedMediaTypeError(
                f"{other} images are not supported; send one of {', '.join(sorted(ALLOWED_FORMATS))}",
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


@functools.cache
def _openers() -> tuple[str, ...]:
    """_OPEN_FORMATS that this Pillow registers: Image.open fails outright on a name it lacks."""
    Image.init()
    return tuple(name for name in _OPEN_FORMATS if name in Image.OPEN)


def _other_format(data: bytes) -> str | None:
    """The format PIL knows that `data` announces, by signature alone: no other plugin parses it.

    Formats with neither a leading signature nor a footer (TGA 1.0, SPIDER, ...) are unidentifiable: 422.
    """
    footer = next((name for footer, name in _FOOTERS.items() if data.endswith(footer)), None)
    if footer is not None:  # more specific than the 4-byte signatures (a TGA's header reads as a CUR's)
        return footer
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if name in _OPEN_FORMATS or name == "MPO" or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # noqa: BLE001 - a signature check that fails has not recognised the file
            continue
    return None


def _tiff_blocks(data: bytes) -> int | None:
    """How many strips or tiles a TIFF's first directory declares, read from its header; None if not a TIFF.

    A few struct reads, so a layout Pillow would expand into millions of records is refused first.
    """
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None:
        return None
    try:
        (magic,) = struct.unpack_from(order + "H", data, 2)
        if magic == 42:  # classic TIFF: 2-byte entry count, 12-byte entries, 4-byte counts
            (ifd,) = struct.unpack_from(order + "I", data, 4)
            (entries,) = struct.unpack_from(order + "H", data, ifd)
            first, size, entry = ifd + 2, 12, order + "HHI"
        elif magic == 43:  # BigTIFF: 8-byte entry count, 20-byte entries, 8-byte counts
            (ifd,) = struct.unpack_from(order + "Q", data, 8)
            (entries,) = struct.unpack_from(order + "Q", data, ifd)
            first, size, entry = ifd + 8, 20, order + "HHQ"
        else:
            return None
        blocks = 0
        for i in range(min(entries, (len(data) - first) // size)):
            tag, _, count = struct.unpack_from(entry, data, first + i * size)
            if tag in (273, 324):  # StripOffsets, TileOffsets
                blocks = max(blocks, count)
        return blocks
    except struct.error:  # truncated: Pillow says what is wrong with it
        return None


def _looks_like_svg(data: bytes) -> bool:
    """An SVG document, or text with an <svg> element near its start that is not an HTML page."""
    if _SVG_ROOT.match(data[: 8 * _SVG_SNIFF_BYTES]):
        return True
    head = data[:_SVG_SNIFF_BYTES]
    svg = _SVG_TAG.search(head)
    html = _HTML_TAG.search(head)
    return svg is not None and (html is None or html.start() > svg.start())


def decode_bytes(mode: str, size: tuple[int, int], *, transparency: bool = False) -> int:
    """Peak bytes of decoding an image of this PIL mode and size, converting it (_to_rgb) and resizing it.

    PIL stores 1, L and P in a byte per pixel, I;16 in two, every other mode in four. The peak is
    the largest of: the decoded image and its EXIF rotation (a second copy for a moment); the decoded
    image and its conversion; the converted image and the resize's band (up to as large again).
    """
    width, height = size
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    gray = mode in _WIDE_GRAY or mode.startswith("I;16") or (mode == "L" and not transparency)
    if transparency and mode in ("P", "L", "RGB"):
        converted = 8  # to RGBA, then composited into RGB
    elif mode in _ALPHA_MODES:
        converted = 4 if mode == "RGBA" else 8
    elif mode in ("L", "RGB"):
        converted = 0  # used as decoded
    else:
        converted = 1 if gray else 4
    out = 1 if gray else 4
    return max(2 * stored, stored + converted, 2 * out) * width * height


@contextlib.contextmanager
def _pixel_errors(index: int | None) -> Iterator[None]:
    """PIL's errors while decoding pixels, as the API's: a bomb is 413, anything else 422."""
    try:
        yield
    except _BOMB:
        raise ImageTooLargeError("image has too many pixels to decode", index=index) from None
    except _DECODE_ERRORS:
        raise InvalidImageError("image data is truncated or corrupt: cannot decode its pixels", index=index) from None


def _decode_rgb(
    image: ImageFile.ImageFile, spec: InputSpec, *, draft: bool, index: int | None, max_pixels: int,
    checkpoint: _Checkpoints,
) -> tuple[Image.Image, bool]:
    """Decode the first frame upright as 8-bit RGB (or L); also whether the EXIF orientation swapped its sides.

    Refuses an image whose decode would need more than DECODE_BYTES_PER_PIXEL x max_pixels bytes,
    from its mode and (drafted) size, before any pixel is decoded.
    """
    full_width, full_height = image.size
    if draft and image.format in ("JPEG", "MPO"):
        # Pillow picks the smallest 1/2^k scale whose sides are >= the requested size.
        side = math.ceil(DRAFT_SAFETY_FACTOR * spec.resize_size)
        image.draft(image.mode, (side, side))
    need = decode_bytes(image.mode, image.size, transparency="transparency" in image.info)
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        # libjpeg holds every DCT coefficient (2 bytes) of a progressive JPEG at full size, draft or not
        need += 2 * len(image.getbands()) * full_width * full_height
    budget = DECODE_BYTES_PER_PIXEL * max_pixels
    if need > budget:
        width, height = image.size
        raise ImageTooLargeError(
            f"a {width}x{height} image in pixel mode {image.mode} needs {need // 2**20} MiB to decode; the limit is "
            f"{budget // 2**20} MiB ({DECODE_BYTES_PER_PIXEL} bytes x {max_pixels} pixels): send it smaller"
            + ("" if image.mode == "RGB" else ", or as 8-bit RGB"), index=index,
        )
    with _pixel_errors(index):
        image.load()
    stored_size = image.size
    checkpoint()
    exif_bytes = len(image.info.get("exif", b""))
    if exif_bytes > MAX_EXIF_BYTES:  # PIL would parse every tag of it, whatever the image's size
        raise InvalidImageError(
            f"its EXIF block is {exif_bytes} bytes; at most {MAX_EXIF_BYTES} are read (a JPEG's can be no larger)",
            index=index,
        )
    with _pixel_errors(index):
        ImageOps.exif_transpose(image, in_place=True)  # no copy, and none when upright
    swapped = image.size != stored_size
    checkpoint()
    try:
        rgb = _to_rgb(image, checkpoint)
    except ValueError:  # a mode PIL cannot convert
        raise UnsupportedMediaTypeError(
            f"{image.format} images with pixel mode {image.mode} are not supported",
            index=index, code="unsupported_image_format",
        ) from None
    if rgb is not image:
        image.close()  # frees the decoded pixels before the resize allocates
    return rgb, swapped


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


_LUT16 = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)


def _to_rgb(image: Image.Image, checkpoint: _Checkpoints) -> Image.Image:
    """8-bit RGB by the rules in the module docstring; gray images stay L (resized as one channel, then tripled)."""
    mode = image.mode
    if mode in ("P", "L", "RGB") and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"  # palette or colour-key transparency -> alpha
    if mode in ("RGB", "L"):
        return image
    if mode in _ALPHA_MODES:
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, BACKGROUND)
        rgb.paste(rgba, mask=rgba)  # the mask is rgba's alpha band
        return rgb
    if mode in _WIDE_GRAY or mode.startswith("I;16"):
        return _to_gray8(image, checkpoint)
    return image.convert("RGB")


def _to_gray8(image: Image.Image, checkpoint: _Checkpoints) -> Image.Image:
    """I;16*, I and F as 8-bit L, a strip of rows at a time: whole-image numpy temporaries made a
    40 MP image cost 0.5 GB (and 15 s of integer division); strips cost a few MB.

    Integers: clipped to [0, 65535], then round(v * 255 / 65535) (a lookup table, exact). F: a [0, 1]
    image (max <= 1.0) is scaled by 255; then clipped to [0, 255] and rounded; NaN is 0, +-inf 255 and 0.
    """
    width, height = image.size
    rows = max(1, _STRIP_PIXELS // width)

    def strips() -> Iterator[tuple[int, np.ndarray]]:
        for top in range(0, height, rows):
            checkpoint()
            yield top, np.asarray(image.crop((0, top, width, min(height, top + rows))))

    def finite(values: np.ndarray) -> np.ndarray:
        return np.nan_to_num(values.astype(np.float32, copy=False), nan=0.0, posinf=255.0, neginf=0.0)

    gray = np.empty((height, width), dtype=np.uint8)
    if image.mode == "F":
        unit = max(float(finite(values).max()) for _, values in strips()) <= 1.0
        for top, values in strips():
            scaled = finite(values) * 255.0 if unit else finite(values)
            gray[top:top + len(values)] = np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
    else:
        for top, values in strips():
            gray[top:top + len(values)] = _LUT16[np.clip(values, 0, 65535)]
    return Image.fromarray(gray)


def _branch0(rgb: Image.Image, spec: InputSpec) -> np.ndarray:
    """timm's eval transform on a PIL RGB or L image: Resize(resize_size, BICUBIC), CenterCrop, ToTensor, Normalize."""
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
    if pixels.ndim == 2:  # L: resampled once; its three equal channels are what convert("RGB") then resize give
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    x = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)  # (3, 240, 240), a copy
    # The same float32 operations, in order, as ToTensor + Normalize (elementwise IEEE operations give
    # the same bits in numpy as in torch).
    x /= np.float32(255)
    x -= np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    x /= np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    return x
