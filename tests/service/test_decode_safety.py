"""Hostile images (issue 14): decoders see only accepted formats, TIFF layouts and decode memory are
bounded before pixels are decoded, every decoder failure is a 4xx, and abandoned decodes stop.

Unit tests call `preprocess`; the findings about the server run against the real one (`start_cli`,
a subprocess, so that /proc/<pid>/status shows the API process's own peak RSS).
"""

from __future__ import annotations

import io
import math
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from model.variants import get_variant
from service.errors import ImageTooLargeError, InvalidImageError, UnsupportedMediaTypeError
from service.imaging.preprocess import (
    DECODE_BYTES_PER_PIXEL,
    MAX_TIFF_BLOCKS,
    DecodeCancelled,
    InputSpec,
    decode_bytes,
    preprocess,
)
from tests.conftest import CliServer, Reference, start_cli
from tests.photos import encode, photo, resized

MAX_PIXELS = 40_000_000
SIDE = (7300, 5479)  # 39,996,700 pixels: as large as the default limit allows
PREPROCESS_THREADS = 2


@pytest.fixture(scope="module")
def spec() -> InputSpec:
    return InputSpec.from_variant(get_variant("crossvit_tiny_240"))


# -- crafted files ---------------------------------------------------------------------------------


def tiff_one_block_per_row(rows: int, *, order: str = "<", big: bool = False, tiles: bool = False) -> bytes:
    """An uncompressed 1-pixel-wide 8-bit gray TIFF with a strip (or a 1x1 tile) per row: `rows` offsets."""
    width, fmt = 1, {"<": "II", ">": "MM"}[order]
    tags = [(256, 4, 1, width), (257, 4, 1, rows), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (277, 3, 1, 1)]
    tags += [(322, 4, 1, 1), (323, 4, 1, 1)] if tiles else [(278, 4, 1, 1)]
    count_fmt, field, head = ("Q", "Q", 16) if big else ("H", "I", 8)
    entry_size = 4 + 2 * struct.calcsize(field)
    ifd_size = struct.calcsize(count_fmt) + (len(tags) + 1) * entry_size + struct.calcsize(field)
    offsets_at = head + ifd_size
    data_at = offsets_at + 4 * rows
    tags.append((324 if tiles else 273, 4, rows, offsets_at))
    tags.sort()

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        # a single value sits left-justified in the value field; an array's offset fills it
        packed = struct.pack(order + ("H" if kind == 3 else "I"), value) if count == 1 else struct.pack(
            order + field, value)
        return struct.pack(order + "HH" + field, tag, kind, count) + packed.ljust(struct.calcsize(field), b"\0")

    header = (fmt.encode() + struct.pack(order + "HHHQ", 43, 8, 0, head) if big
              else fmt.encode() + struct.pack(order + "HI", 42, head))
    ifd = struct.pack(order + count_fmt, len(tags)) + b"".join(entry(*t) for t in tags) + bytes(struct.calcsize(field))
    offsets = (data_at + np.arange(rows, dtype=np.uint32) * width).astype(order + "u4").tobytes()
    return header + ifd + offsets + bytes(width * rows)


def spider(*, stack: float = 0.0, side: float = 10.0) -> bytes:
    """A SPIDER file (big-endian float header, no magic number): a side x side 2D image, or `stack` in field 24."""
    header = [0.0] * 27  # field k (1-based) is header[k - 1]
    header[0], header[1], header[4], header[11] = 1.0, side, 1.0, side  # nslice, nrow, iform 1 (2D), nsam
    lenbyt = side * 4  # header records as long as a row
    labrec = float(math.ceil(struct.calcsize(">27f") / lenbyt))
    header[12], header[21], header[22] = labrec, labrec * lenbyt, lenbyt
    header[23] = stack
    body = struct.pack(">27f", *header)
    body += bytes(int(labrec * lenbyt) - len(body)) if labrec * lenbyt > len(body) else b""
    return body + np.linspace(0, 1, int(side * side), dtype=">f4").tobytes()


def png16(size: tuple[int, int] = SIDE) -> bytes:
    """A 16-bit gray PNG (PIL mode I;16) of a horizontal gradient: 80 MB of pixels in about 90 kB."""
    width, height = size
    row = np.linspace(0, 65535, width).round().astype(np.uint16)
    image = Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (height, width))))
    assert image.mode == "I;16"
    return encode(image, "PNG", compress_level=9)


