"""Splitting a list of images into requests that fit the server's limits (from /v1/models)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Limits", "multipart_size", "plan_batches"]

# What httpx adds around each file part (boundary line, Content-Disposition with the filename,
# Content-Type, blank line, trailing CRLF) and once at the end, rounded up generously.
PART_OVERHEAD_BYTES = 256
BODY_OVERHEAD_BYTES = 64


@dataclass(frozen=True)
class Limits:
    max_images_per_request: int
    max_upload_bytes: int

    @classmethod
    def from_model_card(cls, card: dict[str, Any]) -> Limits:
        return cls(int(card["max_images_per_request"]), int(card["max_upload_bytes"]))


def multipart_size(filename: str, size: int) -> int:
    """An upper bound of the bytes one file part adds to a multipart body."""
    return size + len(filename.encode()) + PART_OVERHEAD_BYTES


def plan_batches(parts: Sequence[tuple[str, int]], limits: Limits) -> list[list[int]]:
    """Indices of `(filename, size)` parts grouped in order into requests under both limits.

    A part too large to fit any request goes alone: the server refuses it with 413, which is
    then that image's own error rather than its neighbours'.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    current_bytes = BODY_OVERHEAD_BYTES
    for index, (filename, size) in enumerate(parts):
        part_bytes = multipart_size(filename, size)
        full = len(current) >= limits.max_images_per_request
        if current and (full or current_bytes + part_bytes > limits.max_upload_bytes):
            batches.append(current)
            current, current_bytes = [], BODY_OVERHEAD_BYTES
        current.append(index)
        current_bytes += part_bytes
    if current:
        batches.append(current)
    return batches
