"""The INT8 mode: a prepared OpenVINO model quantised with NNCF, kept only with its guard's verdict.

NNCF (OpenVINO's quantiser, the `int8` extra) records activation ranges on the calibration samples and
writes an INT8 graph (model type "transformer": softmax, layer norms and GELU stay in floating point). The
guard (service/quantization/guard.py) then compares its logits with the prepared fp32 model's on the
held-out samples. Both go into a folder beside the prepared one, named by the calibration set's hash:

    <prepared folder>.int8-<calibration sha256[:16]>/
        model.xml, model.bin   the quantised graph: the prepared graph's input and outputs (the heads stay fp32)
        quantization.json      the calibration set, sample counts, NNCF's release, seconds, the guard's verdict

A refused quantisation is kept as well, so a restarted worker reads the refusal instead of quantising
again. Like the prepared folder, it appears whole by an atomic rename, under a file lock.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ...golden import reference_decode
from ...imaging.preprocess import InputSpec
from ...quantization import CalibrationError, CalibrationSet, GuardResult, judge, load_samples
from ...quantization.samples import CALIBRATION_SAMPLES, HELD_OUT_SAMPLES
from .base import ModeGate
from .openvino_runtime import OpenVINOBackend, openvino
from .prepared import QUANTIZED_NOT_CACHED, NotPreparedError, load_heads, publish, temporary

__all__ = ["NNCF_HINT", "NotQuantizableError", "Quantization", "Quantized", "batched_logits", "nncf_available",
           "quantize_openvino", "quantized_folder", "read_quantization"]

logger = logging.getLogger(__name__)

FILES = ("model.xml", "model.bin", "quantization.json")
NNCF_HINT = ("quantising needs NNCF: pip install 'crossvit-serve[int8]' and run `crossvit-serve --prepare-only` "
             "with the same CROSSVIT_PRECISION=int8, weights, CROSSVIT_CALIBRATION_DIR and CROSSVIT_CACHE_DIR; the "
             "server then serves the cached quantisation without NNCF")
_BATCH = 8  # held-out samples per inference while judging
# How long a worker may quantise (or wait for the worker that does) before the parent takes it for a hang:
# far past the start limit, as a quantisation is a one-off step (18-dagger: 48 s on 2 Zen 4 cores).
QUANTIZE_BUDGET_S = 1800.0


class NotQuantizableError(NotPreparedError):
    """INT8 asked for, and no cached quantisation for this calibration set: no NNCF here to make one, or the
    calibration images cannot serve. No start mends it, so `--prepare-only` exits 2 and a worker stays out."""


@dataclass(frozen=True)
class Quantization:
    """What quantization.json says: how the INT8 model was made and whether its guard admitted it."""

    calibration: dict[str, Any]  # CalibrationSet.summary() and the sample counts
    guard: GuardResult
    nncf: str
    seconds: float

    def summary(self) -> dict[str, Any]:
        """For /v1/models and the start-up log."""
        g = self.guard
        return {"calibration": self.calibration, "nncf": self.nncf, "quantize_s": self.seconds,
                "guard": {"passed": g.passed, "held_out_samples": g.images, "median_cosine": round(g.median_cosine, 5),
                          "worst_cosine": round(g.worst_cosine, 5), "top1_agreement": round(g.top1_agreement, 4),
                          "confident_images": g.confident_images,
                          "confident_agreement": None if g.confident_agreement is None
                          else round(g.confident_agreement, 4),
                          **({} if g.passed else {"reason": g.reason()})}}


def nncf_available() -> bool:
    try:
        return importlib.util.find_spec("nncf") is not None
    except ImportError:  # a finder that refuses it outright
        return False


def quantized_folder(prepared: Path, calibration: CalibrationSet) -> Path:
    return prepared.parent / f"{prepared.name}.int8-{calibration.digest[:16]}"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


def read_quantization(folder: Path) -> Quantization:
    data = json.loads((folder / "quantization.json").read_text())
    return Quantization(data["calibration"], GuardResult.from_dict(data["guard"]), data["nncf"], data["seconds"])


class Quantized(NamedTuple):
    """An INT8 model ready to read: its folder and what quantization.json says of it."""

    folder: Path
    quantization: Quantization


def quantize_openvino(
    prepared: Path, calibration: CalibrationSet, spec: InputSpec, *, threads: int, cached: bool,
    gate: ModeGate | None = None,
) -> tuple[Quantized, str]:
    """The INT8 model of `prepared` for `calibration`, and how it came to be: "cache", "quantized" or
    "quantized, not cached" (`cached` False, or a cache folder that cannot be written: a temporary folder,
    which the caller removes once the model is read). Raises NotQuantizableError without NNCF, or for
    calibration images that cannot serve. `gate` hears of the long step (QUANTIZE_BUDGET_S) before it starts."""
    target = quantized_folder(prepared, calibration)
    if cached and _is_complete(target):
        return Quantized(target, read_quantization(target)), "cache"
    if gate is not None:
        gate.preparing("quantising to INT8, or waiting for the worker that is", QUANTIZE_BUDGET_S)
    write = functools.partial(_quantize, prepared, calibration, spec, threads)
    if cached and _writable(target.parent / f"{target.name}.lock"):
        made = publish(target, _is_complete, write)  # else another worker quantised it while we waited
        return Quantized(target, read_quantization(target)), "quantized" if made else "cache"
    scratch = temporary("crossvit-int8-", write)
    return Quantized(scratch, read_quantization(scratch)), QUANTIZED_NOT_CACHED


def _writable(lock: Path) -> bool:
    try:
        open(lock, "a").close()  # noqa: SIM115
    except OSError as exc:
        logger.warning("cannot use the model cache; quantising without it",
                       extra={"cache_dir": str(lock.parent), "error": str(exc)})
        return False
    return True


def _require_nncf() -> None:
    if not nncf_available():
        raise NotQuantizableError(NNCF_HINT)


def _quantize(prepared: Path, calibration: CalibrationSet, spec: InputSpec, threads: int, out: Path) -> None:
    _require_nncf()
    import nncf

    started = time.perf_counter()
    ov = openvino()
    core = ov.Core()
    model = core.read_model(prepared / "model.xml")
    decode = reference_decode(spec)
    digest = calibration.digest
    try:
        calibrate = load_samples(calibration.calibration, CALIBRATION_SAMPLES, decode, seed=f"calibration {digest}")
        held_out = load_samples(calibration.held_out, HELD_OUT_SAMPLES, decode, seed=f"held out {digest}")
    except CalibrationError as exc:
        raise NotQuantizableError(f"{exc} ({calibration.source})") from None
    logger.info("quantising to INT8 with NNCF", extra={**calibration.summary(), "samples": len(calibrate)})
    with _quiet(nncf):
        quantized = nncf.quantize(model, nncf.Dataset(list(calibrate), lambda x: x[None]),
                                  model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibrate))
    heads = load_heads(prepared)
    guard = judge(batched_logits(core, model, heads, "fp32", held_out, threads),
                  batched_logits(core, quantized, heads, "int8", held_out, threads))
    ov.save_model(quantized, out / "model.xml", compress_to_fp16=False)
    record = {
        "calibration": {**calibration.summary(), "calibration_samples": len(calibrate),
                        "held_out_samples": len(held_out)},
        "guard": guard.to_dict(),
        "nncf": importlib.metadata.version("nncf"),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "quantization.json").write_text(json.dumps(record, indent=2) + "\n")
    log = logger.info if guard.passed else logger.error
    log("INT8 quantisation " + ("admitted" if guard.passed else "refused") + " by its guard",
        extra=read_quantization(out).summary()["guard"])


def batched_logits(core: Any, model: Any, heads: list[tuple[np.ndarray, np.ndarray]], mode: str, x: np.ndarray,
                   threads: int) -> np.ndarray:
    """(n, 2, C) logits of `model` (an OpenVINO graph, compiled here in `mode`) for `x`, _BATCH at a time."""
    backend = OpenVINOBackend(core, model, heads, mode, [threads])
    return np.concatenate([backend(x[i:i + _BATCH], threads) for i in range(0, len(x), _BATCH)])


@contextlib.contextmanager
def _quiet(nncf: Any) -> Iterator[None]:
    """NNCF logs each step at INFO and draws progress bars (rich, on stdout): a worker's log wants neither."""
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf.set_log_level(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_logger.setLevel(level)
