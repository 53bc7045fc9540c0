"""The INT8 mode: NNCF quantises the prepared OpenVINO model on calibration images, the guard admits it against
fp32 on held-out ones, and the quantisation is cached beside the prepared model, refusal included.

Real parts throughout: NNCF on the test weights (timm, random init), the real preprocessing, real servers. The
bad quantisation is a real mistake: calibrating on blank images, which records activation ranges far narrower
than a photo's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from service.golden import QUANTIZED, reference_decode, tolerance_for
from service.imaging.preprocess import InputSpec
from service.inference.assembly import prepare
from service.quantization import CalibrationError, calibration_set, judge, load_samples
from service.quantization.guard import MIN_MEDIAN_COSINE, MIN_WORST_COSINE
from service.quantization.samples import CalibrationImage
from service.worker.backends import resolve_backend
from service.worker.backends.openvino_quantize import quantized_folder, read_quantization
from service.worker.backends.prepared import find_prepared
from tests.conftest import TEST_VARIANT, Reference, run_server, server_settings, start_cli, until
from tests.photos import encode, photo
from tests.service.serving import stays_unready
from tests.service.test_lean import _no_torch_env


def _spec() -> InputSpec:
    from model.variants import get_variant

    return InputSpec.from_variant(get_variant(TEST_VARIANT))


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("CROSSVIT_")]:
        monkeypatch.delenv(key)


# -- the calibration set and the guard ---------------------------------------------------------------------

def test_the_default_set_holds_out_every_third_photo_and_its_hash_follows_the_bytes(tmp_path: Path) -> None:
    default = calibration_set(None)
    assert [i.name for i in default.held_out] == ["coffee.jpg", "retina.jpg"]
    assert len(default.calibration) == 5
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.jpg").write_bytes(encode(photo("chelsea").rotate(90 * (name == "b")), "JPEG"))
    (folder / "notes.txt").write_text("not an image")
    mine = calibration_set(folder)
    assert [i.name for i in mine.calibration] == ["a.jpg", "b.jpg"] and [i.name for i in mine.held_out] == ["c.jpg"]
    digest = mine.digest
    (folder / "c.jpg").write_bytes(encode(photo("coffee"), "JPEG"))
    assert calibration_set(folder).digest != digest  # another image: another cache entry
    (folder / "c.jpg").unlink()
    pair = calibration_set(folder)  # two images: the second is held out, so the guard always has one
    assert [i.name for i in pair.calibration] == ["a.jpg"] and [i.name for i in pair.held_out] == ["b.jpg"]
    (folder / "b.jpg").unlink()
    with pytest.raises(CalibrationError, match="holds 1 images"):
        calibration_set(folder)


def test_an_image_that_does_not_decode_is_named() -> None:
    broken = CalibrationImage("broken.jpg", b"\xff\xd8 not really a jpeg")
    with pytest.raises(CalibrationError, match="calibration image broken.jpg"):
        load_samples([broken], 4, reference_decode(_spec()), seed="s")


def test_samples_go_through_the_served_preprocessing_and_are_the_same_every_time() -> None:
    decode = reference_decode(_spec())
    held = calibration_set(None).held_out
    first = load_samples(held, 6, decode, seed="s")
    assert first.shape == (6, 3, 240, 240) and first.dtype == np.float32
    np.testing.assert_array_equal(first[0], decode(held[0].data))  # each image once as served, then crops
    np.testing.assert_array_equal(first, load_samples(held, 6, decode, seed="s"))
    assert not np.array_equal(first[2:], load_samples(held, 6, decode, seed="other")[2:])


def test_the_guard_judges_cosine_and_the_confident_top1() -> None:
    rng = np.random.default_rng(0)
    flat = rng.standard_normal((40, 2, 1000)) * 0.1  # a random-init model: confident about nothing
    assert judge(flat, flat).passed and judge(flat, flat).confident_agreement is None
    noisy = judge(flat, flat + rng.standard_normal(flat.shape) * 0.1)  # half the signal: cosine ~0.7
    assert not noisy.passed and f"< {MIN_MEDIAN_COSINE}" in noisy.reason()
    confident = flat.copy()
    confident[:, :, 7] += 20.0  # fp32 sure of class 7 for every sample
    flipped = confident.copy()
    flipped[:8, :, 8] += 25.0  # int8 says class 8 for 8 of 40 (20 %): cosine stays high, the answer does not
    result = judge(confident, flipped)
    assert result.confident_images == 40 and result.confident_agreement == pytest.approx(0.8)
    assert not result.passed and "top-1 agrees with fp32 on 80.0% of the 40" in result.reason()
    assert result.median_cosine > MIN_MEDIAN_COSINE  # only the top-1 rule refused it


def test_a_stored_verdict_is_judged_again_by_the_current_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 2, 1000))
    stored = judge(logits, logits + rng.standard_normal(logits.shape) * 0.05).to_dict()
    assert stored["passed"] is True
    from service.quantization import guard

    monkeypatch.setattr(guard, "MIN_MEDIAN_COSINE", 0.99999)  # a later release with a tighter bound
    again = guard.GuardResult.from_dict(stored)
    assert not again.passed and "median logit cosine" in again.reason()


def test_int8_is_openvino_on_the_cpu_only() -> None:
    with pytest.raises(ValidationError, match="runs on the OpenVINO backend only"):
        server_settings(precision="int8", backend="torch")
    with pytest.raises(ValidationError, match="runs on CPU workers only"):
        server_settings(precision="int8", device="cuda")
    choice = resolve_backend("auto", "cpu", "int8")
    assert choice.name == "openvino" and not choice.fallback  # never a silent fp32 on PyTorch
    assert tolerance_for("int8") is QUANTIZED
    assert QUANTIZED.cosine == MIN_WORST_COSINE  # the self-test never refuses what the guard admitted for cosine


# -- quantised, cached, served ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int8_cache(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with the test weights prepared and quantised on the default calibration set."""
    cache = tmp_path_factory.mktemp("int8-cache")
    assert prepare(server_settings(weights=str(reference.checkpoint), precision="int8", cache_dir=str(cache))) == 0
    return cache


