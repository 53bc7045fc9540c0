"""The CUDA path, on a real GPU (marked `gpu`: skipped without one; bench/gpu/run.py runs them where one is lent).

The accuracy guard on fp16 and bf16, pinned and non-blocking input copies, one worker set per visible
GPU, and a worker killed under load on CUDA.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from model.runtime import Mode, prepare
from model.variants import create_model
from service.worker.backends import GUARD_COSINE
from service.worker.backends.pytorch_runtime import build_torch, reference_probe
from tests.conftest import TEST_VARIANT, Reference, engine_of, pids_of, run_server, until
from tests.service.serving import classify

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_guard_admits_or_refuses_each_reduced_precision_on_cuda(precision: str) -> None:
    torch.manual_seed(0)
    model = create_model(TEST_VARIANT).eval()
    probe = reference_probe(model)  # PyTorch fp32 on the CPU: the yardstick, as in a worker
    built = build_torch(model, precision, torch.device("cuda:0"), probe)
    assert built.requested == f"{precision}-autocast"
    if built.rejected:  # refused: the worker serves fp32, and says why
        assert built.backend.mode == "fp32" and built.rejected[0][1].cosine < GUARD_COSINE
    else:
        assert built.backend.mode == f"{precision}-autocast"
        assert built.backend.agreement.cosine >= GUARD_COSINE


def test_pinned_non_blocking_copies_give_the_same_logits() -> None:
    torch.manual_seed(0)
    runner = prepare(create_model(TEST_VARIANT), Mode.FP32, "cuda:0")
    x = torch.randn(4, 3, 240, 240)
    pageable = runner(x)
    pinned = runner(x.pin_memory())
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(pageable, pinned, strict=True))


def test_one_worker_set_per_visible_gpu(reference: Reference) -> None:
    with run_server(weights=str(reference.checkpoint), device="auto", workers="auto") as url:
        card = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert card["devices"] == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert all(w["device"].startswith("cuda:") for w in card["workers"])


def test_a_cuda_worker_killed_under_load_loses_no_request(reference: Reference) -> None:
    with run_server(weights=str(reference.checkpoint), device="cuda", workers=2, max_batch_size=8) as url:
        engine = engine_of(url)
        until(lambda: all(w["state"] == "ready" for w in engine.describe()["workers"]), 120, "both workers")
        with ThreadPoolExecutor(16) as pool:
            requests = [pool.submit(classify, url, 2) for _ in range(64)]
            until(lambda: sum(r.done() for r in requests) >= 8, 60, "some answers")
            os.kill(next(iter(pids_of(engine).values())), signal.SIGKILL)
            answers = [r.result() for r in requests]
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 60, statuses  # one retry each: only a second death fails an image
        assert all(a.json()["error"]["code"] == "worker_failed" for a in answers if a.status_code == 503)
        until(lambda: all(w["state"] == "ready" for w in engine.describe()["workers"]), 120, "the restart")
        assert classify(url).status_code == 200
