"""The worker process: one model replica on its backend, fed batches through shared-memory slots.

What crosses the pipe, and why, is service/worker/protocol.py: `Run` in, `Done` out, slots in shared memory
between; `Trying` before each compute mode it starts, so that a native crash no guard can catch
names the mode the parent skips from then on.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.digest import file_sha256
from model.variants import get_variant
from weights.labels import load_labels

from ..golden import GoldenRecord
from .backends import (
    Backend,
    Built,
    DeviceOutOfMemoryError,
    ModeGate,
    NotPreparedError,
    build_openvino,
    cache_key,
    is_complete,
    torch_available,
)
from .backends.prepared import NOT_CACHED, PREPARE_HINT, QUANTIZED_NOT_CACHED
from .protocol import Done, Failed, Fatal, Ping, Pong, Preparing, Ready, ReplicaSpec, Slots, Stop, ToWorker, Trying

if TYPE_CHECKING:
    from .backends.openvino_quantize import Quantized

__all__ = ["PipeGate", "WeightsChangedError", "build_backend", "main"]

logger = logging.getLogger(__name__)


class WeightsChangedError(RuntimeError):
    """The checkpoint no longer hashes to what the parent verified: the worker refuses to start."""


class PipeGate:
    """The worker's ModeGate: skips the spec's refused modes (crashed, or failed the self-test) and tells the
    parent each mode it tries."""

    def __init__(self, spec: ReplicaSpec, conn: Connection | None) -> None:
        self._spec, self._conn = spec, conn

    def allowed(self, key: str) -> bool:
        if key in self._spec.skip_modes:
            logger.warning("skipping a mode that crashed a worker while starting or failed its self-test",
                           extra={"worker": self._spec.worker_id, "mode": key})
            return False
        return True

    def preparing(self, what: str, budget_s: float | None = None) -> None:
        if self._conn is not None:
            self._conn.send(Preparing(what, budget_s))

    def trying(self, key: str) -> None:
        if self._conn is not None:
            self._conn.send(Trying(key))
        if key in self._spec.abort_modes:
            logger.warning("test fault: aborting while trying a mode", extra={"worker": self._spec.worker_id,
                                                                           "mode": key})
            os.abort()


def build_backend(spec: ReplicaSpec, gate: ModeGate | None = None) -> tuple[Built, dict[str, Any]]:
    """Admit the fastest mode of the spec's backend that passes its check (and the gate). OpenVINO serves
    the prepared model, preparing it first where it is missing and torch is installed."""
    if spec.backend == "openvino":
        try:
            return _build_openvino(spec, gate)
        except WeightsChangedError:
            raise  # no backend may serve it
        except Exception as exc:
            if not spec.backend_fallback:
                raise
            logger.warning("OpenVINO backend failed to start; falling back to PyTorch",
                           extra={"worker": spec.worker_id, "error": f"{type(exc).__name__}: {exc}"})
    return _build_torch(spec, gate), {}


def _build_openvino(spec: ReplicaSpec, gate: ModeGate | None) -> tuple[Built, dict[str, Any]]:
    variant = get_variant(spec.variant).name
    cache_dir = None if spec.cache_dir is None else Path(spec.cache_dir)
    started = time.perf_counter()
    folder = None if cache_dir is None else cache_dir / cache_key(variant, spec.weights_sha256)
    source = "prepared earlier"
    if folder is not None and is_complete(folder):
        if spec.weights is not None:  # not loaded here: hashed, so that a replaced file is refused as by torch
            _check_unchanged(spec, file_sha256(spec.weights))
    else:
        if spec.weights is None or not torch_available():
            raise NotPreparedError(
                f"no prepared OpenVINO model for {variant} with weights sha256 {spec.weights_sha256[:16]}... in "
                f"{cache_dir}; {PREPARE_HINT}"
            )
        from .backends.openvino_prepare import prepare_openvino

        if gate is not None:
            gate.preparing("preparing the OpenVINO model")
        folder, source = prepare_openvino(
            _load_model(spec), cache_dir, variant=variant, sha256=spec.weights_sha256, source=spec.weights_source,
            pretrained=spec.pretrained, labels=_labels(spec),
        )
    prepare_s = time.perf_counter() - started
    int8: Quantized | None = None
    int8_source: str | None = None
    try:
        if spec.precision == "int8":
            int8, int8_source = _quantized(spec, folder, gate, cached=source != NOT_CACHED)
        if gate is not None and (source != "prepared earlier" or int8_source not in (None, "cache")):
            gate.preparing("compiling and checking its mode")  # the one-off step is over: the usual limit again
        built, info = build_openvino(folder, precision=spec.precision, threads=spec.thread_options, gate=gate,
                                     compiled_cache=None if cache_dir is None else cache_dir / "compiled", int8=int8)
    finally:  # a temporary folder is read and compiled by now (an unlinked mapping stays valid)
        if source == NOT_CACHED:
            shutil.rmtree(folder, ignore_errors=True)
        if int8 is not None and int8_source == QUANTIZED_NOT_CACHED:
            shutil.rmtree(int8.folder, ignore_errors=True)
    extra = {} if int8_source is None else {"int8_source": int8_source}
    return built, {"model_source": source, "prepare_s": round(prepare_s, 3), **extra, **info}


def _quantized(spec: ReplicaSpec, prepared: Path, gate: ModeGate | None, *, cached: bool) -> tuple[Quantized, str]:
    """The INT8 model of `prepared` for the spec's calibration set, and where it came from: the cache, or
    quantised now (NNCF, where installed). Imported here: the other modes' workers need none of it."""
    from ..imaging.preprocess import InputSpec
    from ..quantization import CalibrationError, calibration_set
    from .backends.openvino_quantize import NotQuantizableError, quantize_openvino

    try:
        calibration = calibration_set(None if spec.calibration_dir is None else Path(spec.calibration_dir))
    except CalibrationError as exc:
        raise NotQuantizableError(str(exc)) from None
    return quantize_openvino(prepared, calibration, InputSpec.from_variant(get_variant(spec.variant)),
                             threads=max(spec.thread_options), cached=cached, gate=gate)


