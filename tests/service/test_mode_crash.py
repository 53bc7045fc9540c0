"""Start-up survives a compute mode that kills the worker while it starts it.

On an Intel Xeon with AMX, OpenVINO bf16 segfaulted inside the start-up guard of every worker, and
the supervisor restarted the same mode forever: the service never became ready. A native crash
cannot be caught in the worker, so the worker names each mode before it tries it and the parent
skips a mode that a worker died in. The crash is made on purpose here (CROSSVIT_TEST_ABORT_MODES:
the worker calls os.abort() as it starts that mode), so the test holds on every CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import torch

from model.variants import create_model
from service.settings import Settings
from service.worker.backends import build_openvino
from service.worker.backends.openvino_prepare import prepare_openvino
from service.worker.backends.openvino_runtime import modes_for
from service.worker.backends.pytorch_runtime import build_torch, reference_probe
from tests.conftest import TEST_VARIANT, Reference, run_server
from tests.photos import encode, photo
from weights.labels import imagenet_labels


class _Skips:
    """A gate that refuses the given modes and records the ones tried."""

    def __init__(self, *refused: str) -> None:
        self.refused, self.tried = set(refused), []  # type: ignore[var-annotated]

    def allowed(self, key: str) -> bool:
        return key not in self.refused

    def trying(self, key: str) -> None:
        self.tried.append(key)

    def preparing(self, what: str, budget_s: float | None = None) -> None:
        pass


def test_every_openvino_mode_crashing_falls_back_to_pytorch(
    reference: Reference, caplog: pytest.LogCaptureFixture
) -> None:
    """auto: bf16 (where the CPU has it) aborts, then OpenVINO fp32 aborts; the third start serves on PyTorch."""
    crashing = modes_for("auto")  # what auto tries on this CPU, fastest first
    abort = [f"openvino/{mode}" for mode in crashing]
    with caplog.at_level(logging.WARNING, logger="service.inference.pool"), run_server(
        weights=str(reference.checkpoint), workers=1, threads_per_worker=1, precision="auto",
        test_abort_modes=",".join(abort),
    ) as url:
        card = httpx.get(f"{url}/v1/models", timeout=10).json()
        worker = card["workers"][0]
        assert worker["state"] == "ready" and worker["backend"] == "torch", worker
        assert worker["restarts"] == len(abort)  # one start per crashing mode, no more
        assert [s["mode"] for s in card["skipped_modes"]] == abort
        assert all("died (exit code -6)" in s["reason"] for s in card["skipped_modes"]), card["skipped_modes"]
        photo_jpeg = encode(photo("chelsea"), "JPEG")
        answer = httpx.post(f"{url}/v1/classify", files={"images": ("c.jpg", photo_jpeg, "image/jpeg")}, timeout=60)
        assert answer.status_code == 200, answer.text
    logged = [r for r in caplog.records if r.getMessage().startswith("a compute mode crashed a worker")]
    assert [r.mode for r in logged] == abort  # type: ignore[attr-defined]


def test_a_crashing_bf16_falls_back_to_openvino_fp32(reference: Reference) -> None:
    """Where the CPU runs bf16: the next start serves OpenVINO fp32, exact, and says why in /v1/models."""
    if modes_for("auto")[0] != "bf16":
        pytest.skip("OpenVINO reports no native bf16 on this CPU: auto starts with fp32")
    with run_server(weights=str(reference.checkpoint), workers=1, threads_per_worker=1, precision="auto",
                    test_abort_modes="openvino/bf16") as url:
        card = httpx.get(f"{url}/v1/models", timeout=10).json()
        worker = card["workers"][0]
        assert (worker["backend"], worker["mode"], worker["restarts"]) == ("openvino", "fp32", 1), worker
        assert card["precision"] == ["fp32"]
        assert [s["mode"] for s in card["skipped_modes"]] == ["openvino/bf16"]


def test_build_functions_ask_the_gate_before_each_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(TEST_VARIANT).eval()
    probe = reference_probe(model)
    gate = _Skips("torch/bf16-autocast")
    built = build_torch(model, "bf16", torch.device("cpu"), probe, gate)
    assert built.backend.mode == "fp32" and gate.tried == ["torch/fp32"]
    with pytest.raises(RuntimeError, match="PyTorch fp32, the last mode"):
        build_torch(model, "fp32", torch.device("cpu"), probe, _Skips("torch/fp32"))
    gate = _Skips("openvino/bf16")
    folder, _ = prepare_openvino(model, tmp_path, variant=TEST_VARIANT, sha256="0" * 64, source="random",
                                 pretrained=False, labels=imagenet_labels())
    built, _ = build_openvino(folder, precision="auto", threads=[1], gate=gate)
    assert built.backend.mode == "fp32" and gate.tried == ["openvino/fp32"]
    with pytest.raises(RuntimeError, match="every OpenVINO mode"):
        build_openvino(folder, precision="fp32", threads=[1], gate=_Skips("openvino/fp32"))


def test_the_abort_setting_takes_mode_names_only() -> None:
    assert Settings(test_abort_modes="openvino/bf16, torch/fp32").test_abort_modes == ["openvino/bf16", "torch/fp32"]
    with pytest.raises(ValueError, match="not a mode name"):
        Settings(test_abort_modes="bf16")
