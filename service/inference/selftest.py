"""The end-to-end self-test, parent side: the golden images' bytes through the served path.

The bytes are decoded by the same function requests use (`Engine`'s, with its EXIF handling, resize,
crop and normalisation, and the test-only fault hook), run as a batch on one worker through its
shared-memory slots, and the answers compared with the worker's golden record (service/golden) in the
tolerance of the worker's mode, with the class names this server answers with. The pool runs it on
every worker start, before the worker takes work, and on demand (POST /v1/admin/self-test).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from ..golden import GoldenRecord, SelfTestResult, compare, golden_images, golden_pixels, tolerance_for

__all__ = ["SelfTest"]

Infer = Callable[[np.ndarray], Awaitable[np.ndarray]]  # (n, 3, S, S) pixels -> (n, 2, C) logits on one worker


class SelfTest:
    def __init__(self, decode: Callable[[bytes], np.ndarray], labels: Sequence[str]) -> None:
        self._decode = decode
        self._labels = labels

    async def run(self, record: GoldenRecord, mode: str, device: str, infer: Infer) -> tuple[SelfTestResult, float]:
        """The verdict for a worker serving `mode`, and the seconds it took (decode included)."""
        started = time.perf_counter()
        shipped = tuple(image.name for image in golden_images())
        if record.images != shipped:  # a record from another release's image set: a clear refusal beats a mismatch
            raise ValueError(f"the golden record holds {', '.join(record.images)}; this release ships "
                             f"{', '.join(shipped)}: prepare the model again")
        pixels = await asyncio.to_thread(golden_pixels, self._decode)
        served = await infer(pixels)
        result = compare(record, served, self._labels, tolerance_for(mode, device))
        return result, time.perf_counter() - started

