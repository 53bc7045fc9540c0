"""How long a worker may take before it counts as hung: measured batch times, a multiplier, a floor.

A stuck CUDA call, a runtime deadlock or a stopped process looks, from the parent, like a batch
that never finishes. Each finished batch is a sample; a batch of n images is expected to take
the p99 of what those samples predict for n, and may run `multiplier` times that (never less
than `floor_s`) before its worker is killed. Until enough batches have run, the worker's own
warm-up (a full batch among others, timed at start-up) stands in as a generous first sample.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["InferenceTimes", "WatchdogConfig"]

WINDOW = 256  # recent batches per device kind
MIN_SAMPLES = 16  # fewer measured batches than this: the warm-up time still counts


@dataclass(frozen=True)
class WatchdogConfig:
    floor_s: float = 5.0  # the least a batch may run, and how long an idle worker has to answer a ping
    multiplier: float = 10.0  # times the expected (p99) batch time
    start_timeout_s: float = 120.0  # a start (load, convert, compile, guard, warm-up) may take this long

    @property
    def scan_interval_s(self) -> float:
        """How often the pool looks: a fraction of the floor, so a hang is seen soon after its limit."""
        return min(1.0, self.floor_s / 4)


class InferenceTimes:
    """Recent (images, seconds) of finished batches on one device kind, and the warm-up's time."""

    def __init__(self) -> None:
        self._samples: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self._warm_up: tuple[int, float] | None = None

    def record(self, images: int, seconds: float) -> None:
        self._samples.append((max(1, images), seconds))

    def record_warm_up(self, images: int, seconds: float) -> None:
        """A worker's warm-up ran a full batch of `images` (and smaller ones) in `seconds`: an upper bound
        of one batch."""
        self._warm_up = (max(1, images), seconds)

    def expected_s(self, images: int) -> float | None:
        """p99 of the time the samples predict for `images`: a larger batch scales a sample up
        linearly, a smaller one is taken to cost as much as the sample (batches are not cheaper
        per image when small)."""
        samples = list(self._samples)
        if len(samples) < MIN_SAMPLES and self._warm_up is not None:
            samples.append(self._warm_up)
        if not samples:
            return None
        predictions = sorted(seconds * max(1.0, images / n) for n, seconds in samples)
        return predictions[max(0, math.ceil(0.99 * len(predictions)) - 1)]

    def limit_s(self, images: int, config: WatchdogConfig) -> float:
        expected = self.expected_s(images)
        return config.floor_s if expected is None else max(config.floor_s, config.multiplier * expected)
