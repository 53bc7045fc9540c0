"""Placement and precision choices, including the CUDA paths, exercised without a GPU.

The GPU-marked test at the end runs the real server on CUDA where one is visible.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from model.runtime import Mode
from service.inference import placement
from service.inference.placement import cuda_device_count, plan_workers, usable_cpus
from service.worker.backends.pytorch_runtime import choose_mode
from tests.conftest import Reference, run_server
from tests.photos import encode, photo
from tests.service.test_api import _served_logits, _timm_logits


def test_cgroup_v2_quota_caps_the_cpu_count(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == usable_cpus(tmp_path / "absent")


def test_cgroup_v1_quota_caps_the_cpu_count(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1  # half a core still gets one worker


def test_no_nvidia_device_nodes_means_no_cuda_without_importing_torch(tmp_path: Path) -> None:
    assert cuda_device_count(tmp_path) == 0  # a /dev without nvidiactl


def test_cpu_plan_splits_the_cores() -> None:
    cpus = usable_cpus()
    plan = plan_workers("cpu", "auto", "auto")
    assert all(p.device == "cpu" for p in plan)
    assert len(plan) == min(cpus, 4) and sum(p.threads for p in plan) <= max(cpus, len(plan))
    assert [p.threads for p in plan_workers("cpu", 3, 2)] == [2, 2, 2]


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend two CUDA devices are visible: placement logic only, nothing touches a GPU."""
    monkeypatch.setattr(placement, "cuda_device_count", lambda: 2)


@pytest.mark.usefixtures("two_gpus")
def test_auto_places_one_worker_set_per_gpu() -> None:
    assert [p.device for p in plan_workers("auto", "auto", "auto")] == ["cuda:0", "cuda:1"]
    assert [p.device for p in plan_workers("cuda", 2, "auto")] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert [p.device for p in plan_workers("cuda:1", "auto", 3)] == ["cuda:1"]
    assert plan_workers("cuda:1", "auto", 3)[0].threads == 3
    with pytest.raises(RuntimeError, match="CROSSVIT_DEVICE=cuda:2 but only 2"):
        plan_workers("cuda:2", "auto", "auto")


def test_cuda_requested_without_a_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "cuda_device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        plan_workers("cuda", "auto", "auto")
    assert {p.device for p in plan_workers("auto", "auto", "auto")} == {"cpu"}


@pytest.mark.parametrize(("bf16", "expected"), [(True, Mode.BF16_AUTOCAST), (False, Mode.FP16_AUTOCAST)])
def test_auto_precision_on_cuda_prefers_bf16_then_fp16(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: Mode
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert choose_mode("auto", torch.device("cuda:0")) is expected


def test_explicit_precisions_map_to_modes() -> None:
    cpu = torch.device("cpu")
    assert choose_mode("fp32", cpu) is Mode.FP32
    assert choose_mode("bf16", cpu) is Mode.BF16_AUTOCAST
    assert choose_mode("fp16", cpu) is Mode.FP16_AUTOCAST
    assert choose_mode("auto", cpu) in (Mode.FP32, Mode.BF16_AUTOCAST)


@pytest.mark.gpu
def test_server_on_cuda_classifies_like_the_cpu(reference: Reference) -> None:
    """Not only a 200: the CUDA worker's logits (reduced precision, as `auto` picks it) follow
    timm's fp32 pipeline on the CPU, image for image."""
    data = encode(photo("chelsea"), "JPEG")
    expected = _timm_logits(reference, data)
    with run_server(weights=str(reference.checkpoint), device="cuda", workers=1) as url:
        card = httpx.get(f"{url}/v1/models").json()
        assert card["devices"] == ["cuda:0"] and card["precision"][0] in ("bf16-autocast", "fp16-autocast")
        with httpx.Client(base_url=url, timeout=60) as client:
            served = _served_logits(client, data, "image/jpeg")
    assert F.cosine_similarity(served, expected, dim=0) >= 0.999
    assert float((served - expected).abs().max() / expected.abs().max()) <= 5e-2
    assert served.argmax() == expected.argmax() or expected.topk(2).values.diff().abs() < 1e-2
