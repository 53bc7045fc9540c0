"""Batch limits calibrated to a p99 target: the choice from measured batch times, and a real server doing it."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from model.variants import get_variant
from service.imaging.preprocess import InputSpec
from service.inference import calibration
from service.inference.calibration import HEADROOM, BatchTiming, calibrate, calibrate_pool, choose
from tests.conftest import TEST_VARIANT, Reference, run_server


def _timings(per_image_ms: float = 25.0, fixed_ms: float = 30.0, workers: int = 2) -> list[BatchTiming]:
    return [BatchTiming(b, fixed_ms + per_image_ms * b, round(workers * b / ((fixed_ms + per_image_ms * b) / 1000), 1))
            for b in range(1, 9)]


def test_the_largest_batch_whose_worst_case_fits_the_target_is_chosen() -> None:
    timings = _timings()  # t(b) = 30 + 25 b ms
    best, delay, predicted = choose(timings, 250)  # budget 200 ms: 2 t(b) <= 200 -> t(b) <= 100 -> b = 2
    assert best.batch == 2
    assert 0 <= delay <= HEADROOM * 250 - 2 * best.round_ms
    assert predicted <= HEADROOM * 250
    assert choose(timings, 1000)[0].batch == 8  # 2 x 230 ms fits 800 ms
    assert choose(timings, 10)[0].batch == 1  # nothing fits: the smallest batch, said by its prediction
    assert choose(timings, 10)[2] > 10


def test_calibrate_times_every_batch_size() -> None:
    ran: list[int] = []

    async def run_everywhere(batch: int) -> int:
        ran.append(batch)
        await asyncio.sleep((10 + 5 * batch) / 1000)
        return 2

    result = asyncio.run(calibrate(run_everywhere, 4, target_ms=60))
    assert [t.batch for t in result.timings] == [1, 2, 3, 4]
    assert ran == [b for b in range(1, 5) for _ in range(4)]  # one untimed run and three timed, per size
    assert all(t.round_ms >= 10 + 5 * t.batch for t in result.timings)
    assert result.max_batch_size < 4  # 2 x t(4) = 60 ms does not fit 0.8 x 60 ms
    assert result.summary()["timings"][0]["batch"] == 1


def test_a_server_calibrates_before_it_reports_ready(reference: Reference) -> None:
    with run_server(weights=str(reference.checkpoint), precision="fp32", workers=2, threads_per_worker=1,
                    max_batch_size=4, calibrate_p99_ms=1000) as url:
        batching = httpx.get(f"{url}/v1/models", timeout=10).json()["batching"]
        calibration = batching["calibration"]
        assert [t["batch"] for t in calibration["timings"]] == [1, 2, 3, 4]
        assert all(t["round_ms"] > 0 and t["images_per_s"] > 0 for t in calibration["timings"])
        assert batching["max_batch_size"] == calibration["max_batch_size"] <= 4
        assert calibration["predicted_ms"] <= HEADROOM * 1000 and calibration["target_p99_ms"] == 1000
        assert 0 < calibration["seconds"] < 60
        files = [("images", (f"{i}.jpg", _jpeg(), "image/jpeg")) for i in range(3)]
        assert httpx.post(f"{url}/v1/classify", files=files, timeout=60).status_code == 200


def test_without_a_target_the_configured_limits_stay(server: str) -> None:
    batching = httpx.get(f"{server}/v1/models", timeout=10).json()["batching"]
    assert batching["calibration"] is None and batching["max_batch_size"] == 4


def _jpeg() -> bytes:
    from tests.photos import encode, photo

    return encode(photo("chelsea"), "JPEG", quality=90)


class _Pool:
    """Workers that compute a batch in (5 + 2 n) ms; `ready` of them up."""

    def __init__(self, ready: int) -> None:
        self.ready_count = ready
        self.shapes: list[tuple[int, ...]] = []

    async def run_everywhere(self, pixels: np.ndarray) -> int:
        self.shapes.append(pixels.shape)
        await asyncio.sleep((5 + 2 * len(pixels)) / 1000)
        return self.ready_count


def test_a_pool_with_no_worker_up_keeps_the_hand_set_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    result = asyncio.run(calibrate_pool(_Pool(0), _spec(), 4, 100, workers=2, start_timeout_s=0.3))
    assert result is None


def test_one_worker_that_never_starts_holds_the_others_back_a_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "WAIT_AFTER_FIRST_S", 0.3)
    pool = _Pool(1)  # of 2
    started = time.monotonic()
    result = asyncio.run(calibrate_pool(pool, _spec(), 4, 100, workers=2, start_timeout_s=120))
    assert result is not None and time.monotonic() - started < 10
    assert {shape[1:] for shape in pool.shapes} == {(3, 240, 240)}  # golden images, the variant's input
    assert sorted({shape[0] for shape in pool.shapes}) == [1, 2, 3, 4]


def _spec() -> InputSpec:
    return InputSpec.from_variant(get_variant(TEST_VARIANT))
