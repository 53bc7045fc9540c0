"""Per-image cost of `service.imaging.preprocess.preprocess`, and what JPEG draft mode changes in its output.

    .venv/bin/python bench/preprocess_speed.py [--repeats 25] [--variant crossvit_18_dagger_240]

Single thread (torch.set_num_threads(1), as one worker of the service's pool), median of
`--repeats` runs after warm-up. Draft differences: real photos upscaled to 4000x3000 and
1600x1200, JPEG quality 90; max |x_draft - x_full| of the normalised branch-0 tensor, and the
cosine between the logits of a randomly initialised timm crossvit_9_dagger_240 on both (for
scale: the same cosine between two different photos is printed too).
"""

from __future__ import annotations

import argparse
import io
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import PIL
import timm
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_line  # noqa: E402  (bench/, this script's folder)

import service.imaging.preprocess as pp  # noqa: E402
from model.variants import get_variant  # noqa: E402
from tests.photos import encode, photo, resized  # noqa: E402

PHOTOS = ("chelsea", "astronaut", "coffee", "motorcycle_left", "rocket")
FACTORS = (1.0, 2.0, 2.5, 3.0)
MAX_PIXELS = 40_000_000


def median_ms(data: bytes, spec: pp.InputSpec, *, draft: bool, repeats: int) -> float:
    for _ in range(3):
        pp.preprocess(data, spec, max_pixels=MAX_PIXELS, draft=draft)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pp.preprocess(data, spec, max_pixels=MAX_PIXELS, draft=draft)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def median_ms_at(factor: float, data: bytes, spec: pp.InputSpec, *, repeats: int) -> float:
    saved = pp.DRAFT_SAFETY_FACTOR
    pp.DRAFT_SAFETY_FACTOR = factor  # a bench-only override of the module constant
    try:
        return median_ms(data, spec, draft=True, repeats=repeats)
    finally:
        pp.DRAFT_SAFETY_FACTOR = saved


def with_factor(factor: float, data: bytes, spec: pp.InputSpec) -> tuple[torch.Tensor, int]:
    """Branch 0 with draft mode at `factor`, and the shorter side libjpeg decoded at."""
    saved = pp.DRAFT_SAFETY_FACTOR
    pp.DRAFT_SAFETY_FACTOR = factor  # a bench-only override of the module constant
    try:
        x = torch.from_numpy(pp.preprocess(data, spec, max_pixels=MAX_PIXELS).pixels)
    finally:
        pp.DRAFT_SAFETY_FACTOR = saved
    with Image.open(io.BytesIO(data)) as image:
        side = math.ceil(factor * spec.resize_size)  # as preprocess asks for it
        image.draft(image.mode, (side, side))
        return x, min(image.size)


def timing_table(spec: pp.InputSpec, repeats: int) -> None:
    base = photo("chelsea")
    inputs = {
        "640x480 JPEG q90": encode(resized(base, 640, 480), "JPEG", quality=90),
        "4000x3000 JPEG q90": encode(resized(base, 4000, 3000), "JPEG", quality=90),
        "640x480 PNG": encode(resized(base, 640, 480), "PNG"),
    }
    print("| image | bytes | draft off (ms) | draft on (ms) | draft speedup |")
    print("|---|---:|---:|---:|---:|")
    for label, data in inputs.items():
        off = median_ms(data, spec, draft=False, repeats=repeats)
        on = median_ms(data, spec, draft=True, repeats=repeats)
        print(f"| {label} | {len(data):,} | {off:.2f} | {on:.2f} | {off / on:.2f}x |")


def draft_table(spec: pp.InputSpec, repeats: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model("crossvit_9_dagger_240").eval()
    print(f"\n| size | factor | decoded shorter side (x resize {spec.resize_size}) | ms ({PHOTOS[0]}) | "
          "max abs diff, worst photo | mean abs diff, worst photo | min logits cosine |")
    print("|---|---:|---|---:|---:|---:|---:|")
    full_logits: dict[str, torch.Tensor] = {}
    for width, height in ((4000, 3000), (1600, 1200)):
        jpegs = {name: encode(resized(photo(name), width, height), "JPEG", quality=90) for name in PHOTOS}
        full = {name: torch.from_numpy(pp.preprocess(data, spec, max_pixels=MAX_PIXELS, draft=False).pixels)
                for name, data in jpegs.items()}
        with torch.no_grad():
            logits = {name: model(x[None])[0] for name, x in full.items()}
        full_logits.update({f"{name}@{width}": v for name, v in logits.items()})
        for factor in FACTORS:
            diffs, mean_diffs, cosines, sides = [], [], [], set()
            for name, data in jpegs.items():
                x, side = with_factor(factor, data, spec)
                sides.add(side)
                diffs.append(float((x - full[name]).abs().max()))
                mean_diffs.append(float((x - full[name]).abs().mean()))
                with torch.no_grad():
                    cosines.append(float(F.cosine_similarity(model(x[None])[0], logits[name], dim=0)))
            side_text = ", ".join(f"{s} ({s / spec.resize_size:.2f}x)" for s in sorted(sides))
            ms = median_ms_at(factor, jpegs[PHOTOS[0]], spec, repeats=repeats)
            print(f"| {width}x{height} | {factor:g} | {side_text} | {ms:.1f} | {max(diffs):.4f} | "
                  f"{max(mean_diffs):.5f} | {min(cosines):.6f} |")
    pairs = [("chelsea", "coffee"), ("astronaut", "rocket")]
    scale = ", ".join(
        f"{a} vs {b} {float(F.cosine_similarity(full_logits[a + '@4000'], full_logits[b + '@4000'], dim=0)):.4f}"
        for a, b in pairs
    )
    print(f"\nFor scale, the logits cosine between different photos (same random model): {scale}.")
    for width, height in ((4000, 3000), (1600, 1200)):
        image = resized(photo(PHOTOS[0]), width, height)
        q90, q95 = (pp.preprocess(encode(image, "JPEG", quality=q), spec, max_pixels=MAX_PIXELS, draft=False)
                    for q in (90, 95))
        delta = abs(q90.pixels - q95.pixels)
        print(f"Saving the {width}x{height} {PHOTOS[0]} at JPEG quality 95 instead of 90 (no draft) moves "
              f"branch 0 by max {float(delta.max()):.4f}, mean {float(delta.mean()):.5f}.")
    print(f"One 8-bit step after normalisation is 1 / 255 / std = {1 / 255 / max(spec.std):.4f} "
          f"to {1 / 255 / min(spec.std):.4f}. DRAFT_SAFETY_FACTOR is {pp.DRAFT_SAFETY_FACTOR:g}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--variant", default="crossvit_18_dagger_240")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = pp.InputSpec.from_variant(get_variant(args.variant))
    print(f"{cpu_line()}, Python {platform.python_version()}, "
          f"Pillow {PIL.__version__}, torch {torch.__version__}, 1 thread, median of {args.repeats}; "
          f"{args.variant}: resize {spec.resize_size}, crop {spec.crop_size}\n")
    timing_table(spec, args.repeats)
    draft_table(spec, args.repeats)


if __name__ == "__main__":
    main()
