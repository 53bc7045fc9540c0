"""The PyTorch backend: eager CrossViT on CPU or CUDA, fp32 or autocast, through `model.runtime`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from model import CrossViT
from model.runtime import Mode, Runner, bf16_is_fast, prepare
from model.variants import get_variant

from ...golden import GoldenRecord, record_golden
from ...imaging.preprocess import InputSpec
from .base import (
    PROBE_IMAGES,
    PROBE_SEED,
    Agreement,
    Built,
    DeviceOutOfMemoryError,
    ModeGate,
    OpenGate,
    Probe,
    mode_key,
)

__all__ = ["TorchBackend", "build_torch", "choose_mode", "reference_golden", "reference_probe"]

logger = logging.getLogger(__name__)


def choose_mode(precision: str, device: torch.device) -> Mode:
    """Map the setting to a compute mode; `auto` takes the fastest mode the benchmarks showed."""
    if precision == "fp32":
        return Mode.FP32
    if precision == "bf16":
        return Mode.BF16_AUTOCAST
    if precision == "fp16":
        return Mode.FP16_AUTOCAST
    if device.type == "cuda":
        return Mode.BF16_AUTOCAST if torch.cuda.is_bf16_supported() else Mode.FP16_AUTOCAST
    # CPU: bf16 autocast is 1.4-2x fp32 where the CPU has native bf16 (bench/README.md)
    return Mode.BF16_AUTOCAST if bf16_is_fast() else Mode.FP32


class TorchBackend:
    name = "torch"

    def __init__(self, runner: Runner, agreement: Agreement) -> None:
        self.runner = runner
        self.agreement = agreement

    @property
    def mode(self) -> str:
        return self.runner.mode.value

    def __call__(self, x: np.ndarray, threads: int) -> np.ndarray:
        if self.runner.device.type == "cpu" and threads != torch.get_num_threads():
            torch.set_num_threads(threads)  # the parent shares the cores among busy workers
        try:
            b0, b1 = self.runner(torch.from_numpy(x))  # branch 1's input: the model's own resize of x, on the device
            return torch.stack((b0, b1), dim=1).float().cpu().numpy()
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise DeviceOutOfMemoryError(str(exc)) from exc

    def warm_up(self, x: np.ndarray) -> None:
        for n in range(1, x.shape[0] + 1):  # every batch size this worker will see
            self(x[:n], torch.get_num_threads())
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)


def reference_probe(model: CrossViT) -> Probe:
    """The probe batch and PyTorch fp32's logits for it, on the CPU: the yardstick of every mode."""
    size = model.config.img_size[0]
    x = torch.randn(PROBE_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(PROBE_SEED))
    with torch.inference_mode():
        reference = torch.stack(model.eval().branch_logits(x), dim=1).float()
    return Probe(x.numpy(), reference.numpy())


def reference_golden(model: CrossViT, variant: str, labels: Sequence[str], *, recorded: str) -> GoldenRecord:
    """PyTorch fp32's answers for the golden images (the self-test's record), on the CPU."""

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.stack(model.eval().branch_logits(torch.from_numpy(x)), dim=1).float().numpy()

    return record_golden(forward, InputSpec.from_variant(get_variant(variant)), labels, recorded=recorded)


def build_torch(
    model: CrossViT, precision: str, device: torch.device, probe: Probe, gate: ModeGate | None = None
) -> Built:
    """The requested (or automatic) mode if it passes the accuracy guard (and the gate allows it), else
    fp32 (autocast keeps fp32 weights, so falling back costs nothing)."""
    gate = gate or OpenGate()
    requested = choose_mode(precision, device)
    first = requested if gate.allowed(mode_key("torch", requested.value)) else Mode.FP32
    if not gate.allowed(mode_key("torch", Mode.FP32.value)) and first is Mode.FP32:
        raise RuntimeError("PyTorch fp32, the last mode there is, was skipped (it crashed a worker while starting, "
                           "or failed the self-test; /v1/models skipped_modes says which)")
    gate.trying(mode_key("torch", first.value))
    runner = prepare(model, first, device)
    backend = TorchBackend(runner, Agreement(1.0, 0.0))
    backend.agreement = probe.compare(backend(probe.x, torch.get_num_threads()))
    rejected: list[tuple[str, Agreement]] = []
    if first is not Mode.FP32 and not backend.agreement.passes_guard():
        rejected.append((first.value, backend.agreement))
        gate.trying(mode_key("torch", Mode.FP32.value))
        runner.mode = Mode.FP32
        backend.agreement = probe.compare(backend(probe.x, torch.get_num_threads()))
    return Built(backend, requested.value, rejected)
