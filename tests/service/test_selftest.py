"""The end-to-end self-test: a started worker takes work only once the golden images, through the served
path (the real decode and preprocessing in the server, the worker's slots, its backend and mode, the
served class names), reproduce the record made from PyTorch fp32 when the weights were prepared.

The failing starts are real servers with a real fault each: a broken preprocessing step (the test-only
hook swaps the colour channels), a label file with two classes' names swapped, a prepared model whose
weights file was damaged on disk.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.golden import (
    EXACT,
    REDUCED,
    GoldenRecord,
    compare,
    golden_images,
    golden_pixels,
    record_golden,
    reference_decode,
    tolerance_for,
)
from service.golden.record import top_k
from service.imaging.preprocess import InputSpec
from service.inference.assembly import prepare
from service.worker.backends.prepared import find_prepared
from tests.conftest import LIMITED_API_KEY, TEST_VARIANT, Reference, run_server, server_settings
from tests.service.serving import stays_unready
from weights.labels import imagenet_labels, load_labels

LABELS = imagenet_labels()


def _record(seed: int = 0) -> GoldenRecord:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((3, 2, 1000)) * 2).astype(np.float32)
    return record_golden(lambda x: logits, _spec(), LABELS, recorded="test")


def _spec() -> InputSpec:
    from model.variants import get_variant

    return InputSpec.from_variant(get_variant(TEST_VARIANT))


# -- the comparison -------------------------------------------------------------------------------------

def test_the_golden_images_cover_exif_progressive_jpeg_and_png() -> None:
    names = [image.name for image in golden_images()]
    assert names == ["astronaut.png", "chelsea.jpg", "coffee.jpg"]
    pixels = golden_pixels(reference_decode(_spec()))
    assert pixels.shape == (3, 3, 240, 240) and pixels.dtype == np.float32
    # chelsea is stored rotated with EXIF Orientation 6: decoded upright, like the photo the tests use
    assert b"Exif" in dict((i.name, i.data) for i in golden_images())["chelsea.jpg"][:200]


def test_a_record_survives_its_file(tmp_path: Path) -> None:
    record = _record()
    record.save(tmp_path / "golden.npz")
    loaded = GoldenRecord.load(tmp_path / "golden.npz")
    assert loaded.images == record.images and loaded.labels == record.labels and loaded.recorded == "test"
    np.testing.assert_array_equal(loaded.logits, record.logits)


def test_the_same_answers_pass_and_an_fp32_sized_error_passes_the_exact_tolerance() -> None:
    record = _record()
    assert compare(record, record.logits, LABELS, EXACT).passed
    nudged = record.logits * (1 + 1e-6)
    result = compare(record, nudged, LABELS, EXACT)
    assert result.passed, result.reason()
    assert result.worst_cosine > 0.99999


def test_a_bf16_sized_error_passes_only_the_reduced_tolerance() -> None:
    record = _record()
    noise = np.random.default_rng(1).standard_normal(record.logits.shape).astype(np.float32)
    served = record.logits + 0.01 * noise  # bf16-like: ~1e-2 relative on logits of scale ~6
    assert compare(record, served, LABELS, REDUCED).passed
    failed = compare(record, served, LABELS, EXACT)
    assert not failed.passed and "relative error" in failed.reason()


def test_other_answers_fail_naming_the_image_and_the_classes() -> None:
    record = _record()
    other = _record(seed=7).logits
    result = compare(record, other, LABELS, REDUCED)
    assert not result.passed
    assert re.search(r"astronaut\.png branch 0: logit cosine", result.reason())
    assert any("top-5 classes" in problem for problem in result.problems)


def test_a_reordered_label_list_fails_naming_the_class() -> None:
    record = _record()
    first = int(top_k(record.logits)[0, 0, 0])
    swapped = list(LABELS)
    swapped[first], swapped[first + 1 if first < 999 else 0] = swapped[first + 1 if first < 999 else 0], swapped[first]
    result = compare(record, record.logits, swapped, EXACT)
    assert not result.passed
    assert f"class {first} is named {swapped[first]!r} here but {LABELS[first]!r} in the record" in result.reason()


def test_two_close_classes_may_change_places_within_the_tolerance() -> None:
    """A record whose 1st and 2nd classes are closer than the mode can tell apart: a swap is no failure."""
    record = _record()
    logits = record.logits.copy()
    a, b = top_k(logits)[0, 0, :2]
    logits[0, 0, b] = logits[0, 0, a] - 1e-4
    record = GoldenRecord(record.images, logits, record.labels, record.recorded)
    served = logits.copy()
    served[0, 0, a], served[0, 0, b] = logits[0, 0, b], logits[0, 0, a]
    assert compare(record, served, LABELS, REDUCED).passed


# -- served: a correct start ---------------------------------------------------------------------------

def test_a_correct_start_is_ready_with_its_self_test_reported(server: str) -> None:
    """The main server (OpenVINO fp32, two workers): each passed, in the exact tolerance, against the record
    its preparation made; the metric counts them."""
    workers = httpx.get(f"{server}/v1/models", timeout=10).json()["workers"]
    for worker in workers:
        check = worker["self_test"]
        assert check["passed"] is True
        assert check["images"] == ["astronaut.png", "chelsea.jpg", "coffee.jpg"]
        assert check["tolerance"] == {"name": "exact (fp32)", "cosine": 0.99999, "rel_err": 0.0001}
        assert check["recorded"] == "preparation (PyTorch fp32)"
        assert check["worst_cosine"] >= 0.99999 and check["worst_rel_err"] <= 1e-4
        assert 0 < check["seconds"] < 10
    passed = re.search(r'^crossvit_self_tests_total\{outcome="passed"\} ([0-9.e+]+)$',
                       httpx.get(f"{server}/metrics").text, re.M)
    assert passed and float(passed.group(1)) >= len(workers)


def test_the_torch_backend_checks_against_its_own_start(torch_server: str) -> None:
    workers = httpx.get(f"{torch_server}/v1/models", timeout=10).json()["workers"]
    assert all(w["self_test"]["passed"] and w["self_test"]["recorded"] == "this worker's start (PyTorch fp32)"
               for w in workers)


def test_on_demand_behind_the_api_key_and_from_the_cli(limited: str) -> None:
    """POST /v1/admin/self-test needs the key and reports every ready worker; `crossvit-serve --self-test`
    asks the server its settings name and exits 0 when it passed."""
    assert httpx.post(f"{limited}/v1/admin/self-test", timeout=60).status_code == 401
    response = httpx.post(f"{limited}/v1/admin/self-test", headers={"Authorization": f"Bearer {LIMITED_API_KEY}"},
                          timeout=60)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["passed"] is True and [w["id"] for w in report["workers"]] == [0]
    assert report["workers"][0]["state"] == "ready"
    with ThreadPoolExecutor(4) as pool:  # the check waits for a free slot of a busy worker, then runs
        jobs = [pool.submit(_classify_twice, limited) for _ in range(4)]
        under_load = httpx.post(f"{limited}/v1/admin/self-test", timeout=60,
                                headers={"Authorization": f"Bearer {LIMITED_API_KEY}"})
        statuses = [status for job in jobs for status in job.result()]
    assert under_load.status_code == 200 and under_load.json()["passed"] is True, under_load.text
    assert statuses == [200] * 8
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSVIT_")}
    env.update({"CROSSVIT_PORT": limited.rsplit(":", 1)[1], "CROSSVIT_API_KEYS": LIMITED_API_KEY})
    cli = subprocess.run([sys.executable, "-m", "service.cli", "--self-test"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert '"passed": true' in cli.stdout
    env["CROSSVIT_API_KEYS"] = "not-the-key"
    refused = subprocess.run([sys.executable, "-m", "service.cli", "--self-test"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "invalid API key" in refused.stdout


# -- served: starts that must stay unready -------------------------------------------------------------

def _classify_twice(url: str) -> list[int]:
    from tests.photos import encode, photo

    files = [("images", ("chelsea.jpg", encode(photo("chelsea"), "JPEG"), "image/jpeg"))]
    headers = {"Authorization": f"Bearer {LIMITED_API_KEY}"}
    return [httpx.post(f"{url}/v1/classify", files=files, headers=headers, timeout=60).status_code for _ in range(2)]


def test_a_broken_preprocessing_step_keeps_the_server_unready(reference: Reference) -> None:
    with run_server(wait=False, weights=str(reference.checkpoint), backend="openvino", precision="fp32", workers=1,
                    test_preprocess_fault="bgr") as url:
        reason = stays_unready(url, "self-test failed")
        assert re.search(r"(astronaut\.png|chelsea\.jpg|coffee\.jpg) branch \d: logit cosine", reason), reason
        card = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert card["skipped_modes"][0]["mode"] == "openvino/fp32"
        assert card["skipped_modes"][0]["reason"].startswith("self-test failed")
        failed = re.search(r'^crossvit_self_tests_total\{outcome="failed"\} ([0-9.e+]+)$',
                           httpx.get(f"{url}/metrics").text, re.M)
        assert failed and float(failed.group(1)) >= 1
        # with its one mode refused, the restarted worker says so, and the server stays unready
        stays_unready(url, "was skipped")


def test_a_swapped_label_file_keeps_the_server_unready(reference: Reference, tmp_path: Path) -> None:
    """Two neighbouring names swapped, as a hand-edited or mis-generated label file would: the record's
    top classes come out named wrongly. Every class of the record's top-5 is checked, so the swap is
    placed on the first golden image's top-1 class."""
    top1 = _first_top1(reference)
    names = list(LABELS)
    names[top1], names[top1 + 1] = names[top1 + 1], names[top1]
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(names) + "\n")
    assert load_labels(labels)[top1] == LABELS[top1 + 1]
    with run_server(wait=False, weights=str(reference.checkpoint), backend="openvino", precision="fp32", workers=1,
                    labels_file=str(labels)) as url:
        reason = stays_unready(url, "self-test failed")
        assert f"class {top1} is named {LABELS[top1 + 1]!r} here but {LABELS[top1]!r} in the record" in reason


