"""The end-to-end self-test's parts: golden images, the reference answers recorded for them, and the
comparison that admits a worker's mode. The parent runs the check (service/inference/selftest.py);
the worker side records or loads the reference."""

from .check import EXACT, QUANTIZED, REDUCED, SelfTestResult, Tolerance, compare, tolerance_for
from .record import TOP_K, GoldenImage, GoldenRecord, golden_images, golden_pixels, record_golden, reference_decode

__all__ = [
    "EXACT",
    "QUANTIZED",
    "REDUCED",
    "TOP_K",
    "GoldenImage",
    "GoldenRecord",
    "SelfTestResult",
    "Tolerance",
    "compare",
    "golden_images",
    "golden_pixels",
    "record_golden",
    "reference_decode",
    "tolerance_for",
]
