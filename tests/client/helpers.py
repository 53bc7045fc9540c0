"""Folders of real photos and the server's own request counts, for the client, CLI and page tests."""

from __future__ import annotations

from pathlib import Path

import httpx
from PIL import ImageOps
from prometheus_client.parser import text_string_to_metric_families

from tests.photos import encode, photo

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera", "motorcycle_left")


def photo_jpeg(name: str, mirrored: bool = False) -> bytes:
    image = photo(name).convert("RGB")
    return encode(ImageOps.mirror(image) if mirrored else image, "JPEG", quality=85)


def write_photos(folder: Path, count: int = len(PHOTOS)) -> list[Path]:
    """`count` distinct real photos as JPEG files (the originals, then mirrored copies)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        name, mirrored = PHOTOS[i % len(PHOTOS)], i >= len(PHOTOS)
        path = folder / f"{name}{'-mirrored' if mirrored else ''}.jpg"
        path.write_bytes(photo_jpeg(name, mirrored))
        paths.append(path)
    return paths


def counted(url: str, metric: str, label: str, value: str) -> dict[str, float]:
    """The server's own counter samples of `metric` whose `label` is `value`, keyed by their other labels."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == metric and sample.labels.get(label) == value:
                rest = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != label)
                counts[rest] = sample.value
    return counts


def requests_by_status(url: str, route: str = "/v1/classify") -> dict[str, float]:
    """How many requests the server answered on `route`, by status ("200", "422", ...)."""
    return {k.removeprefix("status="): v for k, v in counted(url, "crossvit_requests_total", "route", route).items()}