# -- formats ---------------------------------------------------------------------------------------


def test_a_spider_header_with_an_infinite_field_is_422(spec: InputSpec) -> None:
    """Pillow's SPIDER parser raised OverflowError (int(inf)) out of Image.open: a 500."""
    with pytest.raises(InvalidImageError) as caught:
        preprocess(spider(stack=float("inf")), spec, max_pixels=MAX_PIXELS, index=3)
    assert (caught.value.status, caught.value.code, caught.value.index) == (422, "invalid_image", 3)


def _png_with_exif(entries: int) -> bytes:
    """An 8x8 PNG with an eXIf chunk: a TIFF header and one LONG tag of `entries` values."""
    png = encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG")
    exif = (b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x9999, 4, entries, 26)
            + struct.pack("<I", 0) + bytes(4 * entries))
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    end = png.index(b"IEND") - 4
    return png[:end] + chunk + png[end:]


def test_a_huge_exif_block_is_refused_before_pil_parses_it(spec: InputSpec) -> None:
    """An 8x8 PNG with a 16 MB eXIf chunk: PIL's getexif would read all 4 M values (200+ MiB, GIL held)."""
    started = time.perf_counter()
    with pytest.raises(InvalidImageError, match="EXIF block is"):
        preprocess(_png_with_exif(4_000_000), spec, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - started < 0.3
    preprocess(_png_with_exif(100), spec, max_pixels=MAX_PIXELS)  # an ordinary EXIF block is read


def test_a_valid_spider_image_is_never_parsed(spec: InputSpec) -> None:
    """Only the accepted formats' parsers read a client's bytes: a SPIDER file (no signature) is not
    identified at all (422), where before Pillow's SPIDER parser read it and it was named (415)."""
    data = spider()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "SPIDER" and image.size == (10, 10)  # Pillow would read it
    with pytest.raises(InvalidImageError) as caught:
        preprocess(data, spec, max_pixels=MAX_PIXELS)
    assert caught.value.code == "invalid_image" and "not a readable image" in caught.value.message


@pytest.mark.parametrize("pil_format", ["PCX", "ICO", "PPM", "SGI", "TGA", "DDS", "QOI"])
def test_other_formats_pil_knows_are_415_by_signature(pil_format: str, spec: InputSpec) -> None:
    image = resized(photo(), 64, 48)
    data = encode(image.convert("RGBA") if pil_format == "DDS" else image, pil_format)
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        preprocess(data, spec, max_pixels=MAX_PIXELS, index=1)
    assert (caught.value.status, caught.value.code) == (415, "unsupported_image_format")
    assert pil_format in caught.value.message


# -- TIFF layout -----------------------------------------------------------------------------------


TIFF_LAYOUTS = {  # byte order, BigTIFF, tiles
    "strips": ("<", False, False), "big-endian": (">", False, False), "bigtiff": ("<", True, False),
    "tiles": ("<", False, True),
}


@pytest.mark.parametrize(("order", "big", "tiles"), list(TIFF_LAYOUTS.values()), ids=list(TIFF_LAYOUTS))
def test_a_tiff_with_a_strip_per_row_is_refused_before_pillow_expands_it(
    order: str, big: bool, tiles: bool, spec: InputSpec
) -> None:
    """1x1,000,000 with a strip per row: Pillow built a million tile records in Image.open (4 s,
    +370 MB here, and 13 s, 1.3 GB at 3.5 million) and then decoded it. Now 413 from the header."""
    data = tiff_one_block_per_row(1_000_000, order=order, big=big, tiles=tiles)
    begun = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as caught:
        preprocess(data, spec, max_pixels=MAX_PIXELS, index=0)
    assert time.perf_counter() - begun < 0.5
    assert (caught.value.status, caught.value.code) == (413, "image_too_large")
    assert "1000000 strips or tiles" in caught.value.message


@pytest.mark.parametrize(("order", "big", "tiles"), list(TIFF_LAYOUTS.values()), ids=list(TIFF_LAYOUTS))
def test_a_tiff_at_the_block_limit_still_decodes(order: str, big: bool, tiles: bool, spec: InputSpec) -> None:
    data = tiff_one_block_per_row(MAX_TIFF_BLOCKS, order=order, big=big, tiles=tiles)
    with Image.open(io.BytesIO(data)) as image:  # the crafted file is a real TIFF
        assert image.format == "TIFF" and len(image.tile) == MAX_TIFF_BLOCKS
    result = preprocess(data, spec, max_pixels=MAX_PIXELS)
    assert (result.width, result.height) == (1, MAX_TIFF_BLOCKS) and np.isfinite(result.pixels).all()


# -- decode memory by mode -------------------------------------------------------------------------


def test_decode_memory_is_bounded_by_mode_not_only_by_pixels(spec: InputSpec) -> None:
    """At a 1 MP limit the budget is 8 MB: 1000x1000 RGB (decoded 4 B/pixel, plus the resize's band)
    fits; LA (stored in 4 bytes, then RGBA, then RGB: 12 B/pixel) does not, though its pixels do."""
    limit = 1_000_000
    rgb = Image.fromarray(np.full((1000, 1000, 3), 90, np.uint8))
    assert decode_bytes("RGB", (1000, 1000)) == DECODE_BYTES_PER_PIXEL * limit
    assert preprocess(encode(rgb, "PNG"), spec, max_pixels=limit).width == 1000

    la = encode(rgb.convert("LA"), "PNG")
    with pytest.raises(ImageTooLargeError) as caught:
        preprocess(la, spec, max_pixels=limit, index=4)
    assert (caught.value.status, caught.value.index) == (413, 4)
    assert "pixel mode LA needs 11 MiB to decode; the limit is 7 MiB" in caught.value.message
    assert preprocess(la, spec, max_pixels=2 * limit).width == 1000


def test_a_progressive_jpeg_counts_its_coefficients(spec: InputSpec) -> None:
    """libjpeg keeps a progressive JPEG's every coefficient at full size, draft mode or not (40 MP
    4:4:4: +232 MiB measured): 6 B/pixel for RGB on top of the decode (here 8 + 6 B/pixel)."""
    image = resized(photo(), 1000, 1000)
    baseline, progressive = encode(image, "JPEG", quality=90), encode(image, "JPEG", quality=90, progressive=True)
    assert preprocess(baseline, spec, max_pixels=1_000_000).width == 1000
    with pytest.raises(ImageTooLargeError):
        preprocess(progressive, spec, max_pixels=1_000_000)
    assert preprocess(progressive, spec, max_pixels=2_000_000).width == 1000  # 14 MB of 16


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from Linux's /proc")
def test_a_16_bit_image_decodes_within_its_estimate(tmp_path: Path) -> None:
    """40 MP I;16: whole-image numpy temporaries held +534 MB (and took 19 s); in strips the peak
    stays within decode_bytes' estimate (4 B/pixel: the decode and its rotation). A fresh process,
    so that nothing else counts."""
    path = tmp_path / "16-bit.png"
    path.write_bytes(png16())
    script = (
        "import re, sys\n"
        "from model.variants import get_variant\n"
        "from service.imaging.preprocess import InputSpec, preprocess\n"
        "def hwm(): return int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
        "spec = InputSpec.from_variant(get_variant('crossvit_tiny_240'))\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = hwm()\n"
        "assert preprocess(data, spec, max_pixels=40_000_000).width == 7300\n"
        "print(before, hwm())\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300,
                          check=False, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    estimate = decode_bytes("I;16", SIDE)
    assert estimate == 4 * SIDE[0] * SIDE[1] <= DECODE_BYTES_PER_PIXEL * MAX_PIXELS
    assert after - before <= estimate, f"+{(after - before) >> 20} MiB, estimate {estimate >> 20} MiB"


# -- cancellation ----------------------------------------------------------------------------------


def test_a_cancelled_decode_stops_at_its_next_checkpoint(spec: InputSpec) -> None:
    gone = threading.Event()
    gone.set()
    with pytest.raises(DecodeCancelled):
        preprocess(encode(photo(), "PNG"), spec, max_pixels=MAX_PIXELS, cancelled=gone)
    assert preprocess(encode(photo(), "PNG"), spec, max_pixels=MAX_PIXELS, cancelled=threading.Event()).width == 451


# -- the real server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heavy() -> bytes:
    return png16()


@pytest.fixture(scope="module")
def served(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    """The CLI server (its own process): CPU, one torch worker, two decode threads, a deadline long
    enough for 16 maximal decodes on a loaded CI machine."""
    with start_cli(tmp_path_factory.mktemp("decode-safety"), weights=reference.checkpoint, device="cpu",
                   backend="torch", workers=1, threads_per_worker=1, preprocess_threads=PREPROCESS_THREADS,
                   request_timeout_s=300, log_level="warning") as server:
        yield server


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def preprocess_count(client: httpx.Client) -> float:
    """How many decodes ran to the end (ok or refused), from /metrics."""
    match = re.search(r"^crossvit_preprocess_seconds_count (\S+)$", client.get("/metrics").text, re.MULTILINE)
    assert match is not None
    return float(match.group(1))


def classify(client: httpx.Client, images: list[bytes], **headers: str) -> httpx.Response:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return client.post("/v1/classify", files=files, headers=headers)


def test_server_answers_decoder_failures_with_4xx(served: CliServer) -> None:
    with httpx.Client(base_url=served.url, timeout=60) as client:
        cases = [
            (spider(stack=float("inf")), 422, "invalid_image"),
            (encode(resized(photo(), 64, 48), "PCX"), 415, "unsupported_image_format"),
            (tiff_one_block_per_row(1_000_000), 413, "image_too_large"),
        ]
        for data, status, code in cases:
            response = classify(client, [encode(photo(), "PNG"), data])
            assert response.status_code == status, response.text
            assert response.json()["error"]["code"] == code and response.json()["error"]["index"] == 1


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from Linux's /proc")
def test_sixteen_maximal_16_bit_images_stay_within_the_decode_memory_bound(
    served: CliServer, heavy: bytes
) -> None:
    """The documented bound: peak RSS grows by at most PREPROCESS_THREADS x 8 B x MAX_IMAGE_PIXELS
    over the idle server (640 MB here). Measured: see README "Operating it"."""
    with httpx.Client(base_url=served.url, timeout=300) as client:
        assert classify(client, [encode(photo(), "PNG")]).status_code == 200  # warm: the first request's allocations
        before = peak_rss(served.process.pid)
        response = classify(client, [heavy] * 16)
        after = peak_rss(served.process.pid)
    assert response.status_code == 200, response.text
    assert [r["width"] for r in response.json()["results"]] == [SIDE[0]] * 16
    growth = after - before
    bound = PREPROCESS_THREADS * DECODE_BYTES_PER_PIXEL * MAX_PIXELS
    assert growth <= bound, f"peak RSS {before >> 20} -> {after >> 20} MiB: +{growth >> 20} MiB, bound +{bound >> 20}"


def test_abandoned_decodes_stop_and_leave_the_pool_free(served: CliServer, heavy: bytes) -> None:
    """Requests of 16 heavy images with X-Request-Timeout-Ms: 1 answer 504 at once; their decodes stop
    (none runs to the end), so a normal request right after is served promptly."""
    small = encode(photo(), "JPEG")
    with httpx.Client(base_url=served.url, timeout=60) as client:
        assert classify(client, [small]).status_code == 200
        decoded = preprocess_count(client)
        for _ in range(8):
            begun = time.perf_counter()
            response = classify(client, [heavy] * 16, **{"X-Request-Timeout-Ms": "1"})
            assert response.status_code == 504 and time.perf_counter() - begun < 1.0
        begun = time.perf_counter()
        response = classify(client, [small])
        waited = time.perf_counter() - begun
        assert response.status_code == 200
        assert waited < 3.0, f"{waited:.2f} s"  # measured 0.16 s; a 40 MP 16-bit decode that ran on: 0.7-19 s
        assert preprocess_count(client) - decoded == 1  # only the normal request's image was decoded to the end


def test_a_disconnected_clients_decodes_stop(served: CliServer, heavy: bytes) -> None:
    """A client that leaves mid-decode: its request is cancelled, and so are its decodes."""
    small = encode(photo(), "JPEG")
    with httpx.Client(base_url=served.url, timeout=60) as client:
        decoded = preprocess_count(client)
        files = [("images", (f"{i}.png", heavy, "image/png")) for i in range(16)]
        with pytest.raises(httpx.ReadTimeout):  # a 40 MP decode takes 0.7 s or more: the client leaves first
            client.post("/v1/classify", files=files, timeout=httpx.Timeout(60, read=0.2))
        begun = time.perf_counter()
        assert classify(client, [small]).status_code == 200
        waited = time.perf_counter() - begun
        assert waited < 3.0, f"{waited:.2f} s"
        assert preprocess_count(client) - decoded == 1  # only the normal request's image