def _int8_folder(cache: Path, calibration: Path | None = None) -> Path:
    found = find_prepared(cache, TEST_VARIANT, allow_random=True)
    assert found is not None
    return quantized_folder(found[0], calibration_set(calibration))


def test_preparing_int8_quantises_once_and_caches_the_verdict(
    reference: Reference, int8_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _int8_folder(int8_cache)
    quantization = read_quantization(folder)
    assert quantization.guard.passed, quantization.guard.reason()
    assert quantization.calibration["calibration_samples"] == 128 and quantization.guard.images == 32
    assert quantization.guard.median_cosine >= MIN_MEDIAN_COSINE
    # the graph is quantised: NNCF's FakeQuantize layers are in it
    assert "FakeQuantize" in (folder / "model.xml").read_text() or "FakeConvert" in (folder / "model.xml").read_text()
    stamp = (folder / "quantization.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="service.inference.assembly"):
        assert prepare(server_settings(weights=str(reference.checkpoint), precision="int8",
                                       cache_dir=str(int8_cache))) == 0
    assert [r.int8_source for r in caplog.records if r.getMessage() == "prepared"] == ["cache"]  # type: ignore[attr-defined]
    assert (folder / "quantization.json").stat().st_mtime_ns == stamp  # read, not written again


def test_an_int8_server_reports_its_guard_and_serves(reference: Reference, int8_cache: Path) -> None:
    with run_server(weights=str(reference.checkpoint), precision="int8", cache_dir=str(int8_cache),
                    workers=1) as url:
        card = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert card["precision"] == ["int8"]
        worker = card["workers"][0]
        assert worker["backend"] == "openvino" and worker["mode"] == "int8"
        guard = worker["quantization"]["guard"]
        assert guard["passed"] is True and guard["held_out_samples"] == 32
        assert worker["guard_cosine"] == pytest.approx(guard["worst_cosine"], abs=1e-5)
        assert worker["self_test"]["passed"] is True
        assert worker["self_test"]["tolerance"]["name"] == "quantized (int8)"
        files = [("images", ("chelsea.jpg", encode(photo("chelsea"), "JPEG"), "image/jpeg"))]
        response = httpx.post(f"{url}/v1/classify", files=files, timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["results"][0]["predictions"]) == 5


def test_a_bad_quantisation_is_refused_and_never_served(reference: Reference, int8_cache: Path,
                                                        tmp_path: Path) -> None:
    """Calibrated on blank images: activation ranges far narrower than a photo's, so photos clip. The guard
    refuses it; `--prepare-only` exits 2 naming the figures; a server with it never reports ready."""
    blank = tmp_path / "blank"
    blank.mkdir()
    for i, colour in enumerate([(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (320, 240), colour).save(blank / f"{i}.png")
    (blank / "9-held-out.jpg").write_bytes(encode(photo("chelsea"), "JPEG"))  # 6th by name: held out, a photo
    settings = dict(weights=str(reference.checkpoint), precision="int8", cache_dir=str(int8_cache),
                    calibration_dir=str(blank), workers=1)
    assert prepare(server_settings(**settings)) == 2
    verdict = read_quantization(_int8_folder(int8_cache, blank)).guard
    assert not verdict.passed and "logit cosine" in verdict.reason()
    stamp = (_int8_folder(int8_cache, blank) / "quantization.json").stat().st_mtime_ns
    with run_server(wait=False, **settings) as url:
        reason = stays_unready(url, "refused by its guard")
        assert "CROSSVIT_CALIBRATION_DIR" in reason
        verdict_file = _int8_folder(int8_cache, blank) / "quantization.json"
        assert json.loads(verdict_file.read_text())["guard"]["passed"] is False
        assert verdict_file.stat().st_mtime_ns == stamp  # each start read the refusal; none quantised again


def test_a_cached_quantisation_serves_without_torch_or_nncf(int8_cache: Path, tmp_path: Path) -> None:
    """The lean install (no torch, no NNCF) serves what `--prepare-only` quantised; a calibration set nobody
    quantised is refused with the way to quantise it."""
    lean = _no_torch_env(tmp_path)
    with start_cli(tmp_path, cache_dir=int8_cache, precision="int8", workers=1, threads_per_worker=1,
                   extra_env=lean) as server:
        worker = httpx.get(f"{server.url}/v1/models", timeout=10).json()["workers"][0]
        assert worker["mode"] == "int8" and worker["quantization"]["guard"]["passed"] is True
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea", "coffee"):
        (photos / f"{name}.jpg").write_bytes(encode(photo(name), "JPEG"))
    with start_cli(tmp_path, wait=False, cache_dir=int8_cache, precision="int8", calibration_dir=photos,
                   workers=1, extra_env=lean) as server:
        def says_how() -> bool:
            response = httpx.get(f"{server.url}/readyz", timeout=10)
            assert response.status_code == 503
            return "pip install 'crossvit-serve[int8]'" in response.json()["error"]["message"]

        until(lambda: _answers(server.url) and says_how(), 120, "/readyz to say how to quantise")


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/readyz", timeout=5)
    except httpx.TransportError:
        return False
    return True


def test_a_worker_quantising_outlasts_the_start_limit(reference: Reference, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A worker that finds no quantisation makes one (about 20 s for the test model), past a 10 s start limit:
    it says so first, the watchdog gives the step its own budget, and the worker comes up on its first start."""
    with caplog.at_level(logging.INFO, logger="service.inference.pool"), run_server(
        weights=str(reference.checkpoint), precision="int8", cache_dir=str(tmp_path / "cache"), workers=1,
        worker_start_timeout_s=10,
    ) as url:
        worker = httpx.get(f"{url}/v1/models", timeout=10).json()["workers"][0]
    assert worker["mode"] == "int8" and worker["restarts"] == 0, worker
    steps = [r.step for r in caplog.records if r.getMessage() == "a worker's start is preparing"]  # type: ignore[attr-defined]
    assert steps == ["preparing the OpenVINO model", "quantising to INT8, or waiting for the worker that is",
                     "compiling and checking its mode"]
    quantising = [r for r in caplog.records if getattr(r, "step", "").startswith("quantising")][0]
    assert quantising.budget_s > 10  # type: ignore[attr-defined]