def test_a_corrupted_prepared_model_keeps_the_server_unready(reference: Reference, tmp_path: Path) -> None:
    """The prepared model's weights (model.bin) damaged on disk after preparation: the server never
    reports ready and says which check failed."""
    cache = tmp_path / "cache"
    settings = dict(weights=str(reference.checkpoint), backend="openvino", precision="fp32", workers=1,
                    cache_dir=str(cache))
    assert prepare(server_settings(**settings)) == 0
    found = find_prepared(cache, TEST_VARIANT, allow_random=True)
    assert found is not None
    weights = found[0] / "model.bin"
    data = bytearray(weights.read_bytes())
    rng = np.random.default_rng(0)
    for at in rng.integers(0, len(data) - 4, size=len(data) // 4096):  # one float in every 1024 overwritten
        data[at:at + 4] = np.float32(rng.standard_normal() * 10).tobytes()
    weights.write_bytes(bytes(data))
    with run_server(wait=False, **settings) as url:
        # the start-up guard (noise) or the self-test (the golden images), whichever sees it first
        reason = stays_unready(url, "no OpenVINO mode matches PyTorch fp32", "self-test failed")
        assert "dead" in reason or "starting" in reason


def _first_top1(reference: Reference) -> int:
    """The top-1 class (branch 0) of the first golden image, by the test weights in PyTorch fp32."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.variants import create_model

    model = create_model(TEST_VARIANT)
    load_checkpoint(model, reference.checkpoint)
    with torch.inference_mode():
        logits = model.eval().branch_logits(torch.from_numpy(golden_pixels(reference_decode(_spec()))[:1]))[0]
    top1 = int(logits[0].argmax())
    assert top1 < 999
    return top1


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("CROSSVIT_")]:
        monkeypatch.delenv(key)


def test_a_nan_fails_however_close_the_rest() -> None:
    record = _record()
    served = record.logits.copy()
    served[1, 0, 3] = np.nan
    result = compare(record, served, LABELS, REDUCED)
    assert not result.passed and "1 logits are not finite" in result.reason()


def test_a_label_fault_is_told_apart_from_a_numeric_one() -> None:
    """A mode is skipped for wrong numbers; wrong names are no fault of a mode (another would not mend them)."""
    record = _record()
    assert not compare(record, record.logits + 1.0, LABELS, EXACT).labels_differ
    assert compare(record, record.logits, list(reversed(LABELS)), EXACT).labels_differ


def test_gpu_fp32_is_held_to_the_reduced_tolerance() -> None:
    assert tolerance_for("fp32", "cpu") is EXACT
    assert tolerance_for("fp32", "cuda:0") is REDUCED  # TF32 convolutions
    assert tolerance_for("bf16", "cpu") is REDUCED
