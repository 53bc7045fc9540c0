"""The OpenVINO backend: a prepared CrossViT model (prepared.py), compiled for this CPU. No torch.

On this project's CPUs OpenVINO runs the model faster than PyTorch eager, in exact fp32 and
more so in bf16 (bench/README.md, "Model"). The prepared graph takes the single branch-0 input
with a dynamic batch (branch 1's bicubic resize is part of it) and ends at the two CLS features;
the classifier heads run in numpy fp32, as under autocast (model.runtime): bf16 heads would round
every logit to 8 significant bits. Each mode is admitted only after its logits on the probe batch
match PyTorch fp32's, recorded when the model was prepared. OpenVINO's own compiled-blob cache
sits beside the prepared folders. An OpenVINO compiled model has a fixed thread count, so one is
compiled per thread count the parent may ask for (a worker computing alone borrows the idle
workers' cores).
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Agreement, Built, ModeGate, OpenGate, QuantizationRefusedError, mode_key
from .prepared import load_golden, load_heads, load_probe, locked, read_meta

if TYPE_CHECKING:
    from .openvino_quantize import Quantized

__all__ = [
    "OpenVINOBackend",
    "available",
    "build_openvino",
    "compile_config",
    "modes_for",
    "openvino",
]

# The precision hint of each mode: INT8's graph is quantised (its float parts, softmax and layer norms, in f32,
# as its guard measured them); "auto" tries bf16 then fp32, never int8.
_HINTS = {"bf16": "bf16", "fp32": "f32", "int8": "f32"}


def available() -> bool:
    """Whether the openvino package is installed (without importing it: that takes a second)."""
    return importlib.util.find_spec("openvino") is not None


def openvino() -> Any:
    import openvino as ov

    return ov


def modes_for(precision: str) -> list[str]:
    """Modes to try, fastest first: bf16 only where the CPU computes it natively."""
    if precision == "fp32":
        return ["fp32"]
    if precision in ("bf16", "int8"):
        return [precision]
    if precision != "auto":
        raise ValueError(f"the OpenVINO backend runs fp32, bf16 or int8, not {precision}")
    capabilities = openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
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

    def __init__(self, core: Any, model: Any, heads: list[tuple[np.ndarray, np.ndarray]], mode: str,
                 threads: Sequence[int], blob_lock: Path | None = None) -> None:
        self.mode = mode
        self._heads = [(np.ascontiguousarray(w.T), b) for w, b in heads]  # (D, C): features @ W.T as one matmul
        self.agreement = Agreement(cosine=0.0, rel_err=float("inf"))  # set once the probe has run
        self._core, self._model, self._blob_lock = core, model, blob_lock
        self._requests: dict[int, Any] = {}
        self.compile(threads)
        self._ov = openvino()

    def compile(self, threads: Sequence[int]) -> None:
        """A compiled model per thread count not compiled yet (the probe needs only one: a mode the
        guard refuses costs one compile, not one per thread count)."""
        # With a compiled-blob cache, compiling may write a blob another worker is reading (mmap): a
        # SIGBUS in the reader. One compile at a time; the second worker then reads the finished blob.
        with locked(self._blob_lock) if self._blob_lock is not None else contextlib.nullcontext():
            for n in sorted(set(threads) - set(self._requests)):
                config = compile_config(self.mode, n)
                self._requests[n] = self._core.compile_model(self._model, "CPU", config).create_infer_request()

    def __call__(self, x: np.ndarray, threads: int) -> np.ndarray:
        request = self._requests.get(threads) or self._requests[max(self._requests)]
        request.infer({0: self._ov.Tensor(x, shared_memory=True)})  # reads the shared slot in place
        logits = [request.get_output_tensor(i).data @ w_t + b for i, (w_t, b) in enumerate(self._heads)]
        return np.stack(logits, axis=1)

    def warm_up(self, x: np.ndarray) -> None:
        """The first inference of a compiled model is the slow one (+50-70 ms, tiny, measured); each new
        batch size after it adds ~12 ms once. So batch 1 and the largest, at every thread count: every
        size would cost the whole sum (36 images per thread count at batch 8: seconds of start-up)."""
        for threads in self._requests:
            for n in sorted({1, x.shape[0]}):
                self(x[:n], threads)


def build_openvino(
    folder: Path, *, precision: str, threads: Sequence[int], gate: ModeGate | None = None,
    compiled_cache: Path | None = None, int8: Quantized | None = None,
) -> tuple[Built, dict[str, Any]]:
    """Compile the fastest mode of the prepared model in `folder` that is exact (fp32) or passes the
    guard (bf16), of those the gate allows; `compiled_cache` keeps OpenVINO's compiled blobs. INT8
    (precision int8) serves `int8`'s quantised graph, if its guard admitted it on held-out images.

    Raises RuntimeError when even fp32 is not exact, or the gate allows no mode: the caller falls back to PyTorch.
    """
    gate = gate or OpenGate()
    modes = modes_for(precision)
    allowed = [mode for mode in modes if gate.allowed(mode_key("openvino", mode))]
    if not allowed:
        raise RuntimeError(f"every OpenVINO mode of precision {precision} was skipped (it crashed a worker while "
                           "starting, or failed the self-test; /v1/models skipped_modes says which): "
                           + ", ".join(modes))
    if precision == "int8":
        if int8 is None:
            raise ValueError("precision int8 needs the quantised model")
        if not int8.quantization.guard.passed:
            guard = int8.quantization.guard
            raise QuantizationRefusedError(f"the INT8 quantisation was refused by its guard against fp32 on "
                                           f"{guard.images} held-out samples: {guard.reason()} "
                                           "(quantise on images like the served ones: CROSSVIT_CALIBRATION_DIR)")
    ov = openvino()
    started = time.perf_counter()
    core = ov.Core()
    model = core.read_model((folder if int8 is None else int8.folder) / "model.xml")
    read_s = time.perf_counter() - started
    heads = load_heads(folder)
    probe = load_probe(folder) if int8 is None else None  # INT8 is admitted by its own guard, on images
    blob_lock = None
    if compiled_cache is not None:
        try:  # compiled-blob cache: an optimisation only (a read-only cache folder goes without)
            compiled_cache.mkdir(parents=True, exist_ok=True)
            open(compiled_cache / ".lock", "a").close()  # noqa: SIM115  (can this process lock it?)
            core.set_property({"CACHE_DIR": str(compiled_cache)})
            blob_lock = compiled_cache / ".lock"
        except Exception:
            pass
    rejected: list[tuple[str, Agreement]] = []
    for mode in allowed:
        gate.trying(mode_key("openvino", mode))  # from compiling to the end of warm-up: a death names this mode
        backend = OpenVINOBackend(core, model, heads, mode, [max(threads)], blob_lock)
        if probe is not None:
            agreement = probe.compare(backend(probe.x, max(threads)))
        else:  # INT8: the probe's noise lies outside any calibration's ranges; its guard's figures stand
            assert int8 is not None
            agreement = Agreement(int8.quantization.guard.worst_cosine, int8.quantization.guard.max_rel_err)
        if probe is None or agreement.is_exact() or (mode != "fp32" and agreement.passes_guard()):
            backend.compile(threads)
            backend.agreement = agreement
            info = {"read_s": round(read_s, 3), "openvino": ov.get_version(),
                    "prepared": read_meta(folder).sha256[:16],
                    **({} if int8 is None else {"quantization": int8.quantization.summary()})}
            return Built(backend, modes[0], rejected, load_golden(folder)), info
        rejected.append((mode, agreement))
    raise RuntimeError(
        "no OpenVINO mode matches PyTorch fp32 closely enough: "
        + ", ".join(f"{mode}: cosine {a.cosine:.7f}, rel err {a.rel_err:.2e}" for mode, a in rejected)
    )