def _labels(spec: ReplicaSpec) -> tuple[str, ...]:
    return load_labels(None if spec.labels_file is None else Path(spec.labels_file))


def _load_model(spec: ReplicaSpec) -> Any:
    """The PyTorch model with the spec's weights (torch is imported here, never by the lean path)."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.variants import create_model

    torch.set_num_threads(spec.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set by an earlier torch call in this process
    model = create_model(spec.variant)
    if spec.weights is not None:
        _check_unchanged(spec, load_checkpoint(model, spec.weights))
    return model


def _check_unchanged(spec: ReplicaSpec, found: str) -> None:
    """A restarted worker must not serve a file replaced since start-up under the old sha256."""
    if spec.weights is not None and found != spec.weights_sha256:
        raise WeightsChangedError(
            f"{Path(spec.weights).name} now hashes to sha256 {found}, not the {spec.weights_sha256} verified at "
            "start-up; refusing to load it (restart the server to serve the new file)"
        )


def _build_torch(spec: ReplicaSpec, gate: ModeGate | None) -> Built:
    import torch

    from .backends.pytorch_runtime import build_torch, reference_golden, reference_probe

    if spec.weights is None:
        raise NotPreparedError("the PyTorch backend needs the checkpoint file, and this start has only a prepared "
                               "OpenVINO model")
    model = _load_model(spec)
    # No prepared record for PyTorch: fp32 on the CPU is the reference, so the self-test checks the reduced
    # modes, the parent's preprocessing and the class names the parent serves against this start's answers.
    golden = reference_golden(model, spec.variant, _labels(spec), recorded="this worker's start (PyTorch fp32)")
    built = build_torch(model, spec.precision, torch.device(spec.device), reference_probe(model), gate)
    built.golden = golden
    return built


def _build(spec: ReplicaSpec, slots: Slots, gate: ModeGate) -> tuple[Backend, dict[str, Any], GoldenRecord]:
    started = time.perf_counter()
    on_cuda = spec.device.startswith("cuda")
    if on_cuda:
        import torch

        torch.cuda.set_device(torch.device(spec.device))
    built, details = build_backend(spec, gate)
    backend = built.backend
    for mode, agreement in built.rejected:
        logger.warning(
            "a faster mode failed the accuracy check; using the next one",
            extra={"worker": spec.worker_id, "backend": backend.name, "mode": mode,
                   "cosine": round(agreement.cosine, 7), "rel_err": f"{agreement.rel_err:.2e}"},
        )
    if on_cuda:
        _pin(slots)
    warm_up_started = time.perf_counter()
    backend.warm_up(slots.x[0])  # up to a full batch, at every thread count this worker will see
    warm_up_s = time.perf_counter() - warm_up_started  # the watchdog's first bound of a full batch
    info = {
        "backend": backend.name,
        "mode": backend.mode,
        "requested_mode": built.requested,
        "guard_cosine": round(backend.agreement.cosine, 7),
        "rel_err": float(f"{backend.agreement.rel_err:.3g}"),
        "device": spec.device,
        "threads": spec.threads,
        "startup_s": round(time.perf_counter() - started, 3),
        "warm_up_s": round(warm_up_s, 3),
        **details,
    }
    assert built.golden is not None  # both backends record or load it
    return backend, info, built.golden


def _pin(slots: Slots) -> None:
    """Page-lock the shared input slots so host-to-device copies can be asynchronous."""
    import torch

    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    cudart.cudaHostRegister(slots.x.ctypes.data, slots.x.nbytes, 0)


def _serve(spec: ReplicaSpec, conn: Connection, slots: Slots, backend: Backend) -> None:
    while True:
        try:
            message: ToWorker = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone: nothing left to serve
        if isinstance(message, Stop):
            return
        if isinstance(message, Ping):
            conn.send(Pong())
            continue
        started = time.perf_counter()
        try:
            slots.logits[message.slot, :message.n] = backend(slots.x[message.slot, :message.n], message.threads)
        except DeviceOutOfMemoryError as exc:
            conn.send(Failed(message.batch_id, message.slot, f"out of device memory: {exc}"))
            continue
        conn.send(Done(message.batch_id, message.slot, time.perf_counter() - started))


def main(spec: ReplicaSpec, conn: Connection, slots: Slots) -> None:
    """Process entry point (spawned): build, guard, warm up, report ready, then serve."""
    # Ctrl-C, or a SIGTERM sent to the whole process group, must not kill a worker mid-drain: the
    # parent stops its workers itself (a "stop" message, then SIGKILL), and a worker whose parent
    # vanished exits when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from service.logs import configure_logging

    configure_logging(spec.log_level, spec.log_format)
    try:
        backend, info, golden = _build(spec, slots, PipeGate(spec, conn))
    except Exception as exc:  # reported to the parent, which restarts with backoff
        logger.exception("worker failed to start", extra={"worker": spec.worker_id})
        conn.send(Fatal(f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    logger.info("worker ready", extra={"worker": spec.worker_id, **info, "variant": get_variant(spec.variant).name})
    conn.send(Ready(info, golden))
    _serve(spec, conn, slots, backend)
