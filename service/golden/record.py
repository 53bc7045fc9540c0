"""The golden images and what the reference (PyTorch fp32, the real preprocessing) answered for them.

Recorded once per model source: when the OpenVINO model is prepared (stored in its folder, so a worker
without torch has it), or, for the PyTorch backend, at each worker start. The self-test (check.py)
compares a worker's served answers with it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..imaging.preprocess import InputSpec

__all__ = [
    "TOP_K", "GoldenImage", "GoldenRecord", "golden_images", "golden_pixels", "record_golden", "reference_decode",
    "top_k",
]

TOP_K = 5
# Far above the golden images' sizes: the check must never depend on a server's upload limits.
_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class GoldenImage:
    name: str
    data: bytes


@functools.cache
def golden_images() -> tuple[GoldenImage, ...]:
    """The small real photos shipped in the package (images/README.md): a rotated JPEG, a progressive
    JPEG and a PNG, so that decode, EXIF, resize and crop are all on the checked path."""
    folder = resources.files(__package__).joinpath("images")
    return tuple(
        GoldenImage(entry.name, entry.read_bytes())
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith((".jpg", ".png"))
    )


def reference_decode(spec: InputSpec) -> Callable[[bytes], np.ndarray]:
    """The real preprocessing, as the record is made with it. Imported here, not at the top: a worker that
    only loads a record (every OpenVINO worker) need not import Pillow and the imaging (0.4 s of its start)."""
    from ..imaging.preprocess import preprocess

    return lambda data: preprocess(data, spec, max_pixels=_MAX_PIXELS).pixels


def golden_pixels(decode: Callable[[bytes], np.ndarray]) -> np.ndarray:
    """(n, 3, S, S) float32: the golden images, in `golden_images()` order, through `decode`."""
    return np.stack([decode(image.data) for image in golden_images()])


def top_k(logits: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Class ids by logit, descending; a stable sort keeps the lower id first on a tie (as the engine)."""
    return np.argsort(-logits, axis=-1, kind="stable")[..., :k]


@dataclass(frozen=True)
class GoldenRecord:
    """The reference answer for each golden image: both branches' logits and their top-k class names."""

    images: tuple[str, ...]
    logits: np.ndarray  # (n, 2, C) float32
    labels: tuple[tuple[tuple[str, ...], ...], ...]  # [image][branch] -> top-k names, in the record's order
    recorded: str  # by whom and when: "preparation, PyTorch fp32" or "this worker's start, PyTorch fp32"

    def save(self, path: Path) -> None:
        meta = {"images": self.images, "labels": self.labels, "recorded": self.recorded}
        with open(path, "wb") as handle:  # np.savez would append ".npz" to a name without it
            np.savez(handle, logits=self.logits, meta=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: Path) -> GoldenRecord:
        with np.load(path) as arrays:
            meta = json.loads(str(arrays["meta"]))
            logits = arrays["logits"].astype(np.float32)
        labels = tuple(tuple(tuple(branch) for branch in image) for image in meta["labels"])
        return cls(tuple(meta["images"]), logits, labels, meta["recorded"])


def record_golden(
    forward: Callable[[np.ndarray], np.ndarray], spec: InputSpec, labels: Sequence[str], *, recorded: str
) -> GoldenRecord:
    """Run the golden images through the real preprocessing and `forward` ((n, 3, S, S) -> (n, 2, C)
    PyTorch fp32 logits) and keep the answers with the class names `labels` gives them."""
    logits = np.asarray(forward(golden_pixels(reference_decode(spec))), dtype=np.float32)
    ids = top_k(logits)
    names = tuple(tuple(tuple(labels[int(c)] for c in branch) for branch in image) for image in ids)
    return GoldenRecord(tuple(image.name for image in golden_images()), logits, names, recorded)
