"""Preparing the OpenVINO model from our PyTorch CrossViT: the one step of the CPU path that needs torch.

Run by `crossvit-serve --prepare-only` (an image's build stage, a Kubernetes init container) or by a
worker that finds no prepared model where torch is installed. It writes the folder `prepared.py`
describes. A file lock makes a second worker wait for the first one's conversion instead of
repeating it; the result appears by an atomic rename.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.jit import TracerWarning  # type: ignore[attr-defined]

from model import CrossViT

from .openvino_runtime import openvino
from .prepared import (
    NOT_CACHED,
    PreparedMeta,
    cache_key,
    is_complete,
    openvino_version,
    publish,
    temporary,
    write_arrays,
)
from .pytorch_runtime import reference_golden, reference_probe

__all__ = ["convert", "head_arrays", "prepare_openvino"]

logger = logging.getLogger(__name__)


class _Features(nn.Module):
    """The graph OpenVINO converts: (n, 3, H, W) -> both branches' CLS features, (n, D0), (n, D1).

    Branch 1's input is the model's bicubic resize written as two matrix products, A x A^T, with A
    the resize of the identity: the same weights (border clamping included) and the same result up
    to float rounding (7e-7), but on OpenVINO's matmul kernels instead of its Interpolate, which
    took 13 % of a bf16 forward pass (17 of 129 ms for a batch of 8 9-dagger images, 2 threads).
    """

    resize: Tensor

    def __init__(self, model: CrossViT) -> None:
        super().__init__()
        self.model = model
        size, small = model.config.img_size
        identity = torch.eye(size)[None, None]
        resize = F.interpolate(identity, size=(small, size), mode="bicubic", align_corners=False)[0, 0]
        self.register_buffer("resize", resize, persistent=False)  # (small, size)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # resize_to_branch(x, 224): both products with the constant on the right, which OpenVINO
        # runs as FullyConnected layers (A x A^T as written costs reorders instead)
        x1 = (x @ self.resize.T).transpose(-1, -2) @ self.resize.T  # (n, 3, 224 (W), 224 (H))
        x1 = x1.transpose(-1, -2)  # (n, 3, 224, 224)
        f0, f1 = self.model.forward_features([x, x1])
        return f0, f1


def convert(model: CrossViT) -> Any:
    """The in-memory OpenVINO model of `model`'s features (bench/ uses it directly)."""
    ov = openvino()
    size = model.config.img_size[0]
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():
        # convert_model traces with TorchScript: it warns that tracing is deprecated (torch.export
        # converts too, 3x slower here, and loses the static H and W) and that the shape checks in
        # branch_inputs are traced as constants, which they are for this fixed input size.
        warnings.simplefilter("ignore", TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning)
        return ov.convert_model(
            _Features(model.eval()), example_input=example, input=[ov.PartialShape([-1, 3, size, size])]
        )


def head_arrays(model: CrossViT) -> list[tuple[np.ndarray, np.ndarray]]:
    """Both classifier heads as (W, b) fp32 arrays, for numpy after the OpenVINO graph."""
    linear = [head for head in model.head if isinstance(head, nn.Linear)]  # num_classes 0 has no heads to serve
    return [(h.weight.detach().float().numpy(), h.bias.detach().float().numpy()) for h in linear]


def _write(model: CrossViT, folder: Path, *, labels: Sequence[str], meta: PreparedMeta) -> None:
    # compress_to_fp16=False: the default would halve the weights' precision on disk.
    openvino().save_model(convert(model), folder / "model.xml", compress_to_fp16=False)
    golden = reference_golden(model, meta.variant, labels, recorded="preparation (PyTorch fp32)")
    write_arrays(folder, head_arrays(model), reference_probe(model), golden, meta)


def prepare_openvino(
    model: CrossViT, cache_dir: Path | None, *, variant: str, sha256: str, source: str, pretrained: bool,
    labels: Sequence[str],
) -> tuple[Path, str]:
    """The prepared folder for `model` (its golden record names classes with `labels`) and how it came to
    be: "cache" (already there), "prepared", or "prepared, not cached" (no usable cache folder: a temporary
    one, which the caller removes once the model is read: a worker killed later must not leave it behind)."""
    meta = PreparedMeta(variant=variant, sha256=sha256, source=source, pretrained=pretrained,
                        parameters=sum(p.numel() for p in model.parameters()), openvino=openvino_version())
    write = functools.partial(_write, model, labels=labels, meta=meta)
    if cache_dir is not None:
        target = cache_dir / cache_key(variant, sha256)
        try:
            if is_complete(target):
                return target, "cache"
            cache_dir.mkdir(parents=True, exist_ok=True)
            return target, "prepared" if publish(target, is_complete, write) else "cache"
        except OSError as exc:  # a read-only or full cache folder must not stop the worker
            logger.warning("cannot use the model cache; preparing without it",
                           extra={"cache_dir": str(cache_dir), "error": str(exc)})
    return temporary("crossvit-prepared-", write), NOT_CACHED
