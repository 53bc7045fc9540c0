"""The OpenVINO backend: our CrossViT converted to an OpenVINO model, compiled for this CPU.

On this project's CPUs OpenVINO runs the model faster than PyTorch eager, in exact fp32 and
more so in bf16 (bench/README.md, "Model"). The model is converted from the loaded `CrossViT` itself, with a
dynamic batch and the single branch-0 input: branch 1's bicubic resize is part of the graph.
The graph ends at the two CLS features; the classifier heads run in PyTorch fp32, as under
autocast (model.runtime): bf16 heads would round every logit to 8 significant bits.
Conversion takes seconds, so converted models are cached on disk, keyed by what determines them
(variant, checkpoint sha256, OpenVINO version); a file lock makes the second worker wait for the
first one's conversion instead of repeating it. OpenVINO's own compiled-blob cache sits beside it.
An OpenVINO compiled model has a fixed thread count, so one is compiled per thread count the
parent may ask for (a worker computing alone borrows the idle workers' cores).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.jit import TracerWarning  # type: ignore[attr-defined]

from model import CrossViT

from .base import Agreement, Built, ModeGate, OpenGate, Probe, mode_key

__all__ = [
    "OpenVINOBackend",
    "available",
    "build_openvino",
    "cache_key",
    "compile_config",
    "convert_cached",
    "modes_for",
]

logger = logging.getLogger(__name__)

# The precision hints we serve, fastest first; "auto" tries them in this order.
_HINTS = {"bf16": "bf16", "fp32": "f32"}
_IR_FORMAT = 2  # bump when the conversion below changes what it produces


def available() -> bool:
    """Whether the openvino package is installed (without importing it: that takes a second)."""
    return importlib.util.find_spec("openvino") is not None


def _openvino() -> Any:
    import openvino

    return openvino


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


def cache_key(variant: str, sha256: str) -> str:
    version = re.sub(r"[^\w.-]", "_", _openvino().get_version().split("-")[0])
    return f"{variant}-{sha256[:16]}-ov{version}-ir{_IR_FORMAT}"


def _convert(model: CrossViT) -> Any:
    ov = _openvino()
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


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def convert_cached(model: CrossViT, key: str, cache_dir: Path | None) -> tuple[Any, str]:
    """The converted model and where it came from ("cache", "converted" or "converted, not cached").

    A complete entry is read without the lock (entries appear by an atomic rename), so a cache
    baked into a read-only image works; only a conversion takes the lock.
    """
    ov = _openvino()
    if cache_dir is None:
        return _convert(model), "converted, not cached"
    target = cache_dir / key
    try:
        if (target / "model.xml").is_file():
            return ov.Core().read_model(target / "model.xml"), "cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _locked(cache_dir / f"{key}.lock"):
            if (target / "model.xml").is_file():  # another worker converted while we waited
                return ov.Core().read_model(target / "model.xml"), "cache"
            converted = _convert(model)
            scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
            try:
                # compress_to_fp16=False: the default would halve the weights' precision on disk.
                ov.save_model(converted, scratch / "model.xml", compress_to_fp16=False)
                scratch.chmod(0o755)  # mkdtemp's 0700 would hide a cache baked by root from the server's user
                os.replace(scratch, target)  # atomic: a reader sees the whole model or none
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return converted, "converted"
    except OSError as exc:  # a read-only or full cache folder must not stop the worker
        logger.warning("cannot use the model cache; converting without it", extra={"cache_dir": str(cache_dir),
                                                                                  "error": str(exc)})
        return _convert(model), "converted, not cached"


def modes_for(precision: str) -> list[str]:
    """Modes to try, fastest first: bf16 only where the CPU computes it natively."""
    if precision == "fp32":
        return ["fp32"]
    if precision == "bf16":
        return ["bf16"]
    if precision != "auto":
        raise ValueError(f"the OpenVINO backend runs fp32 or bf16, not {precision}")
    capabilities = _openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ["bf16", "fp32"] if "BF16" in capabilities else ["fp32"]


def compile_config(mode: str, threads: int, *, streams: int = 1, pinning: bool = False) -> dict[str, Any]:
    """OpenVINO CPU settings for one compiled model (bench/openvino_layout.py measures the choices)."""
    return {
        "INFERENCE_PRECISION_HINT": _HINTS[mode],  # a bf16-capable CPU's default is bf16: always say
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": streams,
        "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
        # Several worker processes share the cores, each unaware of the others: pinned, each would
        # put its threads on the first cores of the same affinity mask.
        "ENABLE_CPU_PINNING": pinning,
    }


class OpenVINOBackend:
    name = "openvino"

    def __init__(self, core: Any, model: Any, heads: nn.ModuleList, mode: str, threads: Sequence[int]) -> None:
        self.mode = mode
        self._heads = heads
        self.agreement = Agreement(cosine=0.0, rel_err=float("inf"))  # set once the probe has run
        self._requests = {n: self._compile(core, model, mode, n).create_infer_request() for n in sorted(set(threads))}
        self._ov = _openvino()

    @staticmethod
    def _compile(core: Any, model: Any, mode: str, threads: int) -> Any:
        return core.compile_model(model, "CPU", compile_config(mode, threads))

    def __call__(self, x: Tensor, threads: int) -> Tensor:
        request = self._requests.get(threads) or self._requests[max(self._requests)]
        request.infer({0: self._ov.Tensor(x.numpy(), shared_memory=True)})  # reads the shared slot in place
        with torch.inference_mode():
            logits = [head(torch.from_numpy(request.get_output_tensor(i).data)) for i, head in enumerate(self._heads)]
        return torch.stack(logits, dim=1)

    def warm_up(self, x: Tensor) -> None:
        for threads in self._requests:
            for n in range(1, x.shape[0] + 1):
                self(x[:n], threads)


def build_openvino(
    model: CrossViT, *, key: str, cache_dir: Path | None, precision: str, threads: Sequence[int], probe: Probe,
    gate: ModeGate | None = None,
) -> tuple[Built, dict[str, Any]]:
    """Convert (or load) and compile the fastest mode that is exact (fp32) or passes the guard (bf16),
    of those the gate allows.

    Raises RuntimeError when even fp32 is not exact, or the gate allows no mode: the caller falls back to PyTorch.
    """
    gate = gate or OpenGate()
    modes = modes_for(precision)
    allowed = [mode for mode in modes if gate.allowed(mode_key("openvino", mode))]
    if not allowed:
        raise RuntimeError(f"every OpenVINO mode of precision {precision} crashed a worker while starting: "
                           + ", ".join(modes))
    ov = _openvino()
    started = time.perf_counter()
    converted, source = convert_cached(model, key, cache_dir)
    convert_s = time.perf_counter() - started
    core = ov.Core()
    if cache_dir is not None:
        with contextlib.suppress(Exception):  # compiled-blob cache: an optimisation only
            core.set_property({"CACHE_DIR": str(cache_dir / "compiled")})
    rejected: list[tuple[str, Agreement]] = []
    for mode in allowed:
        gate.trying(mode_key("openvino", mode))  # from compiling to the end of warm-up: a death names this mode
        backend = OpenVINOBackend(core, converted, model.head, mode, threads)
        agreement = probe.compare(backend(probe.x, max(threads)))
        if agreement.is_exact() or (mode != "fp32" and agreement.passes_guard()):
            backend.agreement = agreement
            info = {"model_source": source, "convert_s": round(convert_s, 3), "openvino": ov.get_version()}
            return Built(backend, modes[0], rejected), info
        rejected.append((mode, agreement))
    raise RuntimeError(
        "no OpenVINO mode matches PyTorch fp32 closely enough: "
        + ", ".join(f"{mode}: cosine {a.cosine:.7f}, rel err {a.rel_err:.2e}" for mode, a in rejected)
    )
